"""``depth.moda`` and ``depth.mod`` in a model, and the MLP-side depth writer.

* :class:`MoDAMixer`: the attention projections (as ``AttentionMixer``); reads every depth slot
  written so far from ``Context.state["depth_kv"]`` (a :class:`~blockzoo.core.context.DepthStream`
  the composer creates for each forward pass), runs the MoDA op, then appends its own K,V (if
  attention writers are on). Without a stream (no composer) it reads no slot: plain attention.
* :class:`DepthWriter`: light K,V projections (one linear to 2*Hk*D, rotary on K at the token's
  position like the attention keys) of the MLP input, appended to the stream (spec:
  ``depth: {mlp_writers: true}``).
* :class:`MoDMixer`: Mixture-of-Depths routing around a causal attention sublayer. A linear
  router scores the tokens; training: the top ``capacity`` fraction (whole-sequence top-k, as in
  the paper) is gathered, runs through the attention (causal among the routed tokens, rotary at
  their original positions), and the output is scattered back scaled by the router weight (the
  ``depth.mod`` op); the other tokens get a zero update (they skip the sublayer; the residual
  carries them). A small causal predictor (per-token MLP on the detached input) learns the top-k
  choice with a BCE auxiliary loss; in eval mode with ``eval_routing: predictor`` a token is routed
  iff the predictor says so, so decoding never looks ahead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...core.context import BuildContext, Context
from ...core.ops import BoundOp
from ...registry import Inputs
from ..attention.module import AttentionMixer, rotary
from ..attention.params import DenseAttentionParams
from .reference import mod_gather_reference, mod_select


class MoDAMixer(AttentionMixer):
    reads_depth = True

    def __init__(self, ctx: BuildContext, params) -> None:
        super().__init__(ctx, "depth.moda", params)

    def forward(self, x: torch.Tensor, context: Context | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        h, hd = self.n_heads, self.head_dim
        q, k, v = self.project(x, context)
        stream = context.state.get("depth_kv") if context is not None else None
        if stream is not None:
            depth_k, depth_v = stream.read(k)
        else:
            depth_k = depth_v = k.new_empty((b, 0, self.n_kv_heads, hd))
        o = self.attn(q, k, v, depth_k, depth_v)
        if stream is not None and stream.attention_writers:
            stream.append(k, v)
        return self.out(o.reshape(b, t, h * hd))


class DepthWriter(nn.Module):
    """K,V for the depth stream from the MLP input: one linear d_model -> 2 * Hk * D."""

    def __init__(self, ctx: BuildContext) -> None:
        super().__init__()
        self.n_kv_heads, self.head_dim = ctx.n_kv_heads, ctx.head_dim
        self.rope, self.rope_base = ctx.rope, ctx.rope_base
        self.kv = nn.Linear(ctx.d_model, 2 * ctx.n_kv_heads * ctx.head_dim, bias=False)

    def forward(self, x: torch.Tensor, context: Context) -> None:
        stream = context.state.get("depth_kv")
        if stream is None or not stream.mlp_writers:
            return
        b, t, _ = x.shape
        kv = self.kv(x).view(b, t, 2, self.n_kv_heads, self.head_dim)
        k, v = kv[:, :, 0], kv[:, :, 1]
        if self.rope:
            pos = context.positions if context.positions is not None else torch.arange(t, device=x.device)
            k = rotary(k, pos, self.rope_base)
        stream.append(k, v)


def _rotary_at(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary embedding with per-batch positions [B, T] (``rotary`` takes one [T] vector)."""
    d = x.shape[-1]
    half = d // 2
    if half == 0:
        return x
    freqs = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    ang = positions.to(torch.float32)[..., None] * freqs                    # [B, T, half]
    cos, sin = ang.cos()[:, :, None, :], ang.sin()[:, :, None, :]
    x1, x2 = x[..., :half].float(), x[..., half:2 * half].float()
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)
    if 2 * half < d:
        out = torch.cat([out, x[..., 2 * half:]], dim=-1)
    return out


def _gather_fn(backend: str):
    if backend == "numba":
        from ...kernels.numba.mod import mod_gather
        return mod_gather
    if backend == "triton":
        from ...kernels.triton.mod import mod_gather
        return mod_gather
    return mod_gather_reference


class MoDMixer(nn.Module):
    def __init__(self, ctx: BuildContext, params) -> None:
        super().__init__()
        self.params = params
        d = ctx.d_model
        self.router = nn.Linear(d, 1, bias=False)
        nn.init.normal_(self.router.weight, std=d ** -0.5)
        self.predictor = None
        if params.predictor:
            hidden = max(8, d // 4)
            self.predictor = nn.Sequential(nn.Linear(d, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        # the routed sublayer: causal attention over the routed tokens (its own projections)
        self.inner = AttentionMixer(ctx, "attention.dense", DenseAttentionParams(causal=True))
        self.scatter = BoundOp("depth.mod", params, ctx.backend)
        self.backend_name = self.scatter.resolve_for(Inputs(
            device=ctx.device, dtype=ctx.dtype, requires_grad=ctx.training,
            shapes=(("x", (1, 8, d)), ("router", (1, 8)), ("y", (1, 1, d))))).name
        self.gather = _gather_fn(self.backend_name)

    def _routed(self, x: torch.Tensor, r: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        inner = self.inner
        b, kk = idx.shape
        h, hk, hd = inner.n_heads, inner.n_kv_heads, inner.head_dim
        xs = self.gather(x, idx)                                              # [B, k, C]
        qkv = inner.qkv(xs)
        q = qkv[..., : h * hd].view(b, kk, h, hd)
        k = qkv[..., h * hd: (h + hk) * hd].view(b, kk, hk, hd)
        v = qkv[..., (h + hk) * hd:].view(b, kk, hk, hd)
        if inner.rope:
            q, k = _rotary_at(q, idx, inner.rope_base), _rotary_at(k, idx, inner.rope_base)
        ys = inner.out(inner.attn(q, k, v).reshape(b, kk, h * hd))
        return self.scatter(torch.zeros_like(x), r, ys, index=idx)

    def forward(self, x: torch.Tensor, context: Context | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        r = self.router(x).squeeze(-1)                                        # [B, T]
        p = self.params
        if self.training or p.eval_routing == "topk" or self.predictor is None:
            idx = mod_select(r, p.capacity)
            if self.training and self.predictor is not None and context is not None:
                target = torch.zeros_like(r).scatter_(1, idx, 1.0)
                logits = self.predictor(x.detach()).squeeze(-1)
                aux = F.binary_cross_entropy_with_logits(logits.float(), target.float())
                context.aux_losses[f"depth.mod.predictor.{context.layer}"] = p.aux_weight * aux
            return self._routed(x, r, idx)
        # causal routing: each token decided by the predictor from itself only
        chosen = self.predictor(x).squeeze(-1) > 0                            # [B, T]
        out = torch.zeros_like(x)
        for i in range(b):
            idx = chosen[i].nonzero().reshape(1, -1)
            if idx.numel():
                out[i:i + 1] = self._routed(x[i:i + 1], r[i:i + 1], idx)
        return out
