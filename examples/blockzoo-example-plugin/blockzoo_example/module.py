"""``example.shortconv`` in a model: the mixer the blockzoo composer builds for a spec's
``mixer: {type: example.shortconv}``. Factories receive blockzoo's ``BuildContext`` (d_model,
backend, device, dtype, ...) and the validated params; ``forward(x, context)`` maps [B, T, d]
to [B, T, d]."""

import torch
from torch import nn

from blockzoo.core.ops import BoundOp
from blockzoo.registry import Inputs


class ShortConvMixer(nn.Module):
    """in-projection -> causal depthwise short convolution (+ SiLU) -> out-projection."""

    def __init__(self, ctx, params) -> None:
        super().__init__()
        d = ctx.d_model
        self.inp = nn.Linear(d, d, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        self.weight = nn.Parameter(torch.zeros(d, params.kernel_size))
        with torch.no_grad():
            self.weight[:, 0] = 1.0  # start as the identity filter
            self.weight.add_(0.02 * torch.randn_like(self.weight))
        nn.init.normal_(self.out.weight, std=0.02 / (2 * ctx.n_layers) ** 0.5)
        # dispatch through the registry, resolved per input signature (backend: auto or a name)
        self.conv = BoundOp("example.shortconv", params, ctx.backend)
        # resolve at build time: an impossible backend request fails here, and `blockzoo run`
        # reports which backend each layer uses
        self.backend_name = self.conv.resolve_for(Inputs(
            device=ctx.device, dtype=ctx.dtype, requires_grad=ctx.training,
            shapes=(("x", (1, 1, d)), ("weight", (d, params.kernel_size))))).name

    def forward(self, x: torch.Tensor, context=None) -> torch.Tensor:
        return self.out(self.conv(self.inp(x), self.weight.to(x.dtype)))


def shortconv_module(ctx, params) -> nn.Module:
    return ShortConvMixer(ctx, params)
