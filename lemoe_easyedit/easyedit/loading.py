"""Loading easyeditor and the patches every method needs (LEMoE included).

An upstream EasyEdit checkout found first on ``sys.path`` imports and runs as it is, so it is
used unpatched. The registry release is imported with :mod:`.release`'s import shims and
:mod:`.devices`' device rewrite, and then:

* ``BaseEditor.__init__`` loads any causal LM with the Auto classes, in the hparams' dtype,
  and puts it on :func:`resolve_device` of ``hparams.device``;
* importing ``easyeditor.editors.editor`` no longer changes the root logger, and a repeated
  ``BaseEditor`` no longer duplicates its log lines (it still writes ``./logs/run.log`` under
  the current working directory, as the release does);
* ``ALG_DICT['ROME']`` / ``ALG_DICT['MEMIT']`` load :mod:`.baselines` on their first call.

Every patch is scoped to easyeditor: code outside it sees ``sys.modules``, ``transformers``
and the root logger as they were.
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import logging
import sys
import threading
import types
import warnings
from pathlib import Path
from typing import Any, Callable, Dict

import torch

from .devices import _ReleaseSourceFinder, resolve_device
from .release import (INSTALL_COMMAND, PKG, _module_file, _PlaceholderFinder,
                      _PlaceholderModule, _release_init_file, _removed_modeling_utils,
                      _unimportable_optional_packages, is_release)

_LOCK = threading.RLock()
_STATE: Dict[str, Any] = {"module": None, "finder": None}

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
        loaded = sys.modules.get(PKG)
        if loaded is None:
            # Leftovers of an earlier import that failed half-way were compiled without
            # the rewrite; import the package afresh and consistently.
            for name in [n for n in sys.modules if n.startswith(PKG + ".")]:
                del sys.modules[name]
            try:
                spec = importlib.util.find_spec(PKG)
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
            mod = loaded if loaded is not None else _import_checkout()
        elif loaded is not None:
            warnings.warn(
                "easyeditor was imported before lemoe_easyedit.easyedit.load_easyeditor(); "
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


def _import_checkout() -> types.ModuleType:
    """Import an easyeditor that is not the release (an upstream checkout), as it is."""
    try:
        return importlib.import_module(PKG)
    except ImportError as exc:
        # Its own dependencies are missing: say so, rather than suggest the release.
        where = _module_file(None) or "sys.path"
        for name in [n for n in sys.modules if n == PKG or n.startswith(PKG + ".")]:
            del sys.modules[name]
        raise ImportError(
            f"the EasyEdit checkout at {where} failed to import: {type(exc).__name__}: "
            f"{str(exc).rstrip('.')}. Install what it needs (its requirements.txt), or remove it from "
            f"sys.path to use the release (`{INSTALL_COMMAND}`).") from exc


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
        mod = importlib.import_module(PKG)
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
    ee_logger = logging.getLogger(PKG)
    if ee_logger.level == logging.NOTSET:
        ee_logger.setLevel(logging.INFO)
    return mod


def _submodule(name: str) -> types.ModuleType:
    full = f"{PKG}.{name}"
    mod = sys.modules.get(full)
    return mod if mod is not None else importlib.import_module(full)


def _rebind_everywhere(old: Any, new: Any) -> None:
    """Point every easyeditor module global that holds ``old`` (``from x import old``
    copies included) at ``new``."""
    for name, mod in list(sys.modules.items()):
        if mod is None or not (name == PKG or name.startswith(PKG + ".")):
            continue
        namespace = getattr(mod, "__dict__", {})
        for key, value in list(namespace.items()):
            if value is old:
                namespace[key] = new


def _patch_release_runtime(mod: types.ModuleType) -> None:
    alg_dict = _submodule("util.alg_dict").ALG_DICT
    for alg in BASELINES_ON_FIRST_CALL:
        if alg in alg_dict and not getattr(alg_dict[alg], "_lemoe_patched", False):
            alg_dict[alg] = _baseline_on_first_call(alg_dict[alg])

    editor = _submodule("editors.editor")
    base = editor.BaseEditor
    if not getattr(base.__init__, "_lemoe_patched", False):
        base.__init__ = _wrap_base_editor_init(base.__init__)
    if hasattr(editor, "make_logs") and not getattr(editor.make_logs, "_lemoe_patched", False):
        editor.make_logs = _dedup_log_handlers(editor.make_logs, editor.LOG)

    from .registry import _patch_batchable

    _patch_batchable()


#: Release methods whose ALG_DICT entry loads :mod:`.baselines` when first called.
BASELINES_ON_FIRST_CALL = ("ROME", "MEMIT")


def _baseline_on_first_call(apply_fn: Callable) -> Callable:
    """``apply_fn`` run with :mod:`.baselines`' patches, which are imported (and applied to
    the release) only when a baseline actually edits."""
    state: Dict[str, Callable] = {}

    @functools.wraps(apply_fn)
    def apply_baseline(*args, **kwargs):
        if "fn" not in state:
            from . import baselines

            baselines.patch_release()
            state["fn"] = baselines.with_right_padding(apply_fn)
        return state["fn"](*args, **kwargs)

    apply_baseline._lemoe_patched = True
    return apply_baseline


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


