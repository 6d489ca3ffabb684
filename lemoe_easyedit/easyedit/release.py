"""The EasyEdit registry release ``easyeditor==0.0.1.dev0``: how to recognise it, and what it
needs to import on Python 3.11 and transformers 4.57-5.x.

* Optional packages imported at load time but unused by ROME/MEMIT/FT/LEMoE (omegaconf,
  hydra, timm, torchvision, cv2, ...) get placeholder modules when they are not importable,
  only while easyeditor itself imports them; a placeholder raises ImportError naming the
  package when something actually uses it.
* ``apply_chunking_to_forward``, ``prune_linear_layer`` and
  ``find_pruneable_heads_and_indices`` (gone from ``transformers.modeling_utils`` since 4.57)
  exist there only during easyeditor's import.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import sys
import types
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

#: The only way the registry release can be installed on Python 3.11.
INSTALL_COMMAND = "pip install --no-deps easyeditor==0.0.1.dev0"
RELEASE_VERSION = "0.0.1.dev0"

PKG = "easyeditor"

# Packages the release imports at load time that ROME/MEMIT/FT never use. Found by
# importing the release with each of them missing; the pip name is for error messages.
_OPTIONAL_PACKAGES: Dict[str, str] = {
    "omegaconf": "omegaconf",
    "hydra": "hydra-core",
    "timm": "timm",
    "torchvision": "torchvision",
    "cv2": "opencv-python",
    "openai": "openai",
    "sentence_transformers": "sentence-transformers",
    "nltk": "nltk",
    "iopath": "iopath",
    "einops": "einops",
    "peft": "peft",
    "datasets": "datasets",
    "fairscale": "fairscale",
    "seaborn": "seaborn",
    "pandas": "pandas",
    "PIL": "pillow",
    "matplotlib": "matplotlib",
    "scipy": "scipy",
    "sklearn": "scikit-learn",
}

_REMOVED_MODELING_UTILS = (
    "apply_chunking_to_forward",
    "prune_linear_layer",
    "find_pruneable_heads_and_indices",
)

# ------------------------------------------------------------------ release detection


def _release_init_file() -> Optional[Path]:
    """``easyeditor/__init__.py`` of the installed release distribution, if any."""
    try:
        dist = importlib.metadata.distribution(PKG)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != RELEASE_VERSION:
        return None
    try:
        return Path(dist.locate_file(f"{PKG}/__init__.py")).resolve()
    except (OSError, TypeError):
        return None


def _module_file(mod: Optional[types.ModuleType]) -> Optional[str]:
    if mod is not None:
        return getattr(mod, "__file__", None)
    loaded = sys.modules.get(PKG)
    if loaded is not None:
        return getattr(loaded, "__file__", None)
    try:
        spec = importlib.util.find_spec(PKG)
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None else None


def is_release(mod: Optional[types.ModuleType] = None) -> bool:
    """True when ``mod`` (default: the loaded, else the importable ``easyeditor``) is the
    installed registry release 0.0.1.dev0; False for an upstream checkout on ``sys.path``
    (or anything else that is not the installed distribution's own files)."""
    file = _module_file(mod)
    release = _release_init_file()
    if file is None or release is None:
        return False
    try:
        return Path(file).resolve() == release
    except OSError:
        return False


# ------------------------------------------------------------------ optional packages


class _PlaceholderMeta(type):
    """Metaclass of the stand-ins for names taken from a missing package: importing and
    attribute access work (easyeditor does both at load time), using them raises."""

    def __call__(cls, *args, **kwargs):
        raise ImportError(cls._lemoe_message)

    def __getattr__(cls, attr):
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        return _placeholder_attr(f"{cls._lemoe_qualname}.{attr}", cls._lemoe_root,
                                 cls._lemoe_reason)


def _missing_message(what: str, root: str, reason: str) -> str:
    pip_name = _OPTIONAL_PACKAGES.get(root, root)
    return (f"{what} needs the optional package '{root}', which is not importable here "
            f"({reason}). easyeditor imports it at load time but ROME, MEMIT and FT do not "
            f"use it; to use this feature install it: pip install {pip_name}")


def _placeholder_attr(qualname: str, root: str, reason: str) -> type:
    return _PlaceholderMeta(qualname.rsplit(".", 1)[-1], (), {
        "_lemoe_qualname": qualname,
        "_lemoe_root": root,
        "_lemoe_reason": reason,
        "_lemoe_message": _missing_message(qualname, root, reason),
    })


class _PlaceholderModule(types.ModuleType):
    """Stand-in for a module of a package that cannot be imported."""

    def __init__(self, name: str, root: str, reason: str):
        super().__init__(name, f"placeholder for the missing package {root!r}")
        self.__path__ = []  # a package, so that `import root.sub` reaches the finder
        self._lemoe_root = root
        self._lemoe_reason = reason

    def __getattr__(self, attr):
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        return _placeholder_attr(f"{self.__name__}.{attr}", self._lemoe_root,
                                 self._lemoe_reason)


def _imported_from_easyeditor() -> bool:
    """Whether the import being resolved was asked for by easyeditor's own code.

    Placeholders are served only then, so that availability probes of other libraries
    (transformers calls ``find_spec('torchvision')``...) during the import window still
    see the truth."""
    frame = sys._getframe(2)
    while frame is not None:
        filename = frame.f_code.co_filename
        name = frame.f_globals.get("__name__") or ""
        in_import_machinery = filename.startswith("<frozen importlib") or \
            name == "importlib" or name.startswith("importlib.")
        if not in_import_machinery:
            return name == PKG or name.startswith(PKG + ".")
        frame = frame.f_back
    return False


class _PlaceholderFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves placeholder modules for the packages in ``roots`` to easyeditor's import."""

    def __init__(self, roots: Dict[str, str]):
        self.roots = roots  # root package -> why it is not importable
        self.created: List[str] = []

    def find_spec(self, fullname, path=None, target=None):
        root = fullname.partition(".")[0]
        if root not in self.roots or not _imported_from_easyeditor():
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        root = spec.name.partition(".")[0]
        self.created.append(spec.name)
        return _PlaceholderModule(spec.name, root, self.roots[root])

    def exec_module(self, module):
        pass


def _unimportable_optional_packages() -> Dict[str, str]:
    """The optional packages that cannot be imported here, with the reason.

    An installed package is imported for real (easyeditor would import it anyway); one
    whose import fails (timm/torchvision built for another torch, say) is unloaded again
    and replaced like a missing one."""
    broken: Dict[str, str] = {}
    for root in _OPTIONAL_PACKAGES:
        if root in sys.modules:
            continue
        try:
            spec = importlib.util.find_spec(root)
        except (ImportError, ValueError) as exc:
            spec, why = None, f"{type(exc).__name__}: {exc}"
        else:
            why = "not installed"
        if spec is None:
            broken[root] = why
            continue
        before = set(sys.modules)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                importlib.import_module(root)
        except Exception as exc:  # any failure at import makes the package unusable
            for name in set(sys.modules) - before:
                if name == root or name.startswith(root + "."):
                    sys.modules.pop(name, None)
            broken[root] = f"import failed: {type(exc).__name__}: {exc}"
    return broken


# -------------------------------------------------- transformers names gone since 4.57


def _find_pruneable_heads_and_indices(heads, n_heads, head_size, already_pruned_heads):
    # Which rows of a (n_heads * head_size) projection survive pruning `heads`, given that
    # heads in `already_pruned_heads` are gone and shifted the remaining head indices.
    heads = set(heads) - set(already_pruned_heads)
    keep = torch.ones(n_heads, head_size, dtype=torch.bool)
    for head in heads:
        shift = sum(1 for pruned in already_pruned_heads if pruned < head)
        keep[head - shift] = False
    index = torch.arange(n_heads * head_size)[keep.view(-1)].long()
    return heads, index


def _prune_linear_layer(layer, index, dim=0):
    index = index.to(layer.weight.device)
    weight = layer.weight.index_select(dim, index).detach().clone()
    bias = None
    if layer.bias is not None:
        bias = (layer.bias if dim == 1 else layer.bias[index]).detach().clone()
    shape = list(layer.weight.size())
    shape[dim] = len(index)
    new = torch.nn.Linear(shape[1], shape[0], bias=bias is not None).to(layer.weight.device)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def _apply_chunking_to_forward(forward_fn, chunk_size, chunk_dim, *input_tensors):
    if chunk_size <= 0:
        return forward_fn(*input_tensors)
    n_chunks = input_tensors[0].shape[chunk_dim] // chunk_size
    pieces = zip(*(t.chunk(n_chunks, dim=chunk_dim) for t in input_tensors))
    return torch.cat([forward_fn(*piece) for piece in pieces], dim=chunk_dim)


def _removed_modeling_utils() -> Dict[str, Callable]:
    try:
        from transformers import pytorch_utils
    except ImportError:
        pytorch_utils = None
    own = {
        "apply_chunking_to_forward": _apply_chunking_to_forward,
        "prune_linear_layer": _prune_linear_layer,
        "find_pruneable_heads_and_indices": _find_pruneable_heads_and_indices,
    }
    return {name: getattr(pytorch_utils, name, None) or own[name] for name in own}


