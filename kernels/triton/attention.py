"""Shared Triton online-softmax attention core (forward and backward).

Public contract (other components call exactly this)::

    o = attention(q, k, v, causal=True, scale=None)     # autograd-enabled, returns o like q
    o, lse = attention_fwd(q, k, v, causal, scale)       # lse fp32 [B, Hq, Tq], natural log
    dq, dk, dv = attention_bwd(do, q, k, v, o, lse, causal, scale)

Layout: ``q`` is ``[B, Tq, Hq, D]``, ``k`` and ``v`` are ``[B, Tk, Hk, D]``. Any strides work as
long as the last dimension is unit-stride (views sliced out of a fused ``[B, T, 3, H, D]``
projection are passed to the kernels by stride, without copies); a tensor whose last dim is not
unit-stride is copied once. GQA: ``Hq % Hk == 0`` and query head ``h`` reads kv head
``h // (Hq // Hk)``. ``scale=None`` means ``1/sqrt(D)``.

``causal=True`` uses bottom-right alignment (the FlashAttention-2 convention): query ``i`` may
see key ``j`` iff ``j <= i + (Tk - Tq)``. A row that sees no key (possible when ``Tq > Tk``)
outputs 0 and has ``lse = -inf``; its gradients are 0 (never NaN).

dtypes: float16, bfloat16 and float32. Softmax statistics and accumulators are fp32; outputs
and gradients come back in the input dtype. **float32 inputs use 3xTF32 tensor-core dots on the
GPU** (``input_precision="tf32x3"``: near-fp32 accuracy at about 3x the MMA work; plain TF32 gave
~1e-3 errors that do not cancel where an exact gradient is 0); under ``TRITON_INTERPRET=1`` the dots are exact fp32.

Head dim: any ``D`` from 1 to 256; the kernels use a power-of-two ``BLOCK_D >= 16`` with masks.
Sequence lengths: any (ragged tails are masked). Limits: the per-batch element offset
``T * stride_t`` of every tensor must fit in int32 (checked), and ``B`` must be <= 65535.

Custom ops (torch.library): ``blockzoo::attention_fwd(q, k, v, causal, scale) -> (o, lse)``
with ``register_fake`` and ``register_autograd`` (the gradient of ``lse`` is supported too), and
``blockzoo::attention_bwd(do, q, k, v, o, lse, causal, scale, dlse=None) -> (dq, dk, dv)`` with
``register_fake``. Both run on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``.

Backward modes (``BLOCKZOO_ATTN_BWD`` env var or :data:`BWD_MODE`):

* ``"split"``: a preprocess kernel (delta = rowsum(dO*O), lse in log2 units), one kernel over
  key blocks for dK/dV (it loops the whole GQA query-head group inside the program, so dK/dV
  need no atomics) and one over query blocks for dQ. Deterministic.
* ``"atomic"``: the key-block kernel also forms dQ = dS K and adds it into an fp32 buffer with
  relaxed atomics (FlashAttention-2 style): 5 instead of 7 matmuls, not bitwise deterministic.

The inner loop over key blocks is one ``@triton.jit`` helper, :func:`attn_fwd_inner`, that takes
the running ``(acc, m_i, l_i)`` state and a ``[lo, hi)`` key range (multiples of ``BLOCK_N``).
Variants (block-sparse key lists, an extra depth segment, quantised tiles, kept-KV index lists)
call it with their own ranges or base pointers; ``MASKED=True`` applies the key-bound and the
bottom-right causal mask, ``MASKED=False`` applies none (the fast path for full interior blocks).
The per-tile steps under a given mask are helpers too (:func:`attn_fwd_tile`,
:func:`attn_bwd_dq_tile`, :func:`attn_bwd_dkdv_tile`), for loops that walk their own key or
query tiles (context.moc's flattened chunk loop, token.membank's window).

This module imports only ``math``/``os``/``torch``/``triton`` so that it can be loaded by file
path (the GPU bench does this).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .._alloc import empty

__all__ = [
    "attention",
    "attention_fwd",
    "attention_bwd",
    "attn_fwd_inner",
    "BWD_MODE",
    "AUTOTUNE",
]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------

if _interpreting():
    # Triton 3.6's interpreter turns a runtime loop bound into a Python int with
    # int(ndarray of shape (1,)), which NumPy >= 2.4 rejects (triton-lang/triton#9171, fixed
    # upstream after 3.6). Under the interpreter, kernels run as plain Python, so this helper
    # can hand `range` a real int; compiled, it is the identity below.
    def _loop_bound(x):
        h = getattr(x, "handle", None)
        return int(h.data.reshape(-1)[0]) if h is not None else int(x)
else:

    @triton.jit
    def _loop_bound(x):
        return x


if _interpreting():
    # The interpreter stores bfloat16 as uint16 and its tl.dot multiplies the raw bit patterns
    # (Triton documents that the interpreter does not support bf16 arithmetic), so upcast the
    # operands there. Products of two bf16/fp16 values are exact in fp32 and the sum is fp32,
    # as on the tensor cores.
    @triton.jit
    def _dot(a, b):
        return tl.dot(a.to(tl.float32), b.to(tl.float32))

    @triton.jit
    def _dot_acc(a, b, acc):
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
else:

    # fp32 operands use 3xTF32 (near-fp32 accuracy on the tensor cores); plain TF32 left errors of
    # ~1e-3 that do not cancel where the exact gradient is 0 (e.g. dq with a single visible key).
    # bf16/fp16 operands take the plain tl.dot (the branch is resolved at compile time).
    @triton.jit
    def _dot(a, b):
        if a.dtype == tl.float32:
            return tl.dot(a, b, input_precision="tf32x3")
        return tl.dot(a, b)

    @triton.jit
    def _dot_acc(a, b, acc):
        if a.dtype == tl.float32:
            return tl.dot(a, b, acc, input_precision="tf32x3")
        return tl.dot(a, b, acc)



@triton.jit
def _load_tile(base, rows, stride_row, offs_d, n_rows, D: tl.constexpr, CHECK_ROWS: tl.constexpr,
               EVEN_D: tl.constexpr):
    """Load a [len(rows), BLOCK_D] tile; zero-fill rows >= n_rows (if CHECK_ROWS) and d >= D."""
    ptrs = base + rows[:, None] * stride_row + offs_d[None, :]
    if CHECK_ROWS:
        if EVEN_D:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < D), other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < D, other=0.0)
    return x


@triton.jit
def _store_tile(base, x, rows, stride_row, offs_d, n_rows, D: tl.constexpr, EVEN_D: tl.constexpr):
    ptrs = base + rows[:, None] * stride_row + offs_d[None, :]
    if EVEN_D:
        tl.store(ptrs, x, mask=rows[:, None] < n_rows)
    else:
        tl.store(ptrs, x, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < D))


@triton.jit
def attn_fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn,
                   offs_m, offs_d, lo, hi, qk_scale, Tk, diag,
                   D: tl.constexpr, BLOCK_N: tl.constexpr,
                   MASKED: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
                   NEG_SCALE: tl.constexpr):
    """One online-softmax sweep over key blocks ``[lo, hi)`` (``lo`` a multiple of BLOCK_N).

    State: ``acc`` [BLOCK_M, BLOCK_D] fp32 (unnormalised output), ``m_i`` [BLOCK_M] running max
    of the scores in log2 units (``-inf`` before any key), ``l_i`` [BLOCK_M] running sum.
    ``q`` is the [BLOCK_M, BLOCK_D] query tile, ``k_base``/``v_base`` point at key row 0 of
    this (batch, kv head); ``qk_scale = scale * log2(e)``. ``offs_m`` are the query rows (used
    by the causal mask: key ``j`` visible to row ``i`` iff ``j <= i + diag``). With
    ``MASKED=False`` every block must lie fully inside ``[0, Tk)`` and be fully visible.
    """
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(_loop_bound(lo), _loop_bound(hi), BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n0
        k = _load_tile(k_base, cols, stride_kn, offs_d, Tk, D, MASKED, EVEN_D)
        qk = _dot(q, tl.trans(k))
        if MASKED:
            valid = cols[None, :] < Tk
            if CAUSAL:
                valid = valid & (cols[None, :] <= offs_m[:, None] + diag)
            v = _load_tile(v_base, cols, stride_vn, offs_d, Tk, D, MASKED, EVEN_D)
            acc, m_i, l_i = attn_fwd_tile(acc, m_i, l_i, qk, v, valid, qk_scale)
        else:
            if NEG_SCALE:
                m_new = tl.maximum(m_i, tl.max(qk * qk_scale, 1))
            else:
                m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            v = _load_tile(v_base, cols, stride_vn, offs_d, Tk, D, MASKED, EVEN_D)
            acc = _dot_acc(p.to(v.dtype), v, acc)
            m_i = m_new
    return acc, m_i, l_i


@triton.jit
def attn_fwd_tile(acc, m_i, l_i, qk, v, valid, qk_scale):
    """One masked online-softmax step: the raw scores ``qk`` [BLOCK_M, BLOCK_N] of a key tile,
    its value tile ``v`` and which (row, key) pairs count (``valid``). The step of
    :func:`attn_fwd_inner`'s masked blocks and of loops that walk their own key tiles
    (context.moc's flattened chunk loop). Returns ``(acc, m_i, l_i)``."""
    s = tl.where(valid, qk * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # rows with no visible key so far keep m = -inf; subtract 0 instead (no NaN)
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = _dot_acc(p.to(v.dtype), v, acc)
    return acc, m_new, l_i


@triton.jit
def attn_fwd_finish_log2(acc, m_i, l_i):
    """The end of an online-softmax sweep with the log-sum-exp in log2 units: ``(o, lse2)``,
    o = acc / l (fp32), lse2 = m_i + log2 l; a row that saw no key (l = 0) gets o = 0 and
    lse2 = -inf. Split partials that a combine merges keep these units (kv_decode's split
    pass, moc's key-major partials)."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc * (1.0 / l_safe)[:, None]
    return o, tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe))


@triton.jit
def attn_fwd_finish(acc, m_i, l_i):
    """:func:`attn_fwd_finish_log2` with the natural log-sum-exp, ``lse2 * ln 2`` (-inf stays
    -inf). The forward kernels built on the core (dense, moc, membank, moda, temf) end with it."""
    o, lse2 = attn_fwd_finish_log2(acc, m_i, l_i)
    return o, lse2 * 0.6931471805599453


@triton.jit
def attn_fwd_tile_rows(acc, m_i, l_i, qk, v, keep, qk_scale, NEG_SCALE: tl.constexpr):
    """:func:`attn_fwd_tile` for a tile whose every key is visible to the rows with ``keep``
    [BLOCK_M] and to no other row (context.moc's dense-order tiles below the causal cut). The
    row mask is a per-row bias (0 or -inf) inside the exponent, so the step costs what the
    unmasked step does: no per-pair compare or select. For kept rows every value equals
    :func:`attn_fwd_tile`'s (max(qk) * scale = max(qk * scale) for scale > 0); a dropped row's p
    is exp2(-inf) = 0 and its m, l, acc are unchanged."""
    bias = tl.where(keep, 0.0, float("-inf"))
    if NEG_SCALE:
        m_new = tl.maximum(m_i, tl.max(qk * qk_scale, 1) + bias)
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale + bias)
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk * qk_scale - (m_sub - bias)[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = _dot_acc(p.to(v.dtype), v, acc)
    return acc, m_new, l_i


@triton.jit
def _fwd_kv_ranges(m0, Tk, diag, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Key ranges for query rows [m0, m0+BLOCK_M): unmasked [0, n_full), masked [n_full, n_end)."""
    n_tk_full = (Tk // BLOCK_N) * BLOCK_N
    if CAUSAL:
        n_end = tl.minimum(Tk, m0 + BLOCK_M + diag)
        n_full = (tl.maximum(m0 + diag + 1, 0) // BLOCK_N) * BLOCK_N
        n_full = tl.minimum(n_full, n_tk_full)
    else:
        n_end = Tk
        n_full = n_tk_full
    return n_full, n_end


@triton.jit
def _attn_fwd_kernel(Q, K, V, Out, LSE,
                     s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_ob, s_ot, s_oh,
                     Hq, Tq, Tk, GROUP, qk_scale, diag,
                     D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, NEG_SCALE: tl.constexpr):
    EVEN_D: tl.constexpr = D == BLOCK_D
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m  # heaviest query blocks first
    hk = h // GROUP
    q_base = Q + b * s_qb + h.to(tl.int64) * s_qh
    k_base = K + b * s_kb + hk.to(tl.int64) * s_kh
    v_base = V + b * s_vb + hk.to(tl.int64) * s_vh
    o_base = Out + b * s_ob + h.to(tl.int64) * s_oh

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(q_base, offs_m, s_qt, offs_d, Tq, D, True, EVEN_D)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    n_full, n_end = _fwd_kv_ranges(m0, Tk, diag, BLOCK_M, BLOCK_N, CAUSAL)
    acc, m_i, l_i = attn_fwd_inner(acc, m_i, l_i, q, k_base, v_base, s_kt, s_vt, offs_m, offs_d,
                                   0, n_full, qk_scale, Tk, diag, D, BLOCK_N,
                                   False, CAUSAL, EVEN_D, NEG_SCALE)
    acc, m_i, l_i = attn_fwd_inner(acc, m_i, l_i, q, k_base, v_base, s_kt, s_vt, offs_m, offs_d,
                                   n_full, n_end, qk_scale, Tk, diag, D, BLOCK_N,
                                   True, CAUSAL, EVEN_D, NEG_SCALE)

    o, lse = attn_fwd_finish(acc, m_i, l_i)
    _store_tile(o_base, o.to(Out.dtype.element_ty), offs_m, s_ot, offs_d, Tq, D, EVEN_D)
    lse_ptrs = LSE + (b * Hq + h) * Tq + offs_m
    tl.store(lse_ptrs, lse, mask=offs_m < Tq)


@triton.jit
def _attn_bwd_pre_kernel(Out, DO, LSE, DLSE, DELTA, LSE2,
                         s_ob, s_ot, s_oh, s_db, s_dt, s_dh,
                         Hq, Tq,
                         D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                         HAS_DLSE: tl.constexpr):
    """delta = rowsum(dO * O) (- dlse), lse2 = lse * log2(e) with -inf mapped to +inf."""
    EVEN_D: tl.constexpr = D == BLOCK_D
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(Out + b * s_ob + h.to(tl.int64) * s_oh, offs_m, s_ot, offs_d, Tq, D, True, EVEN_D)
    do = _load_tile(DO + b * s_db + h.to(tl.int64) * s_dh, offs_m, s_dt, offs_d, Tq, D, True, EVEN_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    row = (b * Hq + h) * Tq + offs_m
    rmask = offs_m < Tq
    if HAS_DLSE:
        delta -= tl.load(DLSE + row, mask=rmask, other=0.0)
    lse = tl.load(LSE + row, mask=rmask, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    tl.store(DELTA + row, delta, mask=rmask)
    tl.store(LSE2 + row, lse2, mask=rmask)


@triton.jit
def attn_bwd_dkdv_tile(dk, dv, k, v, q, do, lse2, delta, valid, qk_scale, MASKED: tl.constexpr):
    """One query tile's share of a key block's dK/dV (transposed FA2 form), the step every dK/dV
    loop shares (:func:`attn_bwd_dkdv_inner`, context.moc's query- and key-major kernels).

    ``k``, ``v`` [BLOCK_N, BLOCK_D] key tiles; ``q``, ``do`` [BLOCK_M, BLOCK_D] query tiles with
    their ``lse2`` (base 2) and ``delta`` rows; with MASKED, ``valid`` [BLOCK_N, BLOCK_M] says which
    (key, query) pairs count. P^T = exp2(K Q^T * qk_scale - lse2), dV += P^T dO,
    dS^T = P^T (V dO^T - delta), dK += dS^T Q (unscaled). Returns ``(dk, dv, dsT)``.
    """
    qkT = _dot(k, tl.trans(q))
    pT = tl.math.exp2(qkT * qk_scale - lse2[None, :])
    if MASKED:
        pT = tl.where(valid, pT, 0.0)
    dv = _dot_acc(pT.to(do.dtype), do, dv)
    dpT = _dot(v, tl.trans(do))
    dsT = (pT * (dpT - delta[None, :])).to(q.dtype)
    dk = _dot_acc(dsT, q, dk)
    return dk, dv, dsT


@triton.jit
def attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, dq_base, lse2_base, delta_base,
                        s_qt, s_qh, s_dot, s_doh, s_dqt, s_dqh, GROUP,
                        offs_n, offs_d, lo0, nblk0, lo1, nblk1, qk_scale, sm_scale, Tq, Tk, diag,
                        D: tl.constexpr, BLOCK_M: tl.constexpr,
                        MASKED: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
                        ATOMIC_DQ: tl.constexpr):
    """Accumulate dK/dV of one key block (transposed FA2 form) over query blocks x group heads.

    The query blocks are two segments, ``nblk0`` blocks from row ``lo0`` then ``nblk1`` from
    ``lo1`` (multiples of BLOCK_M); each block is visited for the GROUP query heads that share
    this kv head (head ``g`` at ``q_base + g * s_qh``, its lse2/delta rows at ``+ g * Tq``), so
    dK/dV sum the group without atomics. One flat loop keeps a single pipelined ``for``.
    ``k``, ``v`` are the [BLOCK_N, BLOCK_D] tiles (rows ``offs_n``, zero beyond Tk). With
    ATOMIC_DQ, dQ += scale * dS K is added into the fp32 buffer at ``dq_base``.
    """
    offs_m0 = tl.arange(0, BLOCK_M)
    n_it = (nblk0 + nblk1) * GROUP
    for it in range(0, _loop_bound(n_it)):
        blk = it // GROUP
        g = it - blk * GROUP
        start_m = tl.where(blk < nblk0, lo0 + blk * BLOCK_M, lo1 + (blk - nblk0) * BLOCK_M)
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + offs_m0
        q = _load_tile(q_base + g * s_qh, offs_m, s_qt, offs_d, Tq, D, MASKED, EVEN_D)
        do = _load_tile(do_base + g * s_doh, offs_m, s_dot, offs_d, Tq, D, MASKED, EVEN_D)
        valid = offs_n[:, None] < Tk  # read only when MASKED
        if MASKED:
            rmask = offs_m < Tq
            lse2 = tl.load(lse2_base + g * Tq + offs_m, mask=rmask, other=float("inf"))
            delta = tl.load(delta_base + g * Tq + offs_m, mask=rmask, other=0.0)
            if CAUSAL:
                valid = valid & (offs_n[:, None] <= offs_m[None, :] + diag)
        else:
            lse2 = tl.load(lse2_base + g * Tq + offs_m)
            delta = tl.load(delta_base + g * Tq + offs_m)
        dk, dv, dsT = attn_bwd_dkdv_tile(dk, dv, k, v, q, do, lse2, delta, valid, qk_scale, MASKED)
        if ATOMIC_DQ:
            dq = _dot(tl.trans(dsT), k) * sm_scale
            dq_ptrs = dq_base + g * s_dqh + offs_m[:, None] * s_dqt + offs_d[None, :]
            if MASKED:
                if EVEN_D:
                    amask = offs_m[:, None] < Tq
                else:
                    amask = (offs_m[:, None] < Tq) & (offs_d[None, :] < D)
                tl.atomic_add(dq_ptrs, dq, mask=amask, sem="relaxed")
            else:
                if EVEN_D:
                    tl.atomic_add(dq_ptrs, dq, sem="relaxed")
                else:
                    tl.atomic_add(dq_ptrs, dq, mask=offs_d[None, :] < D, sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, DQ, LSE2, DELTA,
                          s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,
                          s_db, s_dt, s_dh, s_dkb, s_dkt, s_dkh, s_dvb, s_dvt, s_dvh,
                          s_dqb, s_dqt, s_dqh,
                          Hq, Hk, Tq, Tk, GROUP, qk_scale, sm_scale, diag,
                          D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    EVEN_D: tl.constexpr = D == BLOCK_D
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(K + b * s_kb + hk.to(tl.int64) * s_kh, offs_n, s_kt, offs_d, Tk, D, True, EVEN_D)
    v = _load_tile(V + b * s_vb + hk.to(tl.int64) * s_vh, offs_n, s_vt, offs_d, Tk, D, True, EVEN_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # query-block ranges: masked [m_lo, m_a) (causal diagonal), unmasked [m_a, m_b),
    # masked [m_b, m_end) (ragged tail of Tq)
    m_end = tl.cdiv(Tq, BLOCK_M) * BLOCK_M
    if CAUSAL:
        m_lo = (tl.maximum(n0 - diag, 0) // BLOCK_M) * BLOCK_M
        m_lo = tl.minimum(m_lo, m_end)
        m_a = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - diag, 0), BLOCK_M) * BLOCK_M
        m_a = tl.minimum(tl.maximum(m_a, m_lo), m_end)
    else:
        m_lo = m_end * 0
        m_a = m_end * 0
    m_b = tl.maximum(m_a, (Tq // BLOCK_M) * BLOCK_M)
    # ragged last key block: everything goes through the masked path
    tail = n0 + BLOCK_N > Tk
    m_a = tl.where(tail, m_end, m_a)
    m_b = tl.where(tail, m_end, m_b)

    h0 = (hk * GROUP).to(tl.int64)
    q_base = Q + b * s_qb + h0 * s_qh
    do_base = DO + b * s_db + h0 * s_dh
    dq_base = DQ + b * s_dqb + h0 * s_dqh
    lse2_base = LSE2 + (b * Hq + h0) * Tq
    delta_base = DELTA + (b * Hq + h0) * Tq
    n_diag = (m_a - m_lo) // BLOCK_M
    n_tail = (m_end - m_b) // BLOCK_M
    n_mid = (m_b - m_a) // BLOCK_M
    dk, dv = attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, dq_base, lse2_base, delta_base,
                                 s_qt, s_qh, s_dt, s_dh, s_dqt, s_dqh, GROUP, offs_n, offs_d,
                                 m_a, n_mid, m_b, n_mid * 0, qk_scale, sm_scale, Tq, Tk, diag,
                                 D, BLOCK_M, False, CAUSAL, EVEN_D, ATOMIC_DQ)
    dk, dv = attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, dq_base, lse2_base, delta_base,
                                 s_qt, s_qh, s_dt, s_dh, s_dqt, s_dqh, GROUP, offs_n, offs_d,
                                 m_lo, n_diag, m_b, n_tail, qk_scale, sm_scale, Tq, Tk, diag,
                                 D, BLOCK_M, True, CAUSAL, EVEN_D, ATOMIC_DQ)

    dk = dk * sm_scale
    _store_tile(DK + b * s_dkb + hk.to(tl.int64) * s_dkh, dk.to(DK.dtype.element_ty), offs_n, s_dkt,
                offs_d, Tk, D, EVEN_D)
    _store_tile(DV + b * s_dvb + hk.to(tl.int64) * s_dvh, dv.to(DV.dtype.element_ty), offs_n, s_dvt,
                offs_d, Tk, D, EVEN_D)


@triton.jit
def attn_bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, s_kt, s_vt, offs_m, offs_d, lo, hi,
                      qk_scale, Tk, diag, D: tl.constexpr, BLOCK_N: tl.constexpr,
                      MASKED: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr):
    """Accumulate dQ (unscaled) of one query block over key blocks [lo, hi)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(_loop_bound(lo), _loop_bound(hi), BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n0
        k = _load_tile(k_base, cols, s_kt, offs_d, Tk, D, MASKED, EVEN_D)
        v = _load_tile(v_base, cols, s_vt, offs_d, Tk, D, MASKED, EVEN_D)
        valid = cols[None, :] < Tk
        if CAUSAL:
            valid = valid & (cols[None, :] <= offs_m[:, None] + diag)
        dq = attn_bwd_dq_tile(dq, q, do, lse2, delta, k, v, valid, qk_scale, MASKED)
    return dq


@triton.jit
def attn_bwd_dq_tile(dq, q, do, lse2, delta, k, v, valid, qk_scale, MASKED: tl.constexpr):
    """One key tile's share of a query block's dQ (unscaled): P = exp2(Q K^T * qk_scale - lse2)
    (zero where not ``valid``, with MASKED), dS = P (dO V^T - delta), dQ += dS K. The step of
    :func:`attn_bwd_dq_inner` and of context.moc's flattened chunk loop."""
    qk = _dot(q, tl.trans(k))
    p = tl.math.exp2(qk * qk_scale - lse2[:, None])
    if MASKED:
        p = tl.where(valid, p, 0.0)
    dp = _dot(do, tl.trans(v))
    ds = (p * (dp - delta[:, None])).to(k.dtype)
    return _dot_acc(ds, k, dq)


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, DQ, LSE2, DELTA,
                        s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,
                        s_db, s_dt, s_dh, s_dqb, s_dqt, s_dqh,
                        Hq, Tq, Tk, GROUP, qk_scale, sm_scale, diag,
                        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    EVEN_D: tl.constexpr = D == BLOCK_D
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    hk = h // GROUP
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + b * s_qb + h.to(tl.int64) * s_qh, offs_m, s_qt, offs_d, Tq, D, True, EVEN_D)
    do = _load_tile(DO + b * s_db + h.to(tl.int64) * s_dh, offs_m, s_dt, offs_d, Tq, D, True, EVEN_D)
    row = (b * Hq + h) * Tq + offs_m
    rmask = offs_m < Tq
    lse2 = tl.load(LSE2 + row, mask=rmask, other=float("inf"))
    delta = tl.load(DELTA + row, mask=rmask, other=0.0)
    k_base = K + b * s_kb + hk.to(tl.int64) * s_kh
    v_base = V + b * s_vb + hk.to(tl.int64) * s_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_full, n_end = _fwd_kv_ranges(m0, Tk, diag, BLOCK_M, BLOCK_N, CAUSAL)
    dq = attn_bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, s_kt, s_vt, offs_m, offs_d,
                           0, n_full, qk_scale, Tk, diag, D, BLOCK_N, False, CAUSAL, EVEN_D)
    dq = attn_bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, s_kt, s_vt, offs_m, offs_d,
                           n_full, n_end, qk_scale, Tk, diag, D, BLOCK_N, True, CAUSAL, EVEN_D)
    dq = dq * sm_scale
    _store_tile(DQ + b * s_dqb + h.to(tl.int64) * s_dqh, dq.to(DQ.dtype.element_ty), offs_m, s_dqt,
                offs_d, Tq, D, EVEN_D)


# ---------------------------------------------------------------------------------------------
# Configs and the small tuner
# ---------------------------------------------------------------------------------------------


class Cfg(NamedTuple):
    """(rows of the outer tile, rows of the inner step, num_warps, num_stages).

    fwd / dq: (BLOCK_M query rows, BLOCK_N key step); dkdv: (BLOCK_N key rows, BLOCK_M query step).
    """

    outer: int
    inner: int
    warps: int
    stages: int


#: Autotune on CUDA (first call per key benchmarks the short candidate list). When False, or
#: under ``BLOCKZOO_ATTN_AUTOTUNE=0``, the first candidate is used (for bf16/fp16 D=128 the best
#: measured on an H100, within noise; the other rows are compile-checked for sm_90 only).
AUTOTUNE = os.environ.get("BLOCKZOO_ATTN_AUTOTUNE", "1") != "0"
#: Backward mode: "split" (deterministic, no atomics) or "atomic" (fp32 atomic dQ).
BWD_MODE = os.environ.get("BLOCKZOO_ATTN_BWD", "split")

#: Configs used under TRITON_INTERPRET=1 (tests may override them to exercise other tilings).
INTERP_CFGS = {"fwd": Cfg(32, 32, 4, 1), "dkdv": Cfg(32, 16, 4, 1), "dq": Cfg(32, 16, 4, 1)}

_TUNED: dict = {}
#: (key, cfg, ms) for every candidate benchmarked by the tuner (read by the bench script).
TUNE_LOG: list = []


# Candidate lists per (kind, BLOCK_D bucket, 16-bit or fp32), best-known first. Every entry was
# compiled for sm_90 and checked for register spills (see docs/notes/triton-attention.md).
_CANDS = {
    ("fwd", 64, 2): [Cfg(128, 64, 4, 3), Cfg(128, 128, 8, 3), Cfg(64, 64, 4, 3), Cfg(128, 64, 4, 4)],
    ("fwd", 128, 2): [Cfg(128, 64, 8, 3), Cfg(128, 128, 8, 3), Cfg(128, 64, 8, 4)],
    ("fwd", 256, 2): [Cfg(64, 64, 4, 2), Cfg(64, 32, 4, 3), Cfg(128, 32, 8, 2)],
    ("dkdv", 64, 2): [Cfg(128, 64, 8, 3), Cfg(64, 64, 4, 3), Cfg(128, 32, 4, 3)],
    ("dkdv", 128, 2): [Cfg(128, 64, 8, 3), Cfg(128, 64, 8, 4), Cfg(128, 64, 8, 2), Cfg(128, 32, 8, 3)],
    ("dkdv", 256, 2): [Cfg(32, 32, 8, 2), Cfg(64, 32, 8, 2), Cfg(32, 32, 4, 2)],
    ("dq", 64, 2): [Cfg(128, 64, 8, 3), Cfg(64, 64, 4, 3), Cfg(128, 32, 4, 3)],
    ("dq", 128, 2): [Cfg(128, 64, 8, 3), Cfg(128, 64, 8, 4), Cfg(128, 128, 8, 2), Cfg(128, 32, 8, 4)],
    ("dq", 256, 2): [Cfg(64, 32, 8, 2), Cfg(32, 32, 4, 2)],
    # fp32 (TF32 dots): smaller tiles, fewer stages
    ("fwd", 64, 4): [Cfg(64, 64, 4, 2), Cfg(64, 32, 4, 3)],
    ("fwd", 128, 4): [Cfg(64, 32, 4, 2), Cfg(64, 64, 8, 2), Cfg(32, 32, 4, 2)],
    ("fwd", 256, 4): [Cfg(32, 32, 4, 1), Cfg(16, 16, 4, 1)],
    ("dkdv", 64, 4): [Cfg(64, 64, 4, 2), Cfg(64, 32, 4, 3), Cfg(32, 32, 4, 2)],
    ("dkdv", 128, 4): [Cfg(32, 32, 4, 2), Cfg(64, 32, 4, 2)],
    ("dkdv", 256, 4): [Cfg(32, 32, 4, 1), Cfg(16, 16, 4, 1)],
    ("dq", 64, 4): [Cfg(64, 64, 4, 2), Cfg(64, 32, 4, 3), Cfg(32, 32, 4, 2)],
    ("dq", 128, 4): [Cfg(32, 32, 4, 2), Cfg(64, 32, 4, 2)],
    ("dq", 256, 4): [Cfg(32, 32, 4, 1), Cfg(16, 16, 4, 1)],
}


def _candidates(kind: str, block_d: int, esize: int) -> list[Cfg]:
    """Short candidate list for (kind, BLOCK_D, element size), best-known first."""
    bucket = 64 if block_d <= 64 else (128 if block_d <= 128 else 256)
    return list(_CANDS[(kind, bucket, 2 if esize <= 2 else 4)])


def _env_cfg(kind: str) -> Cfg | None:
    s = os.environ.get(f"BLOCKZOO_ATTN_{kind.upper()}_CFG")
    if not s:
        return None
    return Cfg(*[int(x) for x in s.split(",")])


def _run_tuned(kind: str, key: tuple, cands: list[Cfg], launch: Callable[[Cfg], None]) -> Cfg:
    """Launch with the tuned config for ``key``; benchmark ``cands`` on first use (CUDA only).

    ``launch(cfg)`` must be idempotent (it re-initialises any accumulation buffer itself).
    """
    if _interpreting():
        cfg = INTERP_CFGS[kind]
        launch(cfg)
        return cfg
    forced = _env_cfg(kind)
    if forced is not None:
        launch(forced)
        return forced
    cfg = _TUNED.get(key)
    if cfg is not None:
        launch(cfg)
        return cfg
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    if not AUTOTUNE or capturing or len(cands) == 1:
        err = None
        for c in cands:  # first candidate that compiles
            try:
                launch(c)
            except Exception as e:  # OutOfResources and friends
                err = e
                continue
            _TUNED[key] = c
            return c
        raise err  # type: ignore[misc]
    from triton.testing import do_bench

    best, best_ms, err = None, float("inf"), None
    for c in cands:
        try:
            ms = do_bench(lambda c=c: launch(c), warmup=10, rep=40, return_mode="median")
        except Exception as e:
            err = e
            ms = float("inf")
        TUNE_LOG.append((key, c, ms))
        if ms < best_ms:
            best, best_ms = c, ms
    if best is None:
        raise err  # type: ignore[misc]
    _TUNED[key] = best
    launch(best)
    return best


# ---------------------------------------------------------------------------------------------
# Host wrappers
# ---------------------------------------------------------------------------------------------

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_I32 = 2**31 - 1

def _alloc(shape, dtype, device) -> torch.Tensor:
    """Outputs and scratch: NaN-filled inside ``kernels._alloc.poisoned()`` (tests)."""
    return empty(shape, dtype=dtype, device=device)


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if (x.stride(-1) == 1 or x.shape[-1] == 1) else x.contiguous()


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("attention expects q [B, Tq, Hq, D] and k, v [B, Tk, Hk, D]")
    B, Tq, Hq, D = q.shape
    Bk, Tk, Hk, Dk = k.shape
    if Bk != B or Dk != D or tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if Hk == 0 or Hq % Hk != 0:
        raise ValueError(f"GQA needs Hq % Hk == 0, got Hq={Hq}, Hk={Hk}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        raise TypeError(f"q, k, v must share one dtype of {_DTYPES}; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on one device")
    if q.device.type != "cuda" and not _interpreting():
        raise RuntimeError("Triton attention needs CUDA tensors (or TRITON_INTERPRET=1 for CPU)")
    if D < 1 or D > 256:
        raise ValueError(f"head dim {D} not supported (1..256)")
    if B > 65535 or Hq > 65535:
        raise ValueError("B and Hq must be <= 65535 (grid limits)")
    return B, Tq, Hq, D, Tk, Hk


def _check_i32(*ts: torch.Tensor):
    for t in ts:
        if t.shape[1] * max(t.stride(1), 1) + t.shape[2] * max(t.stride(2), 1) > _I32:
            raise ValueError("per-batch tensor extent exceeds int32 indexing")


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _fwd_impl(q, k, v, causal: bool, scale: float):
    B, Tq, Hq, D, Tk, Hk = _check(q, k, v)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    o = _alloc((B, Tq, Hq, D), q.dtype, q.device)
    lse = _alloc((B, Hq, Tq), torch.float32, q.device)
    if o.numel() == 0:
        lse.fill_(float("-inf"))
        return o, lse
    if Tk == 0:
        o.zero_()
        lse.fill_(float("-inf"))
        return o, lse
    _check_i32(q, k, v, o)
    BD = _block_d(D)
    qk_scale = float(scale) * LOG2E
    diag = Tk - Tq

    def launch(c: Cfg):
        grid = (triton.cdiv(Tq, c.outer), Hq, B)
        _attn_fwd_kernel[grid](
            q, k, v, o, lse,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
            Hq, Tq, Tk, Hq // Hk, qk_scale, diag,
            D=D, BLOCK_D=BD, BLOCK_M=c.outer, BLOCK_N=c.inner, CAUSAL=bool(causal),
            NEG_SCALE=bool(scale < 0), num_warps=c.warps, num_stages=c.stages)

    key = ("fwd", BD, bool(causal), q.dtype)
    _run_tuned("fwd", key, _candidates("fwd", BD, q.element_size()), launch)
    return o, lse


def _bwd_impl(do, q, k, v, o, lse, causal: bool, scale: float, dlse=None, mode: str | None = None):
    B, Tq, Hq, D, Tk, Hk = _check(q, k, v)
    mode = mode or BWD_MODE
    if mode not in ("split", "atomic"):
        raise ValueError(f"unknown backward mode {mode!r}")
    q, k, v, o, do = (_unit_last(t) for t in (q, k, v, o, do))
    if do.dtype != q.dtype:
        do = do.to(q.dtype)
    if o.dtype != q.dtype:
        o = o.to(q.dtype)
    dq = _alloc((B, Tq, Hq, D), q.dtype, q.device)
    dk = _alloc((B, Tk, Hk, D), q.dtype, q.device)
    dv = _alloc((B, Tk, Hk, D), q.dtype, q.device)
    if dq.numel() == 0 or dk.numel() == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
        return dq, dk, dv
    _check_i32(q, k, v, o, do)
    lse = lse.contiguous().float()
    BD = _block_d(D)
    G = Hq // Hk
    qk_scale = float(scale) * LOG2E
    diag = Tk - Tq
    esize = q.element_size()

    delta = _alloc((B, Hq, Tq), torch.float32, q.device)
    lse2 = _alloc((B, Hq, Tq), torch.float32, q.device)
    has_dlse = dlse is not None
    dlse_t = dlse.contiguous().float() if has_dlse else delta
    PRE_M = 64 if BD <= 128 else 32
    _attn_bwd_pre_kernel[(triton.cdiv(Tq, PRE_M), Hq, B)](
        o, do, lse, dlse_t, delta, lse2,
        o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
        Hq, Tq, D=D, BLOCK_D=BD, BLOCK_M=PRE_M, HAS_DLSE=has_dlse, num_warps=4)

    atomic = mode == "atomic"
    if atomic:
        dq_acc = torch.empty((B, Tq, Hq, D), dtype=torch.float32, device=q.device)  # zeroed per launch
    else:
        dq_acc = dq

    def launch_dkdv(c: Cfg):
        if atomic:
            dq_acc.zero_()
        grid = (triton.cdiv(Tk, c.outer), Hk, B)
        _attn_bwd_dkdv_kernel[grid](
            q, k, v, do, dk, dv, dq_acc, lse2, delta,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
            dq_acc.stride(0), dq_acc.stride(1), dq_acc.stride(2),
            Hq, Hk, Tq, Tk, G, qk_scale, float(scale), diag,
            D=D, BLOCK_D=BD, BLOCK_M=c.inner, BLOCK_N=c.outer, CAUSAL=bool(causal),
            ATOMIC_DQ=atomic, num_warps=c.warps, num_stages=c.stages)

    key = ("dkdv", BD, bool(causal), q.dtype, atomic)
    _run_tuned("dkdv", key, _candidates("dkdv", BD, esize), launch_dkdv)

    if atomic:
        dq.copy_(dq_acc)
        return dq, dk, dv

    def launch_dq(c: Cfg):
        grid = (triton.cdiv(Tq, c.outer), Hq, B)
        _attn_bwd_dq_kernel[grid](
            q, k, v, do, dq, lse2, delta,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2),
            Hq, Tq, Tk, G, qk_scale, float(scale), diag,
            D=D, BLOCK_D=BD, BLOCK_M=c.outer, BLOCK_N=c.inner, CAUSAL=bool(causal),
            num_warps=c.warps, num_stages=c.stages)

    key = ("dq", BD, bool(causal), q.dtype)
    _run_tuned("dq", key, _candidates("dq", BD, esize), launch_dq)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# torch.library custom ops
# ---------------------------------------------------------------------------------------------


def _fake_fwd(q, k, v, causal, scale):
    B, Tq, Hq, D = q.shape
    return (q.new_empty((B, Tq, Hq, D)), q.new_empty((B, Hq, Tq), dtype=torch.float32))


def _fake_bwd(do, q, k, v, o, lse, causal, scale, dlse=None):
    return (q.new_empty(tuple(q.shape)), k.new_empty(tuple(k.shape)), k.new_empty(tuple(k.shape)))


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.set_materialize_grads(False)
    ctx.causal = causal
    ctx.scale = scale


def _backward(ctx, do, dlse):
    q, k, v, o, lse = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(o)
    dq, dk, dv = _bwd_op(do, q, k, v, o, lse, ctx.causal, ctx.scale, dlse)
    return dq, dk, dv, None, None


def _define_ops():
    ns = getattr(torch.ops, "blockzoo", None)
    if ns is not None and hasattr(ns, "attention_fwd") and hasattr(ns, "attention_bwd"):
        # already registered (module loaded twice, e.g. by path and as a package)
        return ns.attention_fwd, ns.attention_bwd

    @torch.library.custom_op("blockzoo::attention_fwd", mutates_args=())
    def fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
               scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        return _fwd_impl(q, k, v, causal, scale)

    @torch.library.custom_op("blockzoo::attention_bwd", mutates_args=())
    def bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
               lse: torch.Tensor, causal: bool, scale: float,
               dlse: Optional[torch.Tensor] = None,  # noqa: UP045 (schema inference)
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _bwd_impl(do, q, k, v, o, lse, causal, scale, dlse)

    fwd_op.register_fake(_fake_fwd)
    bwd_op.register_fake(_fake_bwd)
    fwd_op.register_autograd(_backward, setup_context=_setup_context)
    return fwd_op, bwd_op


_fwd_op, _bwd_op = _define_ops()


def _resolve_scale(q: torch.Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              scale: float | None = None) -> torch.Tensor:
    """Softmax attention, autograd-enabled (custom op ``blockzoo::attention_fwd``).

    q [B, Tq, Hq, D], k/v [B, Tk, Hk, D] -> o [B, Tq, Hq, D] (contiguous, q's dtype).
    """
    o, _ = _fwd_op(q, k, v, bool(causal), _resolve_scale(q, scale))
    return o


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                  scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward only: returns ``(o, lse)``, lse fp32 [B, Hq, Tq] in natural log (-inf: no key)."""
    return _fwd_op(q, k, v, bool(causal), _resolve_scale(q, scale))


def attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  o: torch.Tensor, lse: torch.Tensor, causal: bool = True,
                  scale: float | None = None,
                  dlse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: ``(dq, dk, dv)`` in the input dtype; dk/dv sum over each GQA group.

    ``dlse`` (optional, fp32 [B, Hq, Tq]) is the gradient flowing into ``lse``.
    """
    return _bwd_op(do, q, k, v, o, lse, bool(causal), _resolve_scale(q, scale), dlse)
