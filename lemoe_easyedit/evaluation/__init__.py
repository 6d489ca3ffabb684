"""Evaluation, kept apart from the method: every editing method (LEMoE and the baselines)
is loaded, edited and scored here the same way.

* :mod:`.data`: EasyEdit-format record files (zsRE, CounterFact, hallucination, the
  testbed) to edit requests, with their checks;
* :mod:`.methods`: which code runs a method, its hparams, the stream cut into edit calls;
* :mod:`.models`: the unedited model and tokenizer, loaded as EasyEdit's ``BaseEditor`` does;
* :mod:`.scoring`: EasyEdit's metrics plus greedy exact match, per edit and summarised;
* :mod:`.protocol`: the lifelong protocol (edit all T, then score all T) and its restore
  modes;
* :mod:`.provenance`: versions, git commit, hparams and method state recorded with results;
* :mod:`.report`: tables and curves;
* :mod:`.runner`: the ``run`` and ``compare`` commands.

Importing this package loads EasyEdit (through :mod:`lemoe_easyedit.easyedit`).
"""

from ..easyedit import load_easyeditor

load_easyeditor()

from .methods import edit_calls, edit_mode, implementation_of, load_hparams  # noqa: E402
from .models import load_model_and_tokenizer, load_tokenizer  # noqa: E402
from .protocol import PROTOCOL_VERSION, UneditedModels, run_protocol  # noqa: E402
from .provenance import package_versions  # noqa: E402
from .report import plot_curves, summary_table  # noqa: E402
from .scoring import (METRIC_KEYS, PPL_KEYS, Scorer, greedy_generate,  # noqa: E402
                      locality_kinds, score_requests, target_token_ids)

__all__ = [
    "PROTOCOL_VERSION",
    "METRIC_KEYS",
    "PPL_KEYS",
    "edit_calls",
    "edit_mode",
    "implementation_of",
    "load_hparams",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "package_versions",
    "run_protocol",
    "UneditedModels",
    "Scorer",
    "score_requests",
    "greedy_generate",
    "target_token_ids",
    "locality_kinds",
    "summary_table",
    "plot_curves",
]
