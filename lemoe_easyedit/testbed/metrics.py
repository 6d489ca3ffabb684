"""Fact accuracy of a causal LM, measured the way EasyEdit measures edits.

* **token accuracy**: teacher-forced, ``prompt + " " + target`` is fed once and the argmax
  at every target position is compared with the target token; the per-example score is the
  mean over the target's tokens (EasyEdit's ``test_prediction_acc``), then averaged.
* **exact match**: the whole target is right, i.e. every target position is right. With
  teacher forcing this is exactly greedy decoding of ``len(target tokens)`` tokens after the
  prompt reproducing the target (if every argmax is right, greedy decoding follows the
  target token by token), so it is computed from the same forward pass;
  :func:`greedy_complete` decodes for real when text is wanted.

The model is called as ``model(input_ids=..., attention_mask=...)`` and only ``.logits`` is
used, so edited or wrapped models are measured the same way.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

__all__ = [
    "encode_pairs",
    "score_pairs",
    "fact_accuracy",
    "template_accuracy",
    "greedy_complete",
]


def encode_pairs(tok, pairs: Sequence[Tuple[str, str]]) -> List[Tuple[List[int], int]]:
    """``(ids of prompt + " " + target, number of prompt ids)`` for each pair."""
    prompts = [p for p, _ in pairs]
    fulls = [p + " " + t for p, t in pairs]
    p_ids = tok(prompts, add_special_tokens=True)["input_ids"]
    f_ids = tok(fulls, add_special_tokens=True)["input_ids"]
    return [(f, len(p)) for f, p in zip(f_ids, p_ids)]


def _device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _forward_logits(model, input_ids: torch.Tensor, positions: torch.Tensor, state: dict):
    """Logits at ``positions`` (same for every row), via ``logits_to_keep`` when supported."""
    if state.get("logits_to_keep", True):
        try:
            logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                           logits_to_keep=positions).logits
            if logits.shape[1] == len(positions):
                state["logits_to_keep"] = True
                return logits
        except TypeError:
            pass
        state["logits_to_keep"] = False
    logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits
    return logits[:, positions.to(logits.device)]


@torch.no_grad()
def score_pairs(model, tok, pairs: Sequence[Tuple[str, str]], batch_size: int = 256,
                device: Optional[torch.device] = None) -> List[Tuple[float, bool, List[int]]]:
    """Per pair, in order: ``(token accuracy, exact match, predicted target ids)``.

    Teacher-forced. Pairs are grouped by (sequence length, prompt length) so that batches
    need no padding and only the target positions' logits are computed.
    """
    device = device or _device_of(model)
    encoded = encode_pairs(tok, pairs)
    groups: Dict[Tuple[int, int], List[int]] = {}
    for i, (ids, n_prompt) in enumerate(encoded):
        groups.setdefault((len(ids), n_prompt), []).append(i)
    out: List[Optional[Tuple[float, bool, List[int]]]] = [None] * len(encoded)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    state: dict = {}
    try:
        for (length, n_prompt), members in sorted(groups.items()):
            if length <= n_prompt:
                raise ValueError("a target encodes to no tokens")
            positions = torch.arange(n_prompt - 1, length - 1, device=device)
            for start in range(0, len(members), batch_size):
                rows = members[start:start + batch_size]
                input_ids = torch.tensor([encoded[i][0] for i in rows], device=device)
                logits = _forward_logits(model, input_ids, positions, state)
                guess = logits.argmax(-1).cpu()
                target = input_ids[:, n_prompt:].cpu()
                hits = guess == target
                for r, i in enumerate(rows):
                    out[i] = (hits[r].float().mean().item(), bool(hits[r].all()),
                              guess[r].tolist())
    finally:
        if was_training:
            model.train()
    return out  # type: ignore[return-value]


def fact_accuracy(model, tok, pairs: Sequence[Tuple[str, str]], batch_size: int = 256
                  ) -> Dict[str, float]:
    """Mean token accuracy and exact match over ``(prompt, target)`` pairs."""
    scores = score_pairs(model, tok, pairs, batch_size=batch_size)
    n = len(scores)
    return {
        "token": sum(s[0] for s in scores) / max(n, 1),
        "exact": sum(s[1] for s in scores) / max(n, 1),
        "n": n,
    }


def template_accuracy(model, tok, world, facts: Optional[Iterable] = None,
                      templates: Optional[Sequence[int]] = None, batch_size: int = 256
                      ) -> Dict[int, Dict[str, float]]:
    """Fact accuracy per template index, over ``facts`` (default all people facts).

    Facts of relations with fewer templates than an index are skipped for that index.
    """
    facts = list(world.facts if facts is None else facts)
    if templates is None:
        templates = range(max(len(world.relation(f.relation).templates) for f in facts))
    result = {}
    for t in templates:
        pairs = [(world.prompt(f, t), f.object) for f in facts
                 if t < len(world.relation(f.relation).templates)]
        if pairs:
            result[int(t)] = fact_accuracy(model, tok, pairs, batch_size=batch_size)
    return result


@torch.no_grad()
def greedy_complete(model, tok, prompts: Sequence[str], max_new_tokens: int = 4) -> List[str]:
    """Greedy continuation of each prompt (one at a time, no padding), decoded without specials."""
    device = _device_of(model)
    outs = []
    for prompt in prompts:
        ids = torch.tensor([tok(prompt)["input_ids"]], device=device)
        new = []
        for _ in range(max_new_tokens):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            nxt = int(logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]], device=device)], dim=1)
        outs.append(tok.decode(new, skip_special_tokens=True).strip())
    return outs
