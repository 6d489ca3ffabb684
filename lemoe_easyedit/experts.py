"""Expert modules: the per-batch networks added beside the frozen host FFN.

Both forms start with an output of exactly zero, so inserting an expert changes no logit
until it is trained. An expert is stored in the host model's dtype on its execution device
(it is served in that dtype); training swaps in float32 master copies for the duration
(:func:`~.training.train_slot`). Its forward takes input of any float dtype and answers in
the input's dtype.

Initial values are drawn from a ``torch.Generator`` on the CPU (the same draws, in the same
order, as ``nn.Linear``'s own initialisation makes from the global RNG after
``torch.manual_seed``), so creating an expert never touches the caller's random state and
gives the same values on every device.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn

from .model_families import (ModelFamily, execution_device, ffn_width, materialised,
                             proj_weight)


def seeded_linear(in_features: int, out_features: int, bias: bool,
                  generator: Optional[torch.Generator], device, dtype) -> nn.Linear:
    """``nn.Linear`` initialised as ``nn.Linear.reset_parameters`` does, from ``generator``
    (the global RNG when None), drawn in float32 on the CPU, then cast and moved."""
    lin = nn.utils.skip_init(nn.Linear, in_features, out_features, bias=bias, device=device,
                             dtype=dtype)
    w = torch.empty(out_features, in_features)
    nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=generator)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias:
            bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
            lin.bias.copy_(torch.empty(out_features).uniform_(-bound, bound,
                                                              generator=generator))
    return lin


class FFNExpert(nn.Module):
    """An FFN of the host's family (gated LLaMA-style or plain GPT-style), any width.

    With ``init="copy"`` the input projections start as the host's (the first ``width``
    hidden units), so the expert begins from features the layer already computes; the output
    projection starts at zero either way.
    """

    def __init__(self, host_mlp: nn.Module, fam: ModelFamily, width: int | None = None,
                 init: str = "copy", generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        device = execution_device(host_mlp)
        with materialised(host_mlp):
            host_w = proj_weight(getattr(host_mlp, fam.in_projs[0]), fam)
            hidden, dtype = host_w.shape[1], host_w.dtype
            self.width = width or ffn_width(host_mlp, fam)
            self.gated = fam.gated
            self.act = getattr(host_mlp, fam.act_name)
            kw = dict(generator=generator, device=device, dtype=dtype)
            self.w_in = seeded_linear(hidden, self.width, not fam.gated, **kw)
            self.w_gate = seeded_linear(hidden, self.width, False, **kw) if fam.gated else None
            self.w_out = seeded_linear(self.width, hidden, False, **kw)
            with torch.no_grad():
                if init == "copy":
                    self._copy_from(host_mlp, fam)
                nn.init.zeros_(self.w_out.weight)

    def _copy_from(self, host_mlp: nn.Module, fam: ModelFamily) -> None:
        n = min(self.width, ffn_width(host_mlp, fam))
        if fam.gated:
            gate, up = (getattr(host_mlp, name) for name in fam.in_projs)
            self.w_gate.weight[:n] = proj_weight(gate, fam)[:n]
            self.w_in.weight[:n] = proj_weight(up, fam)[:n]
        else:
            proj = getattr(host_mlp, fam.in_projs[0])
            self.w_in.weight[:n] = proj_weight(proj, fam)[:n]
            if proj.bias is not None:
                self.w_in.bias[:n] = proj.bias[:n]

    def serving_weights(self) -> "ServingWeights":
        """This expert's weights as plain tensors for :func:`hidden_of` (transposed views:
        no copy; the serving path keeps them per expert until a slot changes)."""
        return (self.w_gate.weight.t() if self.gated else None, self.w_in.weight.t(),
                self.w_in.bias, self.w_out.weight.t(), self.act.forward)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The expert's hidden activations for rows ``x`` ``[P, hidden]`` (any float dtype),
        in the weights' dtype: the expert's output is ``hidden(x) @ out_weight()``."""
        return hidden_of(self.serving_weights(), x)

    def out_weight(self) -> torch.Tensor:
        """The output projection as ``[width, hidden]`` (a view)."""
        return self.w_out.weight.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _on_rows(self, x)


class LoRAExpert(nn.Module):
    """A low-rank expert ``B A x``: ``rank * 2 * hidden`` parameters, ``B`` starts at zero."""

    def __init__(self, host_mlp: nn.Module, fam: ModelFamily, rank: int = 8,
                 generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        device = execution_device(host_mlp)
        with materialised(host_mlp):
            host_w = proj_weight(getattr(host_mlp, fam.in_projs[0]), fam)
            hidden, dtype = host_w.shape[1], host_w.dtype
        kw = dict(generator=generator, device=device, dtype=dtype)
        self.down = seeded_linear(hidden, rank, False, **kw)
        self.up = seeded_linear(rank, hidden, False, **kw)
        with torch.no_grad():
            self.down.weight.copy_(torch.empty(rank, hidden).normal_(
                std=hidden ** -0.5, generator=generator))
            nn.init.zeros_(self.up.weight)

    def serving_weights(self) -> "ServingWeights":
        """See :meth:`FFNExpert.serving_weights`."""
        return None, self.down.weight.t(), None, self.up.weight.t(), None

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """See :meth:`FFNExpert.hidden`."""
        return hidden_of(self.serving_weights(), x)

    def out_weight(self) -> torch.Tensor:
        return self.up.weight.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _on_rows(self, x)


#: ``(gate [hidden, width] or None, in [hidden, width], in-bias or None, out [width, hidden],
#: activation or None)``: an expert as the tensors its forward multiplies by.
ServingWeights = Tuple[Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor],
                       torch.Tensor, Optional[Callable[[torch.Tensor], torch.Tensor]]]


def hidden_of(weights: ServingWeights, x: torch.Tensor) -> torch.Tensor:
    """An expert's hidden activations for rows ``x`` ``[P, hidden]`` from its
    :meth:`~FFNExpert.serving_weights`, in the weights' dtype (``x`` is cast when it has
    another). Plain products against transposed views: for 2-D input these are the
    operations ``F.linear`` reaches through three more dispatches, and this runs on every
    routed forward."""
    w_gate, w_in, b_in, _, act = weights
    if x.dtype != w_in.dtype:
        x = x.to(w_in.dtype)
    if w_gate is not None:
        return act(torch.mm(x, w_gate)) * torch.mm(x, w_in)
    h = torch.mm(x, w_in) if b_in is None else torch.addmm(b_in, x, w_in)
    return h if act is None else act(h)


def _on_rows(expert: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``expert`` on ``x`` of any leading shape, answered in ``x``'s dtype."""
    rows = x.reshape(-1, x.shape[-1])
    y = torch.mm(expert.hidden(rows), expert.out_weight())
    return y.to(x.dtype).view(x.shape)


def make_expert(host_mlp: nn.Module, fam: ModelFamily, form: str, width: int | None,
                init: str, rank: int, generator: Optional[torch.Generator] = None
                ) -> nn.Module:
    """Build one expert of ``form`` (``"ffn"`` or ``"lora"``) for ``host_mlp``."""
    if form == "ffn":
        return FFNExpert(host_mlp, fam, width=width, init=init, generator=generator)
    if form == "lora":
        return LoRAExpert(host_mlp, fam, rank=rank, generator=generator)
    raise ValueError(f"expert_form must be 'ffn' or 'lora', got {form!r}")
