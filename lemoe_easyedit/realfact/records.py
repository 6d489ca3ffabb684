"""Benchmark records -> the true facts they state (what the realfact model is trained on).

A record of EasyEdit's flattened CounterFact or of MEND/EasyEdit zsRE states up to three
true facts, each a ``(prompt, answer)`` pair:

============  ==========================  ==========================
field         CounterFact                 zsRE
============  ==========================  ==========================
edit prompt   ``prompt`` -> ``ground_truth``          ``src`` -> ``answers[0]``
paraphrase    ``rephrase_prompt`` -> ``ground_truth`` ``rephrase`` -> ``answers[0]``
locality      ``locality_prompt`` -> ``locality_ground_truth``  ``loc`` -> ``loc_ans``
============  ==========================  ==========================

and one counterfactual target (CounterFact ``target_new``, zsRE ``alt``) that the model must
*not* know before editing. The field names in reports are the file's own keys, so a reader
can look them up in the data. Nothing here depends on the rest of the package: the build
command reads any file of these two formats, not only the shared ones.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple, Union

__all__ = ["FORMAT_FIELDS", "FactRecord", "detect_format", "read_records", "parse_spec"]

#: Per format: the probe fields (report names) and the name of the counterfactual target.
FORMAT_FIELDS: Dict[str, Tuple[Tuple[str, ...], str]] = {
    "counterfact": (("prompt", "rephrase_prompt", "locality_prompt"), "target_new"),
    "zsre": (("src", "rephrase", "loc"), "alt"),
}


@dataclass
class FactRecord:
    """The true facts of one benchmark record.

    ``probes`` maps a field name (``prompt``, ``rephrase_prompt``, ``locality_prompt`` for
    CounterFact; ``src``, ``rephrase``, ``loc`` for zsRE) to ``(prompt, true answer)``;
    a field the record leaves empty is absent. ``new_target`` is the counterfactual answer
    of the edit prompt (never trained on).
    """

    fmt: str
    index: int
    case_id: int
    probes: Dict[str, Tuple[str, str]]
    new_target: Optional[str]
    source: str = ""
    subject: Optional[str] = None
    extra: Dict[str, str] = field(default_factory=dict)

    @property
    def edit_prompt(self) -> Optional[Tuple[str, str]]:
        """``(edit prompt, true answer)``."""
        return self.probes.get(FORMAT_FIELDS[self.fmt][0][0])


def detect_format(record: dict) -> str:
    """``counterfact`` or ``zsre`` from the keys of one record."""
    if {"src", "alt"} <= set(record):
        return "zsre"
    if {"prompt", "target_new", "ground_truth"} <= set(record):
        return "counterfact"
    raise ValueError(f"neither EasyEdit CounterFact nor zsRE: keys {sorted(record)}")


def _text(value) -> Optional[str]:
    return value if isinstance(value, str) and value.strip() else None


def _convert(fmt: str, i: int, rec: dict, source: str) -> Optional[FactRecord]:
    """One record's facts, or None when its edit prompt or true answer is missing."""
    probes: Dict[str, Tuple[str, str]] = {}
    if fmt == "counterfact":
        truth = _text(rec.get("ground_truth"))
        pairs = [("prompt", rec.get("prompt"), truth),
                 ("rephrase_prompt", rec.get("rephrase_prompt"), truth),
                 ("locality_prompt", rec.get("locality_prompt"),
                  rec.get("locality_ground_truth"))]
        new = _text(rec.get("target_new"))
    else:
        answers = rec.get("answers")
        truth = _text(answers[0]) if isinstance(answers, list) and answers else None
        pairs = [("src", rec.get("src"), truth), ("rephrase", rec.get("rephrase"), truth),
                 ("loc", rec.get("loc"), rec.get("loc_ans"))]
        new = _text(rec.get("alt"))
    for name, prompt, answer in pairs:
        prompt, answer = _text(prompt), _text(answer)
        if prompt is not None and answer is not None:
            probes[name] = (prompt, answer)
    if FORMAT_FIELDS[fmt][0][0] not in probes:
        return None
    case_id = rec.get("case_id", i)
    return FactRecord(fmt=fmt, index=i, case_id=case_id if isinstance(case_id, int) else i,
                      probes=probes, new_target=new, source=source,
                      subject=_text(rec.get("subject")))


def read_records(path: Union[str, os.PathLike], limit: Optional[int] = None,
                 offset: int = 0) -> Tuple[List[FactRecord], List[int]]:
    """Facts of ``records[offset:offset + limit]`` of a JSON list file.

    Returns ``(facts, skipped)``: ``skipped`` are the indices of records without an edit
    prompt or true answer (they state no fact; the caller reports them).
    """
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{path}: expected a non-empty JSON list of records")
    stop = len(raw) if limit is None else offset + limit
    if stop > len(raw):
        raise ValueError(f"{path}: asked for records {offset}..{stop - 1}, the file has "
                         f"{len(raw)}")
    first = next((r for r in raw if isinstance(r, dict)), None)
    if first is None:
        raise ValueError(f"{path}: no record is a JSON object")
    fmt = detect_format(first)
    facts, skipped = [], []
    for i in range(offset, stop):
        rec = raw[i]
        fact = _convert(fmt, i, rec, str(path)) if isinstance(rec, dict) else None
        if fact is None:
            skipped.append(i)
        else:
            facts.append(fact)
    return facts, skipped


def parse_spec(spec: str) -> Tuple[str, Optional[int]]:
    """``PATH`` or ``PATH:N`` (the first ``N`` records) -> ``(path, N or None)``."""
    head, sep, tail = spec.rpartition(":")
    if sep and tail.isdigit() and head:
        return head, int(tail)
    return spec, None


def iter_training_pairs(facts: Iterable[FactRecord]) -> Iterable[Tuple[str, str, str]]:
    """``(field, prompt, answer)`` of every probe of ``facts``, in order."""
    for f in facts:
        for name, (prompt, answer) in f.probes.items():
            yield name, prompt, answer
