"""Devices: EasyEdit's ``hparams.device`` values mapped to devices this machine has, and the
release's hard-coded ``f"cuda:{...}"`` strings rewritten into calls of that mapping when an
easyeditor module is compiled (never written to, nor read from, ``__pycache__``)."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from .release import PKG

# Name of the resolver injected into the globals of every rewritten easyeditor module.
_DEVICE_HOOK = "__lemoe_device__"
_WARNED_DEVICES: set = set()

# --------------------------------------------------------------------------- devices


def resolve_device(device: Any = None) -> torch.device:
    """Map an EasyEdit ``hparams.device`` value to a device that exists on this machine.

    ``0``, ``"0"`` (and ``0.0``, which EasyEdit's YAML loader makes of ``"0"``) mean
    ``cuda:0`` when CUDA is available and the CPU otherwise; a negative index means the
    CPU. ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` and ``torch.device`` objects are
    taken as they are, except that a CUDA or MPS device asked for on a machine without one
    falls back to the CPU with a warning (EasyEdit hparams files are written for GPUs).
    ``None`` means the default accelerator, else the CPU.
    """
    if isinstance(device, bool):
        raise TypeError(f"device must be an int, str or torch.device, got {device!r}")
    if isinstance(device, float) and device.is_integer():
        device = int(device)
    if device is None:
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if isinstance(device, int):
        if device < 0 or not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", device)
    if isinstance(device, str):
        text = device.strip()
        if re.fullmatch(r"-?\d+", text):
            return resolve_device(int(text))
        device = torch.device(text)
    if not isinstance(device, torch.device):
        raise TypeError(f"device must be an int, str or torch.device, got {device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        return _fallback_to_cpu(device)
    if device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            return _fallback_to_cpu(device)
    return device


def _fallback_to_cpu(device: torch.device) -> torch.device:
    key = str(device)
    if key not in _WARNED_DEVICES:
        _WARNED_DEVICES.add(key)
        warnings.warn(f"device {key!r} is not available on this machine; using the CPU",
                      RuntimeWarning, stacklevel=3)
    return torch.device("cpu")

# ------------------------------------------------------- device rewriting at compile


# f"cuda:{expr}" / f'cuda:{expr}' with a simple expression (no nested braces or quotes,
# single line, so that rewritten lines keep their numbers for tracebacks).
_CUDA_FSTRING = re.compile(r"""\bf(["'])cuda:\{([^{}"'\n]+)\}\1""")
# util/perplexity.py moves inputs with .to("cuda").
_TO_BARE_CUDA = re.compile(r"""\.to\((["'])cuda\1\)""")


def _rewrite_device_source(text: str) -> str:
    """Replace easyeditor's hard-coded CUDA device strings by calls of the resolver."""
    if "cuda" not in text:
        return text
    text = _CUDA_FSTRING.sub(lambda m: f"{_DEVICE_HOOK}({m.group(2).strip()})", text)
    return _TO_BARE_CUDA.sub(f".to({_DEVICE_HOOK}(None))", text)


def _easyeditor_device(device: Any = None) -> torch.device:
    return resolve_device(device)


class _RewritingLoader(importlib.machinery.SourceFileLoader):
    """Compiles an easyeditor module from its rewritten source.

    ``get_code`` never consults or writes bytecode caches: cached bytecode of the original
    source would skip the rewrite, and rewritten bytecode in ``__pycache__`` would leak
    into a plain ``import easyeditor`` in another process."""

    def get_code(self, fullname):
        path = self.get_filename(fullname)
        source = importlib.util.decode_source(self.get_data(path))
        return compile(_rewrite_device_source(source), path, "exec", dont_inherit=True)

    def set_data(self, path, data, *, _mode=0o666):
        # Bytecode must never be written for rewritten modules.
        return None

    def exec_module(self, module):
        module.__dict__[_DEVICE_HOOK] = _easyeditor_device
        super().exec_module(module)


class _ReleaseSourceFinder(importlib.abc.MetaPathFinder):
    """Routes the release's own modules (and nothing else) through _RewritingLoader."""

    def __init__(self, package_dir: Path):
        self.package_dir = package_dir

    def find_spec(self, fullname, path=None, target=None):
        if fullname != PKG and not fullname.startswith(PKG + "."):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.origin is None or \
                not isinstance(spec.loader, importlib.machinery.SourceFileLoader):
            return None
        try:
            origin = Path(spec.origin).resolve()
        except OSError:
            return None
        if self.package_dir not in origin.parents:
            return None  # another easyeditor (an upstream checkout) is left alone
        spec.loader = _RewritingLoader(fullname, spec.origin)
        return spec


