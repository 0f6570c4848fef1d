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


class GatedDyT(nn.Module):
    """``normres.dyt`` and ``normres.agu``: ``forward(h, delta) -> (normed, h_new)``.

    dyt: h_new = h + delta, normed = w * tanh(alpha * h_new) + b (``position: post``: the
    normed output is also the stream). agu: h_new = g * h + (1 - g) * delta (variant gate_dyt)
    or h + g * delta (scale_dyt) with g = sigmoid(gate [+ gate_w * h]) per channel, then the
    same squash. alpha is one learned scalar per module, initialised per position
    (``alpha_init_mixer`` / ``alpha_init_mlp`` / ``alpha_init_final``, else ``alpha_init``).
    """

    def __init__(self, ctx: BuildContext, component_id: str, params, gated: bool) -> None:
        super().__init__()
        self.position = getattr(params, "position", "pre")
        d = ctx.d_model
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))
        self.alpha = nn.Parameter(torch.full((1,), params.alpha_for(ctx.role)))
        self.gate = nn.Parameter(torch.full((d,), float(params.gate_init))) if gated else None
        self.gate_w = nn.Parameter(torch.zeros(d)) if gated and params.gate == "input" else None
        self.op = BoundOp(component_id, params, ctx.backend)
        self.backend_name = self.op.resolve_for(
            Inputs(device=ctx.device, dtype=ctx.dtype, requires_grad=ctx.training)).name

    def forward(self, h: torch.Tensor, delta: torch.Tensor | None = None):
        tensors = dict(weight=self.weight, bias=self.bias, alpha=self.alpha)
        if self.gate is not None:
            tensors.update(gate=self.gate, gate_w=self.gate_w)
        y, h_new = self.op(h, delta, **tensors)
        if self.position == "post":
            return y, y
        return y, h_new
