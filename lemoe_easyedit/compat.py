"""Everything lemoe_easyedit needs to run on top of EasyEdit, in one place.

EasyEdit exists in two forms (see ``docs``): the registry release ``easyeditor==0.0.1.dev0``
(October 2023, written for transformers 4.30 / torch 2.0 on CUDA) and an upstream git
checkout put on ``sys.path``. The upstream form imports and runs as it is, so it is used
unpatched. The release needs the following to import and run ROME, MEMIT and FT on
Python 3.11, transformers 4.57-5.x, torch 2.x, on CPU or any GPU. Every patch is scoped to
easyeditor: code outside it sees ``sys.modules``, ``transformers`` and the root logger as
they were.

1. Optional packages imported at load time but unused by ROME/MEMIT/FT (omegaconf, hydra,
   timm, torchvision, cv2, ...) get placeholder modules when they are not importable, only
   while easyeditor itself imports them; a placeholder raises ImportError naming the
   package when something actually uses it.
2. ``apply_chunking_to_forward``, ``prune_linear_layer`` and
   ``find_pruneable_heads_and_indices`` (gone from ``transformers.modeling_utils`` since
   4.57) exist there only during easyeditor's import.
3. Hard-coded ``f"cuda:{...}"`` device strings are rewritten, in memory, when an easyeditor
   module is compiled, into calls of :func:`resolve_device`. Rewritten code is never
   written to, nor read from, ``__pycache__``.
4. ``nethook.Trace`` presents a decoder block's bare-tensor output as the 1-tuple
   easyeditor's callers index into, and hands the tensor back to the model.
5. ``ALG_DICT['ROME']`` / ``ALG_DICT['MEMIT']`` run with the tokenizer padding on the right.
6. ROME/MEMIT second-moment statistics come from a local text file (``mom2_dataset``),
   cached under ``stats_dir``; nothing is downloaded and non-finite statistics are
   neither returned nor left in the cache.
7. ``BaseEditor.__init__`` loads any causal LM with the Auto classes and puts it on
   :func:`resolve_device` of ``hparams.device``.
8. Importing ``easyeditor.editors.editor`` no longer changes the root logger.
   ``BaseEditor`` still writes ``./logs/run.log`` under the current working directory,
   as the release does; a repeated ``BaseEditor`` no longer duplicates its log lines.

This module must not import other ``lemoe_easyedit`` modules: it is loaded on its own in
tests and by tools that only need the EasyEdit bridge.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import sys
import threading
import types
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

__all__ = [
    "INSTALL_COMMAND",
    "RELEASE_VERSION",
    "load_easyeditor",
    "is_release",
    "register_method",
    "uses_callable_restore",
    "resolve_device",
]

#: The only way the registry release can be installed on Python 3.11.
INSTALL_COMMAND = "pip install --no-deps easyeditor==0.0.1.dev0"
RELEASE_VERSION = "0.0.1.dev0"

_PKG = "easyeditor"

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

# Name of the resolver injected into the globals of every rewritten easyeditor module.
_DEVICE_HOOK = "__lemoe_device__"

_LOCK = threading.RLock()
_STATE: Dict[str, Any] = {"module": None, "finder": None}
_EXTRA_BATCHABLE: set = set()
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


# ------------------------------------------------------------------ release detection


def _release_init_file() -> Optional[Path]:
    """``easyeditor/__init__.py`` of the installed release distribution, if any."""
    try:
        dist = importlib.metadata.distribution(_PKG)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != RELEASE_VERSION:
        return None
    try:
        return Path(dist.locate_file(f"{_PKG}/__init__.py")).resolve()
    except (OSError, TypeError):
        return None


def _module_file(mod: Optional[types.ModuleType]) -> Optional[str]:
    if mod is not None:
        return getattr(mod, "__file__", None)
    loaded = sys.modules.get(_PKG)
    if loaded is not None:
        return getattr(loaded, "__file__", None)
    try:
        spec = importlib.util.find_spec(_PKG)
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
            return name == _PKG or name.startswith(_PKG + ".")
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
        if fullname != _PKG and not fullname.startswith(_PKG + "."):
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


# ------------------------------------------------------------------------- loading


def load_easyeditor() -> types.ModuleType:
    """Import ``easyeditor`` and make it work here; return the module.

    The registry release is imported with the patches listed in this module's docstring;
    an upstream checkout found first on ``sys.path`` is imported unpatched. Idempotent:
    later calls return the cached module. Raises ImportError naming
    ``pip install --no-deps easyeditor==0.0.1.dev0`` when easyeditor is not installed.

    Call it before anything imports easyeditor: the device rewrite happens when easyeditor
    compiles; after a plain import only the runtime patches can be applied (with a
    warning). Note that every ``BaseEditor`` (release behaviour, kept) writes
    ``./logs/run.log`` relative to the current working directory.
    """
    with _LOCK:
        if _STATE["module"] is not None:
            return _STATE["module"]
        loaded = sys.modules.get(_PKG)
        if loaded is None:
            # Leftovers of an earlier import that failed half-way were compiled without
            # the rewrite; import the package afresh and consistently.
            for name in [n for n in sys.modules if n.startswith(_PKG + ".")]:
                del sys.modules[name]
            try:
                spec = importlib.util.find_spec(_PKG)
            except (ImportError, ValueError):
                spec = None
            if spec is None:
                raise ImportError(
                    "easyeditor is not installed. Install the EasyEdit release with "
                    f"`{INSTALL_COMMAND}` (its pinned dependencies do not exist for "
                    "Python 3.11, hence --no-deps), or put an EasyEdit git checkout on "
                    "sys.path.")
        release_dir = _release_init_file()
        if not is_release(loaded):
            mod = loaded if loaded is not None else importlib.import_module(_PKG)
        elif loaded is not None:
            warnings.warn(
                "easyeditor was imported before lemoe_easyedit.compat.load_easyeditor(); "
                "its hard-coded 'cuda:N' device strings could not be patched, so editing "
                "needs a CUDA device. Call load_easyeditor() before importing easyeditor "
                "to run on any device.", RuntimeWarning, stacklevel=2)
            mod = loaded
            _install_source_finder(release_dir.parent)
            _patch_release_runtime(mod)
        else:
            _install_source_finder(release_dir.parent)
            mod = _import_release()
            _patch_release_runtime(mod)
        _STATE["module"] = mod
        return mod


def _install_source_finder(package_dir: Path) -> None:
    # Stays installed: easyeditor imports some of its modules lazily, inside functions.
    if _STATE["finder"] is None:
        finder = _ReleaseSourceFinder(package_dir)
        sys.meta_path.insert(0, finder)
        _STATE["finder"] = finder


def _import_release() -> types.ModuleType:
    import transformers.modeling_utils as modeling_utils

    root = logging.getLogger()
    root_level, root_handlers = root.level, list(root.handlers)
    added_names = []
    for name, fn in _removed_modeling_utils().items():
        if not hasattr(modeling_utils, name):
            setattr(modeling_utils, name, fn)
            added_names.append(name)
    placeholders = _PlaceholderFinder(_unimportable_optional_packages())
    sys.meta_path.insert(0, placeholders)
    try:
        mod = importlib.import_module(_PKG)
    finally:
        sys.meta_path.remove(placeholders)
        # easyeditor's modules keep their references; nobody else should find these.
        for name in placeholders.created:
            if isinstance(sys.modules.get(name), _PlaceholderModule):
                del sys.modules[name]
        for name in added_names:
            delattr(modeling_utils, name)
        # editors/editor.py runs logging.basicConfig(level=INFO) at import.
        for handler in list(root.handlers):
            if handler not in root_handlers:
                root.removeHandler(handler)
        root.setLevel(root_level)
    # Keep easyeditor's own INFO messages (and ./logs/run.log) as the release has them.
    ee_logger = logging.getLogger(_PKG)
    if ee_logger.level == logging.NOTSET:
        ee_logger.setLevel(logging.INFO)
    return mod


def _submodule(name: str) -> types.ModuleType:
    full = f"{_PKG}.{name}"
    mod = sys.modules.get(full)
    return mod if mod is not None else importlib.import_module(full)


def _rebind_everywhere(old: Any, new: Any) -> None:
    """Point every easyeditor module global that holds ``old`` (``from x import old``
    copies included) at ``new``."""
    for name, mod in list(sys.modules.items()):
        if mod is None or not (name == _PKG or name.startswith(_PKG + ".")):
            continue
        namespace = getattr(mod, "__dict__", {})
        for key, value in list(namespace.items()):
            if value is old:
                namespace[key] = new


def _patch_release_runtime(mod: types.ModuleType) -> None:
    nethook = _submodule("util.nethook")
    if not getattr(nethook.Trace, "_lemoe_patched", False):
        _rebind_everywhere(nethook.Trace, _make_trace_class(nethook))

    layer_stats_mod = _submodule("models.rome.layer_stats")
    if not getattr(layer_stats_mod.layer_stats, "_lemoe_patched", False):
        _rebind_everywhere(layer_stats_mod.layer_stats, _local_layer_stats)
    layer_stats_mod.load_dataset = _load_local_dataset

    alg_dict = _submodule("util.alg_dict").ALG_DICT
    for alg in ("ROME", "MEMIT"):
        if alg in alg_dict and not getattr(alg_dict[alg], "_lemoe_patched", False):
            alg_dict[alg] = _with_right_padding(alg_dict[alg])

    editor = _submodule("editors.editor")
    base = editor.BaseEditor
    if not getattr(base.__init__, "_lemoe_patched", False):
        base.__init__ = _wrap_base_editor_init(base.__init__)
    if hasattr(editor, "make_logs") and not getattr(editor.make_logs, "_lemoe_patched", False):
        editor.make_logs = _dedup_log_handlers(editor.make_logs, editor.LOG)

    _patch_batchable()


# ------------------------------------------------------------- nethook.Trace (item 4)


def _is_block_name(layer: Optional[str]) -> bool:
    """``model.layers.3`` / ``transformer.h.3``: a whole decoder block."""
    return isinstance(layer, str) and layer.rsplit(".", 1)[-1].isdigit()


def _make_trace_class(nethook: types.ModuleType) -> type:
    base = nethook.Trace

    class Trace(base):
        """``nethook.Trace`` for transformers whose decoder blocks return a bare tensor.

        easyeditor (written for tuple-returning blocks) indexes ``output[0]`` both in
        ``edit_output`` callbacks and in ``.output``; for a block layer the tensor is
        shown to it as a 1-tuple and whatever the callback returns is unwrapped again
        before it goes back to the model."""

        _lemoe_patched = True

        def __init__(self, module, layer=None, retain_output=True, retain_input=False,
                     clone=False, detach=False, retain_grad=False, edit_output=None,
                     stop=False):
            if not _is_block_name(layer):
                super().__init__(module, layer, retain_output=retain_output,
                                 retain_input=retain_input, clone=clone, detach=detach,
                                 retain_grad=retain_grad, edit_output=edit_output, stop=stop)
                return
            self.layer = layer
            self.stop = stop
            target = nethook.get_module(module, layer)

            def hook(_module, inputs, output):
                bare = isinstance(output, torch.Tensor)
                shown = (output,) if bare else output
                if retain_input:
                    self.input = nethook.recursive_copy(
                        inputs[0] if len(inputs) == 1 else inputs,
                        clone=clone, detach=detach, retain_grad=False)
                if edit_output:
                    shown = nethook.invoke_with_optional_args(
                        edit_output, output=shown, layer=self.layer)
                if retain_output:
                    self.output = nethook.recursive_copy(
                        shown, clone=clone, detach=detach, retain_grad=retain_grad)
                    if retain_grad:
                        # Same trivial copy as the original: lets in-place ops follow.
                        shown = nethook.recursive_copy(self.output, clone=True, detach=False)
                if stop:
                    raise nethook.StopForward()
                if bare and isinstance(shown, (tuple, list)):
                    return shown[0]
                return shown

            self.registered_hook = target.register_forward_hook(hook)

    Trace.__qualname__ = Trace.__name__ = "Trace"
    Trace.__module__ = base.__module__
    return Trace


# ----------------------------------------------------------------- padding (item 5)


def _with_right_padding(apply_fn: Callable) -> Callable:
    @functools.wraps(apply_fn)
    def apply_with_right_padding(model, tok, *args, **kwargs):
        # ROME/MEMIT locate the subject/target tokens assuming right padding; transformers
        # 5 Llama tokenizers pad left by default, which makes them produce NaN.
        previous = getattr(tok, "padding_side", None)
        if previous is not None:
            tok.padding_side = "right"
        try:
            return apply_fn(model, tok, *args, **kwargs)
        finally:
            if previous is not None:
                tok.padding_side = previous

    apply_with_right_padding._lemoe_patched = True
    return apply_with_right_padding


# --------------------------------------------------------------- statistics (item 6)


_TEXT_SUFFIXES = (".txt", ".json", ".jsonl", ".text")


def _read_local_texts(path: Path) -> List[str]:
    """Documents of a local text file: .txt one per non-empty line; .json a list of
    strings or of objects with a "text" field; .jsonl one such item per line."""

    def as_text(item, where):
        if isinstance(item, str):
            return item
        if isinstance(item, dict) and isinstance(item.get("text"), str):
            return item["text"]
        raise ValueError(f"{where}: expected a string or an object with a 'text' string")

    suffix = path.suffix.lower()
    if suffix == ".json":
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, list):
            raise ValueError(f"{path}: a .json mom2_dataset must hold a JSON list")
        texts = [as_text(item, f"{path}[{i}]") for i, item in enumerate(data)]
    elif suffix == ".jsonl":
        texts = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    texts.append(as_text(json.loads(line), f"{path}:{lineno}"))
    else:
        with open(path, encoding="utf-8") as f:
            texts = [line.strip() for line in f]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"mom2_dataset {path} holds no text")
    return texts


def _local_text_file(ds_name: Any) -> Optional[Path]:
    """The file ``mom2_dataset`` names, or None for a hub dataset name."""
    text = os.fspath(ds_name) if isinstance(ds_name, (str, os.PathLike)) else None
    if not text:
        return None
    path = Path(os.path.expanduser(text))
    if path.is_file():
        return path.resolve()
    looks_like_path = path.suffix.lower() in _TEXT_SUFFIXES or text.startswith((".", "/", "~"))
    if looks_like_path:
        raise ValueError(f"mom2_dataset file {text!r} does not exist")
    return None


def _dataset_cache_name(path: Path) -> str:
    """Short stable name for a local statistics corpus: file stem + content hash, so that
    editing the file invalidates the cache and the path never ends up in a file name."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.stem)[:40] or "corpus"
    return f"{stem}-{digest.hexdigest()[:10]}"


def _hub_dataset_error(ds_name: Any, cache_file: Path) -> ValueError:
    return ValueError(
        f"mom2_dataset={ds_name!r} names a hub dataset, and statistics are never "
        "downloaded. Set `mom2_dataset` in the hparams to a local text file (.txt: one "
        "document per non-empty line; .json/.jsonl: strings or objects with a 'text' "
        f"field). A precomputed cache under stats_dir is used when present: {cache_file} "
        "does not exist.")


def _load_local_dataset(path, *args, **kwargs):
    """Stand-in for ``datasets.load_dataset`` in layer_stats: local files only."""
    local = _local_text_file(path)
    if local is None:
        raise ValueError(
            f"{path!r} is not a local file; lemoe_easyedit computes statistics from a local "
            "text file only (set `mom2_dataset` to one)")
    return {"train": [{"text": t} for t in _read_local_texts(local)]}


def _max_positions(config) -> int:
    for attr in ("n_positions", "max_sequence_length", "max_position_embeddings"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    raise NotImplementedError(f"cannot tell the context length of {type(config).__name__}")


def _input_device(model) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def _check_finite_stats(stat, cache_file: Path) -> None:
    import numpy as np

    state = stat.state_dict()
    counts = [v for k, v in state.items() if k.rsplit(".", 1)[-1] == "count"]
    bad = [k for k, v in state.items()
           if isinstance(v, np.ndarray) and v.dtype.kind in "fc" and not np.isfinite(v).all()]
    if bad or any(int(c) == 0 for c in counts):
        if cache_file.exists():
            cache_file.unlink()
        what = f"non-finite values in {', '.join(bad)}" if bad else "no tokens"
        raise FloatingPointError(
            f"layer statistics for the cache {cache_file} have {what}; the cache file was "
            "removed. Check the model in float32, the tokenizer padding and mom2_dataset.")


def _local_layer_stats(model, tokenizer, layer_name, stats_dir, ds_name, to_collect,
                       model_name=None, sample_size=None, precision=None, batch_tokens=None,
                       download=True, progress=None, force_recompute=False, hparams=None):
    """Drop-in for the release's ``layer_stats``: same cache layout under ``stats_dir``
    for hub names (so existing caches are used), a local-text corpus otherwise, no
    downloads, no DataLoader workers, inputs on the model's device, finite results only.
    """
    ls = _submodule("models.rome.layer_stats")
    rs = _submodule("util.runningstats")
    nethook = _submodule("util.nethook")

    npos = _max_positions(model.config)
    if batch_tokens is None:
        batch_tokens = npos * 3  # tokens per sub-batch, as in the release
    precision = precision or "float64"
    dtype = getattr(torch, precision)
    size_suffix = "" if sample_size is None else f"_{sample_size}"
    if batch_tokens < npos:
        size_suffix = f"_t{batch_tokens}" + size_suffix
    if model_name is None:
        model_name = model.config._name_or_path.replace("/", "_")
    local = _local_text_file(ds_name)
    ds_key = _dataset_cache_name(local) if local is not None else str(ds_name)
    cache_file = (Path(stats_dir) / model_name / f"{ds_key}_stats" /
                  f"{layer_name}_{precision}_{'-'.join(sorted(to_collect))}{size_suffix}.npz")

    def dataset():  # only called by tally when the cache cannot be used
        if local is None:
            raise _hub_dataset_error(ds_name, cache_file)
        texts = _read_local_texts(local)
        return ls.TokenizedDataset([{"text": t} for t in texts], tokenizer,
                                   maxlen=min(npos, batch_tokens))

    device = _input_device(model)
    stat = rs.CombinedStat(**{k: ls.STAT_TYPES[k]() for k in to_collect})
    loader = rs.tally(
        stat, dataset, cache=None if force_recompute else cache_file,
        sample_size=sample_size, batch_size=100, collate_fn=ls.length_collation(batch_tokens),
        pin_memory=device.type == "cuda", random_sample=1,
        # Workers would fork a process holding the model for a few hundred short texts.
        num_workers=0,
    )
    if progress is not None:
        loader = progress(loader, total=-(-sample_size // 100) if sample_size else None)
    with torch.no_grad():
        for batch_group in loader:
            for batch in batch_group:
                batch = ls.dict_to_(batch, device)
                with nethook.Trace(model, layer_name, retain_input=True, retain_output=False,
                                   stop=True) as tr:
                    model(**batch)
                feats = ls.flatten_masked_batch(tr.input, batch["attention_mask"])
                stat.add(feats.to(dtype=dtype))
    _check_finite_stats(stat, cache_file)
    return stat


_local_layer_stats._lemoe_patched = True


# ------------------------------------------------------------- BaseEditor (item 7)


def hparams_dtype(hparams) -> torch.dtype:
    """The dtype a method's model is loaded in: ``dtype``/``torch_dtype`` or ``fp16`` of the
    hparams, else float32."""
    # The release ran under transformers 4.30, whose from_pretrained loaded float32;
    # transformers 5 defaults to the checkpoint's dtype (often bf16), which ROME/MEMIT's
    # matrix inverses do not tolerate.
    for attr in ("dtype", "torch_dtype"):
        value = getattr(hparams, attr, None)
        if isinstance(value, torch.dtype):
            return value
        if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
            return getattr(torch, value)
    if getattr(hparams, "fp16", False) is True:
        return torch.float16
    return torch.float32


def _load_model_and_tokenizer(name: str, hparams):
    import transformers
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM,
                              AutoTokenizer)

    lowered = name.lower()
    # The release trusted remote code for exactly these families.
    remote = any(k in lowered for k in ("baichuan", "internlm"))
    config = AutoConfig.from_pretrained(name, trust_remote_code=remote)
    seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    model_cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    kwargs = {dtype_key: hparams_dtype(hparams),
              "device_map": "auto" if getattr(hparams, "model_parallel", False) else None}
    if remote:
        kwargs["trust_remote_code"] = True
    model = model_cls.from_pretrained(name, **kwargs)
    tok = AutoTokenizer.from_pretrained(name, trust_remote_code=remote)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    if not seq2seq:
        tok.padding_side = "right" if hparams.alg_name in ("ROME", "MEMIT") else "left"
    return model, tok


def _wrap_base_editor_init(original_init: Callable) -> Callable:
    @functools.wraps(original_init)
    def __init__(self, hparams, *args, **kwargs):
        name = getattr(hparams, "model_name", None)
        lowered = name.lower() if isinstance(name, str) else ""
        # gpt-3.5 (FT-Api) has no local model; chatglm needs the release's own recipe.
        if not isinstance(name, str) or "gpt-3.5" in lowered or "chatglm" in lowered:
            return original_init(self, hparams, *args, **kwargs)
        model, tok = _load_model_and_tokenizer(name, hparams)
        parallel = bool(getattr(hparams, "model_parallel", False))
        off_cuda = parallel and getattr(model.device, "type", "cpu") != "cuda"
        if off_cuda:
            # The release parses the CUDA index out of str(model.device).
            hparams.model_parallel, hparams.device = False, "cpu"
        hparams.model_name = (model, tok)
        try:
            original_init(self, hparams, *args, **kwargs)
        finally:
            hparams.model_name = name
            if off_cuda:
                hparams.model_parallel = True
        self.model_name = name
        if not parallel:
            self.model.to(resolve_device(getattr(hparams, "device", None)))

    __init__._lemoe_patched = True
    return __init__


def _dedup_log_handlers(make_logs: Callable, logger: logging.Logger) -> Callable:
    @functools.wraps(make_logs)
    def wrapper(*args, **kwargs):
        # The release adds a file and a stream handler per BaseEditor, so every line
        # was repeated once per editor created in the process (and file handles leaked).
        before = list(logger.handlers)
        result = make_logs(*args, **kwargs)
        for handler in list(logger.handlers):
            if handler in before:
                continue
            duplicate = any(
                type(old) is type(handler) and
                getattr(old, "baseFilename", None) == getattr(handler, "baseFilename", None)
                for old in before)
            if duplicate:
                logger.removeHandler(handler)
                handler.close()
        return result

    wrapper._lemoe_patched = True
    return wrapper


# ------------------------------------------------------------------- registering


def _patch_batchable() -> None:
    try:
        batch_editor = _submodule("editors.batch_editor")
    except ImportError:
        return
    cls = getattr(batch_editor, "BatchEditor", None)
    current = getattr(cls, "is_batchable_method", None) if cls is not None else None
    if current is None or getattr(current, "_lemoe_patched", False):
        return

    def is_batchable_method(alg_name: str):
        return current(alg_name) or alg_name in _EXTRA_BATCHABLE

    is_batchable_method._lemoe_patched = True
    # The release's BatchEditor is an Enum of hard-coded names; only the method is
    # replaced, the members stay as they are.
    setattr(cls, "is_batchable_method", staticmethod(is_batchable_method))


def _easyeditor_modules() -> List[types.ModuleType]:
    return [m for n, m in list(sys.modules.items())
            if m is not None and (n == _PKG or n.startswith(_PKG + "."))]


def _restore_name_holders() -> List[types.ModuleType]:
    holders = []
    try:
        holders.append(_submodule("util.alg_dict"))
    except ImportError:
        pass
    holders += [m for m in _easyeditor_modules() if m not in holders]
    return [m for m in holders if hasattr(m, "CALLABLE_RESTORE_ALGS")]


def register_method(name: str, apply_fn: Callable, hparams_cls: Optional[type] = None) -> None:
    """Register an editing method with the loaded easyeditor.

    Adds ``name -> apply_fn`` to the ``ALG_DICT`` dict object of
    ``easyeditor.util.alg_dict`` (which ``editors/editor.py`` star-imports, so the object
    must be mutated, not rebound), adds ``name`` to ``CALLABLE_RESTORE_ALGS`` where the
    loaded easyeditor has one (upstream), makes ``BatchEditor.is_batchable_method(name)``
    true, and exposes ``hparams_cls`` as ``easyeditor.<ClassName>`` if that name is free.
    """
    mod = load_easyeditor()
    alg_dict_mod = _submodule("util.alg_dict")
    alg_dicts = [alg_dict_mod.ALG_DICT]
    for m in _easyeditor_modules():
        other = getattr(m, "ALG_DICT", None)
        if isinstance(other, dict) and all(other is not d for d in alg_dicts):
            alg_dicts.append(other)
    for table in alg_dicts:
        table[name] = apply_fn

    seen = set()
    for holder in _restore_name_holders():
        names = holder.CALLABLE_RESTORE_ALGS
        if id(names) in seen:
            continue
        seen.add(id(names))
        if isinstance(names, set):
            names.add(name)
        elif isinstance(names, list):
            if name not in names:
                names.append(name)
        elif isinstance(names, (tuple, frozenset)) and name not in names:
            holder.CALLABLE_RESTORE_ALGS = type(names)(list(names) + [name])

    _EXTRA_BATCHABLE.add(name)
    _patch_batchable()

    if hparams_cls is not None and not hasattr(mod, hparams_cls.__name__):
        setattr(mod, hparams_cls.__name__, hparams_cls)


def uses_callable_restore() -> bool:
    """True when the loaded easyeditor restores a method listed in
    ``CALLABLE_RESTORE_ALGS`` by calling the ``weights_copy`` it returned (upstream);
    False for the release, which restores from a dict of parameter name -> tensor."""
    mod = load_easyeditor()
    # Every edit call asks; the answer changes only when easyeditor modules are imported
    # (a scan of sys.modules costs a millisecond, a few percent of a small edit call).
    key = (id(mod), len(sys.modules))
    if _STATE.get("callable_restore_key") != key:
        _STATE["callable_restore"] = bool(_restore_name_holders())
        _STATE["callable_restore_key"] = key
    return _STATE["callable_restore"]
