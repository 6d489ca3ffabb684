"""Registering an editing method with the loaded easyeditor (``ALG_DICT``, batchable
methods, upstream's callable restore)."""

from __future__ import annotations

import functools

import sys
import types
from typing import Callable, List, Optional


from .loading import _STATE, _submodule, load_easyeditor
from .release import PKG

_EXTRA_BATCHABLE: set = set()
#: Methods registered here: ``BaseEditor.edit`` runs them with ``batch_size`` 1.
_REGISTERED: set = set()

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


def _patch_single_edit() -> None:
    """``BaseEditor.edit`` runs a method registered here with ``batch_size`` 1 for that call
    and gives the hparams their own value back afterwards.

    ``edit()`` is EasyEdit's one-request-at-a-time API: upstream asserts
    ``hparams.batch_size == 1`` in it, and the release sets it to 1 for good (so a later
    ``batch_edit`` ran in calls of one request). A registered method's ``batch_size`` is the
    call size of ``batch_edit`` only, so one YAML file serves both."""
    editor = _submodule("editors.editor")
    base = getattr(editor, "BaseEditor", None)
    current = getattr(base, "edit", None)
    if current is None or getattr(current, "_lemoe_patched", False):
        return

    @functools.wraps(current)
    def edit(self, *args, **kwargs):
        hparams = getattr(self, "hparams", None)
        if getattr(self, "alg_name", None) not in _REGISTERED or \
                not hasattr(hparams, "batch_size"):
            return current(self, *args, **kwargs)
        size = hparams.batch_size
        hparams.batch_size = 1
        try:
            return current(self, *args, **kwargs)
        finally:
            hparams.batch_size = size

    edit._lemoe_patched = True
    base.edit = edit


def _easyeditor_modules() -> List[types.ModuleType]:
    return [m for n, m in list(sys.modules.items())
            if m is not None and (n == PKG or n.startswith(PKG + "."))]


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
    true, lets ``BaseEditor.edit`` run it whatever its ``batch_size``, and exposes
    ``hparams_cls`` as ``easyeditor.<ClassName>`` if that name is free.
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
    _REGISTERED.add(name)
    _patch_single_edit()

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
