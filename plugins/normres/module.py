"""``AddNorm``: the module the composer places before each sublayer.

``forward(h, delta) -> (normed, h_new)``: h_new = h + delta (delta None: h), normed = norm(h_new).
The composer passes the previous sublayer's output as ``delta``, so the residual add of one
sublayer and the norm of the next run as one fused kernel. With ``position: post`` the normed
output also becomes the residual stream (post-norm).
"""

from __future__ import annotations

import torch
from torch import nn

from ...core.context import BuildContext
from ...core.ops import BoundOp
from ...registry import Inputs


class AddNorm(nn.Module):
    def __init__(self, ctx: BuildContext, component_id: str, params, bias: bool) -> None:
        super().__init__()
        self.position = params.position
        self.weight = nn.Parameter(torch.ones(ctx.d_model))
        self.bias = nn.Parameter(torch.zeros(ctx.d_model)) if bias else None
        self.norm = BoundOp(component_id, params, ctx.backend)
        self.backend_name = self.norm.resolve_for(
            Inputs(device=ctx.device, dtype=ctx.dtype, requires_grad=ctx.training)).name

    def forward(self, h: torch.Tensor, delta: torch.Tensor | None = None):
        y, h_new = self.norm(h, delta, self.weight, self.bias)
        if self.position == "post":
            return y, y
        return y, h_new
