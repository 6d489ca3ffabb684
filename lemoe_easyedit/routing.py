"""KV anchor routing: one query per position, built from embedding-layer outputs.

The query at position ``p`` is the mean of the (frozen) input embeddings over the non-padding
positions ``<= p`` (``query_pool="prefix_mean"``), or the embedding of token ``p`` alone
(``"token"``, the paper's token-level ablation). Because it depends only on the tokens up to
``p``, the same position gets the same query when the model is trained on prompt+target, when
prompt and target are scored in one teacher-forced forward, and when the target is generated
token by token with a KV cache (the running sum is carried between generation steps).

Each expert owns a routing projection ``v = W_up SiLU(W_down q)`` and a key ``k``; its score is
``k . v``. It also keeps the normalised queries of the positions it was trained on (its
anchors). With ``router="anchor"`` the expert holding the nearest anchor is chosen instead of
the best learned score. The optional locality guard routes a position to no expert when its
cosine similarity to the chosen expert's nearest anchor is below ``guard_threshold``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class RoutingProjection(nn.Module):
    """The per-expert bottleneck ``W_up SiLU(W_down q)`` and the expert's key."""

    def __init__(self, hidden: int, dim: int, device=None) -> None:
        super().__init__()
        kw = dict(device=device, dtype=torch.float32)
        self.down = nn.Linear(hidden, dim, bias=False, **kw)
        self.up = nn.Linear(dim, dim, bias=False, **kw)
        self.key = nn.Parameter(torch.randn(dim, **kw) / dim ** 0.5)

    def value(self, q: torch.Tensor) -> torch.Tensor:
        return self.up(F.silu(self.down(q)))

    def score(self, q: torch.Tensor) -> torch.Tensor:
        """Routing score ``k . v(q)`` for normalised queries ``q`` of shape ``[..., hidden]``."""
        return self.value(q) @ self.key

    @torch.no_grad()
    def init_key_at_centroid(self, anchors: torch.Tensor) -> None:
        """Place the key at the (scaled) centroid of the batch's projected queries."""
        v = self.value(anchors).mean(0)
        self.key.copy_(v / v.norm().clamp_min(1e-6) * self.key.norm().clamp_min(1.0))


@dataclass
class Routes:
    """Routing decision for a ``[B, T]`` block of positions.

    ``expert[b, t, j]`` is the j-th chosen expert index (``-1``: none) and ``gate[b, t, j]``
    its weight.
    """

    expert: torch.Tensor
    gate: torch.Tensor


def select_routes(query: torch.Tensor, valid: torch.Tensor, projections: List[RoutingProjection],
                  anchors: List[torch.Tensor], enabled: List[bool], *, router: str, top_k: int,
                  guard: bool, threshold: float) -> Routes:
    """Choose up to ``top_k`` experts per position.

    ``query``: ``[B, T, H]`` normalised queries, ``valid``: ``[B, T]`` bool (False for
    padding), one projection, anchor matrix ``[n_i, H]`` and enabled flag per expert. Gates are
    the softmax of the chosen experts' scores, so top-1 gates are 1.
    """
    B, T, _ = query.shape
    n = len(projections)
    none = Routes(torch.full((B, T, top_k), -1, dtype=torch.long, device=query.device),
                  torch.zeros(B, T, top_k, device=query.device))
    live = [i for i in range(n) if enabled[i]]
    if not live:
        return none
    flat = query.reshape(B * T, -1)
    # Nearest-anchor similarity per expert: used by the anchor router and by the guard.
    near = torch.full((B * T, n), -2.0, device=query.device)
    for i in live:
        if anchors[i].numel():
            near[:, i] = (flat @ anchors[i].to(flat.device).t()).max(dim=1).values
    if router == "anchor":
        # Later experts win ties, so a re-edited prompt routes to its newest expert.
        order = torch.arange(n, device=query.device, dtype=torch.float32) * 1e-6
        scores = near + order
    else:
        scores = torch.stack([p.score(flat) for p in projections], dim=1)
    dead = torch.tensor([not e for e in enabled], device=query.device)
    scores = scores.masked_fill(dead, float("-inf"))
    k = min(top_k, len(live))
    top_scores, top_idx = scores.topk(k, dim=1)
    gate = torch.softmax(top_scores, dim=1)
    idx = top_idx.clone()
    if guard:
        idx[near.gather(1, top_idx) < threshold] = -1
    idx[~valid.reshape(-1)] = -1
    gate = gate.masked_fill(idx < 0, 0.0)
    expert = none.expert.clone()
    gates = none.gate.clone()
    expert[..., :k] = idx.reshape(B, T, k)
    gates[..., :k] = gate.reshape(B, T, k)
    return Routes(expert, gates)


class QueryBuilder:
    """Computes routing queries in a forward pre-hook of the whole model.

    The hook is the one piece of state-passing the method needs: the adapted FFN sits deep in
    the network and never sees the input ids, so the model-level hook computes the queries and
    leaves them here for the layer to read. ``reset`` marks the start of a new sequence; a
    forward with a non-empty KV cache continues the running prefix sums of the previous one.
    """

    def __init__(self, embed: nn.Module, pool: str) -> None:
        self.embed = embed
        self.pool = pool
        self.query: Optional[torch.Tensor] = None
        self.valid: Optional[torch.Tensor] = None
        self._sum: Optional[torch.Tensor] = None
        self._count: Optional[torch.Tensor] = None
        self._seen = 0

    def __call__(self, module: nn.Module, args, kwargs) -> None:
        bound = _bind_forward(module, args, kwargs)
        ids = bound.get("input_ids")
        embeds = bound.get("inputs_embeds")
        if embeds is None:
            if ids is None:
                raise ValueError("LEMoE routing needs input_ids or inputs_embeds")
            with torch.no_grad():
                embeds = self.embed(ids)
        embeds = embeds.detach().float()
        B, T = embeds.shape[:2]
        past = _past_length(bound.get("past_key_values"))
        mask = bound.get("attention_mask")
        if mask is None or mask.dim() != 2:
            cur_mask = torch.ones(B, T, device=embeds.device)
        else:
            cur_mask = mask[:, -T:].to(embeds.device).float()
        self.build(embeds, cur_mask, past)

    def build(self, embeds: torch.Tensor, cur_mask: torch.Tensor, past: int) -> None:
        """Queries for ``embeds`` ``[B, T, H]`` that follow ``past`` already-seen positions."""
        B, T, H = embeds.shape
        if past == 0:
            prev_sum = torch.zeros(B, H, device=embeds.device)
            prev_count = torch.zeros(B, device=embeds.device)
        else:
            if self._sum is None or self._sum.shape[0] != B or self._seen != past:
                raise RuntimeError(
                    f"LEMoE routing state does not match the KV cache (cache holds {past} "
                    f"positions, routing saw {self._seen}); beam search and cache reordering "
                    f"are not supported, use greedy or sampling generation")
            prev_sum, prev_count = self._sum, self._count
        masked = embeds * cur_mask.unsqueeze(-1)
        sums = prev_sum.unsqueeze(1) + masked.cumsum(1)
        counts = prev_count.unsqueeze(1) + cur_mask.cumsum(1)
        if self.pool == "prefix_mean":
            q = sums / counts.clamp_min(1.0).unsqueeze(-1)
        else:
            q = embeds
        self.query = F.normalize(q, dim=-1)
        self.valid = cur_mask > 0
        self._sum, self._count, self._seen = sums[:, -1], counts[:, -1], past + T


def _past_length(past) -> int:
    if past is None:
        return 0
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    if isinstance(past, (tuple, list)) and past and past[0] is not None:
        return int(past[0][0].shape[-2])
    return 0


_SIGNATURES: dict = {}


def _bind_forward(module: nn.Module, args, kwargs) -> dict:
    if not args:
        return kwargs
    sig = _SIGNATURES.setdefault(type(module), inspect.signature(module.forward))
    return sig.bind_partial(*args, **kwargs).arguments
