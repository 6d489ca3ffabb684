"""KV anchor routing: one query per position, built from embedding-layer outputs.

The query at position ``p`` is the mean of the (frozen) input embeddings over the non-padding
positions ``<= p`` (``query_pool="prefix_mean"``), or the embedding of token ``p`` alone
(``"token"``, the paper's token-level ablation), or the adapted FFN's own input at ``p``
(``"ffn_input"``, our extension: contextual, and as frozen as the embeddings, since nothing
below the adapted FFN is ever edited). Because it depends only on the tokens up to ``p``, the
same position gets the same query when the model is trained on prompt+target, when prompt and
target are scored in one teacher-forced forward, and when the target is generated token by
token with a KV cache (the running sum is carried between generation steps). ``ffn_input``
queries agree across those up to float rounding (a different batch shape or padding changes
the hidden states in the last bits), which only matters for exact ties.

Each expert owns a routing projection ``v = W_up SiLU(W_down q)`` and a key ``k``; its score is
``k . v``. It also keeps the normalised queries of the positions it was trained on (its
anchors). With ``router="anchor"`` the expert holding the nearest anchor is chosen instead of
the best learned score. The optional locality guard routes a position to no expert when its
cosine similarity to the chosen expert's nearest anchor is below ``guard_threshold``.

Routing costs the same handful of tensor operations whatever the number of experts: the
experts' projections, keys and anchors are stacked once into a :class:`RoutingTable`, which
the layer rebuilds only when a slot changes.
"""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model_families import cached_length
from .subjects import MAX_SUBJECT_TOKENS, SubjectIndex, carry, last_true, run_starts


class RoutingProjection(nn.Module):
    """The per-expert bottleneck ``W_up SiLU(W_down q)`` and the expert's key.

    Float32 whatever the host model's dtype, and kept so through ``model.half()`` /
    ``model.to(dtype)`` (only the device follows): routing compares cosines that a 16-bit
    type rounds to ~3 digits. Initial values come from ``generator`` (the global RNG when
    None), drawn on the CPU.
    """

    def __init__(self, hidden: int, dim: int, device=None,
                 generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        from .experts import seeded_linear

        self.down = seeded_linear(hidden, dim, False, generator, device, torch.float32)
        self.up = seeded_linear(dim, dim, False, generator, device, torch.float32)
        self.key = nn.Parameter(
            (torch.randn(dim, generator=generator) / dim ** 0.5).to(device))

    def _apply(self, fn, recurse: bool = True):
        return super()._apply(keep_float32(fn), recurse)

    def value(self, q: torch.Tensor) -> torch.Tensor:
        return self.up(F.silu(self.down(q)))

    def score(self, q: torch.Tensor) -> torch.Tensor:
        """Routing score ``k . v(q)`` for normalised queries ``q`` of shape ``[..., hidden]``.

        Computed as ``SiLU(W_down q) . (W_up^T k)``, the same product with one matrix fewer
        per query (and the form :class:`RoutingTable` stacks over experts).
        """
        return F.silu(self.down(q)) @ self.key_direction()

    def key_direction(self) -> torch.Tensor:
        """``W_up^T k``: the score is this vector's dot product with ``SiLU(W_down q)``."""
        return self.up.weight.t() @ self.key

    @torch.no_grad()
    def init_key_at_centroid(self, anchors: torch.Tensor) -> None:
        """Place the key at the (scaled) centroid of the batch's projected queries."""
        v = self.value(anchors).mean(0)
        self.key.copy_(v / v.norm().clamp_min(1e-6) * self.key.norm().clamp_min(1.0))


@dataclass
class Routes:
    """Routing decision for a ``[B, T]`` block of positions.

    ``expert[b, t, j]`` is the j-th chosen expert index (``-1``: none) and ``gate[b, t, j]``
    its weight. Top-1 routing leaves ``gate`` to be derived on first use (1 where an expert
    was chosen, else 0): the forward pass does not need it.
    """

    expert: torch.Tensor
    _gate: Optional[torch.Tensor] = None

    @property
    def gate(self) -> torch.Tensor:
        if self._gate is None:
            self._gate = (self.expert >= 0).float()
        return self._gate


def keep_float32(fn: Callable[[torch.Tensor], torch.Tensor]
                 ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` (what ``Module._apply`` maps over tensors: ``.to()``, ``.half()``,
    ``.cuda()``...) changed so that a float32 tensor keeps its dtype and follows only the
    device (routing state stays float32 whatever the host model is cast to)."""
    def apply(t: torch.Tensor) -> torch.Tensor:
        out = fn(t)
        if t.dtype == torch.float32 and out.dtype != torch.float32:
            return t.to(device=out.device)
        return out
    return apply


_VERSION = operator.attrgetter("_version")

#: Counts changes to any slot or slot list (see :func:`note_slot_change`).
_slot_changes = [0]


def note_slot_change() -> None:
    """Record that a slot was added, removed, replaced, assigned a tensor or loaded.

    Every routing table built before is then out of date. One counter for all layers: a
    change is rare (an edit, a load, a rollback) and a forward only compares one integer.
    """
    _slot_changes[0] += 1


class RoutingTable:
    """Every expert's routing state stacked, so that routing costs the same few tensor
    operations whatever the number of experts.

    Holds all anchors of the enabled experts as one ``[hidden, N]`` matrix with the expert
    owning each column and each column's acceptance radius, and (built on first use by the
    learned router) ``W_down`` of all experts as one ``[n * dim, hidden]`` matrix and the
    ``W_up^T k`` vectors as ``[n, dim]``; float32, built without autograd from ``slots``
    (:class:`~.layer.ExpertSlot`). :meth:`is_current` tells whether it still describes
    them: the slots note every structural change (:func:`note_slot_change`: a slot added,
    removed or replaced, a tensor assigned, a state dict loaded, training finished), and the
    one in-place write made from outside, EasyEdit's release switching an expert off by
    writing into its ``enabled`` flag, is seen on the flags' version counters. Moving the
    model to another device or dtype drops the table too (``LEMoELayer._apply``).
    """

    def __init__(self, slots) -> None:
        slots = tuple(slots)
        self.slots = slots
        self.n = len(slots)
        self.changes = _slot_changes[0]
        self._flags = tuple(s._parameters["enabled"] for s in slots)
        self._flag_version = self._flag_versions()
        self._floors: dict = {}
        self._weights: dict = {}
        anchors = [s._buffers["anchors"] for s in slots]
        with torch.no_grad():
            flags = [bool(f.item() > 0.5) for f in self._flags]
            self.enabled = torch.tensor(flags, dtype=torch.bool)
            self.live = sum(flags)
            #: The enabled slots' indices (a Python list: loops over it trace as constants).
            self.live_slots = [i for i, on in enumerate(flags) if on]
            self.any_dead = self.live < self.n
            self.n_anchors = 0
            self.has_radius = False
            self.all_live_anchored = True
            if not slots:
                return
            self.dim = slots[0].routing.key.shape[0]
            device = slots[0].routing.key.device
            # The anchors of the enabled experts as one [hidden, N] matrix with the owner of
            # each column: query @ anchors_t is the one product a forward makes (a contiguous
            # pre-transposed operand is about twice as fast as F.linear against [N, hidden]).
            live = self.live_slots
            self.anchors_t = torch.cat(
                [anchors[i].detach().to(device, torch.float32) for i in live]
                + [torch.zeros(0, anchors[0].shape[1], device=device)]).t().contiguous()
            self.n_anchors = self.anchors_t.shape[1]
            # Each column's acceptance radius (-1: none fitted, the guard alone decides).
            self.radius = torch.cat([_radius_of(slots[i], device) for i in live]
                                    + [torch.zeros(0, device=device)])
            self.has_radius = bool(self.n_anchors) and bool((self.radius > -1.0).any())
            sizes = [len(anchors[i]) for i in live]
            self.owner = torch.repeat_interleave(
                torch.tensor(live, dtype=torch.long),
                torch.tensor(sizes, dtype=torch.long)).to(device)
            self.dead = ~self.enabled.to(device)
            #: -1 ("no expert") as a tensor: torch.where then makes no scalar tensor.
            self.no_expert = torch.tensor(-1, dtype=torch.long, device=device)
            # Per expert, added to its similarities by the anchor router: an offset rising
            # with the expert's index but spanning less than 1e-6 in all, so that a near-tie
            # (the same prompt stored again, its hidden states a few ulps apart because they
            # were computed in a batch of another shape) goes to the newest expert, while no
            # real difference in similarity is ever outweighed, however many experts there
            # are. ``anchor_bias`` is the same offset per anchor.
            self.order = (torch.arange(self.n, device=device, dtype=torch.float32) + 1.0) \
                * (1e-6 / (self.n + 1))
            self.anchor_bias = self.order[self.owner]
            self.all_live_anchored = all(sizes)
            # The subject router's index and each anchor column's subject key (-1: a slot
            # trained without subjects, which the subject router never serves). Built with
            # the table (empty for the other routers) so that no forward reads the device.
            self.subjects = SubjectIndex(
                [(slots[i]._buffers["subject_ids"], slots[i]._buffers["subject_keys"])
                 for i in live], device)
            self.anchor_keys = torch.cat(
                [_anchor_keys_of(slots[i], device) for i in live]
                + [torch.zeros(0, dtype=torch.long, device=device)])

    def expert_weights(self, index: int):
        """Expert ``index``'s :meth:`~.experts.FFNExpert.serving_weights`, kept from its
        first use until the table is rebuilt (the attribute lookups and transposes cost a
        tiny model's forward more than the products)."""
        weights = self._weights.get(index)
        if weights is None:
            weights = self._weights[index] = self.slots[index].expert.serving_weights()
        return weights

    def _flag_versions(self) -> int:
        return sum(map(_VERSION, self._flags))

    # The learned router's state, built on first use: the anchor router never reads it. (Plain
    # attributes rather than functools.cached_property, whose lock torch.compile cannot trace.)
    _down: Optional[torch.Tensor] = None
    _key_dirs: Optional[torch.Tensor] = None
    @property
    def down(self) -> torch.Tensor:
        """``W_down`` of every expert stacked, ``[n * dim, hidden]``, float32."""
        if self._down is None:
            with torch.no_grad():
                self._down = torch.cat([s.routing.down.weight.detach()
                                        for s in self.slots]).float()
        return self._down

    @property
    def key_dirs(self) -> torch.Tensor:
        """``W_up^T k`` of every expert, ``[n, dim]``, float32."""
        if self._key_dirs is None:
            with torch.no_grad():
                self._key_dirs = torch.stack([s.routing.key_direction().detach()
                                              for s in self.slots]).float()
        return self._key_dirs

    def is_current(self) -> bool:
        """True while the slots are still what this table was built from: no slot change
        noted since (one integer comparison) and no ``enabled`` flag written in place (the
        sum of their version counters)."""
        if torch.compiler.is_compiling():
            # A compiled forward guards on the slot-change counter (a change recompiles);
            # the version counters, which Dynamo cannot trace, are left to eager calls,
            # where EasyEdit's release makes its in-place write.
            return self.changes == _slot_changes[0]
        return self.changes == _slot_changes[0] and \
            self._flag_versions() == self._flag_version

    def floor(self, threshold: float) -> torch.Tensor:
        """``[N]``: the least similarity at which each anchor serves a query, the larger of
        the global ``threshold`` and its own radius."""
        floor = self._floors.get(threshold)
        if floor is None:
            floor = self._floors[threshold] = self.radius.clamp_min(threshold)
        return floor

    def nearest_anchor(self, flat: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(similarity, column)`` of the nearest anchor of an enabled expert for each of
        ``P`` normalised queries ``[P, hidden]``; ``owner[column]`` is its expert.

        One product against the stacked anchors plus the tie-breaking offsets
        (``anchor_bias``) and one max, values and indices together (cheaper than argmax and
        a gather). The similarity includes the offset, which moves a guard's threshold by
        less than 1e-6.
        """
        if flat.dtype != torch.float32:
            flat = flat.float()
        return torch.addmm(self.anchor_bias, flat, self.anchors_t).max(1)

    def scores(self, flat: torch.Tensor) -> torch.Tensor:
        """Learned-router scores ``[P, n]`` of ``P`` normalised queries."""
        if flat.dtype != torch.float32:
            flat = flat.float()
        h = F.silu(F.linear(flat, self.down)).view(flat.shape[0], self.n, self.dim)
        return (h * self.key_dirs).sum(-1)

    def similarities(self, flat: torch.Tensor) -> torch.Tensor:
        """``[P, N]`` cosine of each of ``P`` normalised queries to each anchor."""
        return torch.mm(flat if flat.dtype == torch.float32 else flat.float(), self.anchors_t)

    def nearest_of(self, flat: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``[P, 1]`` cosine of each query to the nearest anchor of expert ``idx[p, 0]``."""
        if not self.n_anchors:
            return torch.full_like(idx, -2.0, dtype=torch.float32)
        sims = self.similarities(flat)
        return torch.where(self.owner == idx, sims, -2.0).amax(1, keepdim=True)

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """``[P, n]`` cosine of each query to each expert's nearest anchor (-2: none)."""
        near = torch.full((flat.shape[0], self.n), -2.0, device=flat.device)
        if self.n_anchors:
            sims = self.similarities(flat)
            near.scatter_reduce_(1, self.owner.expand_as(sims), sims, reduce="amax")
        return near


def _anchor_keys_of(slot, device) -> torch.Tensor:
    """The slot's per-anchor subject keys, or ``-1`` for each anchor when it has none."""
    keys = slot._buffers["anchor_subjects"]
    n = len(slot._buffers["anchors"])
    if len(keys) != n:
        return torch.full((n,), -1, dtype=torch.long, device=device)
    return keys.to(device)


def _radius_of(slot, device) -> torch.Tensor:
    """The slot's per-anchor radii, or ``-1`` for each anchor when it has none fitted."""
    radius = slot._buffers.get("radius")
    n = len(slot._buffers["anchors"])
    if radius is None or radius.shape != (n,):
        return torch.full((n,), -1.0, device=device)
    return radius.detach().to(device, torch.float32)


def select_routes(query: torch.Tensor, valid: Optional[torch.Tensor], table: RoutingTable, *,
                  router: str, top_k: int, guard: bool, threshold: float) -> Routes:
    """Choose up to ``top_k`` experts per position.

    ``query``: ``[B, T, H]`` normalised queries, ``valid``: ``[B, T]`` bool or the model's
    0/1 attention mask (False / 0 at padding; None: all valid), ``table``: the experts'
    stacked routing state. Gates are the
    softmax of the chosen experts' scores, so top-1 gates are 1.
    """
    B, T, _ = query.shape
    if not table.live:
        return Routes(torch.full((B, T, top_k), -1, dtype=torch.long, device=query.device),
                      torch.zeros(B, T, top_k, device=query.device))
    flat = query.reshape(B * T, -1)
    k = min(top_k, table.live)
    if router == "anchor" and k == 1 and table.all_live_anchored:
        # The expert with the nearest anchor is the owner of the nearest anchor.
        # (In as few operations as it takes: this runs on every forward of an edited model.)
        # (index_select rather than ``owner[best]``: Tensor indexing parses its arguments in
        # Python first, several times the cost of the lookup itself.)
        best_sim, best = table.nearest_anchor(flat)
        idx = table.owner.index_select(0, best)
        keep = None
        if guard:
            # Served only at or above the larger of the threshold and the anchor's radius.
            # A NaN similarity (the query of an all-zero state) is never served.
            keep = best_sim >= (table.floor(threshold).index_select(0, best)
                                if table.has_radius else threshold)
        if valid is not None:  # bool, or the model's 0/1 attention mask, on query's device
            valid = valid.reshape(-1)
            keep = valid.bool() if keep is None else keep.logical_and(valid)
        if keep is not None:
            idx = torch.where(keep, idx, table.no_expert)
        if top_k > 1:
            return Routes(F.pad(idx.unsqueeze(1), (0, top_k - 1), value=-1).view(B, T, top_k))
        return Routes(idx.view(B, T, 1))
    # Nearest-anchor similarity per expert: used by the anchor router and by the guard (for
    # the learned router at top-1, only the chosen expert's is needed).
    near = table.nearest(flat) if (router == "anchor" or (guard and k > 1)) else None
    if router == "anchor":
        # Later experts win ties, so a re-edited prompt routes to its newest expert.
        scores = near + table.order
    else:
        scores = table.scores(flat)
    if table.any_dead:
        scores = scores.masked_fill(table.dead, float("-inf"))
    drop = None if valid is None else valid.reshape(-1, 1) == 0
    if k == 1:  # the common case, in as few operations as possible (it runs every forward)
        idx = scores.argmax(1, keepdim=True)
        if guard:
            far = _outside(table, flat, idx, near, threshold)
            drop = far if drop is None else drop | far
        if drop is not None:
            idx = idx.masked_fill(drop, -1)
        if top_k > 1:
            idx = F.pad(idx, (0, top_k - 1), value=-1)
        return Routes(idx.view(B, T, top_k))
    top_scores, idx = scores.topk(k, dim=1)
    gate = torch.softmax(top_scores, dim=1)
    if guard:
        far = _outside(table, flat, idx, near, threshold)
        drop = far if drop is None else drop | far
    if drop is not None:
        idx = idx.masked_fill(drop, -1)
        gate = gate.masked_fill(drop, 0.0)
    if k < top_k:
        idx = F.pad(idx, (0, top_k - k), value=-1)
        gate = F.pad(gate, (0, top_k - k), value=0.0)
    return Routes(idx.reshape(B, T, top_k), gate.reshape(B, T, top_k))


def _outside(table: RoutingTable, flat: torch.Tensor, idx: torch.Tensor,
             near: Optional[torch.Tensor], threshold: float) -> torch.Tensor:
    """``[P, k]``: whether each query is outside the guard of chosen expert ``idx[p, j]``:
    its cosine to that expert's nearest anchor is below ``threshold`` or below that
    anchor's radius."""
    if not table.has_radius:
        chosen = near.gather(1, idx) if near is not None else table.nearest_of(flat, idx)
        return chosen < threshold
    sims = table.similarities(flat)
    far = []
    for j in range(idx.shape[1]):
        best, column = torch.where(table.owner == idx[:, j:j + 1], sims, -2.0).max(1)
        far.append((best < threshold) | (best < table.radius[column]))
    return torch.stack(far, 1)


def select_subject_routes(subject: torch.Tensor, query: torch.Tensor,
                          valid: Optional[torch.Tensor], table: RoutingTable, *,
                          guard: bool, threshold: float,
                          admit: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
                          ) -> Routes:
    """Routes of the subject router (:mod:`.subjects`).

    ``subject`` ``[B, T]``: the key of the edit subject each position falls under (-1:
    none; :meth:`QueryBuilder.current_subjects`). A position goes to the expert holding the
    anchor of that subject nearest to its normalised ``query`` ``[B, T, H]``, so that the
    edits of one subject in several experts each keep their own. No subject, or (with
    ``guard``) a nearest anchor below the threshold or its radius: no expert. ``admit``
    (``guard_carries``: :meth:`QueryBuilder.admitted_runs`) turns the positions that pass
    the guard ``[B, T]`` into those served: then a position is also served when an earlier
    position of its subject's run passed (an answer goes on once its question was
    admitted). Padding (``valid`` False / 0) goes nowhere.
    """
    B, T = subject.shape
    if not table.n_anchors:
        return Routes(torch.full((B, T, 1), -1, dtype=torch.long, device=subject.device))
    flat = query.reshape(B * T, -1)
    if flat.dtype != torch.float32:
        flat = flat.float()
    sims = torch.addmm(table.anchor_bias, flat, table.anchors_t)
    own = table.anchor_keys.unsqueeze(0) == subject.reshape(-1, 1)
    best_sim, best = sims.masked_fill(~own, float("-inf")).max(1)
    keep = own.any(1)
    if guard:
        passed = keep & (best_sim >= (table.floor(threshold).index_select(0, best)
                                      if table.has_radius else threshold))
        keep = passed if admit is None else keep & admit(passed.view(B, T)).reshape(-1)
    if valid is not None:
        keep &= valid.reshape(-1).bool()
    expert = torch.where(keep, table.owner.index_select(0, best), table.no_expert)
    return Routes(expert.view(B, T, 1))


#: ``query_pool`` whose queries are the adapted FFN's own input, not the embedding outputs.
LAYER_INPUT_POOL = "ffn_input"
#: ``router`` that routes by the edit subjects found in the input ids (:mod:`.subjects`).
SUBJECT_ROUTER = "subject"
#: An expert slot's buffers that only the subject router fills (:mod:`.subjects`).
SUBJECT_BUFFERS = ("subject_ids", "subject_keys", "anchor_subjects")
#: The values of ``router`` and ``query_pool`` (hparams and saved manifests check both).
ROUTERS = ("learned", "anchor", SUBJECT_ROUTER)
QUERY_POOLS = ("prefix_mean", "token", LAYER_INPUT_POOL)


class QueryBuilder:
    """Computes routing queries in a forward pre-hook of the whole model.

    The hook is the one piece of state-passing the method needs: the adapted FFN sits deep in
    the network and never sees the input ids, so the model-level hook computes the queries and
    leaves them here for the layer to read. ``reset`` marks the start of a new sequence; a
    forward with a non-empty KV cache continues the running prefix sums of the previous one.
    """

    def __init__(self, embed: nn.Module, pool: str, track_ids: bool = False) -> None:
        self.embed = embed
        self.pool = pool
        #: Keep each forward's input ids for the subject router (:meth:`current_subjects`).
        self.track_ids = track_ids
        #: This forward's ids after the last ids of the earlier positions of the sequence
        #: (``ids_first`` of them; -1 at padding), and the subject of the last position.
        self.ids: Optional[torch.Tensor] = None
        self.ids_first = 0
        self.carried: Optional[torch.Tensor] = None
        #: Where this forward's subject run of each position began (-1: before it), and
        #: whether the run in progress at the last position was admitted by the guard
        #: (:meth:`admitted_runs`); both carried like ``carried``.
        self.run_start: Optional[torch.Tensor] = None
        self.carried_admitted: Optional[torch.Tensor] = None
        self.query: Optional[torch.Tensor] = None
        #: This forward's padding mask as the model was given it (1: token, 0: padding).
        self.mask: Optional[torch.Tensor] = None
        self._valid: Optional[torch.Tensor] = None
        self._sum: Optional[torch.Tensor] = None
        #: Positions of the current sequence seen so far (what a KV cache must hold).
        self._seen = 0

    @classmethod
    def for_model(cls, model: nn.Module, hparams) -> "QueryBuilder":
        """The builder ``hparams`` ask for on ``model`` (its input embeddings, the query
        pool, and the input ids kept when the router is ``subject``)."""
        return cls(model.get_input_embeddings(), hparams.query_pool,
                   track_ids=hparams.router == SUBJECT_ROUTER)

    def __call__(self, module: nn.Module, args, kwargs) -> None:
        bound = _bind_forward(module, args, kwargs)
        embeds, ids = bound.get("inputs_embeds"), bound.get("input_ids")
        if embeds is None and ids is None:
            raise ValueError("LEMoE routing needs input_ids or inputs_embeds")
        T = (embeds if embeds is not None else ids).shape[1]
        mask = bound.get("attention_mask")
        # The padding mask of the positions of this forward (the last T of a cached sequence).
        cur_mask = None if mask is None or mask.dim() != 2 else \
            mask if mask.shape[1] == T else mask[:, -T:]
        past = cached_length(bound)
        if past and self._seen != past:
            raise _cache_mismatch(past, self._seen)
        if self.track_ids:
            if ids is None:
                raise ValueError("LEMoE's subject router needs input_ids (it finds the edit "
                                 "subjects in them); inputs_embeds alone cannot be routed")
            self.note_ids(ids, cur_mask, past)
        if self.pool == LAYER_INPUT_POOL:
            # The layer builds the queries from its own input: only padding is needed here.
            self.query = None
            self.mask, self._valid = cur_mask, None
        else:
            embeds = self.embed_ids(ids) if embeds is None else embeds.detach()
            self.build(embeds, cur_mask, past)
        self._seen = past + T

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """The (frozen) input embeddings of ``ids``, without autograd.

        This hook runs before accelerate moves the model's inputs (``device_map``), so the
        ids are taken to the embedding's device here; an offloaded embedding (weights on
        ``meta`` at rest) is called as a module, whose accelerate hook loads its weights.
        """
        emb = self.embed
        with torch.no_grad():
            if type(emb) is nn.Embedding and emb.max_norm is None and \
                    getattr(emb, "_hf_hook", None) is None:
                weight = emb.weight
                # The lookup without module overhead.
                return F.embedding(ids.to(weight.device, non_blocking=True), weight)
            return emb(ids)

    @property
    def valid(self) -> Optional[torch.Tensor]:
        """``[B, T]`` bool, False at padding (None: no padding mask); built on first use."""
        if self._valid is None and self.mask is not None:
            self._valid = self.mask > 0
        return self._valid

    def current(self, x: torch.Tensor, normalise: bool = True):
        """``(query, mask)`` for the adapted layer's input ``x`` ``[B, T, H]``; ``mask`` is
        the padding mask as the model was given it (0/1 or bool; None: no padding), on
        ``x``'s device.

        With ``pool="ffn_input"`` the query of position ``p`` is ``x[:, p]`` normalised (left
        to the caller with ``normalise=False``): the FFN input of the adapted block, which
        only frozen parts of the model compute and which depends only on the tokens up to
        ``p``. Otherwise it is what the model-level hook left.
        """
        if self.pool == LAYER_INPUT_POOL:
            q, mask = self.layer_input(x)  # the mask as given: select_routes reads 0/1 too
            if mask is not None and mask.device != x.device:
                mask = mask.to(x.device)
            return (unit(q) if normalise else q), mask
        q, valid = self.query, self.mask  # the 0/1 mask as given (select_routes reads it)
        if q is None or q.shape[:2] != x.shape[:2]:
            raise RuntimeError("LEMoE routing queries are missing for this forward; call the "
                               "whole model, not the layer alone")
        if q.device != x.device:
            q, valid = q.to(x.device), None if valid is None else valid.to(x.device)
        return q, valid

    def note_ids(self, ids: torch.Tensor, cur_mask: Optional[torch.Tensor], past: int) -> None:
        """Keep ``ids`` ``[B, T]`` (following ``past`` cached positions) for the subject
        router, after the last ids of the earlier positions: a subject may end in this
        forward but begin in an earlier one (a KV-cache step)."""
        if cur_mask is not None:
            ids = ids.masked_fill(cur_mask.to(ids.device) == 0, -1)  # padding never matches
        if past:
            tail = self.ids
            if tail is None or tail.shape[0] != ids.shape[0]:
                raise _cache_mismatch(past, self._seen)
            tail = tail[:, -(MAX_SUBJECT_TOKENS - 1):]
            self.ids, self.ids_first = torch.cat([tail.to(ids.device), ids], 1), tail.shape[1]
        else:
            self.ids, self.ids_first, self.carried = ids, 0, None
            self.carried_admitted = None

    def current_subjects(self, subjects: SubjectIndex, device: torch.device) -> torch.Tensor:
        """``[B, T]``: the key of the edit subject each position of this forward falls
        under (the last one found in ``subjects`` at or before it in the sequence; -1:
        none), on ``device``; carried on to the next forward of a KV-cached sequence."""
        if self.ids is None:
            raise RuntimeError("LEMoE subject routing has no input ids for this forward; "
                               "call the whole model, not the layer alone")
        ids = self.ids if self.ids.device == device else self.ids.to(device)
        carried = self.carried
        found = subjects.matches(ids, self.ids_first)
        self.run_start = run_starts(found)
        subject = carry(found, None if carried is None else carried.to(device), self.run_start)
        self.carried = subject[:, -1]
        return subject

    def admitted_runs(self, passed: torch.Tensor) -> torch.Tensor:
        """``[B, T]``: whether some position of each position's subject run, up to it,
        ``passed`` ``[B, T]`` the guard (this forward's positions; a run begun in an earlier
        forward of the sequence counts what it passed there). Call after
        :meth:`current_subjects` of the same forward."""
        passed_at = last_true(passed)
        start = self.run_start.to(passed.device)
        admitted = (passed_at >= start) & (passed_at >= 0)
        if self.carried_admitted is not None:
            admitted |= (start < 0) & self.carried_admitted.to(passed.device).unsqueeze(1)
        self.carried_admitted = admitted[:, -1]
        return admitted

    def layer_input(self, x: torch.Tensor):
        """``(x as float32 without autograd, this forward's raw padding mask or None)``.

        The ``ffn_input`` query before normalisation, and the mask as the model was given it,
        without the comparison that :attr:`valid` makes (the serving path reads the mask's
        values directly).
        """
        mask = self.mask
        if mask is not None and mask.shape != x.shape[:2]:
            raise RuntimeError("LEMoE routing mask does not match this forward; call the "
                               "whole model, not the layer alone")
        q = x.detach() if x.requires_grad else x
        return (q if q.dtype == torch.float32 else q.float()), mask

    def build(self, embeds: torch.Tensor, cur_mask: Optional[torch.Tensor], past: int) -> None:
        """Queries for ``embeds`` ``[B, T, H]`` that follow ``past`` cached positions.

        ``cur_mask`` ``[B, T]`` (1 for tokens, 0 for padding; None: no padding). The prefix
        mean is normalised without dividing by the count first: a mean and a sum differ by a
        positive factor, which normalisation removes, so only the running sum is carried
        between generation steps.
        """
        B, T, H = embeds.shape
        if embeds.dtype != torch.float32:
            embeds = embeds.float()  # routing is float32 whatever the model's dtype
        if cur_mask is not None and cur_mask.device != embeds.device:
            cur_mask = cur_mask.to(embeds.device)
        if past and self.pool == "prefix_mean" and (self._sum is None or
                                                    self._sum.shape[0] != B):
            raise _cache_mismatch(past, self._seen)
        if self.pool == "prefix_mean":
            q = (embeds if cur_mask is None else embeds * cur_mask.unsqueeze(-1)).cumsum(1)
            if past:
                q = q + self._sum.unsqueeze(1)
            self._sum = q[:, -1]
        else:
            q = embeds
        self.query = unit(q)
        self.mask, self._valid = cur_mask, None


def _cache_mismatch(past: int, seen: int) -> RuntimeError:
    return RuntimeError(
        f"LEMoE routing state does not match the KV cache (cache holds {past} positions, "
        f"routing saw {seen}); beam search and cache reordering are not supported, use "
        f"greedy or sampling generation")


def unit(q: torch.Tensor) -> torch.Tensor:
    """``q`` over its norm along the last dimension, in two operations (it runs on every
    forward). Unlike ``F.normalize`` an all-zero row gives NaN, which no routing rule
    serves (the guard's ``>=`` is False; the only such rows, the empty prefix sums of
    left padding, are masked out anyway)."""
    return q / torch.linalg.vector_norm(q, dim=-1, keepdim=True)


_SIGNATURES: dict = {}


def _bind_forward(module: nn.Module, args, kwargs) -> dict:
    if not args:
        return kwargs
    sig = _SIGNATURES.setdefault(type(module), inspect.signature(module.forward))
    return sig.bind_partial(*args, **kwargs).arguments
