"""References (explicit fp32 math, the oracles) for ``depth.moda`` and ``depth.mod``.

MoDA (Mixture-of-Depths Attention, arXiv 2603.15619). Layout: q [B, Tq, Hq, D], k/v
[B, Tk, Hk, D], depth_k/depth_v [B, Tq*S, Hk, D] token-major: the S depth slots of query row t
are rows ``t*S .. t*S+S-1``. Hq % Hk == 0 (GQA: query head h reads kv head h // (Hq // Hk), for
the sequence keys and the depth slots alike). Query row t attends, under ONE softmax, to

* the sequence keys of its layer: all of them, or (``causal``) key j iff ``j <= t + Tk - Tq``
  (bottom-right alignment, as ``attention.dense``);
* the S depth slots of its own position t (never another position's).

S = 0 (no earlier layer wrote) is plain attention. A row with no visible key (causal, Tq > Tk,
S = 0) returns 0.

MoD (Mixture-of-Depths token routing, Raposo et al. 2024), the routed residual update::

    idx = top-k of router over the T tokens (k = ceil(capacity * T), >= 1), then sorted by time
    out = x ; out[b, idx[b, j]] += gate(router[b, idx[b, j]]) * y[b, j]

``y`` [B, k, C] is the block's output for the gathered tokens ``x[b, idx[b]]``; the other tokens
skip the block. Tie-breaking of the top-k (ours): higher logit first, lower position on equal
logits. The selection is discrete (no gradient); gradients flow to x, y and, through the gate,
to the router logits of the chosen tokens.
"""

from __future__ import annotations

import math

import torch

from ..attention.reference import check_shapes, expand_kv


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def depth_slots(q: torch.Tensor, depth_k: torch.Tensor, depth_v: torch.Tensor, k: torch.Tensor) -> int:
    """Validate the depth tensors against q/k and return S (slots per query position)."""
    b, tq, _, d = q.shape
    if depth_k.dim() != 4 or depth_v.dim() != 4:
        raise ValueError(f"depth_k and depth_v must be [B, Tq*S, Hk, D]; got {tuple(depth_k.shape)}, "
                         f"{tuple(depth_v.shape)}")
    if depth_k.shape != depth_v.shape:
        raise ValueError(f"depth_k {tuple(depth_k.shape)} and depth_v {tuple(depth_v.shape)} differ")
    if depth_k.shape[0] != b or depth_k.shape[2] != k.shape[2] or depth_k.shape[3] != d:
        raise ValueError(f"depth_k {tuple(depth_k.shape)} must be [B={b}, Tq*S, Hk={k.shape[2]}, D={d}]")
    n = depth_k.shape[1]
    if tq == 0:
        if n:
            raise ValueError(f"depth_k has {n} rows but q has no positions")
        return 0
    if n % tq:
        raise ValueError(f"depth_k has {n} rows, not a multiple of Tq={tq} (token-major [B, Tq*S, Hk, D])")
    return n // tq


def moda_reference(q, k, v, depth_k, depth_v, causal: bool = True, scale: float | None = None) -> torch.Tensor:
    """Joint softmax over causal sequence keys and the own position's depth slots (fp32)."""
    check_shapes(q, k, v)
    s_slots = depth_slots(q, depth_k, depth_v, k)
    b, tq, hq, d = q.shape
    tk = k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    acc = _acc(q.dtype)
    qf = q.to(acc)
    kf, vf = expand_kv(k, hq).to(acc), expand_kv(v, hq).to(acc)
    s_seq = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale                     # [B, H, Tq, Tk]
    if causal:
        i = torch.arange(tq, device=q.device)[:, None]
        j = torch.arange(tk, device=q.device)[None, :]
        s_seq = s_seq.masked_fill(~(j <= i + (tk - tq)), float("-inf"))
    dk = expand_kv(depth_k, hq).to(acc).reshape(b, tq, s_slots, hq, d)
    dv = expand_kv(depth_v, hq).to(acc).reshape(b, tq, s_slots, hq, d)
    s_dep = torch.einsum("bqhd,bqshd->bhqs", qf, dk) * scale                    # [B, H, Tq, S]
    p = torch.softmax(torch.cat([s_seq, s_dep], dim=-1), dim=-1).nan_to_num(0.0)
    p_seq, p_dep = p[..., :tk], p[..., tk:]
    o = torch.einsum("bhqk,bkhd->bqhd", p_seq, vf) + torch.einsum("bhqs,bqshd->bqhd", p_dep, dv)
    return o.to(q.dtype)


def moda_flops(b: int, tq: int, tk: int, hq: int, d: int, slots: int, causal: bool) -> float:
    """Forward matmul FLOPs: 4*d per visible (query, key) pair, sequence pairs plus S depth slots
    per query row."""
    from ..attention.reference import attention_flops
    return attention_flops(b, tq, tk, hq, d, causal) + 4.0 * b * hq * d * tq * slots


# ---------------------------------------------------------------------------------------------
# MoD
# ---------------------------------------------------------------------------------------------

def mod_k(t: int, capacity: float) -> int:
    """Routed tokens per sequence: ceil(capacity * T), clamped to [1, T] (0 when T = 0)."""
    if t <= 0:
        return 0
    return max(1, min(t, int(math.ceil(capacity * t - 1e-9))))


@torch.no_grad()
def mod_select(router: torch.Tensor, capacity: float) -> torch.Tensor:
    """Top-k positions of ``router`` [B, T] per row, sorted by position: LongTensor [B, k].

    Shared by every backend. Tie-breaking: higher logit first, lower position on ties (a
    stable descending sort of the fp32 logits)."""
    if router.dim() != 2:
        raise ValueError(f"router must be [B, T]; got {tuple(router.shape)}")
    kk = mod_k(router.shape[1], capacity)
    order = torch.sort(router.detach().to(_acc(router.dtype)), dim=1, descending=True, stable=True).indices
    return torch.sort(order[:, :kk], dim=1).values


def mod_gate(r: torch.Tensor, gate: str) -> torch.Tensor:
    if gate == "sigmoid":
        return torch.sigmoid(r)
    if gate == "raw":
        return r
    raise ValueError(f"gate must be 'sigmoid' or 'raw', got {gate!r}")


def check_mod(x, router, y, index):
    if x.dim() != 3:
        raise ValueError(f"x must be [B, T, C]; got {tuple(x.shape)}")
    b, t, c = x.shape
    if tuple(router.shape) != (b, t):
        raise ValueError(f"router must be [B, T] = {(b, t)}; got {tuple(router.shape)}")
    if y.dim() != 3 or y.shape[0] != b or y.shape[2] != c:
        raise ValueError(f"y must be [B, k, C] with B={b}, C={c}; got {tuple(y.shape)}")
    if index is not None and tuple(index.shape) != (b, y.shape[1]):
        raise ValueError(f"index must be [B, k] = {(b, y.shape[1])}; got {tuple(index.shape)}")


def resolve_index(x, router, y, index, capacity: float) -> torch.Tensor:
    """The routed positions: ``index`` if given, else :func:`mod_select`; checks k."""
    check_mod(x, router, y, index)
    if index is None:
        index = mod_select(router, capacity)
        if index.shape[1] != y.shape[1]:
            raise ValueError(f"y has {y.shape[1]} routed rows but capacity={capacity} of T={x.shape[1]} "
                             f"routes {index.shape[1]}")
    return index.to(device=x.device, dtype=torch.long)


def mod_reference(x, router, y, index=None, capacity: float = 0.125, gate: str = "sigmoid") -> torch.Tensor:
    """out = x, plus gate(router) * y scattered to the routed positions (fp32 math)."""
    idx = resolve_index(x, router, y, index, capacity)
    acc = _acc(x.dtype)
    w = mod_gate(router.to(acc).gather(1, idx), gate)                           # [B, k]
    upd = w[..., None] * y.to(acc)
    out = x.to(acc).scatter_add(1, idx[..., None].expand(-1, -1, x.shape[2]), upd)
    return out.to(x.dtype)


def mod_gather_reference(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[b, index[b, j]] -> [B, k, C] (differentiable in x)."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[2]))


def mod_flops(b: int, t: int, c: int, capacity: float, gate: str = "sigmoid") -> float:
    """The routed update itself: a multiply-add per routed element (the block it wraps is
    counted by the module's cost model)."""
    return 2.0 * b * mod_k(t, capacity) * c
