"""``LEMoELayer``: the host FFN plus a bypass mixture of experts.

``h(x) = FFN(x) + lambda * sum_i g(i|x) E_i(x)``. One :class:`ExpertSlot` per edit batch holds
the expert, its routing projection and key, its anchors and the ids of the edits it learned.
Slots of finished batches are frozen: their tensors never receive gradients again.
"""

from __future__ import annotations

import functools
import struct
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from .experts import make_expert
from .model_families import ModelFamily
from .routing import (LAYER_INPUT_POOL, QueryBuilder, RoutingProjection, Routes,
                      RoutingTable, note_slot_change, select_routes, share_flags)


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
    ``enabled`` (EasyEdit's release). Change anchors by assigning them, not in place. The
    layer makes every slot's ``enabled`` a view of one shared tensor when it builds its
    routing table (:func:`~.routing.share_flags`): look the flag up on the slot, do not
    keep it.
    """

    def __init__(self, expert: nn.Module, projection: RoutingProjection, hidden: int) -> None:
        super().__init__()
        self.expert = expert
        self.routing = projection
        self.enabled = nn.Parameter(torch.ones((), device=projection.key.device),
                                    requires_grad=False)
        self.register_buffer("anchors", torch.zeros(0, hidden, device=projection.key.device))
        #: Acceptance radius (a cosine) of each anchor, fitted from negatives
        #: (:mod:`~.locality`); empty or ``-1`` entries: only the global guard applies.
        self.register_buffer("radius", torch.zeros(0, device=projection.key.device))
        self.frozen = False
        self.edits: List[Dict[str, Any]] = []

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name in self._parameters or name in self._buffers or name in self._modules:
            note_slot_change()

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        note_slot_change()

    def load_slot_state(self, state: Dict[str, torch.Tensor]) -> None:
        """Load a state dict of this slot taken earlier, whose ``anchors`` and ``radius``
        may differ in length from the current ones (a plain ``load_state_dict`` refuses
        that)."""
        self.anchors = state["anchors"].clone()
        self.radius = state["radius"].clone()
        self.load_state_dict(state)
        self.__dict__.pop("_anchor_owners", None)  # recorded for the anchors just replaced

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
        # The routing table holds closures (not picklable, and a deep copy would share them
        # with the original's weights): copies and pickles rebuild it on first use.
        state = dict(self.__dict__)
        state.pop("_routing_table", None)
        state.pop("_flag_store", None)  # the copy's flags are not views of it
        state.pop("_negative_cache", None)  # only saves work; rebuilt when needed
        state["_last_routes"] = self.last_routes
        return state

    @property
    def last_routes(self) -> Optional[Routes]:
        """The routes of the latest forward (built on first access after a serving forward)."""
        last = self.__dict__.get("_last_routes")
        if callable(last):
            last = last()
            self.__dict__["_last_routes"] = last
        return last

    # -- experts -------------------------------------------------------------------------
    def new_slot(self, seed: Optional[int] = None) -> ExpertSlot:
        """Append a slot whose expert outputs zero, so the model's logits do not change.

        With ``seed``, the slot's random initial values (routing projection, key, LoRA
        down-projection) come from ``torch.manual_seed(seed)`` inside a forked RNG, so they
        do not depend on, nor change, the caller's random state.
        """
        if seed is None:
            return self._build_slot()
        device = self.base_layer_device()
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return self._build_slot()

    def base_layer_device(self) -> torch.device:
        for p in self.base_layer.parameters():
            return p.device
        return torch.device("cpu")

    def _build_slot(self) -> ExpertSlot:
        hp = self.hparams
        expert = make_expert(self.base_layer, self.fam, hp.expert_form, hp.expert_width,
                             hp.expert_init, hp.lora_rank)
        device = next(expert.parameters()).device
        slot = ExpertSlot(expert, RoutingProjection(self.hidden, hp.router_dim, device=device),
                          self.hidden)
        self.slots.append(slot)
        return slot

    def remove_slot(self, index: int) -> None:
        del self.slots[index]

    @property
    def open_slot(self) -> Optional[ExpertSlot]:
        """The newest slot if it still accepts edits (online mode), else None."""
        if len(self.slots) and not self.slots[-1].frozen:
            return self.slots[-1]
        return None

    # -- routing -------------------------------------------------------------------------
    def routing_table(self, learned: bool = True) -> RoutingTable:
        """The experts' stacked routing state, rebuilt only when a slot changed.

        ``learned=False``: the caller uses no routing projection or key (anchor router), so
        a change to those alone does not force a rebuild. The slots' ``enabled`` flags are
        made views of one tensor first (:func:`~.routing.share_flags`), kept while they stay
        so, so that the table checks them all with one version counter.
        """
        table = self.__dict__.get("_routing_table")
        if table is None or not table.is_current(learned):
            store = share_flags(self.slots, self.__dict__.get("_flag_store"))
            table = RoutingTable(self.slots, store)
            self.__dict__["_flag_store"] = store
            self.__dict__["_routing_table"] = table
        return table

    def _apply(self, fn, *args, **kwargs):
        # .to() / .half() / .cuda() change tensors without touching their version counters,
        # and move each flag on its own.
        self.__dict__.pop("_routing_table", None)
        self.__dict__.pop("_flag_store", None)
        return super()._apply(fn, *args, **kwargs)

    def route(self, query: torch.Tensor, valid: torch.Tensor) -> Routes:
        hp = self.hparams
        return select_routes(query, valid, self.routing_table(hp.router == "learned"),
                             router=hp.router, top_k=hp.top_k, guard=hp.locality_guard,
                             threshold=hp.guard_threshold)

    # -- forward -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        hp = self.hparams
        if self.forced_routes is None and hp.router == "anchor" and hp.top_k == 1:
            table = self.routing_table(False)
            if not table.live:  # no experts, or none enabled
                self.__dict__["_last_routes"] = None
                return out
            if table.all_live_anchored and x.shape[0] * x.shape[1] <= _PYTHON_GROUPING:
                return self._serve_nearest_anchor(x, out, table)
        if not len(self.slots):
            return out
        if self.forced_routes is not None:
            routes = self.forced_routes
        else:
            routes = self.route(*self.queries.current(x))
        self.__dict__["_last_routes"] = routes  # (nn.Module.__setattr__ is slow)
        return self._add_expert_outputs(x, out, routes)

    def _serve_nearest_anchor(self, x: torch.Tensor, out: torch.Tensor,
                              table: RoutingTable) -> torch.Tensor:
        """Top-1 nearest-anchor routing and the routed experts, in as few tensor operations as
        the forward of an edited model can take: it runs on every forward.

        The same routes as :func:`~.routing.select_routes` (its top-1 anchor path: both
        take :meth:`~.routing.RoutingTable.nearest_anchor`). The guard, the padding mask and
        the grouping by expert are then read in Python from the few numbers of a prompt or
        a generation step, which costs less than the tensor operations they would take;
        each routed expert runs once, on its positions only.
        """
        hp = self.hparams
        B, T, H = x.shape
        queries = self.queries
        if queries.pool == LAYER_INPUT_POOL:
            q, valid = queries.layer_input(x)  # valid: the raw mask, read as truth values
            q = q.reshape(B * T, H)
            # Unit queries without the clamp of ``unit``: the same bits for any non-zero
            # state; a zero one gives NaN, which the guard's ``>=`` drops.
            q = q / torch.linalg.vector_norm(q, dim=1, keepdim=True)
        else:
            q, valid = queries.current(x)
            q = q.reshape(B * T, H)
        best, column = table.nearest_anchor(q)
        columns = column.tolist()
        keep = [True] * (B * T) if valid is None else valid.reshape(-1).tolist()
        if hp.locality_guard:
            # Compared as float32, as select_routes compares the tensor with the number.
            threshold = _float32(hp.guard_threshold)
            if table.has_radius:
                radius = table.radius_list
                keep = [k and b >= threshold and b >= radius[c]
                        for k, b, c in zip(keep, best.tolist(), columns)]
            else:
                keep = [k and b >= threshold for k, b in zip(keep, best.tolist())]
        owner = table.owner_list
        groups: Dict[int, List[int]] = {}
        for p, (k, c) in enumerate(zip(keep, columns)):
            if k:
                groups.setdefault(owner[c], []).append(p)
        device = x.device
        self.__dict__["_last_routes"] = lambda: _routes_of(groups, B, T, device)
        if not groups:
            return out
        # Each expert is (hidden, w_out): its output projection and the add into the host's
        # output are one addmm.
        scale, expert = hp.expert_scale, table.expert
        flat_x = x.reshape(B * T, H)
        if len(groups) == 1:
            (e, rows), = groups.items()
            if len(rows) == B * T:  # every position (e.g. a generation step)
                hidden, w_out = expert(e)
                return torch.addmm(out.reshape(B * T, H), hidden(flat_x), w_out,
                                   alpha=scale).view(out.shape)
        if all(ps[-1] - ps[0] == len(ps) - 1 for ps in groups.values()):
            # Each expert's positions are one run (often a single position): slices, no index.
            result = _writable(out).view(B * T, H)
            for e, ps in groups.items():
                hidden, w_out = expert(e)
                first, end = ps[0], ps[-1] + 1
                result[first:end].addmm_(hidden(flat_x[first:end]), w_out, alpha=scale)
            return result.view(out.shape)
        index = torch.tensor([p for ps in groups.values() for p in ps], device=device)
        routed_x = flat_x.index_select(0, index)
        ys, start = [], 0
        for e, ps in groups.items():
            hidden, w_out = expert(e)
            ys.append(torch.mm(hidden(routed_x[start:start + len(ps)]), w_out))
            start += len(ps)
        y = ys[0] if len(ys) == 1 else torch.cat(ys)
        return _writable(out).view(B * T, H).index_add_(0, index, y, alpha=scale).view(out.shape)

    def _add_expert_outputs(self, x: torch.Tensor, out: torch.Tensor,
                            routes: Routes) -> torch.Tensor:
        """``out`` plus every position's routed experts, weighted by the gates."""
        # Each expert runs once, on the positions routed to it, and only those positions get
        # its output added. The number of positions per expert decides how.
        scale = self.hparams.expert_scale
        k = routes.expert.shape[-1]
        choice = routes.expert.reshape(-1)
        counts = torch.bincount(choice + 1, minlength=len(self.slots) + 1).tolist()
        used = [i for i, c in enumerate(counts[1:]) if c]
        if not used:
            return out
        if k == 1 and len(used) == 1:  # top-1, one expert: gates are 1
            e, n, P = used[0], counts[used[0] + 1], choice.numel()
            expert = self.slots[e].expert
            if n == P:  # every position (e.g. a generation step)
                return torch.add(out, expert(x), alpha=scale)
            if P <= _SMALL or 4 * n >= P:
                # Few positions in all, or many of them routed: one call on every position,
                # kept where routed (fewer operations than gathering the rows).
                hit = (choice == e).view(x.shape[:-1] + (1,))
                return torch.add(out, torch.where(hit, expert(x), 0.0), alpha=scale)
        # General case: positions grouped by expert with one sort.
        picked = (choice >= 0).nonzero().squeeze(1)
        which, order = torch.sort(choice[picked], stable=True)
        picked = picked[order]
        rows = picked // k
        flat_x = x.reshape(-1, x.shape[-1])[rows]
        outputs, start = [], 0
        for i in used:
            c = counts[i + 1]
            outputs.append(self.slots[i].expert(flat_x[start:start + c]))
            start += c
        y = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        if k > 1:
            y = y * routes.gate.reshape(-1)[picked].to(y.dtype).unsqueeze(-1)
        flat_out = out.reshape(-1, out.shape[-1]).index_add(0, rows, y, alpha=scale)
        return flat_out.reshape(out.shape)


def _writable(out: torch.Tensor) -> torch.Tensor:
    """``out`` itself where adding to it in place is safe, else a copy.

    The host FFN's output is a fresh tensor that only this layer holds. Without autograd it
    takes the experts' outputs in place (one copy fewer per forward); with autograd it is
    copied, so that nothing the backward pass may need is overwritten.
    """
    if torch.is_grad_enabled() or not out.is_contiguous():
        return out.clone(memory_format=torch.contiguous_format)
    return out


@functools.lru_cache(maxsize=16)
def _float32(value: float) -> float:
    """``value`` rounded to the nearest float32."""
    return struct.unpack("f", struct.pack("f", value))[0]


def _routes_of(groups: Dict[int, List[int]], B: int, T: int, device) -> Routes:
    """The :class:`Routes` of ``groups`` (expert -> its positions in a ``[B, T]`` block)."""
    expert = torch.full((B * T,), -1, dtype=torch.long)
    for e, rows in groups.items():
        expert[rows] = e
    return Routes(expert.view(B, T, 1).to(device))


#: Up to this many positions, a single routed expert runs on all of them (masked).
_SMALL = 64
#: Up to this many positions per forward, the serving path groups them by expert in Python.
_PYTHON_GROUPING = 512
