"""Decode attention over token.mixeddim's packed cache in Triton (``plugins/token/mixeddim.py``).

Public contract::

    o_n, o_r, s_pool, s_tail = pooled_decode(q, qp, kbuf, vbuf, tok_off, elem_base, step,
                                             tail_k, tail_v, scale=None, scores=True,
                                             num_splits=None, cfg=None)

q, qp ``[B, Tq, Hq, D]``: the new queries in natural channel order and in their kv head's key
rank order. The pools: ``kbuf``, ``vbuf`` flat; level ``l`` (width ``w_l = (l + 1) * step``) holds
the tokens ``tok_off[l, r] <= i < tok_off[l, r + 1]`` of row ``r = b * Hk + hk`` at elements
``elem_base[l] + (i - tok_off[l, 0]) * w_l + [0, w_l)`` (rank order). The tail ``[B, Hk, t, D]``
(natural order, unit last stride) holds the newest tokens, the step's ``Tq`` new ones last
(bottom-right causal within the tail; every pooled token is older than every query).

Split-K ("flash-decoding", as ``kv_decode.decode_attention``). Grid ``(S, Hk, B)``: program
``(s, hk, b)`` holds the ``G * Tq`` query rows of its kv group (padded to ``BLOCK_M >= 16`` for the
MMAs) and takes split ``s``'s slice of EVERY level's tokens of its row (level ``l``: ``ceil(n_l / S)``
tokens rounded up to whole tiles) and of the tail, through ONE online softmax: scores
``qp[:w_l] . k[:w_l]`` for the pools, ``q . k`` for the tail. The levels are unrolled
(``levels`` and ``step`` are constexprs), so each level's tile has its own width: with ``NARROW``
(the default) a level-``l`` tile is ``[BN_l, WP_l]`` (``WP_l`` = ``w_l`` padded to a power of 2 >= 16,
``BN_l = BLOCK_N * BLOCK_D / WP_l`` tokens, so every tile moves about the same bytes, with
vector loads: the element base is a multiple of ``step``'s power-of-2 part), accumulated into a
level accumulator ``[BLOCK_M, WP_l]`` that is folded into the full-width ``acc_r`` (value rank
order) once per level (zero-padded by join / permute / reshape: no arithmetic); ``acc_r`` and
``acc_n`` (tail values, natural order) are rescaled once per level, not per tile. Each split
writes its normalised partials and lse (fp32 ``[R, S, BLOCK_M, D]`` x2, ``[R, S, BLOCK_M]``); a
combine launch (one program per (batch, head, query)) merges them into ``o_r``, ``o_n`` and the
row's final lse. The caller maps ``o_r`` back to natural order and adds.

``scores=True``: a third launch, split like the first, recomputes the logits with the final lse
and writes ``sum over the program's rows of exp(s - lse)`` per token (``s_pool [N]``,
``s_tail [B, Hk, t]``, fp32): the attention each token received, as the reference's
probabilities give it. Every token is written by exactly one program (no atomics); the pass
reads K once more (half of the first pass's bytes).

``S`` (``num_splits``, default :func:`default_splits`) is chosen so that ``B * Hk * S`` is about 4
programs per SM, each split >= 4 tiles of the average row; 1 for tiny shapes. ``cfg`` =
``(BLOCK_N, num_warps, num_stages, narrow)`` overrides the tile config. The first version (one
program per row, the scores pass inside the kernel, full-width masked tiles; 0.60 ms against
0.33-0.38 ms for this one on the H100 shape of docs/performance.md) was removed in session 6.
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

__all__ = ["pooled_decode", "default_splits", "default_cfg", "MAX_SPLITS"]


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
# split path (the default): split pass -> combine -> (scores) score pass
@triton.jit
def _level_span(TOK, EB, r, R, sid, S, lev: tl.constexpr, BN: tl.constexpr, EB_ALIGN: tl.constexpr):
    """Split ``sid`` of ``S``'s tokens ``[lo, hi)`` of row ``r`` in level ``lev`` (chunks rounded up
    to whole tiles), the level's first token ``tb`` and element base ``eb``."""
    row0 = TOK + lev * (R + 1)
    tb = tl.load(row0).to(tl.int32)
    t0 = tl.load(row0 + r).to(tl.int32)
    t1 = tl.load(row0 + r + 1).to(tl.int32)
    eb = tl.multiple_of(tl.load(EB + lev), EB_ALIGN)
    chunk = tl.cdiv(tl.cdiv(t1 - t0, S), BN) * BN
    lo = t0 + sid * chunk
    hi = tl.minimum(lo + chunk, t1)
    return lo, hi, tb, eb


@triton.jit
def _level_tile(QP, TOK, EB, q_rows, rmask, r, R, sid, S, lev: tl.constexpr, W: tl.constexpr, WP: tl.constexpr,
                BN: tl.constexpr, EB_ALIGN: tl.constexpr):
    """A level's tile setup for split ``sid`` (tiles ``[BN, WP]``, ``W`` real channels): its
    :func:`_level_span` (lo, hi, tb, eb), the channel offsets ``[0, WP)``, the token offsets
    ``[0, BN)``, the channel mask (``< W``) and the rows' ``qp`` ``[BLOCK_M, WP]`` (zero-padded)."""
    lo, hi, tb, eb = _level_span(TOK, EB, r, R, sid, S, lev, BN, EB_ALIGN)
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
def _pool_level(acc_r, acc_n, m_i, l_i, QP, KB, VB, TOK, EB, q_rows, rmask, r, R, sid, S, qk_scale,
                lev: tl.constexpr, STEP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NARROW: tl.constexpr, EB_ALIGN: tl.constexpr):
    """One level's share of split ``sid``: online softmax into a level accumulator ``[BLOCK_M, WP]``
    (the level's ``W`` channels in rank order), then folded into ``acc_r`` (``acc_r``, ``acc_n``
    rescaled once to the new running max)."""
    W: tl.constexpr = (lev + 1) * STEP
    # NARROW: the tile is the level's width (padded to a power of 2 >= 16) and holds more tokens
    WP: tl.constexpr = min(BLOCK_D, max(16, triton.next_power_of_2(W))) if NARROW else BLOCK_D
    BN: tl.constexpr = max(16, min(BLOCK_N * (BLOCK_D // WP), 4096 // BLOCK_M)) if NARROW else BLOCK_N
    lo, hi, tb, eb, offs_w, offs_n, wmask, qp = _level_tile(QP, TOK, EB, q_rows, rmask, r, R, sid, S, lev, W,
                                                            WP, BN, EB_ALIGN)
    m_start = m_i
    acc = tl.zeros([BLOCK_M, WP], tl.float32)
    for start in range(_loop_bound(lo), _loop_bound(hi), BN):
        cols = start + offs_n
        cmask = cols < hi
        el = eb + (cols - tb).to(tl.int64)[:, None] * W + offs_w[None, :]
        kvmask = cmask[:, None] & wmask[None, :]
        k = tl.load(KB + el, mask=kvmask, other=0.0)
        s = _dot(qp, tl.trans(k)) * qk_scale
        s = tl.where(cmask[None, :], s, float("-inf"))
        p, alpha, m_new, l_i = _softmax_step(s, m_i, l_i)
        v = tl.load(VB + el, mask=kvmask, other=0.0)
        acc = _dot_acc(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    # rescale the other accumulators to the new max once (0 where nothing was seen before)
    c = tl.math.exp2(m_start - tl.where(m_i == float("-inf"), 0.0, m_i))
    acc_n = acc_n * c[:, None]
    acc_r = acc_r * c[:, None] + _pad_cols(acc, WP, BLOCK_D)
    return acc_r, acc_n, m_i, l_i


@triton.jit
def _pooled_split_kernel(Q, QP, KB, VB, TOK, EB, TK, TV, PR, PN, PL,
                         s_qb, s_qt, s_qh, s_tkb, s_tkh, s_tkt, s_tvb, s_tvh, s_tvt,
                         Hk, Tq, Tt, GROUP, R, S, qk_scale,
                         L: tl.constexpr, STEP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NARROW: tl.constexpr,
                         EB_ALIGN: tl.constexpr):
    sid = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    r, rows, qi, rmask, q_rows, offs_d, dmask = _group_rows(b, hk, Hk, Tq, GROUP, s_qb, s_qt, s_qh, D, BLOCK_D, BLOCK_M)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc_r = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc_n = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for lev in tl.static_range(L):
        acc_r, acc_n, m_i, l_i = _pool_level(acc_r, acc_n, m_i, l_i, QP, KB, VB, TOK, EB, q_rows, rmask, r, R, sid,
                                             S, qk_scale, lev, STEP, D, BLOCK_D, BLOCK_M, BLOCK_N, NARROW, EB_ALIGN)
    # the split's slice of the full-width tail (bottom-right causal), natural order
    q = tl.load(Q + q_rows[:, None] + offs_d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
    diag = Tt - Tq
    lo, hi = _tail_span(sid, S, Tt, BLOCK_N)
    tk_base = TK + b.to(tl.int64) * s_tkb + hk.to(tl.int64) * s_tkh
    tv_base = TV + b.to(tl.int64) * s_tvb + hk.to(tl.int64) * s_tvh
    offs_n = tl.arange(0, BLOCK_N)
    m_start = m_i
    for start in range(_loop_bound(lo), _loop_bound(hi), BLOCK_N):
        cols = start + offs_n
        cmask = cols < hi
        kvmask = cmask[:, None] & dmask[None, :]
        k = tl.load(tk_base + cols[:, None].to(tl.int64) * s_tkt + offs_d[None, :], mask=kvmask, other=0.0)
        s = _dot(q, tl.trans(k)) * qk_scale
        s = tl.where(cmask[None, :] & (cols[None, :] <= qi[:, None] + diag), s, float("-inf"))
        p, alpha, m_new, l_i = _softmax_step(s, m_i, l_i)
        v = tl.load(tv_base + cols[:, None].to(tl.int64) * s_tvt + offs_d[None, :], mask=kvmask, other=0.0)
        acc_n = _dot_acc(p.to(v.dtype), v, acc_n * alpha[:, None])
        m_i = m_new
    # rescale the other accumulators to the new max once (0 where nothing was seen before)
    c = tl.math.exp2(m_start - tl.where(m_i == float("-inf"), 0.0, m_i))
    acc_r = acc_r * c[:, None]
    # the split's partial: normalised outputs and lse (log2 units; -inf: the split saw nothing)
    empty_row = l_i == 0.0
    l_safe = tl.where(empty_row, 1.0, l_i)
    prow = (r * S + sid).to(tl.int64) * BLOCK_M + rows
    pmask = rmask[:, None] & dmask[None, :]
    tl.store(PR + prow[:, None] * D + offs_d[None, :], acc_r / l_safe[:, None], mask=pmask)
    tl.store(PN + prow[:, None] * D + offs_d[None, :], acc_n / l_safe[:, None], mask=pmask)
    tl.store(PL + prow, tl.where(empty_row, float("-inf"), m_i + tl.math.log2(l_safe)), mask=rmask)


@triton.jit
def _pooled_combine_kernel(PR, PN, PL, OR, ON, LSE2, s_ob, s_ot, s_oh, Hk, Tq, GROUP, S,
                           D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr):
    """One query row (b, head, query) per program: merge the S partials into o_r, o_n and the
    row's final lse (log2 units, +inf for a row that saw nothing: its probabilities are 0)."""
    m = tl.program_id(0)  # g * Tq + qi
    hk = tl.program_id(1)
    b = tl.program_id(2)
    r = b * Hk + hk
    g = m // Tq
    qi = m - g * Tq
    h = (hk * GROUP + g).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    smask = offs_s < S
    prow = (r * S + offs_s).to(tl.int64) * BLOCK_M + m
    lse_s = tl.load(PL + prow, mask=smask, other=float("-inf"))
    mx = tl.max(lse_s, 0)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.math.exp2(lse_s - mx_safe)
    tot = tl.sum(w, 0)
    tot_safe = tl.where(tot == 0.0, 1.0, tot)
    pmask = smask[:, None] & (offs_d[None, :] < D)
    o_off = b.to(tl.int64) * s_ob + qi * s_ot + h * s_oh + offs_d
    pr = tl.load(PR + prow[:, None] * D + offs_d[None, :], mask=pmask, other=0.0)
    tl.store(OR + o_off, tl.sum(pr * w[:, None], 0) / tot_safe, mask=offs_d < D)
    pn = tl.load(PN + prow[:, None] * D + offs_d[None, :], mask=pmask, other=0.0)
    tl.store(ON + o_off, tl.sum(pn * w[:, None], 0) / tot_safe, mask=offs_d < D)
    tl.store(LSE2 + r * BLOCK_M + m, tl.where(tot == 0.0, float("inf"), mx_safe + tl.math.log2(tot_safe)))


@triton.jit
def _score_level(QP, KB, TOK, EB, SP, q_rows, rmask, lse2, r, R, sid, S, qk_scale,
                 lev: tl.constexpr, STEP: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, NARROW: tl.constexpr, EB_ALIGN: tl.constexpr):
    W: tl.constexpr = (lev + 1) * STEP
    WP: tl.constexpr = min(BLOCK_D, max(16, triton.next_power_of_2(W))) if NARROW else BLOCK_D
    BN: tl.constexpr = max(16, min(BLOCK_N * (BLOCK_D // WP), 4096 // BLOCK_M)) if NARROW else BLOCK_N
    lo, hi, tb, eb, offs_w, offs_n, wmask, qp = _level_tile(QP, TOK, EB, q_rows, rmask, r, R, sid, S, lev, W,
                                                            WP, BN, EB_ALIGN)
    for start in range(_loop_bound(lo), _loop_bound(hi), BN):
        cols = start + offs_n
        cmask = cols < hi
        el = eb + (cols - tb).to(tl.int64)[:, None] * W + offs_w[None, :]
        k = tl.load(KB + el, mask=cmask[:, None] & wmask[None, :], other=0.0)
        s = _dot(qp, tl.trans(k)) * qk_scale
        p = tl.math.exp2(s - lse2[:, None])
        p = tl.where(rmask[:, None] & cmask[None, :], p, 0.0)
        tl.store(SP + cols, tl.sum(p, 0), mask=cmask)


@triton.jit
def _pooled_scores_kernel(Q, QP, KB, TOK, EB, TK, LSE2, SP, ST,
                          s_qb, s_qt, s_qh, s_tkb, s_tkh, s_tkt, Hk, Tq, Tt, GROUP, R, S, qk_scale,
                          L: tl.constexpr, STEP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NARROW: tl.constexpr,
                          EB_ALIGN: tl.constexpr):
    """The attention each token received (``sum over the row's queries of exp2(s - lse2)``), split
    ``sid``'s slice of every level and of the tail; every token is written by exactly one program."""
    sid = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    r, rows, qi, rmask, q_rows, offs_d, dmask = _group_rows(b, hk, Hk, Tq, GROUP, s_qb, s_qt, s_qh, D, BLOCK_D, BLOCK_M)
    lse2 = tl.load(LSE2 + r * BLOCK_M + rows, mask=rmask, other=float("inf"))
    for lev in tl.static_range(L):
        _score_level(QP, KB, TOK, EB, SP, q_rows, rmask, lse2, r, R, sid, S, qk_scale, lev, STEP, BLOCK_D, BLOCK_M,
                     BLOCK_N, NARROW, EB_ALIGN)
    q = tl.load(Q + q_rows[:, None] + offs_d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
    diag = Tt - Tq
    lo, hi = _tail_span(sid, S, Tt, BLOCK_N)
    tk_base = TK + b.to(tl.int64) * s_tkb + hk.to(tl.int64) * s_tkh
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(_loop_bound(lo), _loop_bound(hi), BLOCK_N):
        cols = start + offs_n
        cmask = cols < hi
        k = tl.load(tk_base + cols[:, None].to(tl.int64) * s_tkt + offs_d[None, :],
                    mask=cmask[:, None] & dmask[None, :], other=0.0)
        s = _dot(q, tl.trans(k)) * qk_scale
        p = tl.math.exp2(s - lse2[:, None])
        p = tl.where(rmask[:, None] & cmask[None, :] & (cols[None, :] <= qi[:, None] + diag), p, 0.0)
        tl.store(ST + r.to(tl.int64) * Tt + cols, tl.sum(p, 0), mask=cmask)


#: most splits (the combine holds one [BLOCK_S, BLOCK_D] tile)
MAX_SPLITS = 64


def default_splits(rows: int, tokens_per_row: int, block_n: int, device: torch.device) -> int:
    """Splits so that ``rows * S`` is about one program per SM, with >= 4 full-width tiles' worth of
    tokens per split (1 for tiny shapes and whenever the rows alone fill about half the SMs). On
    the H100 (B=16, Hk=8: 128 rows, bench/kv_mixeddim_gpu.py, 2026-11-23) one split was the
    fastest (0.329 ms) and 2, 4, 5, 8, 16 splits took 0.398-0.422 ms; a second run (18:19 UTC) had
    2 splits fastest (0.337 ms; 1 split 0.382 ms): between 1 and 2 the order is within run-to-run
    noise."""
    want = _sm_count(device) // max(rows, 1)
    return max(1, min(want, tokens_per_row // (4 * block_n), MAX_SPLITS))


def default_cfg(d: int, rows_per_program: int) -> tuple[int, int, int, bool]:
    """(BLOCK_N, num_warps, num_stages, narrow) for the split kernels."""
    if _interpreting():
        return 16, 1, 1, True
    bd = max(16, triton.next_power_of_2(d))
    return (64 if bd <= 128 else 32), 4, 3, True


def _eb_align(step: int) -> int:
    """Largest power of 2 dividing ``step``, at most 16: every level's element base is a multiple."""
    return min(step & -step, 16)


def pooled_decode(q: torch.Tensor, qp: torch.Tensor, kbuf: torch.Tensor, vbuf: torch.Tensor, tok_off: torch.Tensor,
                  elem_base: torch.Tensor, step: int, tail_k: torch.Tensor, tail_v: torch.Tensor,
                  scale: float | None = None, scores: bool = True, num_splits: int | None = None,
                  cfg: tuple[int, int, int, bool] | None = None):
    """(o_n, o_r) [B, Tq, Hq, D] fp32 (tail part, natural order; pool part, value rank order;
    both already divided by the shared softmax sum) and, with ``scores``, the attention each
    pooled token (``[N]``) and each tail token (``[B, Hk, t]``) received, fp32 (else None).
    ``num_splits``: splits per row (>= 1; default :func:`default_splits`); ``cfg``: ``(BLOCK_N,
    num_warps, num_stages, narrow)`` (default :func:`default_cfg`)."""
    b, tq, hq, d, hk, levels = check_pooled(q, qp, kbuf, vbuf, tok_off, elem_base, step, tail_k, tail_v)
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"pooled_decode: num_splits must be an int >= 1 (or None for the default), got "
                         f"{num_splits!r}")
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
    # one device -> host copy: the token count (output size) and the level bases (alignment hint)
    host = torch.cat([tok_off[-1, -1:], elem_base]).tolist() if levels else [0]
    n_tok = int(host[0])
    align = _eb_align(step)
    if any(e % align for e in host[1:]):  # not the layout's bases: no alignment hint
        align = 1
    BM = max(16, triton.next_power_of_2(G * tq))
    BD = max(16, triton.next_power_of_2(d))
    bn, warps, stages, narrow = cfg if cfg is not None else default_cfg(d, G * tq)
    if cfg is not None and (bn < 16 or bn & (bn - 1)):
        raise ValueError(f"pooled_decode: cfg BLOCK_N must be a power of 2 >= 16, got {bn}")
    S = num_splits or default_splits(R, n_tok // max(R, 1) + tt, bn, dev)
    S = min(S, MAX_SPLITS)
    o_r = empty((b, tq, hq, d), dtype=torch.float32, device=dev)
    o_n = empty((b, tq, hq, d), dtype=torch.float32, device=dev)
    lse2 = empty((R, BM), dtype=torch.float32, device=dev)
    pr = empty((R, S, BM, d), dtype=torch.float32, device=dev)
    pn = empty((R, S, BM, d), dtype=torch.float32, device=dev)
    pl = empty((R, S, BM), dtype=torch.float32, device=dev)
    kb = kbuf if kbuf.numel() else torch.zeros(1, dtype=tail_k.dtype, device=dev)
    vb = vbuf if vbuf.numel() else torch.zeros(1, dtype=tail_v.dtype, device=dev)
    tok, eb = tok_off.contiguous(), elem_base.contiguous()
    common = dict(L=levels, STEP=step, D=d, BLOCK_D=BD, BLOCK_M=BM, BLOCK_N=bn, NARROW=bool(narrow),
                  EB_ALIGN=align)
    _pooled_split_kernel[(S, hk, b)](
        q, qp, kb, vb, tok, eb, tail_k, tail_v, pr, pn, pl,
        q.stride(0), q.stride(1), q.stride(2), tail_k.stride(0), tail_k.stride(1), tail_k.stride(2),
        tail_v.stride(0), tail_v.stride(1), tail_v.stride(2),
        hk, tq, tt, G, R, S, scale * LOG2E, **common, num_warps=warps, num_stages=stages)
    _pooled_combine_kernel[(G * tq, hk, b)](
        pr, pn, pl, o_r, o_n, lse2, o_r.stride(0), o_r.stride(1), o_r.stride(2), hk, tq, G, S,
        D=d, BLOCK_D=BD, BLOCK_M=BM, BLOCK_S=max(2, triton.next_power_of_2(S)),
        num_warps=1 if _interpreting() else 4)
    if not scores:
        return o_n, o_r, None, None
    s_pool = empty((max(n_tok, 1),), dtype=torch.float32, device=dev)
    s_tail = empty((b, hk, max(tt, 1)), dtype=torch.float32, device=dev)
    _pooled_scores_kernel[(S, hk, b)](
        q, qp, kb, tok, eb, tail_k, lse2, s_pool, s_tail,
        q.stride(0), q.stride(1), q.stride(2), tail_k.stride(0), tail_k.stride(1), tail_k.stride(2),
        hk, tq, tt, G, R, S, scale * LOG2E, **common, num_warps=warps, num_stages=stages)
    return o_n, o_r, s_pool[:n_tok], s_tail[..., :tt]
