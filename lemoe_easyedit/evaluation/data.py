"""Benchmark files -> EasyEdit request dicts, with every malformed record named.

Every loader returns a list of EasyEdit requests::

    {"case_id": int, "prompt": str, "target_new": str, "ground_truth": str,
     "subject": str, "rephrase_prompt": str,             # rephrase only when the data has one
     "locality": {name: {"prompt": str, "ground_truth": str}}, "portability": {}}

which is what ``ALG_DICT[method](model, tok, requests, hparams)`` and
``easyeditor.evaluate.compute_edit_quality`` take. ``case_id`` is the record's own
``case_id`` when it has one (CounterFact), else its index in the file.

Formats (``load_records`` detects them from the keys, or pass ``fmt``):

* ``zsre``: MEND / EasyEdit zsRE (``src, rephrase, alt, answers, loc, loc_ans, subject``), as in
  ``zsre_mend_eval.json``, WISE's ``zsre_mend_edit.json`` and ``zsre_mend_train*.json``.
  Prompt = ``src``, target = ``alt``, ground truth = ``answers[0]``, paraphrase = ``rephrase``,
  locality ``nq`` = (``loc``, ``loc_ans``), exactly as EasyEdit's ``ZsreDataset`` maps them.
* ``counterfact``: EasyEdit's flattened CounterFact (``prompt, subject, target_new,
  ground_truth, rephrase_prompt, locality_prompt, locality_ground_truth``), locality
  ``neighborhood``.
* ``counterfact-rome``: ROME's nested CounterFact (``case_id``, ``requested_rewrite: {prompt
  with "{}", subject, target_new: {str}, target_true: {str}}``, ``paraphrase_prompts``,
  ``neighborhood_prompts``, ...). Mapped the way EasyEdit flattened it: the first paraphrase
  is the rephrase prompt, the first neighbourhood prompt is the locality prompt and its
  ground truth is ``target_true`` (neighbours share the true object).
* ``hallucination``: WISE's SelfCheckGPT/WikiBio set (``prompt, target_new, subject,
  locality_prompt, locality_ground_truth``); no paraphrase, ground truth ``<|endoftext|>``
  (EasyEdit's default when none is given). Scored by perplexity (see ``evaluation``).
* ``requests``: a JSON list already in the request form above (e.g. the testbed's edit sets).

Why EasyEdit's own dataset classes are not the reader: ``easyeditor.dataset.ZsreDataset``
works here without a tokenizer (``config=None``), but it drops ``subject`` (which ROME and
MEMIT need), silently skips records whose ``alt`` is empty (the shared zsRE file has two),
stops the whole file with a bare ``assert`` when a ``loc`` lacks ``"nq question: "``, and
returns flat records, not requests. ``CounterFactDataset`` is ``json.load`` plus a ``print``
and does not know the ROME format. So the files are parsed here, with the same field mapping;
``tests/test_data.py`` checks that the result agrees with ``ZsreDataset`` field by field.

Checking: a *malformed* record (not an object, a required field missing, not a string or
empty, a subject that does not occur in the prompt, a field of the wrong type) is reported by
index and field in a :class:`MalformedRecordError` (a ``ValueError``) listing every problem
in the file; with ``skip_malformed=True`` those records are left out instead, with a
``UserWarning`` listing them. An *optional probe* that is empty (a paraphrase, or a locality
prompt/answer, e.g. the 7 empty ``locality_ground_truth`` of the WISE hallucination set) is
not an error: the record is kept without that probe, with a warning naming the records,
because EasyEdit would score an empty locality answer as ``nan``.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

__all__ = [
    "DATASETS",
    "FORMATS",
    "MalformedRecordError",
    "Problem",
    "detect_format",
    "load_records",
    "load_dataset",
    "load_zsre",
    "load_counterfact",
    "load_hallucination",
    "load_testbed",
    "subject_aligned",
    "validate_requests",
]

#: ``--data`` names of the runner.
DATASETS = ("testbed", "zsre", "counterfact", "hallucination")
#: File formats this module reads.
FORMATS = ("zsre", "counterfact", "counterfact-rome", "hallucination", "requests")

#: EasyEdit's ground truth when a data set has none (``BaseEditor._prepare_requests``).
NO_GROUND_TRUTH = "<|endoftext|>"

Problem = Tuple[int, str, str]  # (record index, field, what is wrong)


class MalformedRecordError(ValueError):
    """Malformed records of a data file; ``problems`` is a list of (index, field, message)."""

    def __init__(self, source: str, problems: Sequence[Problem]):
        self.source = source
        self.problems = list(problems)
        shown = "; ".join(f"record {i}: field {f!r} {m}" for i, f, m in self.problems[:20])
        more = f"; ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
        indices = sorted({i for i, _, _ in self.problems})
        super().__init__(
            f"{source}: {len(indices)} malformed record(s): {shown}{more}. Fix the file, or "
            "pass skip_malformed=True (runner: --skip-malformed) to leave them out.")


# ----------------------------------------------------------------------- field checks


class _Checker:
    """Collects problems of one record; ``get`` returns the value or None when bad."""

    def __init__(self, index: int, record: Any):
        self.index = index
        self.record = record
        self.problems: List[Problem] = []
        self.dropped: List[str] = []

    def bad(self, field: str, message: str) -> None:
        self.problems.append((self.index, field, message))

    def text(self, field: str, container: Optional[dict] = None, label: Optional[str] = None,
             required: bool = True) -> Optional[str]:
        """A string field; missing/empty is a problem when required, else a dropped probe."""
        src = self.record if container is None else container
        label = label or field
        if field not in src or src[field] is None:
            if required:
                self.bad(label, "is missing")
            return None
        value = src[field]
        if not isinstance(value, str):
            self.bad(label, f"must be a string, got {type(value).__name__}")
            return None
        if not value.strip():
            if required:
                self.bad(label, "is empty")
            else:
                self.dropped.append(label)
            return None
        return value

    def subject_in(self, subject: Optional[str], prompt: Optional[str],
                   field: str = "subject") -> None:
        if subject is not None and prompt is not None and subject not in prompt:
            self.bad(field, f"{subject!r} does not occur in the prompt {prompt!r}")


def _pair_dropped(c: _Checker, prompt, answer, prompt_field: str, answer_field: str) -> None:
    """A locality probe needs both halves; note the missing half once."""
    if (prompt is None) != (answer is None):
        missing = answer_field if prompt is not None else prompt_field
        if missing not in c.dropped:
            c.dropped.append(missing)


def _locality(name: str, prompt: Optional[str], answer: Optional[str]) -> Dict[str, dict]:
    if prompt is None or answer is None:
        return {}
    return {name: {"prompt": prompt, "ground_truth": answer}}


def _request(case_id, prompt, target, ground_truth, subject, rephrase, locality) -> dict:
    req = {"case_id": case_id, "prompt": prompt, "target_new": target,
           "ground_truth": ground_truth, "subject": subject}
    if rephrase is not None:
        req["rephrase_prompt"] = rephrase
    req["locality"] = locality
    req["portability"] = {}
    return req


# ----------------------------------------------------------------------- converters


def _zsre(i: int, rec: dict) -> _Checker:
    c = _Checker(i, rec)
    prompt = c.text("src")
    target = c.text("alt")
    subject = c.text("subject")
    c.subject_in(subject, prompt)
    answers = rec.get("answers")
    ground_truth = None
    if not isinstance(answers, list) or not answers:
        c.bad("answers", "must be a non-empty list of strings"
              if "answers" in rec else "is missing")
    elif not isinstance(answers[0], str) or not answers[0].strip():
        c.bad("answers", "[0] must be a non-empty string")
    else:
        ground_truth = answers[0]
    rephrase = c.text("rephrase", required=False)
    loc = c.text("loc", required=False)
    loc_ans = c.text("loc_ans", required=False)
    _pair_dropped(c, loc, loc_ans, "loc", "loc_ans")
    c.request = _request(i, prompt, target, ground_truth, subject, rephrase,
                         _locality("nq", loc, loc_ans))
    return c


def _counterfact(i: int, rec: dict) -> _Checker:
    c = _Checker(i, rec)
    prompt = c.text("prompt")
    target = c.text("target_new")
    ground_truth = c.text("ground_truth")
    subject = c.text("subject")
    c.subject_in(subject, prompt)
    rephrase = c.text("rephrase_prompt", required=False)
    loc = c.text("locality_prompt", required=False)
    loc_ans = c.text("locality_ground_truth", required=False)
    _pair_dropped(c, loc, loc_ans, "locality_prompt", "locality_ground_truth")
    case_id = rec.get("case_id", i)
    c.request = _request(case_id if isinstance(case_id, int) else i, prompt, target,
                         ground_truth, subject, rephrase, _locality("neighborhood", loc, loc_ans))
    return c


def _first_prompt(c: _Checker, field: str) -> Optional[str]:
    items = c.record.get(field)
    if items is None:
        return None
    if not isinstance(items, list):
        c.bad(field, f"must be a list, got {type(items).__name__}")
        return None
    if not items:
        c.dropped.append(field)
        return None
    first = items[0]
    if isinstance(first, dict):  # MEND's variant: {"prompt": ..., "target": ...}
        first = first.get("prompt")
    if not isinstance(first, str):
        c.bad(f"{field}[0]", "must be a string (or an object with a 'prompt' string)")
        return None
    if not first.strip():
        c.dropped.append(f"{field}[0]")
        return None
    return first


def _counterfact_rome(i: int, rec: dict) -> _Checker:
    c = _Checker(i, rec)
    rw = rec.get("requested_rewrite")
    prompt = target = ground_truth = subject = None
    if not isinstance(rw, dict):
        c.bad("requested_rewrite", "must be an object" if "requested_rewrite" in rec
              else "is missing")
    else:
        template = c.text("prompt", rw, "requested_rewrite.prompt")
        subject = c.text("subject", rw, "requested_rewrite.subject")
        for key in ("target_new", "target_true"):
            value = rw.get(key)
            label = f"requested_rewrite.{key}"
            if not isinstance(value, dict):
                c.bad(label, "must be an object with a 'str' field" if key in rw
                      else "is missing")
                continue
            text = c.text("str", value, f"{label}.str")
            if key == "target_new":
                target = text
            else:
                ground_truth = text
        if template is not None and subject is not None:
            if "{}" in template:
                prompt = template.replace("{}", subject, 1)
            else:
                c.bad("requested_rewrite.prompt", 'must contain "{}" where the subject goes')
    rephrase = _first_prompt(c, "paraphrase_prompts")
    loc = _first_prompt(c, "neighborhood_prompts")
    case_id = rec.get("case_id", i)
    c.request = _request(case_id if isinstance(case_id, int) else i, prompt, target,
                         ground_truth, subject, rephrase,
                         _locality("neighborhood", loc, ground_truth))
    return c


def _hallucination(i: int, rec: dict) -> _Checker:
    c = _Checker(i, rec)
    prompt = c.text("prompt")
    target = c.text("target_new")
    subject = c.text("subject")
    c.subject_in(subject, prompt)
    loc = c.text("locality_prompt", required=False)
    loc_ans = c.text("locality_ground_truth", required=False)
    _pair_dropped(c, loc, loc_ans, "locality_prompt", "locality_ground_truth")
    c.request = _request(i, prompt, target, NO_GROUND_TRUTH, subject, None,
                         _locality("locality", loc, loc_ans))
    return c


def _as_request(i: int, rec: dict) -> _Checker:
    c = _Checker(i, rec)
    prompt = c.text("prompt")
    target = c.text("target_new")
    ground_truth = c.text("ground_truth", required=False) or NO_GROUND_TRUTH
    subject = c.text("subject", required=False)
    c.subject_in(subject, prompt)
    rephrase = c.text("rephrase_prompt", required=False)
    locality = {}
    raw_loc = rec.get("locality") or {}
    if not isinstance(raw_loc, dict):
        c.bad("locality", "must be an object {name: {prompt, ground_truth}}")
    else:
        for name, probe in raw_loc.items():
            if not isinstance(probe, dict):
                c.bad(f"locality.{name}", "must be an object with 'prompt' and 'ground_truth'")
                continue
            lp = c.text("prompt", probe, f"locality.{name}.prompt", required=False)
            la = c.text("ground_truth", probe, f"locality.{name}.ground_truth", required=False)
            locality.update(_locality(name, lp, la))
    case_id = rec.get("case_id", i)
    req = _request(case_id if isinstance(case_id, int) else i, prompt, target, ground_truth,
                   subject, rephrase, locality)
    if subject is None:
        req.pop("subject")
    portability = rec.get("portability")
    if isinstance(portability, dict):
        req["portability"] = portability
    c.request = req
    return c


_CONVERTERS: Dict[str, Callable[[int, dict], _Checker]] = {
    "zsre": _zsre,
    "counterfact": _counterfact,
    "counterfact-rome": _counterfact_rome,
    "hallucination": _hallucination,
    "requests": _as_request,
}


# ----------------------------------------------------------------------- reading


def detect_format(records: Sequence[Any]) -> str:
    """Name the format of ``records`` from the keys of the first object record."""
    first = next((r for r in records if isinstance(r, dict)), None)
    if first is None:
        raise ValueError("cannot tell the format: no record is a JSON object")
    keys = set(first)
    if "requested_rewrite" in keys:
        return "counterfact-rome"
    if {"src", "alt"} <= keys:
        return "zsre"
    if "locality" in keys and isinstance(first.get("locality"), dict):
        return "requests"
    if {"prompt", "target_new", "locality_prompt"} <= keys:
        if "rephrase_prompt" in keys or "ground_truth" in keys:
            return "counterfact"
        return "hallucination"
    if {"prompt", "target_new"} <= keys:
        return "requests"
    raise ValueError(f"cannot tell the format from the keys {sorted(keys)}; "
                     f"pass one of {', '.join(FORMATS)}")


def _read_json_list(path: Union[str, os.PathLike]) -> List[Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {str(path)!r}")
    with open(path, encoding="utf-8") as f:
        if path.suffix.lower() == ".jsonl":
            data = [json.loads(line) for line in f if line.strip()]
        else:
            try:
                data = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def convert_records(records: Sequence[Any], fmt: str, source: str = "data",
                    skip_malformed: bool = False) -> List[dict]:
    """Convert raw ``records`` of format ``fmt`` to requests (see the module docstring)."""
    if fmt not in _CONVERTERS:
        raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    convert = _CONVERTERS[fmt]
    requests, problems, bad_indices, dropped = [], [], [], []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            problems.append((i, "<record>", f"must be a JSON object, got {type(rec).__name__}"))
            bad_indices.append(i)
            continue
        c = convert(i, rec)
        if c.problems:
            problems.extend(c.problems)
            bad_indices.append(i)
            continue
        if c.dropped:
            dropped.append((i, c.dropped))
        requests.append(c.request)
    if problems:
        if not skip_malformed:
            raise MalformedRecordError(source, problems)
        details = "; ".join(f"record {i}: {f!r} {m}" for i, f, m in problems)
        warnings.warn(f"{source}: skipped {len(bad_indices)} malformed record(s) "
                      f"{bad_indices}: {details}", UserWarning, stacklevel=3)
    if dropped:
        details = "; ".join(f"record {i}: {', '.join(fields)}" for i, fields in dropped)
        warnings.warn(f"{source}: {len(dropped)} record(s) kept without an empty optional "
                      f"probe (not scored for it): {details}", UserWarning, stacklevel=3)
    return requests


def load_records(path: Union[str, os.PathLike], fmt: Optional[str] = None,
                 skip_malformed: bool = False) -> List[dict]:
    """Read a JSON (or JSON-lines) file of ``fmt`` (default: detected) into requests."""
    raw = _read_json_list(path)
    fmt = fmt or detect_format(raw)
    return convert_records(raw, fmt, source=str(path), skip_malformed=skip_malformed)


def load_zsre(path, skip_malformed: bool = False) -> List[dict]:
    """zsRE in MEND/EasyEdit format (``zsre_mend_eval.json``, ``zsre_mend_edit.json``...)."""
    return load_records(path, "zsre", skip_malformed)


def load_counterfact(path, skip_malformed: bool = False) -> List[dict]:
    """CounterFact, EasyEdit's flattened split or ROME's nested ``requested_rewrite`` file."""
    raw = _read_json_list(path)
    fmt = detect_format(raw)
    if fmt not in ("counterfact", "counterfact-rome"):
        raise ValueError(f"{path}: does not look like CounterFact (detected {fmt!r})")
    return convert_records(raw, fmt, source=str(path), skip_malformed=skip_malformed)


def load_hallucination(path, skip_malformed: bool = False) -> List[dict]:
    """WISE's hallucination set (``hallucination-edit.json``)."""
    return load_records(path, "hallucination", skip_malformed)


# ----------------------------------------------------------------------- testbed


def load_testbed(edit_set: Optional[str] = None, skip_malformed: bool = False) -> List[dict]:
    """The edit set of the embedded testbed (``lemoe_easyedit.testbed``).

    ``edit_set`` is the name of one of the testbed's sets (default: its default set) or the
    path of a JSON file of requests.
    """
    if edit_set is not None and Path(edit_set).suffix.lower() in (".json", ".jsonl") \
            and Path(edit_set).is_file():
        return load_records(edit_set, "requests", skip_malformed)
    try:
        from .. import testbed
    except ImportError as exc:  # pragma: no cover - the testbed ships with the package
        raise RuntimeError(f"the embedded testbed is not available: {exc}") from exc
    loader = getattr(testbed, "load_edit_set", None)
    if loader is None:
        raise RuntimeError("lemoe_easyedit.testbed has no edit sets in this checkout "
                           "(load_edit_set is missing); give --data-path FILE.json")
    raw = loader(edit_set) if edit_set is not None else loader()
    raw = [dict(r) for r in raw]
    return convert_records(raw, "requests", source=f"testbed:{edit_set or 'default'}",
                           skip_malformed=skip_malformed)


# ----------------------------------------------------------------------- dispatch


def load_dataset(name: str, path: Optional[Union[str, os.PathLike]] = None, *,
                 skip_malformed: bool = False) -> List[dict]:
    """Requests of data set ``name`` (one of :data:`DATASETS`), read from ``path``.

    ``path`` is required except for ``testbed`` (where it is an edit-set name or a file).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; one of {', '.join(DATASETS)}")
    if name == "testbed":
        return load_testbed(None if path is None else str(path), skip_malformed)
    if path is None:
        raise ValueError(f"--data {name} needs --data-path FILE (your copy of the benchmark "
                         "file; nothing is downloaded)")
    if name == "zsre":
        return load_zsre(path, skip_malformed)
    if name == "counterfact":
        return load_counterfact(path, skip_malformed)
    return load_hallucination(path, skip_malformed)


def subject_aligned(requests: Sequence[dict], tok) -> Tuple[List[dict], List[int]]:
    """Split ``requests`` by whether the subject ends on a token boundary of the prompt.

    EasyEdit's ROME and MEMIT find the subject's last token by tokenising the text before,
    the subject and the text after it separately and adding the lengths. When the tokenizer
    merges the subject's end with the next characters (a subword vocabulary that has no
    token for "UniFirst" but one for "st?"), that index is wrong, or past the end of the
    prompt and the method stops with an IndexError. Returns ``(kept, dropped_indices)``:
    a request is kept when ``tok(prompt up to the end of its subject)`` is a prefix of
    ``tok(prompt)``. A request without a subject in its prompt is dropped too.
    """
    kept, dropped = [], []
    for i, r in enumerate(requests):
        prompt, subject = r.get("prompt"), r.get("subject")
        at = prompt.find(subject) if isinstance(subject, str) and subject else -1
        if at < 0:
            dropped.append(i)
            continue
        head = tok(prompt[:at + len(subject)])["input_ids"]
        if tok(prompt)["input_ids"][:len(head)] == head:
            kept.append(r)
        else:
            dropped.append(i)
    return kept, dropped


def validate_requests(requests: Sequence[Any], source: str = "requests",
                      skip_malformed: bool = False) -> List[dict]:
    """Check (and normalise) a list already in EasyEdit request form."""
    return convert_records(list(requests), "requests", source, skip_malformed)
