"""GRACE (Hartvigsen et al., NeurIPS 2023) for EasyEdit installs that lack it.

Importing this package registers ``GRACE`` in EasyEdit's ``ALG_DICT`` **only when the
installed EasyEdit has no GRACE of its own** (the registry release 0.0.1.dev0 has none;
upstream checkouts do). :data:`IMPLEMENTATION` says which one runs. The YAML keys are
upstream's, so ``hparams/GRACE/*.yaml`` works with either implementation.

See :mod:`.adapter` for the codebook rules and this implementation's choices.
"""

from __future__ import annotations

from ..easyedit import load_easyeditor, register_method
from .adapter import EARLY_STOP_LOSS, GraceAdapter, find_grace
from .hparams import GraceHyperParams
from .main import apply_grace_to_model, edit_one, inject_grace, remove_grace

__all__ = ["GraceHyperParams", "GraceAdapter", "apply_grace_to_model", "find_grace",
           "inject_grace", "remove_grace", "edit_one", "register", "IMPLEMENTATION",
           "EARLY_STOP_LOSS"]


def register() -> str:
    """Register this GRACE unless EasyEdit has its own; return which implementation runs
    ``GRACE`` now: ``"lemoe_easyedit"`` or ``"easyeditor"``."""
    load_easyeditor()
    from easyeditor.util.alg_dict import ALG_DICT

    current = ALG_DICT.get("GRACE")
    if current is None:
        register_method("GRACE", apply_grace_to_model, GraceHyperParams)
        return "lemoe_easyedit"
    return "lemoe_easyedit" if current is apply_grace_to_model else "easyeditor"


#: Which GRACE the loaded EasyEdit runs after importing this package.
IMPLEMENTATION = register()
