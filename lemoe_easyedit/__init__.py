"""LEMoE lifelong model editing as an EasyEdit method.

Taking ``LEMoEHyperParams`` (or ``apply_lemoe_to_model``) from this package makes the
installed EasyEdit work here (see :mod:`.easyedit`) and registers ``LEMoE`` in its
``ALG_DICT``, so that::

    from lemoe_easyedit import LEMoEHyperParams
    from easyeditor import BaseEditor
    editor = BaseEditor.from_hparams(LEMoEHyperParams.from_hparams("llama-7b"))

edits with LEMoE through ``editor.edit(...)`` and ``editor.batch_edit(...)``. Take
``LEMoEHyperParams`` before importing ``easyeditor`` when that is the 2023 registry release:
the release only runs here when :mod:`.easyedit` imports it. :func:`register` does the same
without taking a name.

Names load on first use (as in ``transformers``), so ``import lemoe_easyedit`` and the
command line's ``--help`` cost no EasyEdit import. Deploying edits needs no EasyEdit:
:func:`save_edits`, :func:`load_edits`, :func:`rollback`, :func:`find_edit` and
:func:`remove_edit` work without it; only the EasyEdit-facing names raise ImportError, with
the reason EasyEdit could not be imported.
"""

import importlib
from typing import Any, List

__version__ = "0.1.0"

#: Public name -> the module defining it (imported on first access).
_NAMES = {
    "find_adaptor": ".injection",
    "remove_adaptor": ".injection",
    "save_edits": ".persistence",
    "load_edits": ".persistence",
    "rollback": ".persistence",
    "find_edit": ".persistence",
    "remove_edit": ".persistence",
    "EditLocation": ".persistence",
    "EditsFileError": ".persistence",
}
#: Names that need EasyEdit: taking one loads it and registers LEMoE.
_EASYEDIT_NAMES = {
    "LEMoEHyperParams": ".hparams",
    "apply_lemoe_to_model": ".editing",
}


_registered = False


def register() -> None:
    """Load EasyEdit through :mod:`.easyedit` and register LEMoE in its ``ALG_DICT``
    (idempotent: later calls return at once). Raises ImportError saying why EasyEdit could
    not be imported."""
    global _registered
    if _registered:
        return
    from .easyedit import load_easyeditor, register_method

    load_easyeditor()
    from .editing import apply_lemoe_to_model
    from .hparams import LEMoEHyperParams

    register_method("LEMoE", apply_lemoe_to_model, LEMoEHyperParams)
    _registered = True


def __getattr__(name: str) -> Any:
    if name in _EASYEDIT_NAMES:
        try:
            register()
        except ImportError as exc:
            raise ImportError(
                f"lemoe_easyedit.{name} needs EasyEdit, which could not be imported: {exc} "
                "(save_edits, load_edits, rollback, find_edit and remove_edit work "
                "without it.)", name=name) from exc
        module = _EASYEDIT_NAMES[name]
    elif name in _NAMES:
        module = _NAMES[name]
    else:
        raise AttributeError(f"module 'lemoe_easyedit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_NAMES) | set(_EASYEDIT_NAMES))


__all__ = list(_NAMES) + list(_EASYEDIT_NAMES) + ["register"]

