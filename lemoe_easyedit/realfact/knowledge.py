"""What a model knows: teacher-forced token accuracy, whole-object exact match, and the
free-generation ("WILD") check that the model stops right after the object.

All three come from one teacher-forced forward of ``<s> prompt answer </s>``:

* **token**: the mean over the answer's tokens of "the argmax is the answer's token"
  (EasyEdit's ``test_prediction_acc``);
* **exact**: every answer token is the argmax. With greedy decoding this is exactly "the
  model generates the whole answer" (each step's argmax is the next answer token, so greedy
  decoding follows the answer);
* **wild**: exact, and the argmax after the last answer token is ``</s>``: greedy free
  generation produces the answer and stops on its own. A generation that spells the answer
  with other tokens than the tokenizer's own split counts as wrong (a lower bound on a string
  comparison of decoded text; with this tokenizer the model is only ever trained on the
  canonical split).

The model is called as ``model(input_ids=..., attention_mask=...)`` and only ``.logits`` is
used, so an edited or wrapped model is measured the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["ProbeScore", "score_answers", "mean_scores", "knowledge_report",
           "request_probes", "known_requests"]


@dataclass
class ProbeScore:
    """Scores of one ``(prompt, answer)`` pair."""

    token: float
    exact: bool
    wild: bool


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


@torch.no_grad()
def score_answers(model, tok, pairs: Sequence[Tuple[str, str]], batch_size: int = 256
                  ) -> List[ProbeScore]:
    """Token accuracy, exact match and WILD (answer then ``</s>``) per pair, in order.

    Pairs are grouped by (sequence length, prompt length), so batches need no padding and
    only the answer positions' logits are computed.
    """
    device = _device(model)
    eos = tok.eos_token_id
    p_ids = tok([p for p, _ in pairs])["input_ids"]
    f_ids = tok([p + " " + a for p, a in pairs])["input_ids"]
    groups: Dict[Tuple[int, int], List[int]] = {}
    seqs = []
    for i, (f, p) in enumerate(zip(f_ids, p_ids)):
        if len(f) <= len(p):
            raise ValueError(f"the answer of {pairs[i]!r} encodes to no tokens")
        seqs.append(f + [eos])
        groups.setdefault((len(f) + 1, len(p)), []).append(i)
    out: List[Optional[ProbeScore]] = [None] * len(pairs)
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        for (length, n_prompt), members in sorted(groups.items()):
            # positions n_prompt-1 .. length-2 predict the answer tokens and then </s>
            positions = torch.arange(n_prompt - 1, length - 1, device=device)
            for start in range(0, len(members), batch_size):
                rows = members[start:start + batch_size]
                ids = torch.tensor([seqs[i] for i in rows], device=device)
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
                guess = logits[:, positions].argmax(-1).cpu()
                hits = guess == ids[:, n_prompt:].cpu()
                for r, i in enumerate(rows):
                    answer_hits = hits[r, :-1]
                    exact = bool(answer_hits.all())
                    out[i] = ProbeScore(token=answer_hits.float().mean().item(), exact=exact,
                                        wild=exact and bool(hits[r, -1]))
    finally:
        if was_training:
            model.train()
    return out  # type: ignore[return-value]


def mean_scores(scores: Sequence[ProbeScore]) -> Dict[str, float]:
    """``{"token", "exact", "wild", "n"}`` averaged over ``scores``."""
    n = len(scores)
    return {"token": round(sum(s.token for s in scores) / max(n, 1), 4),
            "exact": round(sum(s.exact for s in scores) / max(n, 1), 4),
            "wild": round(sum(s.wild for s in scores) / max(n, 1), 4),
            "n": n}


def knowledge_report(model, tok, facts: Sequence, batch_size: int = 256) -> dict:
    """Per field of ``facts`` (:class:`~.records.FactRecord`): token / exact / wild on the
    true answer, the same on the counterfactual target of the edit prompt (should be ~0),
    and how many records are *known* (every probe exact)."""
    pairs, where = [], []
    for k, f in enumerate(facts):
        for name, pair in f.probes.items():
            pairs.append(pair)
            where.append((k, name))
        if f.new_target:
            pairs.append((f.edit_prompt[0], f.new_target))
            where.append((k, "new_target"))
    scores = score_answers(model, tok, pairs, batch_size=batch_size)
    by_field: Dict[str, List[ProbeScore]] = {}
    known = [True] * len(facts)
    for (k, name), s in zip(where, scores):
        by_field.setdefault(name, []).append(s)
        if name != "new_target" and not s.exact:
            known[k] = False
    return {"fields": {name: mean_scores(v) for name, v in by_field.items()},
            "known_records": int(sum(known)), "records": len(facts),
            "known_mask": known}


def request_probes(request: dict) -> List[Tuple[str, str, str]]:
    """``(kind, prompt, answer)`` of every true-fact probe of an EasyEdit request: the edit
    prompt and the paraphrase with ``ground_truth``, each locality prompt with its own."""
    truth = request.get("ground_truth")
    probes = [("prompt", request["prompt"], truth)]
    if request.get("rephrase_prompt"):
        probes.append(("rephrase_prompt", request["rephrase_prompt"], truth))
    for name, loc in (request.get("locality") or {}).items():
        probes.append((f"locality:{name}", loc["prompt"], loc["ground_truth"]))
    return probes


def known_requests(model, tok, requests: Sequence[dict], batch_size: int = 256
                   ) -> Tuple[List[dict], List[Tuple[int, List[str]]]]:
    """Keep the requests whose every probe (:func:`request_probes`) the unedited model
    answers by whole-object greedy exact match.

    Returns ``(kept, dropped)``; ``dropped`` lists ``(case_id, [kinds it got wrong])`` so the
    caller can say how many were left out and why.
    """
    pairs, owner = [], []
    for i, r in enumerate(requests):
        for kind, prompt, answer in request_probes(r):
            pairs.append((prompt, answer))
            owner.append((i, kind))
    scores = score_answers(model, tok, pairs, batch_size=batch_size)
    wrong: Dict[int, List[str]] = {}
    for (i, kind), s in zip(owner, scores):
        if not s.exact:
            wrong.setdefault(i, []).append(kind)
    kept = [r for i, r in enumerate(requests) if i not in wrong]
    dropped = [(requests[i].get("case_id", i), kinds) for i, kinds in sorted(wrong.items())]
    return kept, dropped
