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

__all__ = ["decode_attention", "token_scores", "BLOCK_N"]

BLOCK_N = 128


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
def _decode_task(q, k, v, scale, o, lse, bn, b, hk):
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
def _decode_kernel(q, k, v, scale, o, lse, bn, counter, workers):
    nhk = k.shape[1]
    ntask = q.shape[0] * nhk
    for _w in prange(workers):
        t = atomic_next(counter)
        while t < ntask:
            _decode_task(q, k, v, scale, o, lse, bn, t // nhk, t % nhk)
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


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """o [B, Tq, Hq, D] and lse [B, Hq, Tq] (natural log, -inf for a row that sees no key) of the
    new queries over the cache k, v [B, Hk, T, D] (bottom-right causal)."""
    dtype = _check("decode_attention", q, k, v)
    b, tq, hq, d = q.shape
    t = k.shape[2]
    if t < tq:
        raise ValueError(f"decode_attention: the cache must hold the {tq} new tokens (its last entries); T={t}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    o = empty((b, tq, hq, d), dtype)
    lse = empty((b, hq, tq), dtype)
    if o.numel() == 0:
        lse.fill_(-math.inf)
        return o, lse
    _decode_kernel(np_view(q), np_view(k), np_view(v), scale, o.numpy(), lse.numpy(), BLOCK_N,
                   task_counter(), num_threads())
    return o, lse


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
