"""What a result records besides its scores: package versions, the git commit, the hparams
and the state the method left in the model."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Any, Dict, Optional

import numpy as np
import torch

from .. import easyedit


def _easyeditor_version() -> str:
    try:
        version = importlib.metadata.version("easyeditor")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return f"{version} ({'release' if easyedit.is_release() else 'upstream checkout'})"


def package_versions() -> Dict[str, str]:
    import transformers

    import lemoe_easyedit

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "easyeditor": _easyeditor_version(),
        "lemoe_easyedit": getattr(lemoe_easyedit, "__version__", "unknown"),
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cuda": torch.version.cuda or "none",
    }
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    commit = _git_commit()
    if commit:
        out["lemoe_easyedit_git"] = commit
    return out


def _git_commit() -> Optional[str]:
    """``<commit>[+dirty]`` of the checkout this package runs from, if it is one."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not os.path.isdir(os.path.join(root, ".git")):
        return None
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--",
                                "lemoe_easyedit", "hparams"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) if head else None


def _method_state(model) -> Dict[str, Any]:
    """What the edited model holds, for the record (LEMoE experts and plans, GRACE keys)."""
    state: Dict[str, Any] = {}
    try:
        from ..injection import find_adaptor

        layer = find_adaptor(model)
    except Exception:  # pragma: no cover - defensive: never fail a run for bookkeeping
        layer = None
    if layer is not None:
        state["lemoe_experts"] = len(layer.slots)
        state["lemoe_plans"] = _jsonable(getattr(layer, "plans", []))
    try:
        from ..grace import find_grace

        g = find_grace(model)
    except Exception:
        g = None
    if g is not None:
        state["grace_keys"] = int(g.num_keys)
        state["grace_module"] = g.module_path
    return state


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, torch.Tensor):
        return _jsonable(x.tolist())
    return x


def _hparams_dict(hparams) -> Dict[str, Any]:
    import dataclasses

    if hasattr(hparams, "to_dict"):
        try:
            return _jsonable(hparams.to_dict())
        except Exception:  # pragma: no cover
            pass
    if dataclasses.is_dataclass(hparams):
        out = {}
        for f in dataclasses.fields(hparams):
            v = getattr(hparams, f.name)
            out[f.name] = v if isinstance(v, (int, float, str, bool, type(None), list, dict)) \
                else repr(v)
        return _jsonable(out)
    return {k: repr(v) for k, v in vars(hparams).items()}

