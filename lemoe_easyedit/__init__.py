"""LEMoE lifelong model editing as an EasyEdit method.

Importing this package makes the installed EasyEdit work here (see :mod:`.compat`) and
registers ``LEMoE`` in its ``ALG_DICT``, so that::

    from easyeditor import BaseEditor
    from lemoe_easyedit import LEMoEHyperParams
    editor = BaseEditor.from_hparams(LEMoEHyperParams.from_hparams("hparams/LEMoE/llama-7b.yaml"))

edits with LEMoE through ``editor.edit(...)`` and ``editor.batch_edit(...)``.

Deploying edits needs no EasyEdit: without it, ``import lemoe_easyedit`` still works and
:func:`save_edits`, :func:`load_edits`, :func:`rollback`, :func:`find_edit` and
:func:`remove_edit` are available; only the EasyEdit-facing names (``LEMoEHyperParams``,
``apply_lemoe_to_model``) raise ImportError naming the install command.
"""

from typing import Any, Optional

from .compat import INSTALL_COMMAND, load_easyeditor, register_method
from .injection import find_adaptor, remove_adaptor
from .persistence import (EditLocation, EditsFileError, find_edit, load_edits, remove_edit,
                          rollback, save_edits)

_EASYEDIT_NAMES = ("LEMoEHyperParams", "apply_lemoe_to_model")
_EASYEDIT_ERROR: Optional[ImportError]

try:
    load_easyeditor()
except ImportError as exc:
    _EASYEDIT_ERROR = exc
else:
    _EASYEDIT_ERROR = None
    from .editing import apply_lemoe_to_model  # noqa: E402
    from .hparams import LEMoEHyperParams  # noqa: E402

    register_method("LEMoE", apply_lemoe_to_model, LEMoEHyperParams)


def __getattr__(name: str) -> Any:
    """Explain, for the EasyEdit-facing names, that EasyEdit is missing and how to get it."""
    if name in _EASYEDIT_NAMES and _EASYEDIT_ERROR is not None:
        raise ImportError(
            f"lemoe_easyedit.{name} needs EasyEdit, which is not importable here. Install it "
            f"with `{INSTALL_COMMAND}`. (save_edits, load_edits, rollback, find_edit and "
            f"remove_edit work without it.)", name=name) from _EASYEDIT_ERROR
    raise AttributeError(f"module 'lemoe_easyedit' has no attribute {name!r}")


__all__ = ["find_adaptor", "remove_adaptor", "save_edits", "load_edits", "rollback",
           "find_edit", "remove_edit", "EditLocation", "EditsFileError"]
if _EASYEDIT_ERROR is None:
    __all__ += list(_EASYEDIT_NAMES)
__version__ = "0.1.0"
