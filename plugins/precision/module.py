"""``precision.int8`` / ``precision.qaas`` in a model: the shared ``AttentionMixer``.

``precision.int8`` is the mixer unchanged with the int8 op. ``precision.qaas`` adds its two
learned per-head tensors: the threshold fraction ``tau = sigmoid(tau_logit)`` (initialised to
``params.threshold``) and the output scale ``gamma`` (initialised to 1); both train through
the op's straight-through gradients.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...core.context import BuildContext, Context
from ..attention.module import AttentionMixer


class Int8Mixer(AttentionMixer):
    def __init__(self, ctx: BuildContext, params) -> None:
        super().__init__(ctx, "precision.int8", params)


class QaasMixer(AttentionMixer):
    def __init__(self, ctx: BuildContext, params) -> None:
        super().__init__(ctx, "precision.qaas", params)
        t = min(max(float(params.threshold), 1e-6), 1 - 1e-6)
        self.tau_logit = nn.Parameter(torch.full((ctx.n_heads,), math.log(t / (1 - t))))
        self.gamma = nn.Parameter(torch.ones(ctx.n_heads))

    def forward(self, x: torch.Tensor, context: Context | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        h, hd = self.n_heads, self.head_dim
        q, k, v = self.project(x, context)
        tau = torch.sigmoid(self.tau_logit).to(q.dtype)
        o = self.attn(q, k, v, tau, self.gamma.to(q.dtype))
        return self.out(o.reshape(b, t, h * hd))


def int8_module(ctx: BuildContext, params) -> AttentionMixer:
    return Int8Mixer(ctx, params)


def qaas_module(ctx: BuildContext, params) -> AttentionMixer:
    return QaasMixer(ctx, params)
