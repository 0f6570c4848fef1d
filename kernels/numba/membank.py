"""``token.membank`` forward on the CPU with Numba (no backward: the backend declares
``grad=False``, so training on the CPU dispatches to the reference).

Layout as the reference (``plugins/token/membank/reference.py``): q [B, Tq, Hq, D], k/v
[B, Tk, Hk, D] (query row i at absolute position p = i + Tk - Tq), bank_k/bank_v [B, N*M, Hk, D]
chunk-major. One parallel task per (batch, query row): for each head, the scores of the M bank
slots of chunk p // W and of the window keys p-W+1..p go into one row buffer, then one exact
softmax (max, exp, sum) and the weighted sum of the values; accumulation in float64.
"""

from __future__ import annotations

import math

import numpy as np

from ._common import check_floats, empty, kernel, np_view, prange

__all__ = ["membank_attention", "membank_fwd"]


@kernel(parallel=True)
def _fwd(q, k, v, bk, bv, scale, window, M, o):
    B, Tq, Hq, D = q.shape
    Tk, Hk = k.shape[1], k.shape[2]
    G = Hq // Hk
    diag = Tk - Tq
    for bi in prange(B * Tq):
        b = bi // Tq
        i = bi - b * Tq
        p = i + diag
        c = p // window
        j0 = max(0, p - window + 1)
        nw = p + 1 - j0
        sc = np.empty(M + nw, dtype=np.float64)
        acc = np.empty(D, dtype=np.float64)
        for h in range(Hq):
            hk = h // G
            mx = -math.inf
            for s in range(M):
                t = 0.0
                for d in range(D):
                    t += q[b, i, h, d] * bk[b, c * M + s, hk, d]
                sc[s] = t * scale
                mx = max(mx, sc[s])
            for j in range(nw):
                t = 0.0
                for d in range(D):
                    t += q[b, i, h, d] * k[b, j0 + j, hk, d]
                sc[M + j] = t * scale
                mx = max(mx, sc[M + j])
            tot = 0.0
            for r in range(M + nw):
                sc[r] = math.exp(sc[r] - mx)
                tot += sc[r]
            for d in range(D):
                acc[d] = 0.0
            for s in range(M):
                for d in range(D):
                    acc[d] += sc[s] * bv[b, c * M + s, hk, d]
            for j in range(nw):
                for d in range(D):
                    acc[d] += sc[M + j] * v[b, j0 + j, hk, d]
            for d in range(D):
                o[b, i, h, d] = acc[d] / tot


def membank_fwd(q, k, v, bank_k, bank_v, window=64, scale=None):
    """o [B, Tq, Hq, D] (forward only)."""
    from ...plugins.attention.reference import check_shapes
    from ...plugins.token.membank.reference import bank_slots
    dtype = check_floats("membank", q=q, k=k, v=v, bank_k=bank_k, bank_v=bank_v)
    check_shapes(q, k, v)
    m_slots = bank_slots(q, k, bank_k, bank_v, window)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    o = empty(tuple(q.shape), dtype)
    if q.numel():
        _fwd(np_view(q), np_view(k), np_view(v), np_view(bank_k), np_view(bank_v), scale, int(window), m_slots,
             o.numpy())
    return o


def membank_attention(q, k, v, bank_k, bank_v, window=64, scale=None):
    """Forward only; raises if a gradient is requested (use the reference or triton backend)."""
    import torch
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, bank_k, bank_v)):
        raise NotImplementedError("token.membank (numba) is forward-only: inputs require grad; use the "
                                  "'reference' or 'triton' backend for training")
    return membank_fwd(q, k, v, bank_k, bank_v, window, scale)
