"""Decode-time KV-cache kernels on the CPU with Numba: the same contract as
``kernels/triton/kv_decode.py`` (``decode_attention``, ``token_scores``).

Layout: q ``[B, Tq, Hq, D]`` (the new queries), the cache k / v ``[B, Hk, T, D]`` (the new tokens
are its last Tq entries; bottom-right causal: query i sees key j iff j <= i + T - Tq). GQA: query
head h reads kv head h // (Hq // Hk).

decode_attention: one parallel task per (batch, kv head), taken from a shared counter. A task
gathers the ``G * Tq`` query rows of its kv group (the softmax scale folded in) into one
contiguous block, so each block of keys and values is read once for the whole group, and
streams the cache in blocks of ``BLOCK_N`` keys: ``S = Q K^T`` and ``O += P V`` are small BLAS
matmuls on contiguous slabs of the cache; the row update is the dense kernel's
``online_softmax_row`` and the output / lse are written by its ``finish_rows``
(``kernels/numba/attention.py``). No split-K: with a few threads, ``B * Hk`` tasks already
fill the machine.

token_scores: one task per (batch, output head) (output head = kv head, or query head with
``per_query_head``): the rows (head in the group, query) against each key block,
``sum exp(s - lse)`` over the visible rows with the vectorised ``fexp``.

decode_attention(..., return_logits=True) also writes the scaled logits ``q.k * scale * log2 e``
(the Triton contract); h2o_step / decode_h2o: the fused H2O step (accumulate the probabilities into
the running scores, evict the lowest unprotected token in place), one task per (batch, kv head).

float32 / float64 only (as every Numba kernel here); the callers in ``plugins/token/backends.py``
upcast bfloat16 / float16 caches.
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
    task_counter,
)
from .attention import finish_rows, online_softmax_row

__all__ = ["decode_attention", "token_scores", "h2o_step", "decode_h2o", "BLOCK_N"]

BLOCK_N = 128
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@jitable
def _gather_group(q, b, hk, group, hpo_first, nrows, scale, dst):
    """dst[r] = q[b, r % Tq, hpo_first + r // Tq, :] * scale for r < nrows."""
    tq, d = q.shape[1], q.shape[3]
    sc = q.dtype.type(scale)
    for r in range(nrows):
        g = r // tq
        i = r - g * tq
        for c in range(d):
            dst[r, c] = q[b, i, hpo_first + g, c] * sc


@jitable
def _decode_task(q, k, v, scale, o, lse, lg, bn, b, hk):
    tq, hq, d = q.shape[1], q.shape[2], q.shape[3]
    t = k.shape[2]
    group = hq // k.shape[1]
    off = t - tq
    m = group * tq
    qblk = np.empty((m, d), q.dtype)
    _gather_group(q, b, hk, group, hk * group, m, scale, qblk)
    acc = np.zeros((m, d), q.dtype)
    mrow = np.empty(m, q.dtype)
    lrow = np.zeros(m, q.dtype)
    alpha_row = np.empty(m, q.dtype)
    for r in range(m):
        mrow[r] = -np.inf
    kbuf = np.empty((bn, d), q.dtype)
    vbuf = np.empty((bn, d), q.dtype)
    for j0 in range(0, t, bn):
        n = min(bn, t - j0)
        kb = kbuf[:n]
        vb = vbuf[:n]
        kb[:, :] = k[b, hk, j0:j0 + n]
        vb[:, :] = v[b, hk, j0:j0 + n]
        s = np.dot(qblk, kb.T)
        if lg.shape[3] == t:  # the logits too (log2 units), before the softmax overwrites s
            for r in range(m):
                g = r // tq
                i = r - g * tq
                for c in range(n):
                    lg[b, hk * group + g, i, j0 + c] = s[r, c] * LOG2E
        for r in range(m):
            i = r % tq
            nvis = min(n, max(0, i + off + 1 - j0))
            if nvis == 0:
                alpha_row[r] = 1
                s[r, :] = 0
                continue
            alpha_row[r] = online_softmax_row(s[r], nvis, mrow, lrow, r)
        pv = np.dot(s, vb)
        for r in range(m):
            alpha = alpha_row[r]
            for c in range(d):
                acc[r, c] = acc[r, c] * alpha + pv[r, c]
    for g in range(group):
        r0 = g * tq
        finish_rows(acc[r0:r0 + tq], mrow[r0:r0 + tq], lrow[r0:r0 + tq], o, lse, b, hk * group + g, 0, tq)


@kernel(parallel=True, blas=True)
def _decode_kernel(q, k, v, scale, o, lse, lg, bn, counter, workers):
    nhk = k.shape[1]
    ntask = q.shape[0] * nhk
    for _w in prange(workers):
        t = atomic_next(counter)
        while t < ntask:
            _decode_task(q, k, v, scale, o, lse, lg, bn, t // nhk, t % nhk)
            t = atomic_next(counter)


@jitable
def _scores_task(q, k, lse, scale, sc, bn, hpo, b, ho):
    tq, hq, d = q.shape[1], q.shape[2], q.shape[3]
    t = k.shape[2]
    group = hq // k.shape[1]
    hk = (ho * hpo) // group
    off = t - tq
    m = hpo * tq
    qblk = np.empty((m, d), q.dtype)
    _gather_group(q, b, hk, group, ho * hpo, m, scale, qblk)
    lrow = np.empty(m, q.dtype)
    for r in range(m):
        g = r // tq
        lrow[r] = lse[b, ho * hpo + g, r - g * tq]
    kbuf = np.empty((bn, d), q.dtype)
    for c in range(t):
        sc[b, ho, c] = 0
    for j0 in range(0, t, bn):
        n = min(bn, t - j0)
        kb = kbuf[:n]
        kb[:, :] = k[b, hk, j0:j0 + n]
        s = np.dot(qblk, kb.T)
        out = sc[b, ho, j0:j0 + n]
        for r in range(m):
            if lrow[r] == -np.inf:
                continue
            i = r % tq
            nvis = min(n, max(0, i + off + 1 - j0))
            lr = lrow[r]
            srow = s[r]
            for c in range(nvis):
                out[c] += fexp(srow[c] - lr)


@kernel(parallel=True, blas=True)
def _scores_kernel(q, k, lse, scale, sc, bn, hpo, counter, workers):
    nho = sc.shape[1]
    ntask = q.shape[0] * nho
    for _w in prange(workers):
        t = atomic_next(counter)
        while t < ntask:
            _scores_task(q, k, lse, scale, sc, bn, hpo, t // nho, t % nho)
            t = atomic_next(counter)


@jitable
def _h2o_task(lg, lse, acc, pos, dst, seen, sinks, recent, evict, b, hk):
    hq, tq, n = lg.shape[1], lg.shape[2], lg.shape[3]
    group = hq // acc.shape[1]
    off = n - tq
    tot = np.zeros(n, lg.dtype)
    for g in range(group):
        h = hk * group + g
        for i in range(tq):
            if lse[b, h, i] == -np.inf:
                continue
            l2 = lse[b, h, i] * LOG2E
            row = lg[b, h, i]
            for j in range(min(n, i + off + 1)):
                tot[j] += fexp((row[j] - l2) * LN2)
    for j in range(n):
        acc[b, hk, j] += tot[j]
    if not evict:
        return
    best = -1
    for j in range(n):  # lowest acc among the unprotected, ties to the newest position
        p = pos[b, hk, j]
        if p < sinks or p >= seen - recent:
            continue
        if best < 0 or acc[b, hk, j] < acc[b, hk, best] or (acc[b, hk, j] == acc[b, hk, best]
                                                             and p > pos[b, hk, best]):
            best = j
    last = n - 1
    if best < 0 or best == last:
        return
    dst[b, hk] = best  # the caller moves K and V (any dtype)
    pos[b, hk, best] = pos[b, hk, last]
    acc[b, hk, best] = acc[b, hk, last]


@kernel(parallel=True)
def _h2o_kernel(lg, lse, acc, pos, dst, seen, sinks, recent, evict, counter, workers):
    nhk = acc.shape[1]
    ntask = acc.shape[0] * nhk
    for _w in prange(workers):
        t = atomic_next(counter)
        while t < ntask:
            _h2o_task(lg, lse, acc, pos, dst, seen, sinks, recent, evict, t // nhk, t % nhk)
            t = atomic_next(counter)


# ----------------------------------------------------------------------------------------------
# torch-facing functions
# ----------------------------------------------------------------------------------------------
def _check(op, q, k, v=None):
    dtype = check_floats(op, q=q, k=k, v=v)
    if q.dim() != 4 or k.dim() != 4 or (v is not None and tuple(v.shape) != tuple(k.shape)):
        raise ValueError(f"{op}: expects q [B, Tq, Hq, D] and the cache k, v [B, Hk, T, D]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}" + ("" if v is None else f", v {tuple(v.shape)}"))
    b, tq, hq, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"{op}: q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head dim")
    hk = k.shape[1]
    if hk == 0 or hq % hk:
        raise ValueError(f"{op}: query heads ({hq}) must be a multiple of kv heads ({hk})")
    return dtype


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                     return_logits: bool = False):
    """o [B, Tq, Hq, D] and lse [B, Hq, Tq] (natural log, -inf for a row that sees no key) of the
    new queries over the cache k, v [B, Hk, T, D] (bottom-right causal). ``return_logits``: also
    ``lg = (q . k) * scale * log2(e)`` [B, Hq, Tq, T] (every key; q's dtype), written by the same
    pass (the Triton kernel's contract; :func:`h2o_step` turns them into probabilities)."""
    dtype = _check("decode_attention", q, k, v)
    b, tq, hq, d = q.shape
    t = k.shape[2]
    if t < tq:
        raise ValueError(f"decode_attention: the cache must hold the {tq} new tokens (its last entries); T={t}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    o = empty((b, tq, hq, d), dtype)
    lse = empty((b, hq, tq), dtype)
    lg = empty((b, hq, tq, t), dtype) if return_logits else empty((1, 1, 1, 0), dtype)
    if o.numel() == 0:
        lse.fill_(-math.inf)
        return (o, lse, lg) if return_logits else (o, lse)
    _decode_kernel(np_view(q), np_view(k), np_view(v), scale, o.numpy(), lse.numpy(), lg.numpy(), BLOCK_N,
                   task_counter(), num_threads())
    return (o, lse, lg) if return_logits else (o, lse)


def h2o_step(lg: torch.Tensor, lse: torch.Tensor, acc: torch.Tensor, pos: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor, seen: int, sinks: int, recent: int, evict: bool) -> None:
    """The Triton ``h2o_step`` contract on the CPU, in place: ``acc [B, Hk, n]`` (float32) ``+=``
    the attention each cached token received (``exp2(lg - lse * log2 e)`` over the visible keys,
    summed over the queries and the query heads of its kv group); with ``evict`` the lowest
    unprotected token (ties to the newest position) gets the newest token's (slot n-1) K, V,
    position and acc, and the caller keeps the first n-1 slots. One task per (batch, kv head)."""
    b, hk, n = acc.shape
    if k.dim() != 4 or tuple(k.shape[:3]) != (b, hk, n) or tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"h2o_step: k, v must be [B, Hk, n, D] matching acc {tuple(acc.shape)}; got "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if lg.dim() != 4 or lg.shape[0] != b or lg.shape[3] != n or lg.shape[1] % hk:
        raise ValueError(f"h2o_step: lg must be [B, Hq, Tq, n] with B={b}, n={n}, Hq a multiple of Hk={hk}; "
                         f"got {tuple(lg.shape)}")
    if tuple(lse.shape) != tuple(lg.shape[:3]) or tuple(pos.shape) != (b, hk, n):
        raise ValueError(f"h2o_step: lse {tuple(lse.shape)} must be {tuple(lg.shape[:3])}, pos {tuple(pos.shape)} "
                         f"must be {(b, hk, n)}")
    if acc.dtype != torch.float32 or pos.dtype != torch.int64:
        raise TypeError(f"h2o_step: acc must be float32 and pos int64; got {acc.dtype}, {pos.dtype}")
    if n == 0:
        return
    for name, x in (("acc", acc), ("pos", pos), ("k", k), ("v", v)):
        if x.device.type != "cpu":
            raise ValueError(f"h2o_step: {name} must be a CPU tensor (updated in place), got {x.device}")
    dst = torch.full((b, hk), -1, dtype=torch.int64)
    _h2o_kernel(np_view(lg), np_view(lse.to(lg.dtype)), acc.numpy(), pos.numpy(), dst.numpy(),
                seen, sinks, recent, bool(evict), task_counter(), num_threads())
    if evict:  # K and V rows (any dtype, so torch): the newest token into the leaving token's slot
        bi, hi = (dst >= 0).nonzero(as_tuple=True)
        if bi.numel():
            slot = dst[bi, hi]
            k[bi, hi, slot] = k[bi, hi, n - 1]
            v[bi, hi, slot] = v[bi, hi, n - 1]


def token_scores(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float | None = None,
                 per_query_head: bool = False) -> torch.Tensor:
    """Attention each cached token received, ``[B, Hk, T]`` (``per_query_head``: ``[B, Hq, T]``),
    in q's dtype, from q [B, Tq, Hq, D], k [B, Hk, T, D] and the pass's lse [B, Hq, Tq]."""
    dtype = _check("token_scores", q, k)
    b, tq, hq, d = q.shape
    hk, t = k.shape[1], k.shape[2]
    if tuple(lse.shape) != (b, hq, tq):
        raise ValueError(f"token_scores: lse must be [B, Hq, Tq] = {(b, hq, tq)}, got {tuple(lse.shape)}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    hpo = 1 if per_query_head else hq // hk
    sc = empty((b, hq // hpo, t), dtype)
    if sc.numel() == 0:
        return sc
    _scores_kernel(np_view(q), np_view(k), np_view(lse.to(dtype)), scale, sc.numpy(), BLOCK_N, hpo,
                   task_counter(), num_threads())
    return sc


def decode_h2o(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, acc: torch.Tensor,
               seen: int, keep: int, sinks: int, recent: int, scale: float | None = None
               ) -> tuple[torch.Tensor, bool]:
    """One H2O decoding step (the Triton ``decode_h2o`` contract): the decode pass over the cache
    k, v [B, Hk, n, D] writes its logits, :func:`h2o_step` accumulates the attention into ``acc``
    and, when ``n == keep + 1``, evicts one token per (batch, kv head) in place. Returns
    (o [B, Tq, Hq, D] in q's dtype, evicted). A bfloat16 / float16 cache is read as float32."""
    if keep < sinks + recent and k.shape[2] > keep:
        raise ValueError(f"keep={keep} is smaller than the {sinks + recent} protected tokens (sinks + recent)")
    low = q.dtype not in (torch.float32, torch.float64)
    qf, kf, vf = (x.float() for x in (q, k, v)) if low else (q, k, v)
    o, lse, lg = decode_attention(qf, kf, vf, scale, return_logits=True)
    evict = k.shape[2] == keep + 1
    h2o_step(lg, lse, acc, pos, k, v, seen, sinks, recent, evict)
    return o.to(q.dtype), evict
