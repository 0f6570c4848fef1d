"""Decode attention over token.mixeddim's packed cache in Triton (``plugins/token/mixeddim.py``).

Public contract::

    o_n, o_r, s_pool, s_tail = pooled_decode(q, qp, kbuf, vbuf, tok_off, count, elem_base, step,
                                             tail_k, tail_v, scale=None, scores=True,
                                             num_splits=None, cfg=None)

q, qp ``[B, Tq, Hq, D]``: the new queries in natural channel order and in their kv head's key
rank order. The pools: ``kbuf``, ``vbuf`` flat, in slots (room for one token each). In level ``l``
(width ``w_l = (l + 1) * step``), row ``r = b * Hk + hk`` owns the slots ``tok_off[l, r] <= i <
tok_off[l, r + 1]`` and holds ``count[l, r]`` tokens in the first ones of them, ``tok_off[l, r] <= i
< tok_off[l, r] + count[l, r]``, in any order (the rest are spare capacity: never read); slot
``i``'s elements are ``elem_base[l] + (i - tok_off[l, 0]) * w_l + [0, w_l)`` (rank order). So a
row's held tokens of a level are still one contiguous run. The tail ``[B, Hk, t, D]`` (natural
order, unit last stride) holds the newest tokens, the step's ``Tq`` new ones last (bottom-right
causal within the tail; every pooled token is older than every query).

Split-K ("flash-decoding"), one level per program. Grid ``(P, Hk, B)``: every program holds the
``G * Tq`` query rows of its kv group (padded to ``BLOCK_M >= 16`` for the MMAs) and runs ONE
online softmax over a slice of ONE level of its row, or of the full-width tail: partials
``0 .. PP - 1`` split the levels (level ``l`` gets ``S_l`` of them, the same for every row: its
row-average slots' elements over a target per program, :func:`level_splits`; a level without
slots in every row gets none), partials ``PP .. P - 1`` split the tail. The splits are sized from
the capacities (slots), which the host knows, but a split's chunk of a row is ``ceil(count /
S_l)`` held tokens (rounded up to whole tiles), so a program whose chunk starts at or beyond the
held count reads nothing. So a program streams one contiguous run of one width (a row's held
tokens of a level are contiguous in the pool) with one tile shape: with
``NARROW`` (the default) a level-``l`` tile is ``[BN_l, WP_l]`` (``WP_l`` = ``w_l`` padded to a power
of 2 >= 16, ``BN_l = BLOCK_N * BLOCK_D / WP_l`` tokens, so every tile moves about the same bytes,
with vector loads: the element base is a multiple of ``step``'s power-of-2 part), scores
``qp[:w_l] . k[:w_l]``; the tail's tiles are ``[BLOCK_N, BLOCK_D]``, scores ``q . k``. The levels
are unrolled (``levels`` and ``step`` are constexprs; a program runs the one its partial index
falls in). Each program writes its normalised partial and lse (fp32: pool partials
``[R, PP, BLOCK_M, D]`` in value rank order, tail partials ``[R, P - PP, BLOCK_M, D]`` in natural
order, lse ``[R, P, BLOCK_M]``); a combine launch (one program per (batch, head, query)) merges
them into ``o_r``, ``o_n`` and the row's final lse. The caller maps ``o_r`` back to natural order
and adds.

``scores=True``: a third launch with the same program layout writes ``sum over the program's rows
of exp(s - lse)`` per token (``s_pool [slots]``, ``s_tail [B, Hk, t]``, fp32) with the final lse:
the attention each token received, as the reference's probabilities give it; an unused slot gets
0 (written by the last split of its (level, row)). Every slot is written by exactly one program
(no atomics). By default (``scores_from``) the split pass also writes its
scaled logits ``s`` (fp32 ``[G * Tq, tokens]``: 16 bytes a token at G * Tq = 4, against ~470 of
K and V) and the third launch reads them back; for groups of more than :data:`LOGIT_ROWS_MAX`
rows it recomputes them from K instead (half of the first pass's bytes, no buffer).

The target per program (:func:`default_target`) spreads the pools' and the tail's elements over
about 4 programs per SM, at least 4 full-width tiles each; ``num_splits`` forces that many
programs per level with slots and for the tail. The grid is sized on the host from the levels'
slot counts (capacities: :func:`host_layout`; ``PackedKV.host`` carries them from the rewrite, so a
decode step needs no device -> host copy; ``count`` stays on the device). ``cfg`` = ``(BLOCK_N, num_warps, num_stages, narrow)``
overrides the tile config. Earlier versions (removed): one program per row with the scores pass
inside (session 4, 0.60 ms on the H100 shape of docs/performance.md); splits of EVERY level per
program (session 6, 0.33-0.38 ms: short ragged runs per level, a host copy per call).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._alloc import empty
from ..numba.kv_mixeddim import check_pooled
from .attention import LOG2E, _dot, _dot_acc, _interpreting, _loop_bound
from .kv_decode import _SM_COUNT, _sm_count  # noqa: F401  (one SM-count cache for the decode kernels)

__all__ = ["pooled_decode", "host_layout", "level_splits", "tail_splits", "default_target", "default_cfg",
           "MAX_SPLITS"]


# ---------------------------------------------------------------------------------------------
# shared by the kernels below
@triton.jit
def _group_rows(b, hk, Hk, Tq, GROUP, s_qb, s_qt, s_qh, D: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_M: tl.constexpr):
    """A program's query rows: row ``m`` is query head ``hk * GROUP + m // Tq``, query ``m % Tq``
    of the kv head's group. Returns (row index r = b * Hk + hk, rows, query index, row mask, the
    rows' element offsets in Q / QP, head-dim offsets and mask)."""
    r = b * Hk + hk
    rows = tl.arange(0, BLOCK_M)
    g = rows // Tq
    qi = rows - g * Tq
    h = (hk * GROUP + g).to(tl.int64)
    rmask = rows < GROUP * Tq
    offs_d = tl.arange(0, BLOCK_D)
    q_rows = b.to(tl.int64) * s_qb + qi * s_qt + h * s_qh
    return r, rows, qi, rmask, q_rows, offs_d, offs_d < D


@triton.jit
def _softmax_step(s, m_i, l_i):
    """One online-softmax step over a tile of log2-scaled scores ``s`` (masked entries -inf):
    (p = exp2(s - m_new), the rescale factor of the old state, m_new, the updated row sums)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _tail_span(sid, S, Tt, BLOCK_N: tl.constexpr):
    """Split ``sid``'s slice [lo, hi) of the full-width tail (whole key blocks, the last ragged)."""
    chunk = tl.cdiv(tl.cdiv(Tt, S), BLOCK_N) * BLOCK_N
    lo = sid * chunk
    return lo, tl.minimum(lo + chunk, Tt)


# ---------------------------------------------------------------------------------------------
# split path: split pass (one level or the tail per program) -> combine -> (scores) score pass
@triton.jit
def _level_splits(TOK, R, RTGT, SFIX, SMAX, lev: tl.constexpr, W: tl.constexpr):
    """Programs given to level ``lev`` (every row gets the same count): 0 for a level without
    slots in every row; ``SFIX`` when it is > 0; else ``ceil(row-average slots' elements / target)``
    in [1, SMAX] (``RTGT`` = rows x target). From the slots (``TOK``), as the host sizes the grid.
    :func:`level_splits` is the host's copy of this rule (it sizes the grid)."""
    base = TOK + lev * (R + 1)
    n = (tl.load(base + R) - tl.load(base)).to(tl.int64)
    want = tl.minimum(tl.maximum(tl.cdiv(n * W, RTGT), 1), SMAX)
    return tl.where(n > 0, tl.where(SFIX > 0, SFIX, want), 0).to(tl.int32)


@triton.jit
def _level_span(TOK, CNT, EB, r, R, sid, S, lev: tl.constexpr, BN: tl.constexpr, EB_ALIGN: tl.constexpr):
    """Split ``sid`` of ``S``'s slots ``[lo, hi)`` of the tokens row ``r`` holds in level ``lev``
    (its first ``count`` slots; chunks rounded up to whole tiles; empty: ``lo >= hi``), the level's
    first slot ``tb``, element base ``eb`` and the end of the row's held slots ``t1``."""
    row0 = TOK + lev * (R + 1)
    tb = tl.load(row0).to(tl.int32)
    t0 = tl.load(row0 + r).to(tl.int32)
    t1 = t0 + tl.load(CNT + lev * R + r).to(tl.int32)
    eb = tl.multiple_of(tl.load(EB + lev), EB_ALIGN)
    chunk = tl.cdiv(tl.cdiv(t1 - t0, S), BN) * BN
    lo = t0 + sid * chunk
    hi = tl.minimum(lo + chunk, t1)
    return lo, hi, tb, eb, t1


@triton.jit
def _level_tile(QP, TOK, CNT, EB, q_rows, rmask, r, R, sid, S, lev: tl.constexpr, W: tl.constexpr,
                WP: tl.constexpr, BN: tl.constexpr, EB_ALIGN: tl.constexpr):
    """A level's tile setup for split ``sid`` (tiles ``[BN, WP]``, ``W`` real channels): its
    :func:`_level_span` (lo, hi, tb, eb), the channel offsets ``[0, WP)``, the token offsets
    ``[0, BN)``, the channel mask (``< W``) and the rows' ``qp`` ``[BLOCK_M, WP]`` (zero-padded)."""
    lo, hi, tb, eb, _ = _level_span(TOK, CNT, EB, r, R, sid, S, lev, BN, EB_ALIGN)
    offs_w = tl.arange(0, WP)
    offs_n = tl.arange(0, BN)
    wmask = offs_w < W
    qp = tl.load(QP + q_rows[:, None] + offs_w[None, :], mask=rmask[:, None] & wmask[None, :], other=0.0)
    return lo, hi, tb, eb, offs_w, offs_n, wmask, qp


@triton.jit
def _double_cols(x):
    """[M, N] -> [M, 2N]: x, then N zero columns (exact; a register shuffle, no arithmetic)."""
    return tl.reshape(tl.permute(tl.join(x, tl.zeros_like(x)), (0, 2, 1)), [x.shape[0], 2 * x.shape[1]])


@triton.jit
def _pad_cols(x, WP: tl.constexpr, BLOCK_D: tl.constexpr):
    """[M, WP] -> [M, BLOCK_D] zero-padded on the right (powers of 2, BLOCK_D / WP <= 16)."""
    if WP < BLOCK_D:
        x = _double_cols(x)
    if 2 * WP < BLOCK_D:
        x = _double_cols(x)
    if 4 * WP < BLOCK_D:
        x = _double_cols(x)
    if 8 * WP < BLOCK_D:
        x = _double_cols(x)
    return x


@triton.jit
def _pool_level(m_i, l_i, QP, KB, VB, TOK, CNT, EB, LG, lg_rows, q_rows, rmask, r, R, sid, S, qk_scale,
                lev: tl.constexpr, STEP: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, NARROW: tl.constexpr, EB_ALIGN: tl.constexpr, LOGITS: tl.constexpr):
    """Split ``sid`` of ``S`` of level ``lev``: online softmax into an accumulator ``[BLOCK_M, WP]``
    (the level's ``W`` channels in rank order), returned zero-padded to ``[BLOCK_M, BLOCK_D]``.
    LOGITS: the tile's scaled logits also go to ``LG + lg_rows + token`` (row ``m``'s logits of
    global token ``i`` at ``m * N + i``)."""
    W: tl.constexpr = (lev + 1) * STEP
    WP: tl.constexpr = min(BLOCK_D, max(16, triton.next_power_of_2(W))) if NARROW else BLOCK_D
    BN: tl.constexpr = max(16, min(BLOCK_N * (BLOCK_D // WP), 4096 // BLOCK_M)) if NARROW else BLOCK_N
    lo, hi, tb, eb, offs_w, offs_n, wmask, qp = _level_tile(QP, TOK, CNT, EB, q_rows, rmask, r, R, sid, S, lev,
                                                            W, WP, BN, EB_ALIGN)
    acc = tl.zeros([BLOCK_M, WP], tl.float32)
    for start in range(_loop_bound(lo), _loop_bound(hi), BN):
        cols = start + offs_n
        cmask = cols < hi
        el = eb + (cols - tb).to(tl.int64)[:, None] * W + offs_w[None, :]
        kvmask = cmask[:, None] & wmask[None, :]
        k = tl.load(KB + el, mask=kvmask, other=0.0)
        s = _dot(qp, tl.trans(k)) * qk_scale
        if LOGITS:
            tl.store(LG + lg_rows[:, None] + cols[None, :], s, mask=rmask[:, None] & cmask[None, :])
        s = tl.where(cmask[None, :], s, float("-inf"))
        p, alpha, m_new, l_i = _softmax_step(s, m_i, l_i)
        v = tl.load(VB + el, mask=kvmask, other=0.0)
        acc = _dot_acc(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return _pad_cols(acc, WP, BLOCK_D), m_i, l_i


@triton.jit
def _tail_attend(m_i, l_i, Q, TK, TV, LG, lg_rows, q_rows, rmask, qi, offs_d, dmask, b, hk, sid, S, Tt, Tq,
                 s_tkb, s_tkh, s_tkt, s_tvb, s_tvh, s_tvt, qk_scale, BLOCK_M: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, LOGITS: tl.constexpr):
    """Split ``sid`` of ``S`` of the full-width tail (natural order, bottom-right causal); LOGITS:
    the scaled logits (causally hidden ones included) also go to ``LG + lg_rows + column``."""
    q = tl.load(Q + q_rows[:, None] + offs_d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
    diag = Tt - Tq
    lo, hi = _tail_span(sid, S, Tt, BLOCK_N)
    tk_base = TK + b.to(tl.int64) * s_tkb + hk.to(tl.int64) * s_tkh
    tv_base = TV + b.to(tl.int64) * s_tvb + hk.to(tl.int64) * s_tvh
    offs_n = tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(_loop_bound(lo), _loop_bound(hi), BLOCK_N):
        cols = start + offs_n
        cmask = cols < hi
        kvmask = cmask[:, None] & dmask[None, :]
        k = tl.load(tk_base + cols[:, None].to(tl.int64) * s_tkt + offs_d[None, :], mask=kvmask, other=0.0)
        s = _dot(q, tl.trans(k)) * qk_scale
        if LOGITS:
            tl.store(LG + lg_rows[:, None] + cols[None, :], s, mask=rmask[:, None] & cmask[None, :])
        s = tl.where(cmask[None, :] & (cols[None, :] <= qi[:, None] + diag), s, float("-inf"))
        p, alpha, m_new, l_i = _softmax_step(s, m_i, l_i)
        v = tl.load(tv_base + cols[:, None].to(tl.int64) * s_tvt + offs_d[None, :], mask=kvmask, other=0.0)
        acc = _dot_acc(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _pooled_split_kernel(Q, QP, KB, VB, TOK, CNT, EB, TK, TV, PR, PN, PL, LGP, LGT,
                         s_qb, s_qt, s_qh, s_tkb, s_tkh, s_tkt, s_tvb, s_tvh, s_tvt,
                         Hk, Tq, Tt, GROUP, R, PP, ST, RTGT, SFIX, SMAX, N, qk_scale,
                         L: tl.constexpr, STEP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NARROW: tl.constexpr,
                         EB_ALIGN: tl.constexpr, LOGITS: tl.constexpr):
    """Program ``(p, hk, b)``: partial ``p`` of row ``b * Hk + hk``. ``p < PP``: one split of ONE
    level (the levels' programs in level order, :func:`_level_splits` each); else split
    ``p - PP`` of the ``ST`` splits of the tail."""
    pid = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    r, rows, qi, rmask, q_rows, offs_d, dmask = _group_rows(b, hk, Hk, Tq, GROUP, s_qb, s_qt, s_qh, D, BLOCK_D, BLOCK_M)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if pid < PP:
        p0 = 0
        for lev in tl.static_range(L):
            S_l = _level_splits(TOK, R, RTGT, SFIX, SMAX, lev, (lev + 1) * STEP)
            if (pid >= p0) & (pid < p0 + S_l):
                acc, m_i, l_i = _pool_level(m_i, l_i, QP, KB, VB, TOK, CNT, EB, LGP, rows.to(tl.int64) * N, q_rows,
                                            rmask, r, R, pid - p0, S_l, qk_scale, lev, STEP, BLOCK_D, BLOCK_M,
                                            BLOCK_N, NARROW, EB_ALIGN, LOGITS)
            p0 += S_l
        out = PR + ((r * PP + pid).to(tl.int64) * BLOCK_M + rows)[:, None] * D
    else:
        lg_rows = rows.to(tl.int64) * (R * Tt) + r * Tt
        acc, m_i, l_i = _tail_attend(m_i, l_i, Q, TK, TV, LGT, lg_rows, q_rows, rmask, qi, offs_d, dmask, b, hk,
                                     pid - PP, ST, Tt, Tq, s_tkb, s_tkh, s_tkt, s_tvb, s_tvh, s_tvt, qk_scale,
                                     BLOCK_M, BLOCK_D, BLOCK_N, LOGITS)
        out = PN + ((r * ST + pid - PP).to(tl.int64) * BLOCK_M + rows)[:, None] * D
    # the partial: normalised outputs and lse (log2 units; -inf: the split saw nothing)
    empty_row = l_i == 0.0
    l_safe = tl.where(empty_row, 1.0, l_i)
    tl.store(out + offs_d[None, :], acc / l_safe[:, None], mask=rmask[:, None] & dmask[None, :])
    prow = (r * (PP + ST) + pid).to(tl.int64) * BLOCK_M + rows
    tl.store(PL + prow, tl.where(empty_row, float("-inf"), m_i + tl.math.log2(l_safe)), mask=rmask)


@triton.jit
def _pooled_combine_kernel(PR, PN, PL, OR, ON, LSE2, s_ob, s_ot, s_oh, Hk, Tq, GROUP, PP, ST,
                           D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr):
    """One query row (b, head, query) per program: merge the ``PP`` pool partials into o_r, the
    ``ST`` tail partials into o_n, and the row's final lse (log2 units, +inf for a row that saw
    nothing: its probabilities are 0). Partials in chunks of ``BLOCK_S`` (any count)."""
    m = tl.program_id(0)  # g * Tq + qi
    hk = tl.program_id(1)
    b = tl.program_id(2)
    r = b * Hk + hk
    g = m // Tq
    qi = m - g * Tq
    h = (hk * GROUP + g).to(tl.int64)
    P = PP + ST
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    lbase = PL + (r * P).to(tl.int64) * BLOCK_M + m
    mx = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for s0 in range(0, P, BLOCK_S):
        mx = tl.maximum(mx, tl.load(lbase + (s0 + offs_s) * BLOCK_M, mask=s0 + offs_s < P, other=float("-inf")))
    mx = tl.max(mx, 0)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    tot = tl.zeros([BLOCK_S], tl.float32)
    o_r = tl.zeros([BLOCK_D], tl.float32)
    o_n = tl.zeros([BLOCK_D], tl.float32)
    for s0 in range(0, P, BLOCK_S):
        ps = s0 + offs_s
        w = tl.math.exp2(tl.load(lbase + ps * BLOCK_M, mask=ps < P, other=float("-inf")) - mx_safe)
        tot += w
        pr_m = (ps < PP)[:, None] & dmask[None, :]
        pr = tl.load(PR + ((r * PP + ps).to(tl.int64) * BLOCK_M + m)[:, None] * D + offs_d[None, :], mask=pr_m,
                     other=0.0)
        o_r += tl.sum(pr * w[:, None], 0)
        pn_m = ((ps >= PP) & (ps < P))[:, None] & dmask[None, :]
        pn = tl.load(PN + ((r * ST + ps - PP).to(tl.int64) * BLOCK_M + m)[:, None] * D + offs_d[None, :],
                     mask=pn_m, other=0.0)
        o_n += tl.sum(pn * w[:, None], 0)
    tot = tl.sum(tot, 0)
    tot_safe = tl.where(tot == 0.0, 1.0, tot)
    o_off = b.to(tl.int64) * s_ob + qi * s_ot + h * s_oh + offs_d
    tl.store(OR + o_off, o_r / tot_safe, mask=dmask)
    tl.store(ON + o_off, o_n / tot_safe, mask=dmask)
    tl.store(LSE2 + r * BLOCK_M + m, tl.where(tot == 0.0, float("inf"), mx_safe + tl.math.log2(tot_safe)))


@triton.jit
def _score_level(QP, KB, TOK, CNT, EB, SP, LG, lg_rows, q_rows, rmask, lse2, r, R, sid, S, qk_scale,
                 lev: tl.constexpr, STEP: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, NARROW: tl.constexpr, EB_ALIGN: tl.constexpr, FROM_LOGITS: tl.constexpr):
    """Split ``sid`` of ``S``: the scores of its held slots; the last split also writes 0 to the
    row's unused slots of the level (``[t0 + count, tok_off[lev, r + 1])``)."""
    W: tl.constexpr = (lev + 1) * STEP
    WP: tl.constexpr = min(BLOCK_D, max(16, triton.next_power_of_2(W))) if NARROW else BLOCK_D
    BN: tl.constexpr = max(16, min(BLOCK_N * (BLOCK_D // WP), 4096 // BLOCK_M)) if NARROW else BLOCK_N
    lo, hi, tb, eb, offs_w, offs_n, wmask, qp = _level_tile(QP, TOK, CNT, EB, q_rows, rmask, r, R, sid, S, lev,
                                                            W, WP, BN, EB_ALIGN)
    for start in range(_loop_bound(lo), _loop_bound(hi), BN):
        cols = start + offs_n
        cmask = cols < hi
        if FROM_LOGITS:  # the split pass's logits (equal to recomputing them up to fp32 rounding)
            s = tl.load(LG + lg_rows[:, None] + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        else:
            el = eb + (cols - tb).to(tl.int64)[:, None] * W + offs_w[None, :]
            k = tl.load(KB + el, mask=cmask[:, None] & wmask[None, :], other=0.0)
            s = _dot(qp, tl.trans(k)) * qk_scale
        p = tl.math.exp2(s - lse2[:, None])
        p = tl.where(rmask[:, None] & cmask[None, :], p, 0.0)
        tl.store(SP + cols, tl.sum(p, 0), mask=cmask)
    if sid == S - 1:  # the row's unused slots (spare capacity): no attention
        t1 = tl.load(CNT + lev * R + r).to(tl.int32) + tl.load(TOK + lev * (R + 1) + r).to(tl.int32)
        te = tl.load(TOK + lev * (R + 1) + r + 1).to(tl.int32)
        for start in range(_loop_bound(t1), _loop_bound(te), BN):
            cols = start + offs_n
            tl.store(SP + cols, tl.zeros([BN], tl.float32), mask=cols < te)


@triton.jit
def _pooled_scores_kernel(Q, QP, KB, TOK, CNT, EB, TK, LSE2, SP, ST_OUT, LGP, LGT,
                          s_qb, s_qt, s_qh, s_tkb, s_tkh, s_tkt, Hk, Tq, Tt, GROUP, R, PP, ST, RTGT, SFIX, SMAX,
                          N, qk_scale, L: tl.constexpr, STEP: tl.constexpr, D: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          NARROW: tl.constexpr, EB_ALIGN: tl.constexpr, FROM_LOGITS: tl.constexpr):
    """The attention each token received (``sum over the row's queries of exp2(s - lse2)``), with
    the split pass's program layout; every slot is written by exactly one program. FROM_LOGITS:
    ``s`` is read from the logits the split pass wrote (LGP, LGT) instead of recomputed from K."""
    pid = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    r, rows, qi, rmask, q_rows, offs_d, dmask = _group_rows(b, hk, Hk, Tq, GROUP, s_qb, s_qt, s_qh, D, BLOCK_D, BLOCK_M)
    lse2 = tl.load(LSE2 + r * BLOCK_M + rows, mask=rmask, other=float("inf"))
    if pid < PP:
        p0 = 0
        for lev in tl.static_range(L):
            S_l = _level_splits(TOK, R, RTGT, SFIX, SMAX, lev, (lev + 1) * STEP)
            if (pid >= p0) & (pid < p0 + S_l):
                _score_level(QP, KB, TOK, CNT, EB, SP, LGP, rows.to(tl.int64) * N, q_rows, rmask, lse2, r, R,
                             pid - p0, S_l, qk_scale, lev, STEP, BLOCK_D, BLOCK_M, BLOCK_N, NARROW, EB_ALIGN,
                             FROM_LOGITS)
            p0 += S_l
    else:
        if not FROM_LOGITS:  # (the logits path never touches Q or K)
            q = tl.load(Q + q_rows[:, None] + offs_d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        diag = Tt - Tq
        lo, hi = _tail_span(pid - PP, ST, Tt, BLOCK_N)
        tk_base = TK + b.to(tl.int64) * s_tkb + hk.to(tl.int64) * s_tkh
        offs_n = tl.arange(0, BLOCK_N)
        lg_rows = rows.to(tl.int64) * (R * Tt) + r * Tt
        for start in range(_loop_bound(lo), _loop_bound(hi), BLOCK_N):
            cols = start + offs_n
            cmask = cols < hi
            if FROM_LOGITS:
                s = tl.load(LGT + lg_rows[:, None] + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
            else:
                k = tl.load(tk_base + cols[:, None].to(tl.int64) * s_tkt + offs_d[None, :],
                            mask=cmask[:, None] & dmask[None, :], other=0.0)
                s = _dot(q, tl.trans(k)) * qk_scale
            p = tl.math.exp2(s - lse2[:, None])
            p = tl.where(rmask[:, None] & cmask[None, :] & (cols[None, :] <= qi[:, None] + diag), p, 0.0)
            tl.store(ST_OUT + r.to(tl.int64) * Tt + cols, tl.sum(p, 0), mask=cmask)


#: most programs one level (or the tail) of a row is split over (the combine takes any number)
MAX_SPLITS = 64
#: programs per SM the default split rule aims at (as kv_decode's split-K)
PROGRAMS_PER_SM = 4
#: scores_from="auto": the split pass writes its logits and the scores pass reads them back when a
#: kv head's group holds at most this many query rows (G * Tq); more rows: the scores pass
#: recomputes them from K (the logits buffer is rows x tokens fp32)
LOGIT_ROWS_MAX = 16


def level_splits(level_tokens, step: int, rows: int, target: int, fixed: int = 0,
                 smax: int = MAX_SPLITS) -> list[int]:
    """Programs per level (the host's copy of the kernels' ``_level_splits``; it sizes the grid)
    from ``level_tokens``, the slots per level over all rows (capacities): 0 for a level without
    slots, ``fixed`` when > 0, else the level's row-average slots' elements over ``target``
    elements per program, rounded up, in [1, smax]."""
    out = []
    for lev, n in enumerate(level_tokens):
        w = (lev + 1) * step
        out.append(0 if n <= 0 else fixed if fixed > 0 else min(max(-(-n * w // (rows * target)), 1), smax))
    return out


def tail_splits(tail: int, d: int, target: int, fixed: int = 0, smax: int = MAX_SPLITS) -> int:
    """Programs per row for the full-width tail (it always holds the step's new tokens)."""
    return fixed if fixed > 0 else min(max(-(-tail * d // target), 1), smax)


def default_target(level_tokens, step: int, rows: int, tail: int, d: int, block_n: int,
                   device: torch.device) -> int:
    """K elements per program: the pools' and the tail's elements spread over
    :data:`PROGRAMS_PER_SM` x SMs programs, and at least 4 full-width ``block_n`` tiles' worth."""
    total = sum(n * (lev + 1) * step for lev, n in enumerate(level_tokens)) + rows * tail * d
    bd = max(16, triton.next_power_of_2(d))
    return max(-(-total // (PROGRAMS_PER_SM * _sm_count(device))), 4 * block_n * bd, 1)


def default_cfg(d: int, rows_per_program: int) -> tuple[int, int, int, bool]:
    """(BLOCK_N, num_warps, num_stages, narrow) for the split kernels."""
    if _interpreting():
        return 16, 1, 1, True
    bd = max(16, triton.next_power_of_2(d))
    return (64 if bd <= 128 else 32), 4, 3, True


def _eb_align(step: int) -> int:
    """Largest power of 2 dividing ``step``, at most 16: every level's element base is a multiple."""
    return min(step & -step, 16)


def host_layout(tok_off: torch.Tensor, elem_base: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(slots per level over all rows, i.e. capacities, element base per level) as host ints:
    what :func:`pooled_decode` sizes its grid with (one device -> host copy). ``PackedKV.host``
    keeps it from the rewrite, so a decode step needs no copy."""
    if tok_off.shape[0] == 0:
        return (), ()
    vals = torch.cat([tok_off[:, -1] - tok_off[:, 0], elem_base]).tolist()
    n = tok_off.shape[0]
    return tuple(int(x) for x in vals[:n]), tuple(int(x) for x in vals[n:])


def pooled_decode(q: torch.Tensor, qp: torch.Tensor, kbuf: torch.Tensor, vbuf: torch.Tensor, tok_off: torch.Tensor,
                  count: torch.Tensor, elem_base: torch.Tensor, step: int, tail_k: torch.Tensor, tail_v: torch.Tensor,
                  scale: float | None = None, scores: bool = True, num_splits: int | None = None,
                  cfg: tuple[int, int, int, bool] | None = None, layout=None, scores_from: str = "auto"):
    """(o_n, o_r) [B, Tq, Hq, D] fp32 (tail part, natural order; pool part, value rank order;
    both already divided by the shared softmax sum) and, with ``scores``, the attention each
    pooled slot (``[slots]``, 0 for an unused one) and each tail token (``[B, Hk, t]``) received,
    fp32 (else None). ``count`` [levels, R] (integer, on the device): tokens held per (level, row),
    each at most the row's slots in the level (not checked: that would need a device -> host copy).
    ``num_splits``: programs per non-empty level and for the tail, per row (>= 1; default: split
    by bytes, :func:`default_target`); ``cfg``: ``(BLOCK_N, num_warps, num_stages, narrow)``
    (default :func:`default_cfg`); ``layout``: :func:`host_layout` of ``tok_off`` / ``elem_base``
    if the caller has it (else one device -> host copy; a stale one gives wrong results);
    ``scores_from``: "logits" (the split pass writes its scaled logits, fp32 ``[G * Tq, tokens]``,
    and the scores pass reads them: K is read once), "keys" (the scores pass recomputes them from
    K: no buffer) or "auto" (logits for at most :data:`LOGIT_ROWS_MAX` rows). The two agree to fp32
    rounding (bit for bit in the interpreter; compiled, the two kernels' dots may round apart)."""
    b, tq, hq, d, hk, levels = check_pooled(q, qp, kbuf, vbuf, tok_off, count, elem_base, step, tail_k, tail_v)
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"pooled_decode: num_splits must be an int >= 1 (or None for the default), got "
                         f"{num_splits!r}")
    if scores_from not in ("auto", "logits", "keys"):
        raise ValueError(f"pooled_decode: scores_from must be 'auto', 'logits' or 'keys', got {scores_from!r}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    G = hq // hk
    R = b * hk
    q, qp = q.contiguous(), qp.contiguous().to(q.dtype)
    if tail_k.stride(-1) != 1:
        tail_k = tail_k.contiguous()
    if tail_v.stride(-1) != 1:
        tail_v = tail_v.contiguous()
    dev = q.device
    tt = tail_k.shape[2]
    lev_tok, bases = layout if layout is not None else host_layout(tok_off, elem_base)
    if len(lev_tok) != levels or len(bases) != levels:
        raise ValueError(f"pooled_decode: layout describes {len(lev_tok)} levels, the pools have {levels}")
    n_tok = sum(lev_tok)
    align = _eb_align(step)
    if any(e % align for e in bases):  # not the layout's bases: no alignment hint
        align = 1
    BM = max(16, triton.next_power_of_2(G * tq))
    BD = max(16, triton.next_power_of_2(d))
    bn, warps, stages, narrow = cfg if cfg is not None else default_cfg(d, G * tq)
    if cfg is not None and (bn < 16 or bn & (bn - 1)):
        raise ValueError(f"pooled_decode: cfg BLOCK_N must be a power of 2 >= 16, got {bn}")
    fixed = min(num_splits or 0, MAX_SPLITS)
    tgt = default_target(lev_tok, step, R, tt, d, bn, dev)
    PP = sum(level_splits(lev_tok, step, R, tgt, fixed))
    ST = tail_splits(tt, d, tgt, fixed)
    o_r = empty((b, tq, hq, d), dtype=torch.float32, device=dev)
    o_n = empty((b, tq, hq, d), dtype=torch.float32, device=dev)
    lse2 = empty((R, BM), dtype=torch.float32, device=dev)
    pr = empty((R, max(PP, 1), BM, d), dtype=torch.float32, device=dev)
    pn = empty((R, ST, BM, d), dtype=torch.float32, device=dev)
    pl = empty((R, PP + ST, BM), dtype=torch.float32, device=dev)
    logits = scores and (scores_from == "logits" or (scores_from == "auto" and G * tq <= LOGIT_ROWS_MAX))
    if logits:
        lgp = empty((G * tq, max(n_tok, 1)), dtype=torch.float32, device=dev)
        lgt = empty((G * tq, R * tt), dtype=torch.float32, device=dev)
    else:
        lgp = lgt = pl  # not read
    kb = kbuf if kbuf.numel() else torch.zeros(1, dtype=tail_k.dtype, device=dev)
    vb = vbuf if vbuf.numel() else torch.zeros(1, dtype=tail_v.dtype, device=dev)
    tok, cnt, eb = tok_off.contiguous(), count.contiguous(), elem_base.contiguous()
    common = dict(L=levels, STEP=step, D=d, BLOCK_D=BD, BLOCK_M=BM, BLOCK_N=bn, NARROW=bool(narrow),
                  EB_ALIGN=align)
    _pooled_split_kernel[(PP + ST, hk, b)](
        q, qp, kb, vb, tok, cnt, eb, tail_k, tail_v, pr, pn, pl, lgp, lgt,
        q.stride(0), q.stride(1), q.stride(2), tail_k.stride(0), tail_k.stride(1), tail_k.stride(2),
        tail_v.stride(0), tail_v.stride(1), tail_v.stride(2),
        hk, tq, tt, G, R, PP, ST, R * tgt, fixed, MAX_SPLITS, max(n_tok, 1), scale * LOG2E, **common,
        LOGITS=logits, num_warps=warps, num_stages=stages)
    _pooled_combine_kernel[(G * tq, hk, b)](
        pr, pn, pl, o_r, o_n, lse2, o_r.stride(0), o_r.stride(1), o_r.stride(2), hk, tq, G, PP, ST,
        D=d, BLOCK_D=BD, BLOCK_M=BM, BLOCK_S=max(2, min(16, triton.next_power_of_2(PP + ST))),
        num_warps=1 if _interpreting() else 4)
    if not scores:
        return o_n, o_r, None, None
    s_pool = empty((max(n_tok, 1),), dtype=torch.float32, device=dev)
    s_tail = empty((b, hk, max(tt, 1)), dtype=torch.float32, device=dev)
    _pooled_scores_kernel[(PP + ST, hk, b)](
        q, qp, kb, tok, cnt, eb, tail_k, lse2, s_pool, s_tail, lgp, lgt,
        q.stride(0), q.stride(1), q.stride(2), tail_k.stride(0), tail_k.stride(1), tail_k.stride(2),
        hk, tq, tt, G, R, PP, ST, R * tgt, fixed, MAX_SPLITS, max(n_tok, 1), scale * LOG2E, **common,
        FROM_LOGITS=logits, num_warps=warps, num_stages=stages)
    return o_n, o_r, s_pool[:n_tok], s_tail[..., :tt]
