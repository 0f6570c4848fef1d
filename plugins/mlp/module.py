from __future__ import annotations

import torch
from torch import nn

from ...core.context import BuildContext, Context
from ...core.ops import BoundOp
from ...registry import Inputs
from .reference import hidden_width


class MLP(nn.Module):
    """Feed-forward block around ``op(x, w_in, w_out)``; gated (SwiGLU) doubles w_in's rows."""

    def __init__(self, ctx: BuildContext, component_id: str, params, gated: bool) -> None:
        super().__init__()
        h = hidden_width(ctx.d_model, params.mult, params.multiple_of)
        self.hidden = h
        self.w_in = nn.Parameter(torch.empty((2 if gated else 1) * h, ctx.d_model))
        self.w_out = nn.Parameter(torch.empty(ctx.d_model, h))
        nn.init.normal_(self.w_in, std=ctx.d_model ** -0.5)
        nn.init.normal_(self.w_out, std=0.02 / (2 * ctx.n_layers) ** 0.5)
        self.mlp = BoundOp(component_id, params, ctx.backend)
        self.backend_name = self.mlp.resolve_for(
            Inputs(device=ctx.device, dtype=ctx.dtype, requires_grad=ctx.training)).name

    def forward(self, x: torch.Tensor, context: Context | None = None) -> torch.Tensor:
        return self.mlp(x, self.w_in, self.w_out)
