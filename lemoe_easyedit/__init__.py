"""LEMoE lifelong model editing as an EasyEdit method.

Importing this package makes the installed EasyEdit work here (see :mod:`.compat`) and
registers ``LEMoE`` in its ``ALG_DICT``, so that::

    from easyeditor import BaseEditor
    from lemoe_easyedit import LEMoEHyperParams
    editor = BaseEditor.from_hparams(LEMoEHyperParams.from_hparams("hparams/LEMoE/llama-7b.yaml"))

edits with LEMoE through ``editor.edit(...)`` and ``editor.batch_edit(...)``.
"""

from .compat import load_easyeditor, register_method

load_easyeditor()

from .editing import apply_lemoe_to_model  # noqa: E402
from .hparams import LEMoEHyperParams  # noqa: E402
from .injection import find_adaptor, remove_adaptor  # noqa: E402

register_method("LEMoE", apply_lemoe_to_model, LEMoEHyperParams)

__all__ = ["LEMoEHyperParams", "apply_lemoe_to_model", "find_adaptor", "remove_adaptor"]
__version__ = "0.1.0"
