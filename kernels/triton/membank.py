"""``token.membank`` in Triton: attention over [bank slots | causal sliding window], forward and
backward, on the shared online-softmax core (:mod:`.attention`).

Layout (as ``plugins/token/membank/reference.py``): q [B, Tq, Hq, D], k/v [B, Tk, Hk, D]
(Tq <= Tk, query row i at absolute position ``p = i + Tk - Tq``), bank_k/bank_v [B, N*M, Hk, D]
chunk-major with N = ceil(Tk / W): rows ``c*M .. c*M+M-1`` are the bank of chunk c. Query row i
attends under ONE softmax to the M bank rows of chunk ``p // W`` and to the keys ``p-W < j <= p``.

Forward (one program per (query block, query head, batch), one ``(acc, m_i, l_i)`` state):

* the bank segment: for each chunk c the query block touches (usually one), the core
  :func:`.attention.attn_fwd_inner` over the M bank rows of chunk c, MASKED with a row selector:
  the core's causal test ``col <= offs_m + diag`` is given ``diag = 0`` and ``offs_m = M`` for the
  rows of chunk c and ``-1`` for the others, so a row sees exactly its own chunk's bank;
* the window segment: interior key blocks that every row of the block sees fully run through the
  core unmasked; the boundary blocks (the causal diagonal and the window's lower edge) through
  :func:`window_fwd_masked`, which applies both bounds.

Backward (same joint lse / delta as dense attention: ``dS = P (dP - delta)``):

* the core's preprocess kernel (delta, lse in log2 units);
* window dK/dV: one program per key block and kv head, looping the GQA group; interior query
  blocks through the core's :func:`.attention.attn_bwd_dkdv_inner` unmasked, boundary ones through
  :func:`window_dkdv_masked`;
* bank dK/dV: one program per (chunk, bank-row block, kv head, batch): the query rows of the chunk
  are a contiguous range, so the core's ``attn_bwd_dkdv_inner`` runs MASKED, non-causal, once per
  head of the group (GROUP=1 per call, base pointers moved to the chunk's first row). Each bank
  row belongs to one chunk: written once, no atomics, deterministic;
* dQ: the core's ``attn_bwd_dq_inner`` over each chunk's bank (row selector as in the forward) and
  the interior window blocks, :func:`window_dq_masked` for the boundary blocks.

Custom ops: ``blockzoo::membank_fwd(q, k, v, bank_k, bank_v, window, scale) -> (o, lse)`` and
``blockzoo::membank_bwd(do, q, k, v, bank_k, bank_v, o, lse, window, scale) -> 5 grads``, with
``register_fake`` and ``register_autograd``. CUDA, and CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._customop import bwd_outputs_like_q, bwd_row_stats, define_attention_ops, resolve_scale
from .attention import (
    LOG2E,
    Cfg,
    _alloc,
    _block_d,
    _candidates,
    _check,
    _check_i32,
    _dot,
    _interpreting,
    _load_tile,
    _loop_bound,
    _run_tuned,
    _store_tile,
    _unit_last,
    attn_bwd_dkdv_inner,
    attn_bwd_dkdv_tile,
    attn_bwd_dq_inner,
    attn_bwd_dq_tile,
    attn_fwd_finish,
    attn_fwd_inner,
    attn_fwd_tile,
)

__all__ = ["membank_attention", "membank_fwd", "membank_bwd"]


# ---------------------------------------------------------------------------------------------
# masked window helpers (both bounds: p - W < j <= p)
# ---------------------------------------------------------------------------------------------

@triton.jit
def window_fwd_masked(acc, m_i, l_i, q, k_base, v_base, s_kt, s_vt, pos, offs_d, lo, hi, qk_scale, Tk, W,
                      D: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr):
    """Online-softmax sweep over key blocks [lo, hi) with the key bound and both window bounds;
    ``pos`` [BLOCK_M] are the rows' absolute positions."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(_loop_bound(lo), _loop_bound(hi), BLOCK_N):
        cols = start_n + offs_n0
        k = _load_tile(k_base, cols, s_kt, offs_d, Tk, D, True, EVEN_D)
        qk = _dot(q, tl.trans(k))
        valid = (cols[None, :] < Tk) & (cols[None, :] <= pos[:, None]) & (cols[None, :] > pos[:, None] - W)
        v = _load_tile(v_base, cols, s_vt, offs_d, Tk, D, True, EVEN_D)
        acc, m_i, l_i = attn_fwd_tile(acc, m_i, l_i, qk, v, valid, qk_scale)
    return acc, m_i, l_i


@triton.jit
def window_dq_masked(dq, q, do, lse2, delta, k_base, v_base, s_kt, s_vt, pos, offs_d, lo, hi, qk_scale, Tk, W,
                     D: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr):
    """dQ (unscaled) over key blocks [lo, hi) with both window bounds."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(_loop_bound(lo), _loop_bound(hi), BLOCK_N):
        cols = start_n + offs_n0
        k = _load_tile(k_base, cols, s_kt, offs_d, Tk, D, True, EVEN_D)
        v = _load_tile(v_base, cols, s_vt, offs_d, Tk, D, True, EVEN_D)
        valid = (cols[None, :] < Tk) & (cols[None, :] <= pos[:, None]) & (cols[None, :] > pos[:, None] - W)
        dq = attn_bwd_dq_tile(dq, q, do, lse2, delta, k, v, valid, qk_scale, True)
    return dq


@triton.jit
def window_dkdv_masked(dk, dv, k, v, q_base, do_base, lse2_base, delta_base, s_qt, s_qh, s_dot, s_doh, GROUP,
                       offs_n, offs_d, lo, hi, qk_scale, Tq, Tk, diag, W,
                       D: tl.constexpr, BLOCK_M: tl.constexpr, EVEN_D: tl.constexpr):
    """dK/dV of one key block (rows ``offs_n``) over query blocks [lo, hi) x the GROUP heads, with
    the key bound, the query bound and both window bounds (query row i at position i + diag)."""
    offs_m0 = tl.arange(0, BLOCK_M)
    for start_m in range(_loop_bound(lo), _loop_bound(hi), BLOCK_M):
        offs_m = start_m + offs_m0
        rmask = offs_m < Tq
        pos = offs_m + diag
        valid = (offs_n[:, None] < Tk) & rmask[None, :] & (offs_n[:, None] <= pos[None, :]) & \
            (offs_n[:, None] > pos[None, :] - W)
        for g in range(0, _loop_bound(GROUP)):
            q = _load_tile(q_base + g * s_qh, offs_m, s_qt, offs_d, Tq, D, True, EVEN_D)
            lse2 = tl.load(lse2_base + g * Tq + offs_m, mask=rmask, other=float("inf"))
            do = _load_tile(do_base + g * s_doh, offs_m, s_dot, offs_d, Tq, D, True, EVEN_D)
            delta = tl.load(delta_base + g * Tq + offs_m, mask=rmask, other=0.0)
            dk, dv, _ = attn_bwd_dkdv_tile(dk, dv, k, v, q, do, lse2, delta, valid, qk_scale, True)
    return dk, dv


@triton.jit
def _window_key_ranges(m0, Tk, diag, W, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key ranges of query rows [m0, m0+BLOCK_M): masked [a, f_lo), unmasked [f_lo, f_hi),
    masked [f_hi, end). Unmasked blocks are inside [0, Tk) and fully visible to every row."""
    p0 = m0 + diag                                              # first row's position
    p1 = p0 + BLOCK_M - 1                                       # last row's position (tile bound)
    a = (tl.maximum(p0 - W + 1, 0) // BLOCK_N) * BLOCK_N
    end = tl.minimum(Tk, p1 + 1)
    f_lo = tl.cdiv(tl.maximum(p1 - W + 1, 0), BLOCK_N) * BLOCK_N
    f_hi = tl.minimum(((p0 + 1) // BLOCK_N) * BLOCK_N, (Tk // BLOCK_N) * BLOCK_N)
    has = f_hi > f_lo
    f_lo = tl.where(has, f_lo, end)
    f_hi = tl.where(has, f_hi, end)
    return a, f_lo, f_hi, end


@triton.jit
def _chunk_rows(pos, c, M):
    """Row selector for the core's causal test with diag = 0: M (sees all M bank rows) for the
    rows of chunk ``c``, -1 (sees none) for the others."""
    return tl.where(pos == c, M, -1)


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _membank_fwd_kernel(Q, K, V, BK, BV, Out, LSE,
                        s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,
                        s_bkb, s_bkt, s_bkh, s_bvb, s_bvt, s_bvh, s_ob, s_ot, s_oh,
                        Hq, Tq, Tk, M, GROUP, qk_scale, diag, W,
                        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, NEG_SCALE: tl.constexpr):
    EVEN_D: tl.constexpr = D == BLOCK_D
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    hk = h // GROUP
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    pos = offs_m + diag
    q = _load_tile(Q + b * s_qb + h.to(tl.int64) * s_qh, offs_m, s_qt, offs_d, Tq, D, True, EVEN_D)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # bank segment: the core over each touched chunk's M rows, rows of other chunks masked out
    chunk = pos // W
    c_lo = (m0 + diag) // W
    c_hi = (tl.minimum(m0 + BLOCK_M, Tq) - 1 + diag) // W
    bk_base = BK + b * s_bkb + hk.to(tl.int64) * s_bkh
    bv_base = BV + b * s_bvb + hk.to(tl.int64) * s_bvh
    for c in range(_loop_bound(c_lo), _loop_bound(c_hi + 1)):
        sel = _chunk_rows(chunk, c, M)
        row0 = (c * M).to(tl.int64)
        acc, m_i, l_i = attn_fwd_inner(acc, m_i, l_i, q, bk_base + row0 * s_bkt, bv_base + row0 * s_bvt,
                                       s_bkt, s_bvt, sel, offs_d, 0, M, qk_scale, M, 0, D, BLOCK_N,
                                       True, True, EVEN_D, NEG_SCALE)

    # window segment
    k_base = K + b * s_kb + hk.to(tl.int64) * s_kh
    v_base = V + b * s_vb + hk.to(tl.int64) * s_vh
    a, f_lo, f_hi, end = _window_key_ranges(m0, Tk, diag, W, BLOCK_M, BLOCK_N)
    acc, m_i, l_i = window_fwd_masked(acc, m_i, l_i, q, k_base, v_base, s_kt, s_vt, pos, offs_d, a, f_lo,
                                      qk_scale, Tk, W, D, BLOCK_N, EVEN_D)
    acc, m_i, l_i = attn_fwd_inner(acc, m_i, l_i, q, k_base, v_base, s_kt, s_vt, offs_m, offs_d,
                                   f_lo, f_hi, qk_scale, Tk, diag, D, BLOCK_N, False, True, EVEN_D, NEG_SCALE)
    acc, m_i, l_i = window_fwd_masked(acc, m_i, l_i, q, k_base, v_base, s_kt, s_vt, pos, offs_d, f_hi, end,
                                      qk_scale, Tk, W, D, BLOCK_N, EVEN_D)

    o, lse = attn_fwd_finish(acc, m_i, l_i)
    _store_tile(Out + b * s_ob + h.to(tl.int64) * s_oh, o.to(Out.dtype.element_ty), offs_m, s_ot, offs_d,
                Tq, D, EVEN_D)
    tl.store(LSE + (b * Hq + h) * Tq + offs_m, lse, mask=offs_m < Tq)


@triton.jit
def _membank_dkdv_kernel(Q, K, V, DO, DK, DV, LSE2, DELTA,
                         s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,
                         s_db, s_dt, s_dh, s_dkb, s_dkt, s_dkh, s_dvb, s_dvt, s_dvh,
                         Hq, Tq, Tk, GROUP, qk_scale, sm_scale, diag, W,
                         D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    """dK/dV of the window keys: one key block x one kv head (the GQA group looped inside)."""
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

    # query rows that see a key of this block: positions n0 .. n0+BLOCK_N-1+W-1
    r_lo = (tl.maximum(n0 - diag, 0) // BLOCK_M) * BLOCK_M
    r_end = tl.minimum(Tq, n0 + BLOCK_N - 1 + W - diag)
    # fully visible query blocks [s, s+BLOCK_M): s+diag >= n0+BLOCK_N-1 and s+BLOCK_M-1+diag <= n0+W-1
    f_lo = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - diag, 0), BLOCK_M) * BLOCK_M
    f_hi = tl.minimum((tl.maximum(n0 + W - diag, 0) // BLOCK_M) * BLOCK_M, (Tq // BLOCK_M) * BLOCK_M)
    has = (f_hi > f_lo) & (n0 + BLOCK_N <= Tk)
    f_lo = tl.where(has, f_lo, r_end)
    f_hi = tl.where(has, f_hi, r_end)

    h0 = (hk * GROUP).to(tl.int64)
    q_base = Q + b * s_qb + h0 * s_qh
    do_base = DO + b * s_db + h0 * s_dh
    lse2_base = LSE2 + (b * Hq + h0) * Tq
    delta_base = DELTA + (b * Hq + h0) * Tq
    dk, dv = window_dkdv_masked(dk, dv, k, v, q_base, do_base, lse2_base, delta_base, s_qt, s_qh, s_dt, s_dh,
                                GROUP, offs_n, offs_d, r_lo, f_lo, qk_scale, Tq, Tk, diag, W, D, BLOCK_M, EVEN_D)
    n_mid = (f_hi - f_lo) // BLOCK_M
    dk, dv = attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, q_base, lse2_base, delta_base,
                                 s_qt, s_qh, s_dt, s_dh, s_qt, s_qh, GROUP, offs_n, offs_d,
                                 f_lo, n_mid, f_hi, n_mid * 0, qk_scale, sm_scale, Tq, Tk, diag,
                                 D, BLOCK_M, False, True, EVEN_D, False)
    dk, dv = window_dkdv_masked(dk, dv, k, v, q_base, do_base, lse2_base, delta_base, s_qt, s_qh, s_dt, s_dh,
                                GROUP, offs_n, offs_d, f_hi, r_end, qk_scale, Tq, Tk, diag, W, D, BLOCK_M, EVEN_D)
    dk = dk * sm_scale
    _store_tile(DK + b * s_dkb + hk.to(tl.int64) * s_dkh, dk.to(DK.dtype.element_ty), offs_n, s_dkt,
                offs_d, Tk, D, EVEN_D)
    _store_tile(DV + b * s_dvb + hk.to(tl.int64) * s_dvh, dv.to(DV.dtype.element_ty), offs_n, s_dvt,
                offs_d, Tk, D, EVEN_D)


@triton.jit
def _membank_bank_dkdv_kernel(Q, BK, BV, DO, DBK, DBV, LSE2, DELTA,
                              s_qb, s_qt, s_qh, s_bkb, s_bkt, s_bkh, s_bvb, s_bvt, s_bvh,
                              s_db, s_dt, s_dh, s_gkb, s_gkt, s_gkh, s_gvb, s_gvt, s_gvh,
                              Hq, Tq, M, NMB, GROUP, qk_scale, sm_scale, diag, W,
                              D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr):
    """dK/dV of the bank rows [mb0, mb0+BLOCK_N) of chunk c: its query rows are one contiguous
    range, so the core's key-block inner runs masked, non-causal, one head of the group per call."""
    EVEN_D: tl.constexpr = D == BLOCK_D
    pid = tl.program_id(0)
    c = pid // NMB
    mb0 = (pid - c * NMB) * BLOCK_N
    hk = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row0 = (c * M + mb0).to(tl.int64)
    n_rows = tl.minimum(M - mb0, BLOCK_N)
    k = _load_tile(BK + b * s_bkb + hk.to(tl.int64) * s_bkh + row0 * s_bkt, offs_n, s_bkt, offs_d, n_rows, D,
                   True, EVEN_D)
    v = _load_tile(BV + b * s_bvb + hk.to(tl.int64) * s_bvh + row0 * s_bvt, offs_n, s_bvt, offs_d, n_rows, D,
                   True, EVEN_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    q0 = tl.maximum(c * W - diag, 0)                        # first query row of chunk c
    nq = tl.minimum(c * W + W - diag, Tq) - q0               # its rows (may be <= 0)
    nq = tl.maximum(nq, 0)
    nblk = tl.cdiv(nq, BLOCK_M)
    for g in range(0, _loop_bound(GROUP)):
        h = (hk * GROUP + g).to(tl.int64)
        q_base = Q + b * s_qb + h * s_qh + q0.to(tl.int64) * s_qt
        do_base = DO + b * s_db + h * s_dh + q0.to(tl.int64) * s_dt
        lse2_base = LSE2 + (b * Hq + h) * Tq + q0
        delta_base = DELTA + (b * Hq + h) * Tq + q0
        dk, dv = attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, q_base, lse2_base, delta_base,
                                     s_qt, s_qh, s_dt, s_dh, s_qt, s_qh, 1, offs_n, offs_d,
                                     0, nblk, 0, nblk * 0, qk_scale, sm_scale, nq, n_rows, 0,
                                     D, BLOCK_M, True, False, EVEN_D, False)
    dk = dk * sm_scale
    _store_tile(DBK + b * s_gkb + hk.to(tl.int64) * s_gkh + row0 * s_gkt, dk.to(DBK.dtype.element_ty), offs_n,
                s_gkt, offs_d, n_rows, D, EVEN_D)
    _store_tile(DBV + b * s_gvb + hk.to(tl.int64) * s_gvh + row0 * s_gvt, dv.to(DBV.dtype.element_ty), offs_n,
                s_gvt, offs_d, n_rows, D, EVEN_D)


@triton.jit
def _membank_dq_kernel(Q, K, V, BK, BV, DO, DQ, LSE2, DELTA,
                       s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,
                       s_bkb, s_bkt, s_bkh, s_bvb, s_bvt, s_bvh, s_db, s_dt, s_dh, s_dqb, s_dqt, s_dqh,
                       Hq, Tq, Tk, M, GROUP, qk_scale, sm_scale, diag, W,
                       D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    EVEN_D: tl.constexpr = D == BLOCK_D
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    hk = h // GROUP
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    pos = offs_m + diag
    q = _load_tile(Q + b * s_qb + h.to(tl.int64) * s_qh, offs_m, s_qt, offs_d, Tq, D, True, EVEN_D)
    do = _load_tile(DO + b * s_db + h.to(tl.int64) * s_dh, offs_m, s_dt, offs_d, Tq, D, True, EVEN_D)
    row = (b * Hq + h) * Tq + offs_m
    rmask = offs_m < Tq
    lse2 = tl.load(LSE2 + row, mask=rmask, other=float("inf"))
    delta = tl.load(DELTA + row, mask=rmask, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    chunk = pos // W
    c_lo = (m0 + diag) // W
    c_hi = (tl.minimum(m0 + BLOCK_M, Tq) - 1 + diag) // W
    bk_base = BK + b * s_bkb + hk.to(tl.int64) * s_bkh
    bv_base = BV + b * s_bvb + hk.to(tl.int64) * s_bvh
    for c in range(_loop_bound(c_lo), _loop_bound(c_hi + 1)):
        sel = _chunk_rows(chunk, c, M)
        row0 = (c * M).to(tl.int64)
        dq = attn_bwd_dq_inner(dq, q, do, lse2, delta, bk_base + row0 * s_bkt, bv_base + row0 * s_bvt, s_bkt, s_bvt,
                               sel, offs_d, 0, M, qk_scale, M, 0, D, BLOCK_N, True, True, EVEN_D)

    k_base = K + b * s_kb + hk.to(tl.int64) * s_kh
    v_base = V + b * s_vb + hk.to(tl.int64) * s_vh
    a, f_lo, f_hi, end = _window_key_ranges(m0, Tk, diag, W, BLOCK_M, BLOCK_N)
    dq = window_dq_masked(dq, q, do, lse2, delta, k_base, v_base, s_kt, s_vt, pos, offs_d, a, f_lo,
                          qk_scale, Tk, W, D, BLOCK_N, EVEN_D)
    dq = attn_bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, s_kt, s_vt, offs_m, offs_d,
                           f_lo, f_hi, qk_scale, Tk, diag, D, BLOCK_N, False, True, EVEN_D)
    dq = window_dq_masked(dq, q, do, lse2, delta, k_base, v_base, s_kt, s_vt, pos, offs_d, f_hi, end,
                          qk_scale, Tk, W, D, BLOCK_N, EVEN_D)
    dq = dq * sm_scale
    _store_tile(DQ + b * s_dqb + h.to(tl.int64) * s_dqh, dq.to(DQ.dtype.element_ty), offs_m, s_dqt,
                offs_d, Tq, D, EVEN_D)


# ---------------------------------------------------------------------------------------------
# host wrappers
# ---------------------------------------------------------------------------------------------

def _check_bank(q, k, bank_k, bank_v, window: int) -> int:
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    B, Tq, Hq, D = q.shape
    Tk = k.shape[1]
    if Tq > Tk:
        raise ValueError(f"token.membank needs Tq <= Tk; got Tq={Tq}, Tk={Tk}")
    if bank_k.dim() != 4 or tuple(bank_k.shape) != tuple(bank_v.shape):
        raise ValueError(f"bank_k / bank_v must be one shape [B, N*M, Hk, D]; got {tuple(bank_k.shape)}, "
                         f"{tuple(bank_v.shape)}")
    if bank_k.shape[0] != B or bank_k.shape[2] != k.shape[2] or bank_k.shape[3] != D:
        raise ValueError(f"bank_k {tuple(bank_k.shape)} must be [B={B}, N*M, Hk={k.shape[2]}, D={D}]")
    if bank_k.dtype != q.dtype or bank_v.dtype != q.dtype:
        raise TypeError(f"bank_k/bank_v dtype {bank_k.dtype}/{bank_v.dtype} must match q ({q.dtype})")
    if bank_k.device != q.device or bank_v.device != q.device:
        raise ValueError("bank_k / bank_v must be on q's device")
    n = -(-Tk // window) if Tk else 0
    rows = bank_k.shape[1]
    if n == 0:
        if rows:
            raise ValueError(f"bank_k has {rows} rows but there are no keys")
        return 0
    if rows % n:
        raise ValueError(f"bank_k has {rows} rows, not a multiple of N = ceil(Tk/window) = {n}")
    return rows // n


def _cfg(kind: str, BD: int, esize: int) -> list[Cfg]:
    return _candidates(kind, BD, esize)


def _fwd_impl(q, k, v, bank_k, bank_v, window: int, scale: float):
    B, Tq, Hq, D, Tk, Hk = _check(q, k, v)
    M = _check_bank(q, k, bank_k, bank_v, window)
    q, k, v, bank_k, bank_v = (_unit_last(t) for t in (q, k, v, bank_k, bank_v))
    o = _alloc((B, Tq, Hq, D), q.dtype, q.device)
    lse = _alloc((B, Hq, Tq), torch.float32, q.device)
    if o.numel() == 0:
        o.zero_()
        lse.fill_(float("-inf"))
        return o, lse
    _check_i32(q, k, v, o, bank_k, bank_v)
    BD = _block_d(D)

    def launch(c: Cfg):
        grid = (triton.cdiv(Tq, c.outer), Hq, B)
        _membank_fwd_kernel[grid](
            q, k, v, bank_k, bank_v, o, lse,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), bank_k.stride(0), bank_k.stride(1), bank_k.stride(2),
            bank_v.stride(0), bank_v.stride(1), bank_v.stride(2), o.stride(0), o.stride(1), o.stride(2),
            Hq, Tq, Tk, M, Hq // Hk, float(scale) * LOG2E, Tk - Tq, window,
            D=D, BLOCK_D=BD, BLOCK_M=c.outer, BLOCK_N=c.inner, NEG_SCALE=bool(scale < 0),
            num_warps=c.warps, num_stages=c.stages)

    _run_tuned("fwd", ("membank_fwd", BD, q.dtype), _cfg("fwd", BD, q.element_size()), launch)
    return o, lse


def _bwd_impl(do, q, k, v, bank_k, bank_v, o, lse, window: int, scale: float):
    B, Tq, Hq, D, Tk, Hk = _check(q, k, v)
    M = _check_bank(q, k, bank_k, bank_v, window)
    q, k, v, bank_k, bank_v = (_unit_last(t) for t in (q, k, v, bank_k, bank_v))
    o, do = bwd_outputs_like_q(q, o, do)
    dq = _alloc((B, Tq, Hq, D), q.dtype, q.device)
    dk = _alloc((B, Tk, Hk, D), q.dtype, q.device)
    dv = _alloc((B, Tk, Hk, D), q.dtype, q.device)
    dbk = _alloc(tuple(bank_k.shape), q.dtype, q.device)
    dbv = _alloc(tuple(bank_v.shape), q.dtype, q.device)
    if dq.numel() == 0 or Tk == 0:
        for t in (dq, dk, dv, dbk, dbv):
            t.zero_()
        return dq, dk, dv, dbk, dbv
    if Tq < Tk:  # keys before the first query's window get no gradient; the kernel writes all rows
        pass
    _check_i32(q, k, v, o, do, bank_k, bank_v)
    BD = _block_d(D)
    G = Hq // Hk
    qk_scale = float(scale) * LOG2E
    diag = Tk - Tq
    esize = q.element_size()
    delta, lse2 = bwd_row_stats(o, do, lse, BD)

    def launch_dkdv(c: Cfg):
        grid = (triton.cdiv(Tk, c.outer), Hk, B)
        _membank_dkdv_kernel[grid](
            q, k, v, do, dk, dv, lse2, delta,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
            Hq, Tq, Tk, G, qk_scale, float(scale), diag, window,
            D=D, BLOCK_D=BD, BLOCK_M=c.inner, BLOCK_N=c.outer, num_warps=c.warps, num_stages=c.stages)

    _run_tuned("dkdv", ("membank_dkdv", BD, q.dtype), _cfg("dkdv", BD, esize), launch_dkdv)

    if M:
        n = -(-Tk // window)
        bn = 16 if _interpreting() else max(16, min(64, triton.next_power_of_2(M)))
        bm = 16 if _interpreting() else (64 if BD <= 128 else 32)
        nmb = triton.cdiv(M, bn)
        _membank_bank_dkdv_kernel[(n * nmb, Hk, B)](
            q, bank_k, bank_v, do, dbk, dbv, lse2, delta,
            q.stride(0), q.stride(1), q.stride(2), bank_k.stride(0), bank_k.stride(1), bank_k.stride(2),
            bank_v.stride(0), bank_v.stride(1), bank_v.stride(2), do.stride(0), do.stride(1), do.stride(2),
            dbk.stride(0), dbk.stride(1), dbk.stride(2), dbv.stride(0), dbv.stride(1), dbv.stride(2),
            Hq, Tq, M, nmb, G, qk_scale, float(scale), diag, window,
            D=D, BLOCK_D=BD, BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=2 if not _interpreting() else 1)

    def launch_dq(c: Cfg):
        grid = (triton.cdiv(Tq, c.outer), Hq, B)
        _membank_dq_kernel[grid](
            q, k, v, bank_k, bank_v, do, dq, lse2, delta,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), bank_k.stride(0), bank_k.stride(1), bank_k.stride(2),
            bank_v.stride(0), bank_v.stride(1), bank_v.stride(2), do.stride(0), do.stride(1), do.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2),
            Hq, Tq, Tk, M, G, qk_scale, float(scale), diag, window,
            D=D, BLOCK_D=BD, BLOCK_M=c.outer, BLOCK_N=c.inner, num_warps=c.warps, num_stages=c.stages)

    _run_tuned("dq", ("membank_dq", BD, q.dtype), _cfg("dq", BD, esize), launch_dq)
    return dq, dk, dv, dbk, dbv


# ---------------------------------------------------------------------------------------------
# torch.library custom ops
# ---------------------------------------------------------------------------------------------

_fwd_op, _bwd_op = define_attention_ops("membank", "token.membank (triton)", _fwd_impl, _bwd_impl,
                                        grad_tensors=("bank_k", "bank_v"),
                                        params=(("window", int), ("scale", float)))


def membank_attention(q, k, v, bank_k, bank_v, window: int = 64, scale: float | None = None) -> torch.Tensor:
    """Attention over [bank of the query's chunk | sliding window], autograd-enabled: o like q."""
    o, _ = _fwd_op(q, k, v, bank_k, bank_v, int(window), resolve_scale(q, scale))
    return o


def membank_fwd(q, k, v, bank_k, bank_v, window: int = 64, scale: float | None = None):
    """Forward only: (o, lse fp32 [B, Hq, Tq], natural log)."""
    return _fwd_op(q, k, v, bank_k, bank_v, int(window), resolve_scale(q, scale))


def membank_bwd(do, q, k, v, bank_k, bank_v, o, lse, window: int = 64, scale: float | None = None):
    """(dq, dk, dv, d_bank_k, d_bank_v) in the input dtype."""
    return _bwd_op(do, q, k, v, bank_k, bank_v, o, lse, int(window), resolve_scale(q, scale))
