"""``LEMoELayer``: the host FFN plus a bypass mixture of experts.

``h(x) = FFN(x) + lambda * sum_i g(i|x) E_i(x)``. One :class:`ExpertSlot` per edit batch holds
the expert, its routing projection and key, its anchors and the ids of the edits it learned.
Slots of finished batches are frozen: their tensors never receive gradients again.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Optional

import torch
import torch.nn as nn

from .experts import hidden_of, make_expert
from .model_families import ModelFamily, execution_device
from .routing import (SUBJECT_BUFFERS, SUBJECT_ROUTER, QueryBuilder, RoutingProjection,
                      Routes, RoutingTable, keep_float32, note_slot_change, select_routes,
                      select_subject_routes)
from .subjects import subject_key, subject_rows


class SlotList(nn.ModuleList):
    """The layer's slots; adding, replacing or removing one is noted for the routing table
    (:func:`~.routing.note_slot_change`), so that serving need not re-check every slot."""

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)  # also what __setitem__ and __delitem__ go through
        note_slot_change()

    def add_module(self, name: str, module: Optional[nn.Module]) -> None:
        super().add_module(name, module)  # append and extend
        note_slot_change()

    def insert(self, index: int, module: nn.Module) -> None:
        super().insert(index, module)
        note_slot_change()


class ExpertSlot(nn.Module):
    """Everything one edit batch owns.

    ``enabled`` is a (frozen) parameter rather than a Python flag so that EasyEdit's release,
    which restores an edit by writing saved tensors back into named parameters, can switch an
    expert off exactly. Assigning a slot's tensors or loading a state dict into it is noted
    for the routing table (plain attributes such as ``frozen`` and ``edits`` are not: the
    table reads none); the one in-place write the table checks for itself is to
    ``enabled`` (EasyEdit's release). Change anchors by assigning them, not in place.

    The expert is stored in the host model's dtype; the routing state (projection, key,
    anchors, radii, flag) is float32 and stays float32 through ``model.half()`` /
    ``model.to(dtype)``, which move it to the new device only.
    """

    def __init__(self, expert: nn.Module, projection: RoutingProjection, hidden: int) -> None:
        super().__init__()
        self.expert = expert
        self.routing = projection
        device = projection.key.device
        self.enabled = nn.Parameter(torch.ones((), device=device), requires_grad=False)
        self.register_buffer("anchors", torch.zeros(0, hidden, device=device))
        #: Acceptance radius (a cosine) of each anchor, fitted from negatives
        #: (:mod:`~.locality`); empty or ``-1`` entries: only the global guard applies.
        self.register_buffer("radius", torch.zeros(0, device=device))
        #: ``router: subject`` (:mod:`~.subjects`): the token forms of the edits' subjects,
        #: ``[S, L]`` int64 right-padded with -1, the subject key of each form ``[S]``, and
        #: the subject key of each anchor ``[n_anchors]``; empty for the other routers.
        long = dict(dtype=torch.long, device=device)
        self.register_buffer("subject_ids", torch.zeros(0, 0, **long))
        self.register_buffer("subject_keys", torch.zeros(0, **long))
        self.register_buffer("anchor_subjects", torch.zeros(0, **long))
        self.frozen = False
        self.edits: List[Dict[str, Any]] = []

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name in self._parameters or name in self._buffers or name in self._modules:
            note_slot_change()

    def _apply(self, fn, recurse: bool = True):
        if recurse:
            for module in self.children():
                module._apply(fn)  # the expert follows the host's dtype; routing keeps its own
        return super()._apply(keep_float32(fn), recurse=False)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        note_slot_change()

    def load_slot_state(self, state: Dict[str, torch.Tensor]) -> None:
        """Load a state dict of this slot taken earlier, whose ``anchors`` and ``radius``
        may differ in length from the current ones (a plain ``load_state_dict`` refuses
        that)."""
        self.anchors = state["anchors"].clone()
        self.radius = state["radius"].clone()
        for name in SUBJECT_BUFFERS:
            if name in state:
                setattr(self, name, state[name].clone())
        self.load_state_dict(state)
        self.__dict__.pop("_anchor_owners", None)  # recorded for the anchors just replaced

    def store_subjects(self, tok, anchor_edit: torch.Tensor) -> None:
        """Fill the subject router's buffers from ``self.edits`` (each with its
        ``subject``): their subjects' token forms and keys, and the key of each anchor,
        whose edit (an index into ``self.edits``) is ``anchor_edit`` ``[n_anchors]``."""
        rows, keys = subject_rows(tok, self.edits)
        edit_keys = torch.tensor([subject_key(e["subject"]) for e in self.edits])
        device = self.anchors.device
        self.subject_ids, self.subject_keys = rows.to(device), keys.to(device)
        self.anchor_subjects = edit_keys[anchor_edit.cpu()].to(device)

    @property
    def is_enabled(self) -> bool:
        return bool(self.enabled.item() > 0.5)

    def trainable_parameters(self) -> List[nn.Parameter]:
        return [p for n, p in self.named_parameters() if n != "enabled"]

    def freeze(self) -> None:
        self.frozen = True
        for p in self.parameters():
            p.requires_grad_(False)

    def unfreeze(self) -> None:
        self.frozen = False
        for p in self.trainable_parameters():
            p.requires_grad_(True)


class LEMoELayer(nn.Module):
    """Replaces the FFN of one decoder block; ``base_layer`` is the untouched host FFN."""

    def __init__(self, base_layer: nn.Module, fam: ModelFamily, hparams, queries: QueryBuilder,
                 hidden: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.fam = fam
        self.hparams = hparams
        self.queries = queries
        self.hidden = hidden
        self.slots = SlotList()
        #: Set by training to route every position as a given tensor says (or None).
        self.forced_routes: Optional[Routes] = None
        self._last_routes: Any = None

    def __setattr__(self, name: str, value) -> None:
        if name == "slots" and isinstance(value, nn.ModuleList) and \
                not isinstance(value, SlotList):
            value = SlotList(value)
        super().__setattr__(name, value)
        if name == "slots":
            note_slot_change()

    def __getstate__(self) -> Dict[str, Any]:
        # The routing table is derived state: copies and pickles rebuild it on first use.
        state = dict(self.__dict__)
        state.pop("_routing_table", None)
        state.pop("_negative_cache", None)  # only saves work; rebuilt when needed
        return state

    @contextlib.contextmanager
    def routes_forced(self, routes: Routes) -> Iterator[None]:
        """Every forward inside routes its positions as ``routes`` says (training: the
        routing decided once per minibatch), and the routing in force before afterwards."""
        previous = self.forced_routes
        self.forced_routes = routes
        try:
            yield
        finally:
            self.forced_routes = previous

    @property
    def last_routes(self) -> Optional[Routes]:
        """The routes of the latest forward (None when no expert was live)."""
        return self.__dict__.get("_last_routes")

    # -- experts -------------------------------------------------------------------------
    def new_slot(self, seed: Optional[int] = None) -> ExpertSlot:
        """Append a slot whose expert outputs zero, so the model's logits do not change.

        With ``seed``, the slot's random initial values (routing projection, key, LoRA
        down-projection) come from a CPU ``torch.Generator`` seeded with it: the same values
        on every device, and the caller's random state (CPU and every GPU) is never read or
        reseeded. Without it they come from the global CPU RNG.
        """
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        hp = self.hparams
        expert = make_expert(self.base_layer, self.fam, hp.expert_form, hp.expert_width,
                             hp.expert_init, hp.lora_rank, generator=generator)
        device = next(expert.parameters()).device
        slot = ExpertSlot(expert, RoutingProjection(self.hidden, hp.router_dim, device=device,
                                                    generator=generator), self.hidden)
        self.slots.append(slot)
        return slot

    def base_layer_device(self) -> torch.device:
        """The device the host FFN computes on (accelerate's execution device under a
        device map, where its weights may rest on ``meta``)."""
        return execution_device(self.base_layer)

    def remove_slot(self, index: int) -> None:
        del self.slots[index]

    @property
    def open_slot(self) -> Optional[ExpertSlot]:
        """The newest slot if it still accepts edits (online mode), else None."""
        if len(self.slots) and not self.slots[-1].frozen:
            return self.slots[-1]
        return None

    # -- routing -------------------------------------------------------------------------
    def routing_table(self) -> RoutingTable:
        """The experts' stacked routing state, rebuilt only when a slot changed."""
        table = self.__dict__.get("_routing_table")
        if table is None or not table.is_current():
            table = self.__dict__["_routing_table"] = RoutingTable(self.slots)
        return table

    def _apply(self, fn, *args, **kwargs):
        # .to() / .half() / .cuda() change tensors without noting a slot change.
        self.__dict__.pop("_routing_table", None)
        return super()._apply(fn, *args, **kwargs)

    def route(self, query: torch.Tensor, valid: Optional[torch.Tensor],
              table: Optional[RoutingTable] = None) -> Routes:
        """Routes of this forward's positions from their normalised ``query`` ``[B, T, H]``
        and padding mask ``valid`` (the subject router also reads the input ids the query
        builder kept)."""
        hp = self.hparams
        table = table or self.routing_table()
        if hp.router == SUBJECT_ROUTER:
            subject = self.queries.current_subjects(table.subjects, query.device)
            return select_subject_routes(
                subject, query, valid, table, guard=hp.locality_guard,
                threshold=hp.guard_threshold,
                admit=self.queries.admitted_runs if hp.guard_carries else None)
        return select_routes(query, valid, table, router=hp.router, top_k=hp.top_k,
                             guard=hp.locality_guard, threshold=hp.guard_threshold)

    # -- forward -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``FFN(x) + expert_scale * sum_i g(i|x) E_i(x)``.

        Routing is tensor code end to end (:meth:`route`: a handful of operations whatever
        the number of experts); the dispatch then reads the routes once to run each routed
        expert on its positions only (:meth:`_add_expert_outputs`; a compiled forward with
        few experts runs them all instead and reads nothing).
        """
        out = self.base_layer(x)
        routes, table = self.forced_routes, None
        if routes is None:
            table = self.routing_table() if len(self.slots) else None
            if table is None or not table.live:  # no experts, or none enabled
                self.__dict__["_last_routes"] = None  # (nn.Module.__setattr__ is slow)
                return out
            routes = self.route(*self.queries.current(x), table)
        self.__dict__["_last_routes"] = routes
        return self._add_expert_outputs(x, out, routes, table)

    def _add_expert_outputs(self, x: torch.Tensor, out: torch.Tensor, routes: Routes,
                            table: Optional[RoutingTable] = None) -> torch.Tensor:
        """``out`` plus every position's routed experts, weighted by the gates.

        Each routed expert runs once, on its positions only. Which positions those are is
        data: the routes are read to the host once (one small copy, the only host
        synchronisation of the forward; a dense evaluation of every expert on every position
        would avoid it at ``n`` times the experts' cost, and no grouped matrix product
        exists for every dtype and device). Up to ``_PYTHON_GROUPING`` positions of top-1
        routing (a prompt, a generation step) they are grouped in Python, and an expert's
        positions that form one run (often a single position) are served through a slice
        of ``out`` without an index; beyond, one sort groups them. With ``table`` (serving)
        the experts' weights are the table's views; without (routes forced by training) the
        experts' own parameters, which training may have swapped for float32 masters.
        """
        if table is not None and table.live <= COMPILED_DENSE_EXPERTS and \
                torch.compiler.is_compiling():
            return self._add_every_expert(x, out, routes, table)
        weights_of = table.expert_weights if table is not None else \
            (lambda e: self.slots[e].expert.serving_weights())
        scale = self.hparams.expert_scale
        H = x.shape[-1]
        k = routes.expert.shape[-1]
        choice = routes.expert.reshape(-1)
        flat_x = x.reshape(-1, H)
        P = flat_x.shape[0]
        if k == 1 and P <= _PYTHON_GROUPING:
            groups: Dict[int, List[int]] = {}
            for p, e in enumerate(choice.tolist()):
                if e >= 0:
                    groups.setdefault(e, []).append(p)
            if not groups:
                return out
            result = _writable(out).view(P, H)
            if all(ps[-1] - ps[0] == len(ps) - 1 for ps in groups.values()):
                # Each expert's positions are one run (every position, in a generation
                # step): slices of ``out``, no index.
                for e, ps in groups.items():
                    first, end = ps[0], ps[-1] + 1
                    _add_rows(result[first:end], weights_of(e), flat_x[first:end], scale)
                return result.view(out.shape)
            order = [p for ps in groups.values() for p in ps]
            counts = [len(ps) for ps in groups.values()]
            used = list(groups)
        else:
            counts_all = torch.bincount(choice + 1, minlength=len(self.slots) + 1).tolist()
            used = [i for i, c in enumerate(counts_all[1:]) if c]
            if not used:
                return out
            counts = [counts_all[i + 1] for i in used]
            # Positions by expert, unrouted ones (-1) first and skipped: the counts already
            # read give every boundary, so no further read of the routes is needed.
            order = torch.sort(choice, stable=True)[1][counts_all[0]:]
            result = None
        index = torch.as_tensor(order, device=x.device)
        rows = index // k if k > 1 else index
        routed_x = flat_x.index_select(0, rows)
        ys, start = [], 0
        for e, c in zip(used, counts):
            weights = weights_of(e)
            ys.append(torch.mm(hidden_of(weights, routed_x[start:start + c]), weights[3]))
            start += c
        y = (ys[0] if len(ys) == 1 else torch.cat(ys)).to(out.dtype)
        if k > 1:
            y = y * routes.gate.reshape(-1)[index].to(y.dtype).unsqueeze(-1)
        base = result if result is not None else out.reshape(P, H)
        if result is not None:  # ours to write into
            return base.index_add_(0, rows, y, alpha=scale).view(out.shape)
        return base.index_add(0, rows, y, alpha=scale).view(out.shape)

    def _add_every_expert(self, x: torch.Tensor, out: torch.Tensor, routes: Routes,
                          table: RoutingTable) -> torch.Tensor:
        """``out`` plus every live expert run on every position and kept where routed: no
        read of the routes, so a compiled forward (``torch.compile``) is one graph, at
        ``live`` times the experts' work. Used only when compiling, and only for a few
        experts (:data:`COMPILED_DENSE_EXPERTS`, the paper's five among them)."""
        H = x.shape[-1]
        flat_x = x.reshape(-1, H)
        k = routes.expert.shape[-1]
        choice = routes.expert.reshape(-1, k)
        gate = routes.gate.reshape(-1, k)
        result = out.reshape(-1, H)
        for e in table.live_slots:
            weights = table.expert_weights(e)
            y = torch.mm(hidden_of(weights, flat_x), weights[3])
            g = ((choice == e).to(gate.dtype) * gate).sum(1, keepdim=True)
            result = result + (y * g.to(y.dtype)).to(out.dtype) * self.hparams.expert_scale
        return result.view(out.shape)


def _add_rows(dst: torch.Tensor, weights, x: torch.Tensor, scale: float) -> None:
    """``dst += scale * expert(x)`` in place, for rows ``x`` ``[P, hidden]`` and the expert's
    serving weights; the output projection and the add are one ``addmm`` when the expert
    has ``dst``'s dtype."""
    h, w_out = hidden_of(weights, x), weights[3]
    if w_out.dtype == dst.dtype:
        dst.addmm_(h, w_out, alpha=scale)
    else:  # float32 master weights while training a 16-bit model's expert
        dst.add_(torch.mm(h, w_out).to(dst.dtype), alpha=scale)


def _writable(out: torch.Tensor) -> torch.Tensor:
    """``out`` itself where adding to it in place is safe, else a copy.

    The host FFN's output is a fresh tensor that only this layer holds. Without autograd it
    takes the experts' outputs in place (one copy fewer per forward); with autograd it is
    copied, so that nothing the backward pass may need is overwritten.
    """
    if torch.is_grad_enabled() or not out.is_contiguous():
        return out.clone(memory_format=torch.contiguous_format)
    return out


#: Up to this many positions per forward, top-1 routes are grouped by expert in Python.
_PYTHON_GROUPING = 512
#: A compiled forward with at most this many live experts runs each on every position
#: instead of reading the routes (``_add_every_expert``); with more, it reads them (one
#: graph break) and runs each routed expert on its positions only.
COMPILED_DENSE_EXPERTS = 8
