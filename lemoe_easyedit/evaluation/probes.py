"""Locality probes built from the records themselves.

EasyEdit's CounterFact and zsRE files carry one locality prompt per record: another subject
(CounterFact's neighbourhood: the same relation) or an unrelated question (zsRE's NQ). Neither
asks the *edited subject* anything else, the neighbour a subject-keyed editor reaches first
(the testbed's "same person, another relation", README "Hard locality").
:func:`with_same_subject_probes` builds it from the file: record ``i``'s subject put into the
question of another record, the next one in the list whose question (its prompt with its
subject taken out) differs from record ``i``'s. Scored like every locality probe: the
greedy continuation after the edits must equal the unedited model's (as many tokens as the
other record's answer has), whatever the model answered before.

The files carry no relation labels, so a few probes ask the edited relation in other words
(a paraphrase, where a change is right): 1 of 20 inspected zsRE probes, 0 of 20 CounterFact
ones (``examples/results/realfact-same-subject.md``). The figure is a lower bound for that
reason. A request that already has a ``same_subject`` probe (the testbed's edit sets) keeps
it.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["SAME_SUBJECT", "with_same_subject_probes"]

#: The locality kind (``loc:same_subject``, ``loc_em:same_subject`` in the results).
SAME_SUBJECT = "same_subject"


def _question(request: dict) -> Optional[Tuple[str, str]]:
    """``(before, after)``: the prompt around its subject, or None when the subject does not
    occur in it exactly once (then the question cannot be asked of another subject)."""
    subject, prompt = request.get("subject"), request.get("prompt")
    if not isinstance(subject, str) or not subject or not isinstance(prompt, str):
        return None
    if prompt.count(subject) != 1:
        return None
    before, after = prompt.split(subject)
    return before, after


def _key(question: Tuple[str, str]) -> Tuple[str, str]:
    return tuple(" ".join(part.lower().split()) for part in question)


def with_same_subject_probes(requests: Sequence[dict]) -> Tuple[List[dict], int]:
    """``(requests with a "same_subject" locality probe, how many got none)``.

    Record ``i``'s probe is the question of record ``j``, the first after ``i`` (wrapping
    round) whose question differs from ``i``'s and from ``i``'s paraphrase, asked of ``i``'s
    subject; its ``ground_truth`` is ``j``'s answer, which only sets how many tokens are
    compared. Deterministic: the same list gives the same probes. The input dicts are not
    changed; a request that already has a ``same_subject`` probe keeps it.
    """
    questions = [_question(r) for r in requests]
    keys = [None if q is None else _key(q) for q in questions]
    out: List[dict] = []
    missing = 0
    for i, r in enumerate(requests):
        locality: Dict[str, dict] = dict(r.get("locality") or {})
        if SAME_SUBJECT not in locality:
            probe = _probe_for(i, requests, questions, keys) if keys[i] is not None else None
            if probe is None:
                missing += 1
            else:
                locality[SAME_SUBJECT] = probe
        out.append({**r, "locality": locality})
    return out, missing


def _probe_for(i: int, requests: Sequence[dict], questions, keys) -> Optional[dict]:
    subject = requests[i]["subject"]
    rephrase = requests[i].get("rephrase_prompt")
    n = len(requests)
    for step in range(1, n):
        j = (i + step) % n
        if keys[j] is None or keys[j] == keys[i]:
            continue
        answer = requests[j].get("ground_truth")
        if not isinstance(answer, str) or not answer.strip():
            continue
        before, after = questions[j]
        prompt = before + subject + after
        if prompt == rephrase:
            continue
        return {"prompt": prompt, "ground_truth": answer}
    return None
