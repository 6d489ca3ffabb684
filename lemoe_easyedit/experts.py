"""Expert modules: the per-batch networks added beside the frozen host FFN.

Both forms start with an output of exactly zero, so inserting an expert changes no logit
until it is trained.
"""

from __future__ import annotations

from typing import Callable, Tuple

import torch
import torch.nn as nn

from .model_families import ModelFamily, ffn_width, proj_weight


class FFNExpert(nn.Module):
    """An FFN of the host's family (gated LLaMA-style or plain GPT-style), any width.

    With ``init="copy"`` the input projections start as the host's (the first ``width``
    hidden units), so the expert begins from features the layer already computes; the output
    projection starts at zero either way.
    """

    def __init__(self, host_mlp: nn.Module, fam: ModelFamily, width: int | None = None,
                 init: str = "copy") -> None:
        super().__init__()
        host_w = proj_weight(getattr(host_mlp, fam.in_projs[0]), fam)
        hidden, dtype, device = host_w.shape[1], host_w.dtype, host_w.device
        self.width = width or ffn_width(host_mlp, fam)
        self.gated = fam.gated
        self.act = getattr(host_mlp, fam.act_name)
        kw = dict(device=device, dtype=dtype)
        self.w_in = nn.Linear(hidden, self.width, bias=not fam.gated, **kw)
        self.w_gate = nn.Linear(hidden, self.width, bias=False, **kw) if fam.gated else None
        self.w_out = nn.Linear(self.width, hidden, bias=False, **kw)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _on_rows(serving_function(self), x)

    def serving_parts(self) -> Tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
        """``(hidden, w_out)``: this expert on rows ``[P, hidden]`` is ``hidden(x) @ w_out``.

        ``hidden`` is a closure of plain matrix products against transposed views of the
        weights (the operations ``F.linear`` reaches for 2-D input, without four
        ``nn.Module`` calls and the layers of ``F.linear``), ``w_out`` the output
        projection as a ``[width, hidden]`` view. The serving path (the layer's routing
        table keeps them per expert) runs on nearly every forward of an edited model and
        adds the last product to the host's output in the same operation
        (``addmm(out, hidden(x), w_out)``); ``forward`` computes the same products, so
        training and serving agree.
        """
        act = self.act.forward  # the host's activation, without the module-call overhead
        w_in, b_in = self.w_in.weight.t(), self.w_in.bias
        if self.gated:
            w_gate = self.w_gate.weight.t()
            return (lambda x: act(torch.mm(x, w_gate)) * torch.mm(x, w_in)), \
                self.w_out.weight.t()
        return (lambda x: act(torch.addmm(b_in, x, w_in))), self.w_out.weight.t()


class LoRAExpert(nn.Module):
    """A low-rank expert ``B A x``: ``rank * 2 * hidden`` parameters, ``B`` starts at zero."""

    def __init__(self, host_mlp: nn.Module, fam: ModelFamily, rank: int = 8) -> None:
        super().__init__()
        host_w = proj_weight(getattr(host_mlp, fam.in_projs[0]), fam)
        hidden, dtype, device = host_w.shape[1], host_w.dtype, host_w.device
        self.down = nn.Linear(hidden, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, hidden, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            nn.init.normal_(self.down.weight, std=hidden ** -0.5)
            nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _on_rows(serving_function(self), x)

    def serving_parts(self) -> Tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
        """``(hidden, w_out)`` with ``expert(x) = hidden(x) @ w_out`` (see FFNExpert's)."""
        down = self.down.weight.t()
        return (lambda x: torch.mm(x, down)), self.up.weight.t()


def serving_function(expert: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``expert`` on rows ``[P, hidden]``, from its :meth:`serving_parts`."""
    hidden, w_out = expert.serving_parts()
    return lambda x: torch.mm(hidden(x), w_out)


def _on_rows(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn`` (rows in, rows out) applied to ``x`` of any leading shape."""
    return fn(x.reshape(-1, x.shape[-1])).view(x.shape)


def make_expert(host_mlp: nn.Module, fam: ModelFamily, form: str, width: int | None,
                init: str, rank: int) -> nn.Module:
    """Build one expert of ``form`` (``"ffn"`` or ``"lora"``) for ``host_mlp``."""
    if form == "ffn":
        return FFNExpert(host_mlp, fam, width=width, init=init)
    if form == "lora":
        return LoRAExpert(host_mlp, fam, rank=rank)
    raise ValueError(f"expert_form must be 'ffn' or 'lora', got {form!r}")
