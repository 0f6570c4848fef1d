"""Mixture of Contexts attention on the CPU with Numba: forward over the selected chunks only.

The routing (chunk means, scores, top-k with the shared tie-breaking, drop-off / drop-in) is the
torch function ``plugins.context.reference.moc_routing``, shared by every backend so that all of
them attend to exactly the same keys; it costs O(Tq * C * D), a small fraction of attention.

The kernel follows ``kernels/numba/attention.py`` (tasks (batch, query head, query block) taken
dynamically by numba's workers, online softmax, np.dot on contiguous blocks) but streams, for
each query block, the prefix segment ``[0, prefix)`` and then every chunk that at least one row
of the block selected, restricted to ``[max(start, prefix), end)`` so that a key is counted once
(the union). Per chunk the rows that selected it are gathered into a compact block, so work is
proportional to the selected (query, key) pairs, not to the union of the block's chunks. A key
``j`` is visible to row ``i`` iff ``j < lim_i`` (``lim_i = pos_i + 1`` causal, ``Tk`` otherwise).

Backward: the same tasks (batch, query head, query block) recompute P = exp(S - lse) over the
same segments; each task owns the dQ rows of its block, and adds dK / dV into per-thread
buffers summed after the parallel region (no atomics), as ``kernels/numba/attention.py`` does
for dQ.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .._alloc import empty
from ._common import (
    atomic_next,
    check_floats,
    fexp,
    jitable,
    kernel,
    np_view,
    num_threads,
    prange,
    task_counter,
    thread_id,
)
from .attention import _bwd_post, _load_rows, finish_rows, online_softmax_block

__all__ = ["moc_attention", "moc_attention_fwd", "moc_attention_bwd", "MoCFunction", "BLOCK_M", "BLOCK_N"]

# Query rows per task: larger than the dense kernel's 128 because each chunk's gemm only gets the
# rows that selected it (~rows * top_k / #chunks); at T=4096, chunk 128, top_k 4 on one core the
# forward kernel took 133 / 110 / 88 / 79 ms at 128 / 256 / 512 / 2048 rows (dense: 293 ms).
BLOCK_M = 512
BLOCK_N = 128


@jitable
def _active_rows(act, lim, i0, m, j0, idx):
    """Rows r < m with act[r] != 0 that see key j0 (lim[i0 + r] > j0) into idx[:nr]; returns nr.
    The gather step shared by the forward and backward segment loops."""
    nr = 0
    for r in range(m):
        if act[r] != 0 and lim[i0 + r] > j0:
            idx[nr] = r
            nr += 1
    return nr


@jitable
def _max_lim(lim, i0, m):
    """The largest key limit of rows [i0, i0 + m): no key at or past it is visible to the block."""
    maxlim = 0
    for r in range(m):
        maxlim = max(maxlim, lim[i0 + r])
    return maxlim


@jitable
def _chunk_segment(sel, bounds, prefix, maxlim, b, h, i0, m, c, act):
    """Keys [ja, jb) of chunk ``c`` past the prefix and below ``maxlim``, with act[r] set to whether
    row i0 + r selected the chunk; returns (ja, jb), empty (ja >= jb) when no row of the block
    selected it or no key is left. The chunk walk shared by the forward and backward tasks."""
    ja = max(bounds[c], prefix)
    jb = min(bounds[c + 1], maxlim)
    if ja >= jb:
        return ja, jb
    anyr = False
    for r in range(m):
        f = sel[b, h, i0 + r, c]
        act[r] = f
        anyr = anyr or f != 0
    return (ja, jb) if anyr else (jb, jb)


@jitable
def _segment(qblk, k, v, b, g, ja, jb, i0, m, lim, act, bn, acc, mrow, lrow,
             qsub_buf, idx, kbuf, vbuf, nvis, alpha):
    """Online-softmax update of the rows r with act[r] != 0 over keys [ja, jb)."""
    d = qblk.shape[1]
    one = qblk.dtype.type(1)
    for j0 in range(ja, jb, bn):
        n = min(bn, jb - j0)
        nr = _active_rows(act, lim, i0, m, j0, idx)
        if nr == 0:
            continue
        qsub = qsub_buf[:nr]
        for a in range(nr):
            src = qblk[idx[a]]
            dst = qsub[a]
            for c in range(d):
                dst[c] = src[c]
        kb = kbuf[:n]
        vb = vbuf[:n]
        _load_rows(k, b, j0, g, n, one, kb)
        _load_rows(v, b, j0, g, n, one, vb)
        s = np.dot(qsub, kb.T)
        for a in range(nr):
            nvis[a] = min(n, lim[i0 + idx[a]] - j0)
        online_softmax_block(s, vb, nvis, idx, alpha, acc, mrow, lrow)


@jitable
def _fwd_task(q, k, v, sel, bounds, lim, prefix, scale, o, lse, bm, bn, b, h, qb):
    tq, hq, d = q.shape[1], q.shape[2], q.shape[3]
    g = h // (hq // k.shape[2])
    nch = bounds.shape[0] - 1
    i0 = qb * bm
    i1 = min(i0 + bm, tq)
    m = i1 - i0
    qblk = np.empty((m, d), q.dtype)
    _load_rows(q, b, i0, h, m, q.dtype.type(scale), qblk)
    acc = np.zeros((m, d), q.dtype)
    mrow = np.empty(m, q.dtype)
    lrow = np.zeros(m, q.dtype)
    for r in range(m):
        mrow[r] = -np.inf
    qsub_buf = np.empty((m, d), q.dtype)
    idx = np.empty(m, np.int64)
    kbuf = np.empty((bn, d), q.dtype)
    vbuf = np.empty((bn, d), q.dtype)
    nvis = np.empty(m, np.int64)
    alpha = np.empty(m, q.dtype)
    act = np.ones(m, np.uint8)
    maxlim = _max_lim(lim, i0, m)
    if prefix > 0:
        _segment(qblk, k, v, b, g, 0, min(prefix, maxlim), i0, m, lim, act, bn, acc, mrow, lrow,
                 qsub_buf, idx, kbuf, vbuf, nvis, alpha)
    for c in range(nch):
        ja, jb = _chunk_segment(sel, bounds, prefix, maxlim, b, h, i0, m, c, act)
        if ja < jb:
            _segment(qblk, k, v, b, g, ja, jb, i0, m, lim, act, bn, acc, mrow, lrow,
                     qsub_buf, idx, kbuf, vbuf, nvis, alpha)
    finish_rows(acc, mrow, lrow, o, lse, b, h, i0, m)


@kernel(parallel=True, blas=True)
def _fwd_kernel(q, k, v, sel, bounds, lim, prefix, scale, o, lse, bm, bn, counter, workers):
    """Tasks (batch, head, query block), last query block first (the heaviest under causal)."""
    nbh = q.shape[0] * q.shape[2]
    nqb = (q.shape[1] + bm - 1) // bm
    ntask = nbh * nqb
    for _w in prange(workers):
        t = atomic_next(counter)
        while t < ntask:
            kq = t // nbh
            bh = t - kq * nbh
            _fwd_task(q, k, v, sel, bounds, lim, prefix, scale, o, lse, bm, bn, bh // q.shape[2],
                      bh % q.shape[2], nqb - 1 - kq)
            t = atomic_next(counter)


@jitable
def _bwd_segment(qblk, doblk, lse, delta, k, v, b, h, g, ja, jb, i0, m, lim, act, bn, dq_blk,
                 dk_acc, dv_acc, tid, qsub_buf, dosub_buf, idx, kbuf, vbuf):
    """Gradient contributions of keys [ja, jb) for the rows r with act[r] != 0."""
    d = qblk.shape[1]
    one = qblk.dtype.type(1)
    for j0 in range(ja, jb, bn):
        n = min(bn, jb - j0)
        nr = _active_rows(act, lim, i0, m, j0, idx)
        if nr == 0:
            continue
        qsub = qsub_buf[:nr]
        dosub = dosub_buf[:nr]
        for a in range(nr):
            for c in range(d):
                qsub[a, c] = qblk[idx[a], c]
                dosub[a, c] = doblk[idx[a], c]
        kb = kbuf[:n]
        vb = vbuf[:n]
        _load_rows(k, b, j0, g, n, one, kb)
        _load_rows(v, b, j0, g, n, one, vb)
        p = np.dot(qsub, kb.T)
        for a in range(nr):
            r = idx[a]
            nvis = min(n, lim[i0 + r] - j0)
            lr = lse[b, h, i0 + r]
            for c in range(nvis):
                p[a, c] = fexp(p[a, c] - lr)
            p[a, nvis:] = 0
        pt_do = np.dot(p.T, dosub)
        dp = np.dot(dosub, vb.T)
        for a in range(nr):
            dl = delta[idx[a]]
            for c in range(n):
                dp[a, c] = p[a, c] * (dp[a, c] - dl)
        dst_q = np.dot(dp.T, qsub)
        ds_k = np.dot(dp, kb)
        for r in range(n):
            for c in range(d):
                dv_acc[tid, b, j0 + r, g, c] += pt_do[r, c]
                dk_acc[tid, b, j0 + r, g, c] += dst_q[r, c]
        for a in range(nr):
            r = idx[a]
            for c in range(d):
                dq_blk[r, c] += ds_k[a, c]


@jitable
def _bwd_task(q, k, v, o, do, lse, sel, bounds, lim, prefix, scale, dq, dk_acc, dv_acc, bm, bn, b, h, qb):
    tq, hq, d = q.shape[1], q.shape[2], q.shape[3]
    g = h // (hq // k.shape[2])
    nch = bounds.shape[0] - 1
    tid = thread_id()
    i0 = qb * bm
    m = min(i0 + bm, tq) - i0
    one = q.dtype.type(1)
    qblk = np.empty((m, d), q.dtype)
    doblk = np.empty((m, d), q.dtype)
    _load_rows(q, b, i0, h, m, q.dtype.type(scale), qblk)
    _load_rows(do, b, i0, h, m, one, doblk)
    delta = np.empty(m, q.dtype)
    for r in range(m):
        acc = q.dtype.type(0)
        for c in range(d):
            acc += doblk[r, c] * o[b, i0 + r, h, c]
        delta[r] = acc
    dq_blk = np.zeros((m, d), q.dtype)
    qsub_buf = np.empty((m, d), q.dtype)
    dosub_buf = np.empty((m, d), q.dtype)
    idx = np.empty(m, np.int64)
    kbuf = np.empty((bn, d), q.dtype)
    vbuf = np.empty((bn, d), q.dtype)
    act = np.ones(m, np.uint8)
    maxlim = _max_lim(lim, i0, m)
    if prefix > 0:
        _bwd_segment(qblk, doblk, lse, delta, k, v, b, h, g, 0, min(prefix, maxlim), i0, m, lim, act, bn,
                     dq_blk, dk_acc, dv_acc, tid, qsub_buf, dosub_buf, idx, kbuf, vbuf)
    for c in range(nch):
        ja, jb = _chunk_segment(sel, bounds, prefix, maxlim, b, h, i0, m, c, act)
        if ja < jb:
            _bwd_segment(qblk, doblk, lse, delta, k, v, b, h, g, ja, jb, i0, m, lim, act, bn,
                         dq_blk, dk_acc, dv_acc, tid, qsub_buf, dosub_buf, idx, kbuf, vbuf)
    sc = q.dtype.type(scale)
    for r in range(m):
        for c in range(d):
            dq[b, i0 + r, h, c] = dq_blk[r, c] * sc


@kernel(parallel=True, blas=True)
def _bwd_kernel(q, k, v, o, do, lse, sel, bounds, lim, prefix, scale, dq, dk_acc, dv_acc, bm, bn,
                counter, workers):
    """Tasks (batch, head, query block): dQ rows of the block (owned), dK/dV into this thread's
    buffers dk_acc / dv_acc [nthreads, B, Tk, Hk, D] (summed afterwards: no atomics)."""
    nbh = q.shape[0] * q.shape[2]
    nqb = (q.shape[1] + bm - 1) // bm
    ntask = nbh * nqb
    for _w in prange(workers):
        t = atomic_next(counter)
        while t < ntask:
            kq = t // nbh
            bh = t - kq * nbh
            _bwd_task(q, k, v, o, do, lse, sel, bounds, lim, prefix, scale, dq, dk_acc, dv_acc, bm, bn,
                      bh // q.shape[2], bh % q.shape[2], nqb - 1 - kq)
            t = atomic_next(counter)


def _routing_arrays(routing):
    sel = routing.sel.to(torch.uint8).contiguous().numpy()
    bounds = routing.bounds.cpu().numpy().astype(np.int64)
    lim = routing.lim.cpu().numpy().astype(np.int64)
    return sel, bounds, lim


def _route(q, k, causal, chunk_size, top_k, prefix, boundaries, drop_off, drop_in, seed):
    from ...plugins.context.reference import moc_routing
    # the router's torch ops are small ([B, H, T, C]); on the CPU their OpenMP fork/join
    # costs more than the work (10x on a loaded 2-core box), so they run on one thread
    nt = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return moc_routing(q, k, causal, chunk_size, top_k, prefix, boundaries, drop_off, drop_in, seed)
    finally:
        torch.set_num_threads(nt)


def moc_attention_bwd(do, q, k, v, o, lse, routing, scale=None):
    """(dq, dk, dv) given dO, the inputs, O and lse from the forward and the same routing."""
    dtype = check_floats("context.moc", do=do, q=q, k=k, v=v, o=o, lse=lse)
    b, tq, hq, d = q.shape
    tk, hk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    dq = empty((b, tq, hq, d), dtype=dtype)
    dk = empty((b, tk, hk, d), dtype=dtype)
    dv = empty((b, tk, hk, d), dtype=dtype)
    if q.numel() == 0 or k.numel() == 0 or routing.n_chunks == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    nthr = num_threads()
    npdt = dq.numpy().dtype
    dk_acc = np.zeros((nthr, b, tk, hk, d), dtype=npdt)
    dv_acc = np.zeros((nthr, b, tk, hk, d), dtype=npdt)
    sel, bounds, lim = _routing_arrays(routing)
    _bwd_kernel(np_view(q), np_view(k), np_view(v), np_view(o), np_view(do), np_view(lse), sel, bounds, lim,
                int(routing.prefix), scale, dq.numpy(), dk_acc, dv_acc, BLOCK_M, BLOCK_N, task_counter(), nthr)
    _bwd_post(dk_acc.reshape(nthr, -1), 1.0, dk.view(-1).numpy())
    _bwd_post(dv_acc.reshape(nthr, -1), 1.0, dv.view(-1).numpy())
    return dq, dk, dv


def moc_attention_fwd(q, k, v, causal=True, chunk_size=64, top_k=4, prefix=0, boundaries=None,
                      drop_off=0.0, drop_in=0.0, seed=0, scale=None, routing=None):
    """-> (o [B,Tq,Hq,D], lse [B,Hq,Tq] natural log, -inf for rows with no key)."""
    from ...plugins.attention.reference import check_shapes

    dtype = check_floats("context.moc", q=q, k=k, v=v)
    check_shapes(q, k, v)
    b, tq, hq, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if routing is None:
        routing = _route(q, k, causal, chunk_size, top_k, prefix, boundaries, drop_off, drop_in, seed)
    o = empty((b, tq, hq, d), dtype=dtype)
    lse = empty((b, hq, tq), dtype=dtype)
    if o.numel() == 0 or k.shape[1] == 0 or routing.n_chunks == 0:
        o.zero_()
        lse.fill_(-math.inf)
        return o, lse
    sel, bounds, lim = _routing_arrays(routing)
    _fwd_kernel(np_view(q), np_view(k), np_view(v), sel, bounds, lim, int(routing.prefix), scale,
                o.numpy(), lse.numpy(), BLOCK_M, BLOCK_N, task_counter(), num_threads())
    return o, lse


class MoCFunction(torch.autograd.Function):
    """autograd wrapper: apply(q, k, v, routing, scale) -> o (routing fixed, no gradient)."""

    @staticmethod
    def forward(ctx, q, k, v, routing, scale):
        o, lse = moc_attention_fwd(q, k, v, scale=scale, routing=routing)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.routing, ctx.scale = routing, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = moc_attention_bwd(do.contiguous(), q, k, v, o, lse, ctx.routing, ctx.scale)
        return dq, dk, dv, None, None


def moc_attention(q, k, v, causal=True, chunk_size=64, top_k=4, prefix=0, boundaries=None, drop_off=0.0,
                  drop_in=0.0, seed=0, scale=None, routing=None):
    """``context.moc`` on the CPU, autograd-enabled (forward and backward over the selected keys)."""
    check_floats("context.moc", q=q, k=k, v=v)
    if routing is None:
        routing = _route(q, k, causal, chunk_size, top_k, prefix, boundaries, drop_off, drop_in, seed)
    return MoCFunction.apply(q, k, v, routing, scale)
