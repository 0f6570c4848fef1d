"""Mixture-of-Depths Attention (``depth.moda``) on the CPU with Numba, forward and backward.

Layout as the reference (``plugins/depth/reference.py``): q [B, Tq, Hq, D], k/v [B, Tk, Hk, D],
depth_k/depth_v [B, Tq*S, Hk, D] token-major. One softmax over the causal sequence keys and the
S depth slots of the query's own position.

The joint softmax splits exactly into two segments merged by their log-sum-exps, so the
sequence segment is the shared Numba attention core (:mod:`.attention`, blocked online softmax)
and this module adds the depth segment:

* forward: ``(o_seq, lse_seq)`` from the core; a parallel pass over (batch, position) scores the
  S slots of each (position, head), and merges: ``lse = logaddexp(lse_seq, lse_dep)``,
  ``o = o_seq * exp(lse_seq - lse) + sum_s exp(s_s - lse) v_s``.
* backward: the core's backward run with the JOINT ``(o, lse)`` gives dQ (sequence part), dK and
  dV exactly (``P = exp(S - lse)``, ``dS = P (dP - delta)``, ``delta = rowsum(dO * O)`` are the
  joint ones); a parallel pass over (batch, position) adds the depth part of dQ and writes the
  depth slots' dK/dV (each slot belongs to one position: no contention).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ._common import check_floats, empty, kernel, np_view, prange
from .attention import attention_bwd, attention_fwd

__all__ = ["moda_attention", "moda_fwd", "moda_bwd"]


@kernel(parallel=True)
def _depth_fwd(q, dk, dv, scale, o, lse, S):
    B, T, Hq, D = q.shape
    Hk = dk.shape[2]
    G = Hq // Hk
    for bt in prange(B * T):
        b = bt // T
        t = bt - b * T
        sc = np.empty(S, dtype=np.float64)
        for h in range(Hq):
            hk = h // G
            m = lse[b, h, t]
            for s in range(S):
                acc = 0.0
                for d in range(D):
                    acc += q[b, t, h, d] * dk[b, t * S + s, hk, d]
                sc[s] = acc * scale
                if sc[s] > m:
                    m = sc[s]
            # lse_seq may be -inf (no visible sequence key); m is finite when S >= 1
            w_seq = math.exp(lse[b, h, t] - m) if lse[b, h, t] > -math.inf else 0.0
            tot = w_seq
            for s in range(S):
                sc[s] = math.exp(sc[s] - m)
                tot += sc[s]
            for d in range(D):
                acc = o[b, t, h, d] * w_seq
                for s in range(S):
                    acc += sc[s] * dv[b, t * S + s, hk, d]
                o[b, t, h, d] = acc / tot
            lse[b, h, t] = m + math.log(tot)


@kernel(parallel=True)
def _depth_bwd(q, dk, dv, o, do, lse, scale, dq, ddk, ddv, S):
    B, T, Hq, D = q.shape
    Hk = dk.shape[2]
    G = Hq // Hk
    for bt in prange(B * T):
        b = bt // T
        t = bt - b * T
        for hk in range(Hk):
            for s in range(S):
                for d in range(D):
                    ddk[b, t * S + s, hk, d] = 0.0
                    ddv[b, t * S + s, hk, d] = 0.0
        for h in range(Hq):
            hk = h // G
            delta = 0.0
            for d in range(D):
                delta += do[b, t, h, d] * o[b, t, h, d]
            for s in range(S):
                r = t * S + s
                sc = 0.0
                dp = 0.0
                for d in range(D):
                    sc += q[b, t, h, d] * dk[b, r, hk, d]
                    dp += do[b, t, h, d] * dv[b, r, hk, d]
                p = math.exp(sc * scale - lse[b, h, t])
                ds = p * (dp - delta) * scale
                for d in range(D):
                    dq[b, t, h, d] += ds * dk[b, r, hk, d]
                    ddk[b, r, hk, d] += ds * q[b, t, h, d]
                    ddv[b, r, hk, d] += p * do[b, t, h, d]


def _check(q, k, v, depth_k, depth_v, scale):
    from ...plugins.depth.reference import depth_slots
    dtype = check_floats("moda", q=q, k=k, v=v, depth_k=depth_k, depth_v=depth_v)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"moda: q, k, v must be [B, T, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    s_slots = depth_slots(q, depth_k, depth_v, k)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return dtype, s_slots, scale


def moda_fwd(q, k, v, depth_k, depth_v, causal=True, scale=None):
    """(o [B, Tq, Hq, D], lse [B, Hq, Tq] natural log)."""
    dtype, S, scale = _check(q, k, v, depth_k, depth_v, scale)
    o, lse = attention_fwd(q, k, v, causal, scale)
    if S and q.numel():
        _depth_fwd(np_view(q), np_view(depth_k), np_view(depth_v), scale, o.numpy(), lse.numpy(), S)
    return o, lse


def moda_bwd(do, q, k, v, depth_k, depth_v, o, lse, causal=True, scale=None):
    """(dq, dk, dv, d_depth_k, d_depth_v)."""
    dtype, S, scale = _check(q, k, v, depth_k, depth_v, scale)
    check_floats("moda_bwd", do=do, o=o, q=q)
    dq, dk, dv = attention_bwd(do, q, k, v, o, lse, causal, scale)
    ddk = empty(tuple(depth_k.shape), dtype)
    ddv = empty(tuple(depth_v.shape), dtype)
    if S and q.numel():
        dq = dq.contiguous()
        _depth_bwd(np_view(q), np_view(depth_k), np_view(depth_v), np_view(o), np_view(do),
                   np_view(lse), scale, dq.numpy(), ddk.numpy(), ddv.numpy(), S)
    else:
        ddk.zero_(), ddv.zero_()
    return dq, dk, dv, ddk, ddv


class MoDAFunction(torch.autograd.Function):
    """autograd wrapper: apply(q, k, v, depth_k, depth_v, causal, scale) -> o."""

    @staticmethod
    def forward(ctx, q, k, v, depth_k, depth_v, causal, scale):
        o, lse = moda_fwd(q, k, v, depth_k, depth_v, causal, scale)
        ctx.save_for_backward(q, k, v, depth_k, depth_v, o, lse)
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, depth_k, depth_v, o, lse = ctx.saved_tensors
        grads = moda_bwd(do.contiguous(), q, k, v, depth_k, depth_v, o, lse, ctx.causal, ctx.scale)
        return (*grads, None, None)


def moda_attention(q, k, v, depth_k, depth_v, causal=True, scale=None):
    """MoDA, autograd-enabled; CPU float32/float64."""
    _check(q, k, v, depth_k, depth_v, scale)
    return MoDAFunction.apply(q, k, v, depth_k, depth_v, bool(causal), scale)
