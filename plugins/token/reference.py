"""KV-cache policies: the scorers (one per policy) and the shared selector and compaction.

Scorer ops (the registered functional ops, checked by the conformance matrix) take
``q [B, Tq, H, D]`` (the queries that look at the cache) and ``k, v [B, Tk, Hk, D]`` and return a
score per cached token and kv head, ``[B, Hk, Tk]`` (higher = keep). Causality is bottom-right
aligned as in ``attention.dense`` (query i sees key j iff j <= i + Tk - Tq).

The selector (:func:`select`) is shared: it keeps the top-scoring tokens per (batch, kv head)
under the budget, always keeping the protected tokens (the first ``sinks`` positions and the
``recent`` most recent ones), and returns the kept indices in time order; :func:`compact`
gathers any per-token tensors along the token axis with them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..attention.reference import causal_mask, check_shapes


def attention_weights(q: torch.Tensor, k: torch.Tensor, causal: bool = True,
                      scale: float | None = None) -> torch.Tensor:
    """Softmax attention probabilities [B, Hq, Tq, Tk] in fp32 (fp64 for fp64) from q [B, Tq, Hq, D]
    and k [B, Tk, Hk, D] (GQA: query head h reads kv head h // (Hq // Hk))."""
    acc = torch.promote_types(q.dtype, torch.float32)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    group = q.shape[2] // k.shape[2]
    kf = k.to(acc) if group == 1 else k.to(acc).repeat_interleave(group, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.to(acc), kf) * scale
    if causal:
        s = s.masked_fill(~causal_mask(q.shape[1], k.shape[1], q.device), float("-inf"))
    return torch.softmax(s, dim=-1).nan_to_num(0.0)


def per_kv_head(p: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """[B, Hq, Tq, Tk] attention -> [B, Hk, Tk]: summed over the queries and the query heads of
    each kv group."""
    b, hq, _, tk = p.shape
    return p.sum(2).view(b, n_kv_heads, hq // n_kv_heads, tk).sum(2)


# ---------------------------------------------------------------------------------------------
# scorers (functional ops)
def streaming_scores(q, k, v, positions: torch.Tensor | None = None, **_policy) -> torch.Tensor:
    """StreamingLLM: newer is better (score = absolute position); the sinks are protected by the
    selector. ``positions`` [B, Hk, Tk] (default 0..Tk-1)."""
    check_shapes(q, k, v)
    b, tk, hk, _ = k.shape
    if positions is None:
        positions = torch.arange(tk, device=k.device).expand(b, hk, tk)
    return positions.to(q.dtype)


def h2o_scores(q, k, v, **_policy) -> torch.Tensor:
    """H2O: attention each cached token received from the queries (summed over queries and the
    query heads of its kv group). The cache accumulates these over decoding steps."""
    check_shapes(q, k, v)
    return per_kv_head(attention_weights(q, k), k.shape[2]).to(q.dtype)


def snapkv_scores(q, k, v, window: int = 8, pool: int = 5, **_policy) -> torch.Tensor:
    """SnapKV: attention from the last ``window`` queries (the observation window), summed over
    them, max-pooled along the keys per query head (kernel ``pool``) so that neighbours of a
    strong token are kept with it, then summed over the query heads of each kv group."""
    check_shapes(q, k, v)
    w = min(window, q.shape[1])
    s = attention_weights(q[:, -w:], k).sum(2)  # [B, Hq, Tk]
    if pool > 1:  # per query head (as in SnapKV), then summed over the kv group
        s = F.max_pool1d(s, kernel_size=pool, stride=1, padding=pool // 2)
    b, hq, tk = s.shape
    hk = k.shape[2]
    return s.view(b, hk, hq // hk, tk).sum(2).to(q.dtype)


# ---------------------------------------------------------------------------------------------
# shared selector and compaction
def protected_mask(positions: torch.Tensor, seen: int, sinks: int, recent: int) -> torch.Tensor:
    """bool like ``positions``: the first ``sinks`` positions and the last ``recent`` of ``seen``."""
    return (positions < sinks) | (positions >= seen - recent)


def select(scores: torch.Tensor, positions: torch.Tensor, seen: int, keep: int, sinks: int,
           recent: int) -> torch.Tensor:
    """Indices [B, Hk, keep] (ascending, i.e. time order) of the tokens to keep.

    scores, positions: [B, Hk, T] (T = tokens now cached). Protected tokens are kept first
    (``keep`` must be at least their count), the rest of the budget goes to the highest scores
    (ties: the older token). Raises if the budget cannot hold the protected tokens."""
    t = scores.shape[-1]
    if keep > t:
        raise ValueError(f"keep={keep} exceeds the {t} cached tokens")
    prot = protected_mask(positions, seen, sinks, recent)
    n_prot = int(prot.sum(-1).max()) if t else 0
    if keep < n_prot:
        raise ValueError(f"keep={keep} is smaller than the {n_prot} protected tokens (sinks={sinks}, "
                         f"recent={recent})")
    s = scores.float().masked_fill(prot, float("inf"))
    # stable: among equal scores, the lower index (older token) first
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :keep]
    return torch.sort(order, dim=-1).values


def compact(idx: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Gather each [B, Hk, T, ...] tensor along T with ``idx`` [B, Hk, keep]."""
    out = []
    for x in tensors:
        ix = idx.view(*idx.shape, *([1] * (x.dim() - 3))).expand(*idx.shape, *x.shape[3:])
        out.append(torch.gather(x, 2, ix))
    return tuple(out)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention of new queries q [B, Tq, Hq, D] over the kept cache k, v [B, Hk, T, D]
    (the new tokens are its last Tq entries; bottom-right causal). Returns the output
    [B, Tq, Hq, D] and the probabilities [B, Hq, Tq, T] (fp32), which H2O accumulates."""
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)
    p = attention_weights(q, kt, causal=True, scale=scale)
    group = q.shape[2] // k.shape[1]
    vf = vt.to(p.dtype) if group == 1 else vt.to(p.dtype).repeat_interleave(group, dim=2)
    o = torch.einsum("bhqk,bkhd->bqhd", p, vf)
    return o.to(q.dtype), p
