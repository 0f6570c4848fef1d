"""Online-softmax attention on the CPU with Numba (FlashAttention-2 style), forward and backward.

Layout: q [B, Tq, Hq, D], k / v [B, Tk, Hk, D] (GQA: Hq % Hk == 0, query head h reads kv head
h // (Hq // Hk)). ``causal`` uses bottom-right alignment: query i sees key j iff
j <= i + (Tk - Tq); a row that sees no key outputs 0 and has lse = -inf (no NaN anywhere).

Forward: parallel over tasks (batch, query head, query block), taken dynamically by numba's
worker threads from a shared counter, heaviest first (causal work is uneven). Each task keeps
its [BM, D] query block, running row max / row sum and a [BM, D] accumulator, and streams key
blocks: S = Q K^T and O += P V are small dense matmuls (np.dot on contiguous 2-D blocks, which
numba lowers to BLAS gemm); the exponentials use the vectorised ``fexp``. Key blocks entirely
above the causal diagonal are never visited.

Backward: tasks (batch, kv head, key block), scheduled the same way. Each task owns dK / dV
of its key block (summed over the query heads of its GQA group, so no contention) and, for every query block
that sees it, recomputes P = exp(S - lse), dV += P^T dO, dP = dO V^T, dS = P (dP - delta)
with delta = rowsum(dO * O), dK += dS^T Q, and adds dS K into a per-thread dQ buffer
(summed after the parallel loop: no atomics, no contention).

The softmax scale is folded into a scaled, head-major copy of Q made once per call; that copy,
the head-major K / V / dO copies, delta and the final dQ reduction are numba passes too (a
torch op here would leave torch's OpenMP workers spinning beside the kernel).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ._common import (
    atomic_next,
    check_floats,
    fexp,
    jitable,
    kernel,
    np_view,
    num_threads,
    prange,
    row_max,
    task_counter,
    thread_id,
)

__all__ = ["attention", "attention_fwd", "attention_bwd", "AttentionFunction"]

# Block sizes (rows of Q per task, keys per inner step), module attributes so that tests and
# tuning can change them; 128 x 128 was the fastest of 64..256 at D = 64 on a 2-core AVX2
# machine, forward and backward (see docs/notes/numba-kernels.md).
BLOCK_M = 128
BLOCK_N = 128


# ----------------------------------------------------------------------------------------------
# kernels (plain Python, jitted on first call)
# ----------------------------------------------------------------------------------------------
@jitable
def _fwd_task(qs, kh, vh, o, lse, causal, bm, bn, b, h, qb):
    """One (batch, head, query block): stream the visible key blocks with online softmax."""
    hq, tq, d = qs.shape[1], qs.shape[2], qs.shape[3]
    tk = kh.shape[2]
    g = h // (hq // kh.shape[1])
    off = tk - tq
    i0 = qb * bm
    i1 = min(i0 + bm, tq)
    m = i1 - i0
    q = qs[b, h, i0:i1]
    jend = tk
    if causal:
        jend = min(tk, i1 + off)  # key blocks past the last row's diagonal are never read
    zero = qs.dtype.type(0)
    acc = np.zeros((m, d), qs.dtype)
    mrow = np.empty(m, qs.dtype)
    lrow = np.zeros(m, qs.dtype)
    alpha_row = np.empty(m, qs.dtype)
    for r in range(m):
        mrow[r] = -np.inf
    for j0 in range(0, jend, bn):
        j1 = min(j0 + bn, jend)
        n = j1 - j0
        kb = kh[b, g, j0:j1]
        vb = vh[b, g, j0:j1]
        s = np.dot(q, kb.T)
        for r in range(m):
            nvis = n
            if causal:
                nvis = min(n, max(0, i0 + r + off + 1 - j0))
            if nvis == 0:
                alpha_row[r] = 1
                for c in range(n):
                    s[r, c] = 0
                continue
            mold = mrow[r]
            mnew = max(mold, row_max(s[r], nvis))
            tot = zero
            for c in range(nvis):
                p = fexp(s[r, c] - mnew)
                s[r, c] = p
                tot += p
            for c in range(nvis, n):
                s[r, c] = 0
            if mold == -np.inf:
                alpha_row[r] = 0
                lrow[r] = tot
            else:
                alpha = fexp(mold - mnew)
                alpha_row[r] = alpha
                lrow[r] = lrow[r] * alpha + tot
            mrow[r] = mnew
        pv = np.dot(s, vb)
        for r in range(m):
            alpha = alpha_row[r]
            for c in range(d):
                acc[r, c] = acc[r, c] * alpha + pv[r, c]
    for r in range(m):
        i = i0 + r
        if lrow[r] > 0:
            inv = qs.dtype.type(1) / lrow[r]
            for c in range(d):
                o[b, i, h, c] = acc[r, c] * inv
            lse[b, h, i] = mrow[r] + np.log(lrow[r])
        else:
            for c in range(d):
                o[b, i, h, c] = 0
            lse[b, h, i] = -np.inf


@kernel(parallel=True, blas=True)
def _fwd_kernel(qs, kh, vh, o, lse, causal, bm, bn, counter, workers):
    """qs [B,Hq,Tq,D] (pre-scaled), kh/vh [B,Hk,Tk,D] -> o [B,Tq,Hq,D], lse [B,Hq,Tq].
    Tasks = (batch, head, query block), heaviest (last query block) first, taken from
    ``counter`` by ``workers`` threads."""
    nbh = qs.shape[0] * qs.shape[1]
    nqb = (qs.shape[2] + bm - 1) // bm
    ntask = nbh * nqb
    for _w in prange(workers):
        t = atomic_next(counter)
        while t < ntask:
            k = t // nbh
            bh = t - k * nbh
            _fwd_task(qs, kh, vh, o, lse, causal, bm, bn, bh // qs.shape[1],
                      bh % qs.shape[1], nqb - 1 - k)
            t = atomic_next(counter)


@jitable
def _bwd_task(qs, kh, vh, doh, lse, delta, dq_acc, dk, dv, causal, bm, bn, b, g, kbi):
    """One (batch, kv head, key block): dK / dV of the block over its GQA group, dQ parts
    into this thread's buffer."""
    hq, tq, d = qs.shape[1], qs.shape[2], qs.shape[3]
    tk = kh.shape[2]
    group = hq // kh.shape[1]
    off = tk - tq
    tid = thread_id()
    j0 = kbi * bn
    j1 = min(j0 + bn, tk)
    n = j1 - j0
    kb = kh[b, g, j0:j1]
    vb = vh[b, g, j0:j1]
    dkb = np.zeros((n, d), qs.dtype)
    dvb = np.zeros((n, d), qs.dtype)
    ibeg = 0
    if causal:
        ibeg = max(0, j0 - off)  # first query row that sees key j0
    ib0 = (ibeg // bm) * bm
    for h in range(g * group, (g + 1) * group):
        for i0 in range(ib0, tq, bm):
            i1 = min(i0 + bm, tq)
            m = i1 - i0
            q = qs[b, h, i0:i1]
            do = doh[b, h, i0:i1]
            p = np.dot(q, kb.T)
            for r in range(m):
                lr = lse[b, h, i0 + r]
                nvis = n
                if causal:
                    nvis = min(n, max(0, i0 + r + off + 1 - j0))
                if lr == -np.inf:
                    nvis = 0
                for c in range(nvis):
                    p[r, c] = fexp(p[r, c] - lr)
                for c in range(nvis, n):
                    p[r, c] = 0
            pt_do = np.dot(p.T, do)
            for r in range(n):
                for c in range(d):
                    dvb[r, c] += pt_do[r, c]
            ds = np.dot(do, vb.T)
            for r in range(m):
                dl = delta[b, h, i0 + r]
                for c in range(n):
                    ds[r, c] = p[r, c] * (ds[r, c] - dl)
            dst_q = np.dot(ds.T, q)
            for r in range(n):
                for c in range(d):
                    dkb[r, c] += dst_q[r, c]
            ds_k = np.dot(ds, kb)
            for r in range(m):
                for c in range(d):
                    dq_acc[tid, b, h, i0 + r, c] += ds_k[r, c]
    for r in range(n):
        for c in range(d):
            dk[b, j0 + r, g, c] = dkb[r, c]
            dv[b, j0 + r, g, c] = dvb[r, c]


@kernel(parallel=True, blas=True)
def _bwd_kernel(qs, kh, vh, doh, lse, delta, dq_acc, dk, dv, causal, bm, bn, counter, workers):
    """qs/doh [B,Hq,Tq,D] (qs pre-scaled), kh/vh [B,Hk,Tk,D], lse/delta [B,Hq,Tq].
    Writes dk, dv [B,Tk,Hk,D] (dk already includes the scale) and adds dS K (unscaled) into
    dq_acc[thread] [nthreads,B,Hq,Tq,D]. Tasks = (batch, kv head, key block), heaviest (first
    key block under causal) first."""
    nbg = kh.shape[0] * kh.shape[1]
    nkb = (kh.shape[2] + bn - 1) // bn
    ntask = nbg * nkb
    for _w in prange(workers):
        t = atomic_next(counter)
        while t < ntask:
            kbi = t // nbg
            bg = t - kbi * nbg
            _bwd_task(qs, kh, vh, doh, lse, delta, dq_acc, dk, dv, causal, bm, bn,
                      bg // kh.shape[1], bg % kh.shape[1], kbi)
            t = atomic_next(counter)


@kernel(parallel=True)
def _to_heads(x, mul, out):
    """x [B,T,H,D] -> out [B,H,T,D] (times mul). A numba pass, not a torch op: torch's idle
    OpenMP workers would otherwise spin beside the kernel that follows (see the notes)."""
    nb, t, h, d = x.shape
    m = x.dtype.type(mul)
    for r in prange(nb * t):
        b = r // t
        i = r - b * t
        for hh in range(h):
            for c in range(d):
                out[b, hh, i, c] = x[b, i, hh, c] * m


@kernel(parallel=True)
def _bwd_prep(do, o, delta):
    """delta [B,H,T] = rowsum(dO * O) over D, from [B,T,H,D] inputs."""
    nb, t, h, d = do.shape
    for r in prange(nb * t):
        b = r // t
        i = r - b * t
        for hh in range(h):
            acc = do.dtype.type(0)
            for c in range(d):
                acc += do[b, i, hh, c] * o[b, i, hh, c]
            delta[b, hh, i] = acc


@kernel(parallel=True)
def _bwd_post(dq_acc, scale, dq):
    """dq [B,T,H,D] = scale * sum over threads of dq_acc [nthreads,B,H,T,D]."""
    nthr, nb, h, t, d = dq_acc.shape
    sc = dq.dtype.type(scale)
    for r in prange(nb * t):
        b = r // t
        i = r - b * t
        for hh in range(h):
            for c in range(d):
                acc = dq_acc[0, b, hh, i, c]
                for w in range(1, nthr):
                    acc += dq_acc[w, b, hh, i, c]
                dq[b, i, hh, c] = acc * sc


# ----------------------------------------------------------------------------------------------
# torch-facing functions
# ----------------------------------------------------------------------------------------------
def _check(q, k, v, scale):
    dtype = check_floats("attention", q=q, k=k, v=v)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("attention: q, k, v must be 4-D [B, T, H, D]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, tq, hq, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} differ "
                         "(this kernel needs equal key and value head dims)")
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"attention: q {tuple(q.shape)} and k {tuple(k.shape)} disagree on "
                         "batch or head dim")
    hk = k.shape[2]
    if hk == 0 or hq % hk != 0:
        raise ValueError(f"attention: query heads ({hq}) must be a multiple of kv heads ({hk})")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    return dtype, float(scale)


def _heads(x, mul=1.0):
    """[B, T, H, D] tensor -> new contiguous [B, H, T, D] numpy array (times ``mul``)."""
    x = x.detach().contiguous()
    b, t, h, d = x.shape
    out = np.empty((b, h, t, d), dtype=x.numpy().dtype)
    _to_heads(x.numpy(), float(mul), out)
    return out


def attention_fwd(q, k, v, causal=True, scale=None):
    """Forward only: returns (o [B,Tq,Hq,D], lse [B,Hq,Tq], natural log; -inf for empty rows)."""
    dtype, scale = _check(q, k, v, scale)
    b, tq, hq, d = q.shape
    o = torch.empty((b, tq, hq, d), dtype=dtype)
    lse = torch.empty((b, hq, tq), dtype=dtype)
    if o.numel() == 0 or k.shape[1] == 0:
        o.zero_()
        lse.fill_(-math.inf)
        return o, lse
    _fwd_kernel(_heads(q, scale), _heads(k), _heads(v), o.numpy(), lse.numpy(), bool(causal),
                BLOCK_M, BLOCK_N, task_counter(), num_threads())
    return o, lse


def attention_bwd(do, q, k, v, o, lse, causal=True, scale=None):
    """Gradients (dq, dk, dv) of attention given dO, the inputs, O and lse from the forward."""
    dtype, scale = _check(q, k, v, scale)
    check_floats("attention_bwd", do=do, o=o, lse=lse, q=q)
    b, tq, hq, d = q.shape
    tk, hk = k.shape[1], k.shape[2]
    dq = torch.empty((b, tq, hq, d), dtype=dtype)
    dk = torch.empty((b, tk, hk, d), dtype=dtype)
    dv = torch.empty((b, tk, hk, d), dtype=dtype)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    do = do.detach().contiguous()
    delta = np.empty((b, hq, tq), dtype=dq.numpy().dtype)
    _bwd_prep(do.numpy(), np_view(o), delta)
    nthr = num_threads()
    dq_acc = np.zeros((nthr, b, hq, tq, d), dtype=delta.dtype)
    _bwd_kernel(_heads(q, scale), _heads(k), _heads(v), _heads(do), np_view(lse), delta,
                dq_acc, dk.numpy(), dv.numpy(), bool(causal), BLOCK_M, BLOCK_N,
                task_counter(), nthr)
    _bwd_post(dq_acc, scale, dq.numpy())
    return dq, dk, dv


class AttentionFunction(torch.autograd.Function):
    """autograd wrapper: apply(q, k, v, causal, scale) -> o."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        o, lse = attention_fwd(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal = causal
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = attention_bwd(do, q, k, v, o, lse, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None


def attention(q, k, v, causal=True, scale=None):
    """Softmax attention o = softmax(scale * q k^T [causal mask]) v, autograd-enabled.

    q [B, Tq, Hq, D], k / v [B, Tk, Hk, D] CPU float32/float64; returns o [B, Tq, Hq, D]."""
    _check(q, k, v, scale)
    return AttentionFunction.apply(q, k, v, bool(causal), scale)
