"""The hparams YAML files this project ships, and the paths written in them.

The files live in the repository's top-level ``hparams/<METHOD>/<name>.yaml`` (where EasyEdit
users expect them). The package reaches them as ``lemoe_easyedit/shipped_hparams``: in a
checkout that is a symbolic link to ``../hparams``; a wheel or a non-editable install
carries a copy of the same files (package data), so one source serves both and nothing can
drift. A name such as ``"tiny-llama"`` therefore resolves from any working directory.

A relative path inside a YAML file (``model_name``, ``mom2_dataset``) is found, in order,
relative to the working directory (EasyEdit's own rule), to the YAML file's folder, and to
the folder holding the ``lemoe_easyedit`` package (the shipped models:
``lemoe_easyedit/testbed_assets/...``). A value found nowhere is left as it is: a hub name
such as ``meta-llama/Llama-2-7b-hf``.
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path
from typing import List, Optional, Union

PathLike = Union[str, "os.PathLike[str]"]

#: The folder holding ``lemoe_easyedit/`` (the checkout's root, or site-packages).
PACKAGE_PARENT = Path(__file__).resolve().parent.parent


def shipped_hparams_dir() -> Path:
    """``shipped_hparams`` of the installed package (``<METHOD>/<name>.yaml`` inside)."""
    return Path(str(importlib.resources.files("lemoe_easyedit") / "shipped_hparams"))


def shipped_hparams(method: str) -> List[str]:
    """Names of the YAML files shipped for ``method`` (e.g. ``["llama-7b", ...]``)."""
    folder = shipped_hparams_dir() / method
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def find_hparams_file(name_or_path: PathLike, method: str = "LEMoE") -> Path:
    """A YAML file by path, by path without ``.yaml``, or by name among those shipped for
    ``method``. Raises FileNotFoundError listing what was tried and the shipped names."""
    p = Path(os.path.expandvars(os.path.expanduser(str(name_or_path))))
    shipped = shipped_hparams_dir() / method
    candidates = [p, p.with_name(p.name + ".yaml")]
    if len(p.parts) == 1:
        candidates += [shipped / p.name, shipped / (p.name + ".yaml")]
    for c in candidates:
        if c.is_file():
            return c
    names = ", ".join(shipped_hparams(method)) or "none"
    raise FileNotFoundError(
        f"no {method} hparams file at {str(name_or_path)!r} (working directory "
        f"{os.getcwd()}); names shipped for {method}: {names}")


def resolve_relative(value: Optional[str], hparams_file: Optional[PathLike] = None,
                     must_exist: bool = False) -> Optional[str]:
    """``value`` (a path written in a YAML file) made usable from any working directory.

    Expands ``~`` and variables; a relative path is looked up as the module docstring says.
    A value found nowhere is returned expanded (a hub name), or raises FileNotFoundError when
    ``must_exist``. Non-strings (a loaded ``(model, tokenizer)``) pass through."""
    if not isinstance(value, str):
        return value
    text = os.path.expandvars(os.path.expanduser(value))
    p = Path(text)
    if p.is_absolute() or p.exists():
        return str(p)
    bases = ([Path(hparams_file).resolve().parent] if hparams_file else []) + [PACKAGE_PARENT]
    for base in bases:
        if (base / p).exists():
            return str(base / p)
    if must_exist:
        raise FileNotFoundError(
            f"{value!r} exists neither in {os.getcwd()} nor in "
            f"{' nor in '.join(str(b) for b in bases)}")
    return text
