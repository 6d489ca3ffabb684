"""Cached-activation training: fit a new expert by running only the model above its FFN.

Everything below the adapted FFN is frozen, and so is everything beside the new expert in
it (the host FFN, the earlier experts, the routing decided before phase 2). For a fixed
minibatch, one no-grad forward therefore fixes

* ``x``: the FFN input at the positions routed to the new expert, and their gates;
* ``h``: the hidden state leaving the adapted block *without* the new expert's term;
* the arguments every decoder block above receives (attention mask, position embeddings,
  position ids... whatever the model passes), captured with forward pre-hooks.

Every decoder block of the supported families adds its FFN output to the residual stream,
so with the new expert the block's output is ``h + expert_scale * sum_j g_j E(x_j)``
scattered to the routed positions (exactly what :class:`~.layer.LEMoELayer` adds). A
training step computes that, runs the blocks above with the captured arguments, the final
norm (``ModelFamily.final_norm``) and the LM head at the target positions only, and takes
the same loss as the full forward. Nothing below the adaptor runs again, the routing is not
recomputed, and no logits are computed where there is no label.

Nothing here needs to know the architecture beyond the family table: blocks may return a
tensor or a tuple, and may take the hidden state positionally or as ``hidden_states=``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layer import LEMoELayer
from .model_families import get_submodule
from .routing import Routes

__all__ = ["CachedMinibatch", "UpperStack"]


@dataclass
class CachedMinibatch:
    """What one fixed minibatch needs for cached training steps (all without autograd)."""

    base_hidden: torch.Tensor          # [B, L, H] leaving the adapted block, new expert left out
    rows: torch.Tensor                 # [n] flat positions (b * L + t) routed to the new expert
    x: torch.Tensor                    # [n, H] FFN input at those positions
    gates: torch.Tensor                # [n] their gates
    block_calls: List[Tuple[tuple, Dict[str, Any], bool]]  # per upper block: args, kwargs,
    #                                                        hidden passed positionally?
    target_pos: torch.Tensor           # [B, L-1] bool: positions whose next token is a target
    targets: torch.Tensor              # [m] the target token ids, in target_pos order


def _hidden_of(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def without_slot(routes: Routes, index: int) -> Routes:
    """``routes`` with every choice of expert ``index`` dropped (gate 0, expert -1)."""
    hit = routes.expert == index
    return Routes(routes.expert.masked_fill(hit, -1), routes.gate.masked_fill(hit, 0.0))


class UpperStack:
    """The frozen part of ``model`` from the adaptor's block upward.

    ``capture`` runs one no-grad forward of a minibatch and keeps what the new expert's
    training steps need; ``loss`` is the differentiable target loss of the current expert
    on a captured minibatch, equal to the full model's (up to float rounding).
    """

    def __init__(self, model: nn.Module, layer: LEMoELayer) -> None:
        fam = layer.fam
        blocks = get_submodule(model, fam.layers_path)
        self.model = model
        self.layer = layer
        self.block = blocks[layer.layer_index]
        self.upper: List[nn.Module] = list(blocks)[layer.layer_index + 1:]
        self.norm = get_submodule(model, fam.final_norm)
        self.head = model.get_output_embeddings()
        if self.head is None:
            raise ValueError("cached-activation training needs model.get_output_embeddings()")

    @torch.no_grad()
    def capture(self, batch, slot_index: int, routes: Routes) -> CachedMinibatch:
        """One no-grad forward of ``batch`` (an :class:`~.training.EditBatch`).

        ``routes`` is the routing of the batch's positions as the layer decides it
        (``LEMoELayer.route`` of the batch's queries); the forward runs with every choice of
        ``slot_index`` removed, so the captured hidden state lacks exactly the new expert's
        term.
        """
        layer = self.layer
        got: Dict[str, Any] = {}
        calls: List[Optional[tuple]] = [None] * len(self.upper)

        def grab_x(module, args):
            got["x"] = args[0]

        def grab_out(module, args, output):
            got["h"] = _hidden_of(output)

        def grab_call(i):
            def hook(module, args, kwargs):
                if args:
                    calls[i] = (tuple(args[1:]), dict(kwargs), True)
                else:
                    kw = dict(kwargs)
                    kw.pop("hidden_states")
                    calls[i] = ((), kw, False)
            return hook

        handles = [layer.register_forward_pre_hook(grab_x),
                   self.block.register_forward_hook(grab_out)]
        handles += [b.register_forward_pre_hook(grab_call(i), with_kwargs=True)
                    for i, b in enumerate(self.upper)]
        try:
            with layer.routes_forced(without_slot(routes, slot_index)):
                self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           use_cache=False)
        finally:
            for h in handles:
                h.remove()
        if "x" not in got or "h" not in got or any(c is None for c in calls):
            raise RuntimeError("cached-activation capture did not see the adapted block and "
                               "every block above it run")
        x = got["x"]
        k = routes.expert.shape[-1]
        rows, cols = (routes.expert.reshape(-1, k) == slot_index).nonzero(as_tuple=True)
        gates = routes.gate.reshape(-1, k)[rows, cols].detach().to(x.dtype)
        target_pos = batch.labels[:, 1:] != -100
        return CachedMinibatch(
            base_hidden=got["h"].detach(), rows=rows,
            x=x.reshape(-1, x.shape[-1])[rows].detach(), gates=gates,
            block_calls=calls, target_pos=target_pos,
            targets=batch.labels[:, 1:][target_pos])

    def target_logits(self, cached: CachedMinibatch, expert: nn.Module,
                      scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(logits [m, V], targets [m])`` at the target positions, with ``expert`` as the
        new slot's expert (differentiable in its parameters)."""
        h = cached.base_hidden
        y = expert(cached.x) * cached.gates.unsqueeze(-1)
        hidden = h.reshape(-1, h.shape[-1]).index_add(0, cached.rows, y, alpha=scale)
        hidden = hidden.reshape(h.shape)
        for block, (args, kwargs, positional) in zip(self.upper, cached.block_calls):
            if positional:
                out = block(hidden, *args, **kwargs)
            else:
                out = block(hidden_states=hidden, **kwargs)
            hidden = _hidden_of(out)
        # (Under a device map the last block may sit on another device than the batch.)
        at_targets = hidden[:, :-1][cached.target_pos.to(hidden.device)]
        return self.head(self.norm(at_targets)), cached.targets

    def loss(self, cached: CachedMinibatch, expert: nn.Module, scale: float) -> torch.Tensor:
        """Mean cross-entropy of the targets (what the full forward's loss is)."""
        logits, targets = self.target_logits(cached, expert, scale)
        return F.cross_entropy(logits.float(), targets.to(logits.device))
