"""Acceptance radii fitted from negatives: how LEMoE keeps its neighbours' facts.

A routing query that lands near an edit's anchor is served by that edit's expert. With one
global cosine guard, a *neighbour* (the same relation asked about another person, or the
same person asked about another relation) often lands near enough to some anchor to be
served by an expert that knows nothing about it, and its answer changes. So each anchor
gets its own acceptance radius, fitted from data:

* **negatives** are built from the edit stream itself, never from evaluation probes: each
  request's prompt with its subject swapped for other subjects of the stream
  (:func:`subject_swaps`), followed by the request's own target (so that every anchor
  position has a counterpart), plus the anchors of the other requests (assembled by
  :func:`~.training.negative_pool`);
* an anchor's radius is a cosine between its most similar negative **about another
  subject** and the anchor itself (1), ``margin`` of the way up (``radius_margin``) (negatives about the anchor's own subject are
  left out: without relation labels, "the same person in other words" cannot be told from
  "the same person, another relation");
* a query is served by the expert of its nearest anchor only when its cosine to that
  anchor is at least the anchor's radius (and the global ``guard_threshold``, a floor).

The rule has no absolute number in it: the radius follows whatever similarities the host
model's hidden states have, so the same mechanism applies to any model width.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

__all__ = ["NegativePool", "subject_swaps", "fit_radii", "NO_RADIUS"]

#: Radius of an anchor that has no negative to be fitted against: only the global guard.
NO_RADIUS = -1.0
#: Radii stay below this, so that the anchor's own prompt, recomputed in a batch of another
#: shape (a few ulps off), stays inside even when a negative coincides with it.
_MAX_RADIUS = 0.999


@dataclass
class NegativePool:
    """Queries that must not be served by an anchor about another subject.

    ``queries``: ``[M, H]`` normalised routing queries; ``subjects``: ``[M]`` integer ids of
    the subject each one is about (ids from :func:`subject_ids`; ``-1``: none known).
    """

    queries: torch.Tensor
    subjects: torch.Tensor

    @classmethod
    def empty(cls, hidden: int, device=None) -> "NegativePool":
        return cls(torch.zeros(0, hidden, device=device),
                   torch.zeros(0, dtype=torch.long, device=device))

    def __len__(self) -> int:
        return int(self.subjects.numel())

    def cat(self, other: "NegativePool") -> "NegativePool":
        return NegativePool(torch.cat([self.queries, other.queries.to(self.queries.device)]),
                            torch.cat([self.subjects, other.subjects.to(self.subjects.device)]))


def subject_ids(subjects: Sequence[Optional[str]], table: Dict[str, int]) -> List[int]:
    """Integer id of each subject, adding new ones to ``table``; None gets ``-1``."""
    out = []
    for s in subjects:
        if s is None:
            out.append(-1)
        else:
            out.append(table.setdefault(s, len(table)))
    return out


def subject_swaps(requests: Sequence[Dict], subjects: Sequence[str], per_request: int,
                  seed: int) -> List[Dict]:
    """``per_request`` copies of each request with its subject replaced by another one.

    ``subjects``: the pool to draw from (the stream's subjects). Only requests whose
    ``subject`` occurs in their prompt are swapped. Each copy keeps the request's
    ``target_new`` (its positions are where the anchors are), records the subject it is
    now about in ``subject`` and the index of the request it was made from in ``source``.
    Drawn from ``random.Random(seed)``: deterministic, and the caller's global random
    state is not touched.
    """
    if per_request <= 0:
        return []
    rng = random.Random(seed)
    pool = sorted(set(subjects))
    out = []
    for i, r in enumerate(requests):
        subject = r.get("subject")
        if not isinstance(subject, str) or subject not in r["prompt"]:
            continue
        others = [s for s in pool if s != subject]
        for s in rng.sample(others, min(per_request, len(others))):
            out.append({"prompt": r["prompt"].replace(subject, s),
                        "target_new": r["target_new"], "subject": s, "source": i})
    return out


@torch.no_grad()
def fit_radii(anchors: torch.Tensor, anchor_subjects: torch.Tensor,
              negatives: NegativePool, margin: float = 0.5) -> torch.Tensor:
    """Acceptance radius of each anchor, ``[N]`` (see the module docstring).

    ``margin``: where between its nearest negative (0) and itself (1) an anchor's radius
    lies, as a fraction of the cosine gap (0.5: halfway). ``anchors``: ``[N, H]`` normalised queries, ``anchor_subjects``: ``[N]`` subject ids
    (``-1``: unknown, then every negative counts). An anchor with no negative about
    another subject gets :data:`NO_RADIUS`.
    """
    n = anchors.shape[0]
    if not n or not len(negatives):
        return torch.full((n,), NO_RADIUS, device=anchors.device)
    neg = negatives.queries.to(anchors.device, torch.float32)
    sims = anchors.float() @ neg.t()
    same = (anchor_subjects.to(anchors.device).unsqueeze(1)
            == negatives.subjects.to(anchors.device).unsqueeze(0)) \
        & (anchor_subjects.to(anchors.device).unsqueeze(1) >= 0)
    nearest = sims.masked_fill(same, -2.0).amax(1)
    radius = (nearest + margin * (1.0 - nearest)).clamp_max(_MAX_RADIUS)
    return torch.where(nearest > -2.0, radius, torch.full_like(nearest, NO_RADIUS))
