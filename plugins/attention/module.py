"""``AttentionMixer``: projections + rotary embedding around any attention-shaped op.

Every attention-shaped component (dense, and later quantised, mixture-of-contexts, depth...)
uses this module with its own component id and params: the op is called as
``op(q, k, v, **params)`` with q/k/v [B, T, H, D].
"""

from __future__ import annotations

import torch
from torch import nn

from ...core.context import BuildContext, Context
from ...core.ops import BoundOp
from ...registry import Inputs


def rotary(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate pairs (x[..., :D/2], x[..., D/2:]) by position-dependent angles. x [B, T, H, D]."""
    d = x.shape[-1]
    half = d // 2
    if half == 0:
        return x
    freqs = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    ang = positions.to(torch.float32)[:, None] * freqs[None, :]  # [T, half]
    cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]
    x1, x2 = x[..., :half].float(), x[..., half:2 * half].float()
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)
    if 2 * half < d:
        out = torch.cat([out, x[..., 2 * half:]], dim=-1)
    return out


class AttentionMixer(nn.Module):
    def __init__(self, ctx: BuildContext, component_id: str, params) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = ctx.n_heads, ctx.n_kv_heads, ctx.head_dim
        self.rope, self.rope_base = ctx.rope, ctx.rope_base
        d, hd = ctx.d_model, ctx.head_dim
        self.qkv = nn.Linear(d, (ctx.n_heads + 2 * ctx.n_kv_heads) * hd, bias=False)
        self.out = nn.Linear(ctx.n_heads * hd, d, bias=False)
        nn.init.normal_(self.out.weight, std=0.02 / (2 * ctx.n_layers) ** 0.5)
        self.attn = BoundOp(component_id, params, ctx.backend)
        # resolve now (build time) so an impossible backend request fails early and dispatch
        # stays out of compiled graphs; forward re-resolves only if device/dtype change
        self.backend_name = self.attn.resolve_for(Inputs(
            device=ctx.device, dtype=ctx.dtype, requires_grad=ctx.training, head_dim=hd,
            shapes=(("q", (1, 1, ctx.n_heads, hd)), ("k", (1, 1, ctx.n_kv_heads, hd)),
                    ("v", (1, 1, ctx.n_kv_heads, hd))))).name

    def project(self, x: torch.Tensor, context: Context | None = None):
        """x [B, T, d_model] -> q [B, T, H, D], k, v [B, T, Hk, D], RoPE applied at the context's
        positions (subclasses that change only the attention call reuse this)."""
        b, t, _ = x.shape
        h, hk, hd = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.qkv(x)
        q = qkv[..., : h * hd].view(b, t, h, hd)
        k = qkv[..., h * hd: (h + hk) * hd].view(b, t, hk, hd)
        v = qkv[..., (h + hk) * hd:].view(b, t, hk, hd)
        if self.rope:
            pos = context.positions if context is not None and context.positions is not None else \
                torch.arange(t, device=x.device)
            q, k = rotary(q, pos, self.rope_base), rotary(k, pos, self.rope_base)
        return q, k, v

    def forward(self, x: torch.Tensor, context: Context | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        h, hd = self.n_heads, self.head_dim
        q, k, v = self.project(x, context)
        cache = context.state.get("kv_cache") if context is not None else None
        if cache is not None:  # decoding (core/cache.py): read/append this layer's KV cache
            o = cache.attend(context.layer, q, k, v, context.positions, self.attn)
            return self.out(o.reshape(b, t, h * hd))
        o = self.attn(q, k, v)
        stream = context.state.get("depth_kv") if context is not None else None
        if stream is not None and stream.attention_writers:  # depth.moda's depth KV stream
            stream.append(k, v)
        return self.out(o.reshape(b, t, h * hd))
