"""Reference dense attention: explicit fp32 math, autograd through torch ops.

Layout q [B, Tq, Hq, D], k/v [B, Tk, Hk, D], Hq % Hk == 0 (GQA: query head h reads kv head
h // (Hq // Hk)). Causal masks are bottom-right aligned: query i sees key j iff j <= i + Tk - Tq.
Rows that see no key return 0.
"""

from __future__ import annotations

import math

import torch


def expand_kv(k: torch.Tensor, n_q_heads: int) -> torch.Tensor:
    group = n_q_heads // k.shape[2]
    return k if group == 1 else k.repeat_interleave(group, dim=2)


def causal_mask(tq: int, tk: int, device) -> torch.Tensor:
    """Boolean [Tq, Tk], True where attention is allowed."""
    i = torch.arange(tq, device=device)[:, None]
    j = torch.arange(tk, device=device)[None, :]
    return j <= i + (tk - tq)


def check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, T, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})")


def attention_reference(q, k, v, causal: bool = True, scale: float | None = None) -> torch.Tensor:
    check_shapes(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)
    qf, kf, vf = q.to(acc), expand_kv(k, q.shape[2]).to(acc), expand_kv(v, q.shape[2]).to(acc)
    s = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale
    if causal:
        allowed = causal_mask(q.shape[1], k.shape[1], q.device)
        s = s.masked_fill(~allowed, float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # fully masked rows -> 0
    else:
        p = torch.softmax(s, dim=-1)
    o = torch.einsum("bhqk,bkhd->bqhd", p, vf)
    return o.to(q.dtype)


def attention_flops(b: int, tq: int, tk: int, hq: int, d: int, causal: bool) -> float:
    """Forward matmul FLOPs (QK^T and PV) over the (query, key) pairs the mask lets through."""
    if causal:
        pairs = int(torch.clamp(torch.arange(tq) + (tk - tq) + 1, 0, tk).sum())
    else:
        pairs = tq * tk
    return 4.0 * b * hq * d * pairs
