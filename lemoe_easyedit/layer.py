"""``LEMoELayer``: the host FFN plus a bypass mixture of experts.

``h(x) = FFN(x) + lambda * sum_i g(i|x) E_i(x)``. One :class:`ExpertSlot` per edit batch holds
the expert, its routing projection and key, its anchors and the ids of the edits it learned.
Slots of finished batches are frozen: their tensors never receive gradients again.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from .experts import make_expert
from .model_families import ModelFamily
from .routing import (QueryBuilder, RoutingProjection, Routes, RoutingTable,
                      select_routes)


class ExpertSlot(nn.Module):
    """Everything one edit batch owns.

    ``enabled`` is a (frozen) parameter rather than a Python flag so that EasyEdit's release,
    which restores an edit by writing saved tensors back into named parameters, can switch an
    expert off exactly.
    """

    def __init__(self, expert: nn.Module, projection: RoutingProjection, hidden: int) -> None:
        super().__init__()
        self.expert = expert
        self.routing = projection
        self.enabled = nn.Parameter(torch.ones((), device=projection.key.device),
                                    requires_grad=False)
        self.register_buffer("anchors", torch.zeros(0, hidden, device=projection.key.device))
        self.frozen = False
        self.edits: List[Dict[str, Any]] = []

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
        self.slots = nn.ModuleList()
        #: Set by training to route every position as a given tensor says (or None).
        self.forced_routes: Optional[Routes] = None
        self.last_routes: Optional[Routes] = None

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
        a change to those alone does not force a rebuild.
        """
        table = self.__dict__.get("_routing_table")
        if table is None or not table.is_current(self.slots, learned):
            table = RoutingTable(self.slots)
            self.__dict__["_routing_table"] = table
        return table

    def _apply(self, fn, *args, **kwargs):
        # .to() / .half() / .cuda() change tensors without touching their version counters.
        self.__dict__.pop("_routing_table", None)
        return super()._apply(fn, *args, **kwargs)

    def route(self, query: torch.Tensor, valid: torch.Tensor) -> Routes:
        hp = self.hparams
        return select_routes(query, valid, self.routing_table(hp.router == "learned"),
                             router=hp.router, top_k=hp.top_k, guard=hp.locality_guard,
                             threshold=hp.guard_threshold)

    # -- forward -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if not len(self.slots):
            return out
        if self.forced_routes is not None:
            routes = self.forced_routes
        else:
            routes = self.route(*self.queries.current(x))
        self.__dict__["last_routes"] = routes  # (nn.Module.__setattr__ is slow)
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


#: Up to this many positions, a single routed expert runs on all of them (masked).
_SMALL = 64
