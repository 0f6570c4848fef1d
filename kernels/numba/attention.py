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

Each task gathers the [rows, D] blocks it needs from the [B, T, H, D] inputs into contiguous
buffers itself (the softmax scale folded into the Q block), so the forward is ONE parallel
region and the backward two (the tiles, then the sum of the per-thread dQ buffers): every
extra region is a barrier, and on a loaded machine each barrier can cost a scheduler time
slice (see docs/notes/numba-kernels.md).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ._common import (
    atomic_next,
    check_floats,
    empty,
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
def _load_rows(src, b, t0, h, n, mul, dst):
    """dst[:n] = src[b, t0:t0+n, h, :] * mul: a [T, D] slab of a [B, T, H, D] array made
    contiguous for np.dot (rows of D contiguous values, stride H*D between rows)."""
    d = src.shape[3]
    for r in range(n):
        row = dst[r]
        for c in range(d):
            row[c] = src[b, t0 + r, h, c] * mul


@jitable
def online_softmax_row(srow, nvis, mrow, lrow, r):
    """One online-softmax step for query row ``r``: exponentiate the first ``nvis`` scores of
    ``srow`` in place against the new running max (the rest become 0), update ``mrow[r]`` and
    ``lrow[r]``, and return the factor that rescales the row's accumulator (0 on its first block).
    Shared by dense attention and context.moc (kernels/numba/moc.py)."""
    mold = mrow[r]
    mnew = max(mold, row_max(srow, nvis))
    tot = srow.dtype.type(0)
    for c in range(nvis):
        p = fexp(srow[c] - mnew)
        srow[c] = p
        tot += p
    srow[nvis:] = 0
    mrow[r] = mnew
    if mold == -np.inf:
        lrow[r] = tot
        return srow.dtype.type(0)
    alpha = fexp(mold - mnew)
    lrow[r] = lrow[r] * alpha + tot
    return alpha


@jitable
def online_softmax_block(s, vb, nvis, rows, alpha, acc, mrow, lrow):
    """One online-softmax block step for the score rows ``s[a]`` (a < s.shape[0]) of accumulator
    rows ``rows[a]``: each row's first ``nvis[a]`` scores are exponentiated in place against the
    new running max (:func:`online_softmax_row`; a row with no visible key becomes 0 and keeps
    its state), then ``acc[rows[a]] = acc[rows[a]] * alpha[a] + (P V)[a]`` with ``vb`` the
    block's values. ``alpha`` is scratch of at least ``s.shape[0]`` entries.
    Shared by dense attention and context.moc (kernels/numba/moc.py)."""
    nr = s.shape[0]
    for a in range(nr):
        if nvis[a] == 0:
            alpha[a] = 1
            s[a, :] = 0
        else:
            alpha[a] = online_softmax_row(s[a], nvis[a], mrow, lrow, rows[a])
    pv = np.dot(s, vb)
    d = acc.shape[1]
    for a in range(nr):
        r = rows[a]
        al = alpha[a]
        for c in range(d):
            acc[r, c] = acc[r, c] * al + pv[a, c]


@jitable
def finish_rows(acc, mrow, lrow, o, lse, b, h, i0, m):
    """Write the m query rows from i0 of an online-softmax block: o = acc / l and
    lse = max + log l; a row that saw no key gets o = 0, lse = -inf. Shared with context.moc."""
    d = acc.shape[1]
    one = acc.dtype.type(1)
    for r in range(m):
        i = i0 + r
        if lrow[r] > 0:
            inv = one / lrow[r]
            for c in range(d):
                o[b, i, h, c] = acc[r, c] * inv
            lse[b, h, i] = mrow[r] + np.log(lrow[r])
        else:
            for c in range(d):
                o[b, i, h, c] = 0
            lse[b, h, i] = -np.inf


@jitable
def _fwd_task(q, k, v, scale, o, lse, causal, bm, bn, b, h, qb):
    """One (batch, head, query block): stream the visible key blocks with online softmax."""
    tq, hq, d = q.shape[1], q.shape[2], q.shape[3]
    tk = k.shape[1]
    g = h // (hq // k.shape[2])
    off = tk - tq
    i0 = qb * bm
    i1 = min(i0 + bm, tq)
    m = i1 - i0
    jend = tk
    if causal:
        jend = min(tk, i1 + off)  # key blocks past the last row's diagonal are never read
    one = q.dtype.type(1)
    qblk = np.empty((m, d), q.dtype)
    _load_rows(q, b, i0, h, m, q.dtype.type(scale), qblk)  # softmax scale folded into Q
    kbuf = np.empty((bn, d), q.dtype)
    vbuf = np.empty((bn, d), q.dtype)
    acc = np.zeros((m, d), q.dtype)
    mrow = np.empty(m, q.dtype)
    lrow = np.zeros(m, q.dtype)
    alpha_row = np.empty(m, q.dtype)
    nvis = np.empty(m, np.int64)
    rows = np.arange(m)
    for r in range(m):
        mrow[r] = -np.inf
    for j0 in range(0, jend, bn):
        n = min(bn, jend - j0)
        kb = kbuf[:n]
        vb = vbuf[:n]
        _load_rows(k, b, j0, g, n, one, kb)
        _load_rows(v, b, j0, g, n, one, vb)
        s = np.dot(qblk, kb.T)
        for r in range(m):
            nvis[r] = min(n, max(0, i0 + r + off + 1 - j0)) if causal else n
        online_softmax_block(s, vb, nvis, rows, alpha_row, acc, mrow, lrow)
    finish_rows(acc, mrow, lrow, o, lse, b, h, i0, m)


@kernel(parallel=True, blas=True)
def _fwd_kernel(q, k, v, scale, o, lse, causal, bm, bn, counter, workers):
    """q [B,Tq,Hq,D], k/v [B,Tk,Hk,D] -> o [B,Tq,Hq,D], lse [B,Hq,Tq]. One parallel region:
    tasks (batch, head, query block), heaviest (last query block) first, taken from
    ``counter`` by ``workers`` threads; each task gathers the blocks it needs itself."""
    nbh = q.shape[0] * q.shape[2]
    nqb = (q.shape[1] + bm - 1) // bm
    ntask = nbh * nqb
    for _w in prange(workers):
        t = atomic_next(counter)
        while t < ntask:
            kq = t // nbh
            bh = t - kq * nbh
            _fwd_task(q, k, v, scale, o, lse, causal, bm, bn, bh // q.shape[2],
                      bh % q.shape[2], nqb - 1 - kq)
            t = atomic_next(counter)


@jitable
def _bwd_task(q, k, v, o, do, lse, scale, dq_acc, dk, dv, causal, bm, bn, b, g, kbi):
    """One (batch, kv head, key block): dK / dV of the block over its GQA group, dS K into
    this thread's dQ buffer."""
    tq, hq, d = q.shape[1], q.shape[2], q.shape[3]
    tk = k.shape[1]
    group = hq // k.shape[2]
    off = tk - tq
    one = q.dtype.type(1)
    sc = q.dtype.type(scale)
    tid = thread_id()
    j0 = kbi * bn
    n = min(bn, tk - j0)
    kb = np.empty((n, d), q.dtype)
    vb = np.empty((n, d), q.dtype)
    _load_rows(k, b, j0, g, n, one, kb)
    _load_rows(v, b, j0, g, n, one, vb)
    dkb = np.zeros((n, d), q.dtype)
    dvb = np.zeros((n, d), q.dtype)
    qbuf = np.empty((bm, d), q.dtype)
    dobuf = np.empty((bm, d), q.dtype)
    dl = np.empty(bm, q.dtype)
    ibeg = 0
    if causal:
        ibeg = max(0, j0 - off)  # first query row that sees key j0
    ib0 = (ibeg // bm) * bm
    for h in range(g * group, (g + 1) * group):
        for i0 in range(ib0, tq, bm):
            m = min(bm, tq - i0)
            qb = qbuf[:m]
            dob = dobuf[:m]
            _load_rows(q, b, i0, h, m, sc, qb)
            _load_rows(do, b, i0, h, m, one, dob)
            for r in range(m):  # delta = rowsum(dO * O)
                acc = q.dtype.type(0)
                for c in range(d):
                    acc += dob[r, c] * o[b, i0 + r, h, c]
                dl[r] = acc
            p = np.dot(qb, kb.T)
            for r in range(m):
                lr = lse[b, h, i0 + r]
                nvis = n
                if causal:
                    nvis = min(n, max(0, i0 + r + off + 1 - j0))
                if lr == -np.inf:
                    nvis = 0
                for c in range(nvis):
                    p[r, c] = fexp(p[r, c] - lr)
                p[r, nvis:] = 0
            pt_do = np.dot(p.T, dob)
            for r in range(n):
                for c in range(d):
                    dvb[r, c] += pt_do[r, c]
            ds = np.dot(dob, vb.T)
            for r in range(m):
                dlr = dl[r]
                for c in range(n):
                    ds[r, c] = p[r, c] * (ds[r, c] - dlr)
            dst_q = np.dot(ds.T, qb)
            for r in range(n):
                for c in range(d):
                    dkb[r, c] += dst_q[r, c]
            ds_k = np.dot(ds, kb)
            for r in range(m):
                for c in range(d):
                    dq_acc[tid, b, i0 + r, h, c] += ds_k[r, c]
    for r in range(n):
        for c in range(d):
            dk[b, j0 + r, g, c] = dkb[r, c]
            dv[b, j0 + r, g, c] = dvb[r, c]


@kernel(parallel=True, blas=True)
def _bwd_kernel(q, k, v, o, do, lse, scale, dq_acc, dk, dv, causal, bm, bn, counter, workers):
    """q/o/do [B,Tq,Hq,D], k/v [B,Tk,Hk,D], lse [B,Hq,Tq]. Writes dk, dv [B,Tk,Hk,D] and adds
    dS K (unscaled) into dq_acc[thread] [nthreads,B,Tq,Hq,D]. Tasks (batch, kv head, key
    block), heaviest (first key block under causal) first."""
    nbg = k.shape[0] * k.shape[2]
    nkb = (k.shape[1] + bn - 1) // bn
    ntask = nbg * nkb
    for _w in prange(workers):
        t = atomic_next(counter)
        while t < ntask:
            kbi = t // nbg
            bg = t - kbi * nbg
            _bwd_task(q, k, v, o, do, lse, scale, dq_acc, dk, dv, causal, bm, bn,
                      bg // k.shape[2], bg % k.shape[2], kbi)
            t = atomic_next(counter)


@kernel(parallel=True)
def _bwd_post(dq_acc, scale, dq):
    """dq = scale * sum over threads of dq_acc [nthreads, ...] (flat views)."""
    nthr, n = dq_acc.shape
    sc = dq.dtype.type(scale)
    chunk = 16384
    for t in prange((n + chunk - 1) // chunk):
        lo = t * chunk
        hi = min(n, lo + chunk)
        out = dq[lo:hi]
        first = dq_acc[0, lo:hi]
        for c in range(hi - lo):
            out[c] = first[c]
        for w in range(1, nthr):
            part = dq_acc[w, lo:hi]
            for c in range(hi - lo):
                out[c] += part[c]
        for c in range(hi - lo):
            out[c] *= sc


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


def attention_fwd(q, k, v, causal=True, scale=None):
    """Forward only: returns (o [B,Tq,Hq,D], lse [B,Hq,Tq], natural log; -inf for empty rows)."""
    dtype, scale = _check(q, k, v, scale)
    b, tq, hq, d = q.shape
    o = empty((b, tq, hq, d), dtype)
    lse = empty((b, hq, tq), dtype)
    if o.numel() == 0 or k.shape[1] == 0:
        o.zero_()
        lse.fill_(-math.inf)
        return o, lse
    _fwd_kernel(np_view(q), np_view(k), np_view(v), scale, o.numpy(), lse.numpy(),
                bool(causal), BLOCK_M, BLOCK_N, task_counter(), num_threads())
    return o, lse


def attention_bwd(do, q, k, v, o, lse, causal=True, scale=None):
    """Gradients (dq, dk, dv) of attention given dO, the inputs, O and lse from the forward."""
    dtype, scale = _check(q, k, v, scale)
    check_floats("attention_bwd", do=do, o=o, lse=lse, q=q)
    b, tq, hq, d = q.shape
    tk, hk = k.shape[1], k.shape[2]
    dq = empty((b, tq, hq, d), dtype)
    dk = empty((b, tk, hk, d), dtype)
    dv = empty((b, tk, hk, d), dtype)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    nthr = num_threads()
    dq_acc = np.zeros((nthr, b, tq, hq, d), dtype=dq.numpy().dtype)
    _bwd_kernel(np_view(q), np_view(k), np_view(v), np_view(o), np_view(do), np_view(lse),
                scale, dq_acc, dk.numpy(), dv.numpy(), bool(causal), BLOCK_M, BLOCK_N,
                task_counter(), nthr)
    _bwd_post(dq_acc.reshape(nthr, -1), scale, dq.view(-1).numpy())
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
