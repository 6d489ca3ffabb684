"""What ``run`` / ``compare`` need from the realfact model: its name, its known records, its
end token.

* :func:`resolve_model_name`: ``tiny-llama-realfact`` (the asset's name, alone or as the
  last part of a path that does not exist here) is the default realfact model, shipped or
  built into the cache on first use;
* :func:`filter_known`: keep the requests whose edit prompt, paraphrase and every locality
  prompt the unedited model answers by whole-object greedy exact match (an edit of a fact
  the model never knew, or a locality probe it already gets wrong, measures nothing), and
  say how many were left out and for which probe;
* :func:`is_realfact_dir`: whether a model directory is a realfact build, whose facts all
  end with ``</s>``: editors are then trained on targets that end the same way.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import List, Sequence, Tuple

__all__ = ["resolve_model_name", "is_realfact_dir", "filter_known"]


def resolve_model_name(name):
    """``name`` itself, unless it names the default realfact model (``tiny-llama-realfact``
    or a missing path ending in it): then the directory of that model (built if needed)."""
    from . import ASSET_NAME, realfact_model_path

    if not isinstance(name, str):
        return name
    p = Path(name)
    if p.name == ASSET_NAME and not (p / "config.json").is_file():
        return str(realfact_model_path())
    return name


def is_realfact_dir(path) -> bool:
    """Whether ``path`` holds a model written by :mod:`lemoe_easyedit.realfact.build`."""
    if not isinstance(path, str):
        return False
    info = Path(path) / "build_info.json"
    if not info.is_file():
        return False
    try:
        data = json.loads(info.read_text())
    except (OSError, ValueError):
        return False
    return "knowledge" in data and "training_sequences" in data


def filter_known(requests: Sequence[dict], model_name: str, batch_size: int = 256
                 ) -> Tuple[List[dict], dict]:
    """The requests the unedited model at ``model_name`` knows, and a report.

    The report: ``{"records", "kept", "dropped", "wrong_by_probe": {probe: count},
    "dropped_case_ids": [...]}`` (a record counts once per probe it gets wrong).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .knowledge import known_requests

    tok = AutoTokenizer.from_pretrained(model_name)
    model = AutoModelForCausalLM.from_pretrained(model_name)
    model.eval()
    with torch.no_grad():
        kept, dropped = known_requests(model, tok, list(requests), batch_size=batch_size)
    by_probe = Counter(kind for _, kinds in dropped for kind in kinds)
    report = {"records": len(requests), "kept": len(kept), "dropped": len(dropped),
              "wrong_by_probe": dict(sorted(by_probe.items())),
              "dropped_case_ids": [cid for cid, _ in dropped],
              "rule": "kept when the unedited model's greedy answer is the whole true object "
                      "for the edit prompt, the paraphrase and every locality prompt"}
    return kept, report


def describe(report: dict) -> str:
    """One line for the user: how many records were left out and why."""
    why = ", ".join(f"{k} wrong in {v}" for k, v in report["wrong_by_probe"].items())
    return (f"known-record filter: kept {report['kept']} of {report['records']} records; "
            f"left out {report['dropped']} the unedited model does not know"
            + (f" ({why})" if why else ""))
