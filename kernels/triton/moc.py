"""Mixture of Contexts (``context.moc``) in Triton: block-sparse flash attention over the chunks
each query selected, forward and backward, on the shared online-softmax core.

Routing (:func:`moc_route`) is the reference's chunk means and scores in torch, then
:func:`_moc_select_kernel` for the top-k with the shared tie-breaking (drop-off / drop-in take
the torch ``plugins.context.reference.moc_routing``); the shape-only geometry is cached, so the
step makes no host sync. It gives a selection ``sel[b, h, i, c]`` (own chunk included), the chunk
bounds and each row's exclusive key limit ``lim[i]`` (``pos_i + 1`` causal, ``Tk`` otherwise).
Small kernels then build the block lists (:func:`_moc_qlist_kernel`, :func:`_moc_klist_q_kernel`;
the torch :func:`moc_block_lists` builds the same lists and is the tests' yardstick):

* forward / dQ: for every (batch, query head, query block of BLOCK_M rows), the ascending list of
  chunks selected by at least one row of the block;
* dK/dV: for every (batch, kv head, key block of BLOCK_N keys), the list of query blocks in which
  some row of some head of the GQA group selected a chunk touching the key block (or, for key
  blocks overlapping the prefix, every query block that can see them).

Forward kernel: per (query block, head, batch) it sweeps the prefix segment ``[0, prefix)`` and
then each listed chunk restricted to ``[max(start, prefix), end)`` (so no key is counted twice)
with :func:`attention.attn_fwd_inner` unchanged: the key base pointer is moved to the segment
start, ``Tk`` is the segment length, and the per-row selection and causal limit are folded into
the ``offs_m`` argument of its causal mask (``key_rel <= offs_m + diag`` with ``diag = 0`` and
``offs_m = lim_i - 1 - start`` for a row that selected the chunk, ``-1`` for one that did not).
The dQ kernel reuses :func:`attention.attn_bwd_dq_inner` the same way; the preprocess kernel
(delta, lse2) is the core's. When the chunk segments are equal in length (:func:`_flat_seg_len`),
both instead run ONE loop over (listed chunk, tile) pairs (:func:`_flat_tile` gives each tile's
keys, values and mask; the steps are the core's :func:`attention.attn_fwd_tile` /
:func:`attention.attn_bwd_dq_tile`), so the software pipeline is not drained per chunk. When the shapes predict that per-block unions
cover nearly every chunk (fixed chunks, :data:`DENSE_ORDER_MIN`), the forward skips the lists and
walks every causal key tile in the dense core's order instead (:func:`_moc_fwd_dense_kernel`;
unselected chunks are masked per row with a 0 / -inf bias, not skipped), and so does dQ
(:func:`_moc_dq_dense_kernel`, lse2 = +inf for such rows). dK/dV need a per-(key,
row) selection, which the core's
``attn_bwd_dkdv_inner`` cannot express (its query rows are internal), so :func:`_moc_dkdv_kernel`
has its own loop over the listed query blocks (group heads inside the program: no atomics); each
step of it is the core's :func:`attention.attn_bwd_dkdv_tile` with the selection as the mask.

Key-major path (MoBA-style, for routing where neighbouring queries choose differently and the
per-block unions above cover nearly every chunk): a counting sort lists, per (batch, head, chunk),
the rows that chose it; :func:`_moc_km_fwd_kernel` attends each tile of gathered rows to one
chunk and writes a partial (o, lse) per (row, chunk), :func:`_moc_km_combine_kernel` merges them
per row with the prefix segment. Backward: :func:`_moc_km_dkdv_kernel` (per key block of a chunk,
over its gathered rows; optional atomic dQ) and :func:`_moc_km_dq_kernel` + combine (per-(row,
chunk) fp32 partials: deterministic). ``PATH`` / ``BLOCKZOO_MOC_PATH`` = auto | query | key; auto
compares the two paths' tile counts (:func:`_plan`).

Under ``TRITON_INTERPRET=1`` it runs on CPU tensors (interpreter quirks handled by the core's
``_loop_bound`` / ``_dot`` helpers). Custom ops: ``blockzoo::moc_fwd`` / ``blockzoo::moc_bwd``
with ``register_fake`` and ``register_autograd``.
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._customop import bwd_row_stats
from .attention import (
    LOG2E,
    _alloc,
    _block_d,
    _check,
    _check_i32,
    _dot,
    _interpreting,
    _load_tile,
    _loop_bound,
    _store_tile,
    _unit_last,
    attn_bwd_dkdv_tile,
    attn_bwd_dq_inner,
    attn_bwd_dq_tile,
    attn_fwd_finish,
    attn_fwd_finish_log2,
    attn_fwd_inner,
    attn_fwd_tile,
    attn_fwd_tile_rows,
)

__all__ = ["moc_attention", "moc_attention_fwd", "moc_block_lists", "moc_route", "key_major_lists", "BLOCKS",
           "KM_BLOCKS", "PATH"]


def _blocks(block_d: int, esize: int = 2, kind: str = "fwd") -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of a query-major kernel: ``kind`` "fwd" / "dq"
    (BLOCK_M query rows per program, BLOCK_N key step) or "dkdv" (BLOCK_N keys per program,
    BLOCK_M query step; its lists are built at that step)."""
    if _interpreting():
        return BLOCKS.get(f"interp_{kind}", BLOCKS.get("interp", (16, 16, 4, 1)))
    for key in (f"cuda_{kind}", "cuda"):   # tuning scripts (bench/moc_tune.py) set these
        if key in BLOCKS:
            return BLOCKS[key]
    if esize > 2 and block_d > 64:   # fp32 operands: 64x64 tiles at D=128 overflow shared memory (H100)
        return (32, 32, 4, 2) if block_d <= 128 else (32, 32, 4, 1)
    if block_d <= 64:
        return (64, 64, 4, 3)
    if block_d <= 128:
        # H100 sweep (bench/moc_profile.py, T = 8192, bf16): the forward gains from a third
        # stage (0.91 vs 1.00 ms), dK/dV from 128-key blocks over 64-row steps with 8 warps
        # (about 1.7 vs 2.9 ms: each Q / dO tile loaded serves 128 keys); dQ keeps 64 x 64 x 4 x 2
        return {"fwd": (64, 64, 4, 3), "dq": (64, 64, 4, 2), "dkdv": (64, 128, 8, 2)}[kind]
    return (32, 32, 4, 1)


#: the forward and dQ walk every listed chunk's key tiles in one loop when the chunk segments
#: are (nearly) equal in length (:func:`_flat_seg_len`); False: one loop per listed chunk (the
#: A/B switch of bench/moc_profile.py). H100, T = 8192, chunk 512, top_k 8, same run:
#: forward+backward 3.52 vs 3.68 ms (random), 3.10 vs 3.22 ms (coherent)
FLAT_CHUNKS = True

#: the dK/dV kernel walks a key block's listed query blocks past its causal cut (KMeta's n_diag
#: on) with the per-row selection folded into lse2 (no per-pair mask); False: every listed block
#: takes the per-pair mask (the A/B switch of bench/moc_profile.py). H100, T = 8192, chunk 512,
#: top_k 8, same run: dK/dV 1.535 vs 1.598 ms (random), 1.342 vs 1.396 ms (coherent). The same
#: fold in the forward (a 0 / -inf row bias) and dQ was slower or equal there (0.842 vs 0.816 ms
#: forward), so they keep the per-pair mask.
ROW_MASKS = True

#: tests may set BLOCKS["interp"] = (BM, BN, warps, stages) to exercise other tilings, tuning
#: scripts BLOCKS["cuda"]; a key with a kind suffix ("interp_dkdv", "cuda_fwd", "cuda_dq", ...)
#: sets one kernel's tiles and wins over the plain key
BLOCKS: dict = {}


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _moc_select_kernel(S, Own, Lim, Sel, Tq, C, TOPK, CAUSAL: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    """Routing selection for BLOCK_R query rows of one (batch, head): candidates (causal: chunks
    before the own chunk; otherwise every chunk but the own one), top-k by TOPK rounds of row
    max (lowest chunk index among equal scores, as the reference's stable order), own chunk
    added. S: fp32 scores [B, Hq, Tq, C]; Sel: uint8, same layout."""
    pid_r = tl.program_id(0)
    bh = tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < Tq
    m2 = rmask[:, None] & (cols < C)[None, :]
    offs = bh.to(tl.int64) * Tq * C + rows.to(tl.int64)[:, None] * C + cols[None, :]
    s = tl.load(S + offs, mask=m2, other=float("-inf"))
    own = tl.load(Own + rows, mask=rmask, other=-1)
    if CAUSAL:
        lim = tl.load(Lim + rows, mask=rmask, other=0)
        cand = (cols[None, :] < own[:, None]) & (lim > 0)[:, None]
    else:
        cand = cols[None, :] != own[:, None]
    s = tl.where(cand & m2, s, float("-inf"))
    sel = (cols[None, :] == own[:, None]) & (own >= 0)[:, None]
    for _ in range(0, TOPK):
        mx = tl.max(s, axis=1)
        idx = tl.min(tl.where(s == mx[:, None], cols[None, :], BLOCK_C), axis=1)
        pick = (cols[None, :] == idx[:, None]) & (mx > float("-inf"))[:, None]
        sel = sel | pick
        s = tl.where(pick, float("-inf"), s)
    tl.store(Sel + offs, sel.to(tl.uint8), mask=m2)


@triton.jit
def _flagged_first(flag):
    """Positions that list the set entries of 0/1 ``flag`` first, then the others, each in
    ascending order (a stable partition), and the count of set entries."""
    cnt = tl.sum(flag, axis=0)
    return tl.where(flag > 0, tl.cumsum(flag, axis=0) - 1, cnt + tl.cumsum(1 - flag, axis=0) - 1), cnt


@triton.jit
def _moc_qlist_kernel(Sel, Lim, QList, QCount, U, BlkLim, Tq, C, NQB, NSB, BLOCK_M: tl.constexpr,
                      SUB: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, LIST: tl.constexpr,
                      UNION: tl.constexpr):
    """Per (query block of BLOCK_M rows, head, batch). LIST: the chunks selected by any row of
    the block, ascending, then the others ascending (QList [B, Hq, NQB, C]), and their count
    (QCount [B, Hq, NQB]). UNION: the same union per sub-block of BLOCK_S rows (BLOCK_M a
    multiple of BLOCK_S) as uint8 U [B, Hq, NSB, C], and (batch 0, head 0) each sub-block's
    largest and smallest row limits BlkLim [2, NSB] (the backward's key-block lists,
    :func:`_moc_klist_q_kernel`)."""
    qb = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    bh = b * tl.num_programs(1) + h
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    base = bh.to(tl.int64) * Tq * C
    blk = tl.zeros([BLOCK_C], dtype=tl.int32)
    for s0 in tl.static_range(0, BLOCK_M, BLOCK_S):
        part = tl.zeros([BLOCK_C], dtype=tl.int32)
        for r0 in range(0, BLOCK_S, SUB):
            rows = qb * BLOCK_M + s0 + r0 + tl.arange(0, SUB)
            m2 = (rows < Tq)[:, None] & cmask[None, :]
            x = tl.load(Sel + base + rows.to(tl.int64)[:, None] * C + cols[None, :], mask=m2, other=0)
            part = tl.maximum(part, tl.max(x.to(tl.int32), axis=0))
        blk = tl.maximum(blk, part)
        if UNION:
            sb = qb * (BLOCK_M // BLOCK_S) + s0 // BLOCK_S
            tl.store(U + (bh.to(tl.int64) * NSB + sb) * C + cols, part.to(tl.uint8), mask=cmask & (sb < NSB))
            if bh == 0:   # the row limits are the same for every (batch, head)
                srows = sb * BLOCK_S + tl.arange(0, BLOCK_S)
                lims = tl.load(Lim + srows, mask=srows < Tq, other=0)
                tl.store(BlkLim + sb, tl.max(lims, axis=0), mask=sb < NSB)
                tl.store(BlkLim + NSB + sb, tl.min(tl.where(srows < Tq, lims, 2147483647), axis=0),
                         mask=sb < NSB)
    if LIST:
        pos, cnt = _flagged_first(blk)
        out = (bh.to(tl.int64) * NQB + qb)
        tl.store(QList + out * C + pos, cols, mask=cmask)
        tl.store(QCount + out, cnt)


@triton.jit
def _moc_klist_q_kernel(U, BlkLim, Bounds, KList, KMeta, C, NSB, GROUP, PREFIX, Tk,
                        BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr, LOGS: tl.constexpr):
    """Per (key block of BLOCK_N keys, kv head, batch): the query sub-blocks (rows of U) in which
    some row of some head of the GQA group selected a chunk touching the key block, or every
    sub-block that can see it when it overlaps the prefix, restricted to sub-blocks whose
    largest row limit passes the block start; ascending, then the others ascending (KList [B,
    Hk, NKB, NSB]); KMeta [B, Hk, NKB, 4] = (count, first chunk, last chunk + 1, n_diag):
    listed sub-blocks from position n_diag on have every row's limit past the key block's last
    key (no per-pair causal mask there). The same lists as the torch :func:`moc_block_lists`
    (its ``klist`` / ``kmeta``)."""
    kb = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    nkb = tl.num_programs(0)
    kstart = kb * BLOCK_N
    kend = tl.minimum(kstart + BLOCK_N, Tk) - 1
    c_first = _find_segment(Bounds, kstart, C, LOGS)   # the chunk holding the first key
    c_last = _find_segment(Bounds, kend, C, LOGS)
    qs = tl.arange(0, BLOCK_Q)
    qmask = qs < NSB
    need = tl.zeros([BLOCK_Q], dtype=tl.int32)
    h0 = (b * (tl.num_programs(1) * GROUP) + hk * GROUP).to(tl.int64)
    for g in range(0, GROUP):
        ub = U + (h0 + g) * NSB * C
        for c in range(_loop_bound(c_first), _loop_bound(c_last + 1)):
            need = tl.maximum(need, tl.load(ub + qs.to(tl.int64) * C + c, mask=qmask, other=0).to(tl.int32))
    blim = tl.load(BlkLim + qs, mask=qmask, other=0)
    if kstart < PREFIX:
        need = need * 0 + 1
    need = tl.where(qmask & (blim > kstart), need, 0)
    pos, cnt = _flagged_first(need)
    blim_min = tl.load(BlkLim + NSB + qs, mask=qmask, other=0)
    n_diag = tl.max(tl.where((need > 0) & (blim_min <= kend), pos + 1, 0), axis=0)
    row = ((b * tl.num_programs(1) + hk) * nkb + kb).to(tl.int64)
    tl.store(KList + row * NSB + pos, qs, mask=qmask)
    tl.store(KMeta + row * 4, cnt)
    tl.store(KMeta + row * 4 + 1, c_first)
    tl.store(KMeta + row * 4 + 2, c_last + 1)
    tl.store(KMeta + row * 4 + 3, n_diag)


@triton.jit
def _listed_chunk(QList, Bounds, Sel, lst, t, sel_row, offs_m, rmask, C, PREFIX):
    """Listed chunk ``t`` of a query block: its segment ``[ja, jb)`` with ``ja = max(start,
    PREFIX)`` (prefix keys are swept once, before the chunks) and whether each row selected it."""
    c = tl.load(QList + lst + t)
    ja = tl.maximum(tl.load(Bounds + c), PREFIX)
    jb = tl.load(Bounds + c + 1)
    return ja, jb, tl.load(Sel + sel_row + offs_m.to(tl.int64) * C + c, mask=rmask, other=0) != 0


@triton.jit
def _chunk_segment(QList, Bounds, Sel, lst, t, sel_row, offs_m, rmask, lim, C, PREFIX):
    """:func:`_listed_chunk` for the per-chunk loops: segment start, length, and the ``offs_m``
    argument of the core's causal mask over it (``lim_i - 1 - ja`` for rows that selected the
    chunk, ``-1``: nothing visible, otherwise)."""
    ja, jb, chose = _listed_chunk(QList, Bounds, Sel, lst, t, sel_row, offs_m, rmask, C, PREFIX)
    return ja, tl.maximum(jb - ja, 0), tl.where(chose, lim - 1 - ja, -1)


@triton.jit
def _flat_tile(QList, Bounds, Sel, lst, sel_row, offs_m, rmask, lim, i, TPC, C, PREFIX, k_base, v_base, s_kt, s_vt,
               offs_d, D: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr):
    """Tile ``i`` of a query block's flattened chunk loop (TPC tiles per listed chunk): its key
    and value tiles (keys from ``max(start, PREFIX)``, zero past the segment end) and ``valid``
    [BLOCK_M, BLOCK_N]: key < min(lim_row, end) for rows that selected the chunk, one compare
    per pair. Tiles past a short segment's end are all invalid."""
    e = i // TPC
    ja, jb, chose = _listed_chunk(QList, Bounds, Sel, lst, e, sel_row, offs_m, rmask, C, PREFIX)
    row_end = tl.where(chose, tl.minimum(lim, jb), 0)
    cols = ja + (i - e * TPC) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = _load_tile(k_base, cols, s_kt, offs_d, jb, D, True, EVEN_D)
    v = _load_tile(v_base, cols, s_vt, offs_d, jb, D, True, EVEN_D)
    return k, v, cols[None, :] < row_end[:, None]


@triton.jit
def _moc_fwd_kernel(Q, K, V, Out, LSE, Sel, Lim, Bounds, QList, QCount,
                    s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_ob, s_ot, s_oh,
                    Hq, Tq, GROUP, C, NQB, PREFIX, qk_scale, TPC,
                    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, FLAT: tl.constexpr):
    EVEN_D: tl.constexpr = D == BLOCK_D
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    hk = h // GROUP
    q_base = Q + b * s_qb + h.to(tl.int64) * s_qh
    k_base = K + b * s_kb + hk.to(tl.int64) * s_kh
    v_base = V + b * s_vb + hk.to(tl.int64) * s_vh
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(q_base, offs_m, s_qt, offs_d, Tq, D, True, EVEN_D)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lim = tl.load(Lim + offs_m, mask=offs_m < Tq, other=0)
    if PREFIX > 0:
        # prefix keys [0, PREFIX): visible to every row up to its limit
        hi = tl.cdiv(PREFIX, BLOCK_N) * BLOCK_N
        acc, m_i, l_i = attn_fwd_inner(acc, m_i, l_i, q, k_base, v_base, s_kt, s_vt, lim - 1, offs_d,
                                       0, hi, qk_scale, PREFIX, 0, D, BLOCK_N, True, True, EVEN_D, False)
    sel_row = (b * Hq + h) * Tq * C
    lst = (b * Hq + h) * NQB * C + pid_m * C
    cnt = tl.load(QCount + (b * Hq + h) * NQB + pid_m)
    rmask = offs_m < Tq
    if FLAT:
        # one loop over (listed chunk, tile) pairs, so the pipeline does not drain per chunk
        for i in range(0, _loop_bound(cnt * TPC)):
            k, v, valid = _flat_tile(QList, Bounds, Sel, lst, sel_row, offs_m, rmask, lim, i, TPC, C, PREFIX,
                                     k_base, v_base, s_kt, s_vt, offs_d, D, BLOCK_N, EVEN_D)
            acc, m_i, l_i = attn_fwd_tile(acc, m_i, l_i, _dot(q, tl.trans(k)), v, valid, qk_scale)
    else:
        for t in range(0, _loop_bound(cnt)):
            ja, seg, rows = _chunk_segment(QList, Bounds, Sel, lst, t, sel_row, offs_m, rmask, lim, C, PREFIX)
            hi = tl.cdiv(seg, BLOCK_N) * BLOCK_N
            acc, m_i, l_i = attn_fwd_inner(acc, m_i, l_i, q, k_base + ja * s_kt, v_base + ja * s_vt, s_kt, s_vt,
                                           rows, offs_d, 0, hi, qk_scale, seg, 0, D, BLOCK_N,
                                           True, True, EVEN_D, False)
    o, lse = attn_fwd_finish(acc, m_i, l_i)
    _store_tile(Out + b * s_ob + h.to(tl.int64) * s_oh, o.to(Out.dtype.element_ty), offs_m, s_ot, offs_d,
                Tq, D, EVEN_D)
    tl.store(LSE + (b * Hq + h) * Tq + offs_m, lse, mask=offs_m < Tq)


@triton.jit
def _dense_block(Q, K, V, Sel, Lim, s_qb, s_qt, s_qh, s_kb, s_kh, s_vb, s_vh, Hq, Tq, GROUP, C, PREFIX,
                 D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 EVEN_D: tl.constexpr):
    """What both dense-order kernels start with: the program's query block (latest, the heaviest
    under causal, first), batch, head, rows, query tile, its kv head's key / value bases, row
    limits, selection rows, and its key range: tiles ``[PREFIX, n_full)`` lie below every row's
    limit, ``[n_full, hi)`` cross the causal edge (hi: the rows' largest limit)."""
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    hk = (h // GROUP).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rmask = offs_m < Tq
    q = _load_tile(Q + b * s_qb + h.to(tl.int64) * s_qh, offs_m, s_qt, offs_d, Tq, D, True, EVEN_D)
    lim = tl.load(Lim + offs_m, mask=rmask, other=0)
    sel_rows = Sel + (b * Hq + h) * Tq * C + offs_m.to(tl.int64) * C
    n_full = tl.maximum((tl.min(tl.where(rmask, lim, 2147483647), 0) // BLOCK_N) * BLOCK_N, PREFIX)
    hi = tl.maximum(tl.max(tl.where(rmask, lim, 0), 0), PREFIX)
    return (b, h, offs_m, offs_d, rmask, q, K + b * s_kb + hk * s_kh, V + b * s_vb + hk * s_vh, lim, sel_rows,
            n_full, hi)


@triton.jit
def _dense_tile(sel_rows, rmask, start_n, CHUNK, k_base, v_base, s_kt, s_vt, offs_d, hi,
                D: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr):
    """Key tile at ``start_n`` of a dense-order walk: its columns, key and value tiles (rows past
    ``hi`` zero with MASKED) and which rows selected its chunk, ``keep`` [BLOCK_M]."""
    start_n = tl.multiple_of(start_n, BLOCK_N)
    cols = start_n + tl.arange(0, BLOCK_N)
    keep = tl.load(sel_rows + start_n // CHUNK, mask=rmask, other=0) != 0
    k = _load_tile(k_base, cols, s_kt, offs_d, hi, D, MASKED, EVEN_D)
    v = _load_tile(v_base, cols, s_vt, offs_d, hi, D, MASKED, EVEN_D)
    return cols, k, v, keep


@triton.jit
def _moc_fwd_dense_kernel(Q, K, V, Out, LSE, Sel, Lim,
                          s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_ob, s_ot, s_oh,
                          Hq, Tq, GROUP, C, PREFIX, CHUNK, qk_scale,
                          D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, NEG_SCALE: tl.constexpr):
    """The forward in the dense core's order (fixed chunks of CHUNK keys; CHUNK and PREFIX
    multiples of BLOCK_N): per query block, every key tile from PREFIX up to its rows' largest
    limit, whether or not a row selected the tile's chunk. Below every row's limit the selection
    is a per-row bias (:func:`attention.attn_fwd_tile_rows`: no per-pair mask, plain loads);
    across the causal edge, the per-pair mask. No chunk lists. For routings whose per-block
    unions cover (nearly) every chunk, where the list walk visits the same tiles at a higher
    cost per tile (:data:`DENSE_ORDER_MIN`)."""
    EVEN_D: tl.constexpr = D == BLOCK_D
    b, h, offs_m, offs_d, rmask, q, k_base, v_base, lim, sel_rows, n_full, hi = _dense_block(
        Q, K, V, Sel, Lim, s_qb, s_qt, s_qh, s_kb, s_kh, s_vb, s_vh, Hq, Tq, GROUP, C, PREFIX,
        D, BLOCK_D, BLOCK_M, BLOCK_N, EVEN_D)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if PREFIX > 0:
        acc, m_i, l_i = attn_fwd_inner(acc, m_i, l_i, q, k_base, v_base, s_kt, s_vt, lim - 1, offs_d,
                                       0, PREFIX, qk_scale, PREFIX, 0, D, BLOCK_N, True, True, EVEN_D, False)
    for start_n in range(_loop_bound(PREFIX), _loop_bound(n_full), BLOCK_N):
        cols, k, v, keep = _dense_tile(sel_rows, rmask, start_n, CHUNK, k_base, v_base, s_kt, s_vt, offs_d, hi,
                                       D, BLOCK_N, EVEN_D, False)
        acc, m_i, l_i = attn_fwd_tile_rows(acc, m_i, l_i, _dot(q, tl.trans(k)), v, keep, qk_scale, NEG_SCALE)
    for start_n in range(_loop_bound(n_full), _loop_bound(hi), BLOCK_N):
        cols, k, v, keep = _dense_tile(sel_rows, rmask, start_n, CHUNK, k_base, v_base, s_kt, s_vt, offs_d, hi,
                                       D, BLOCK_N, EVEN_D, True)
        valid = keep[:, None] & (cols[None, :] < lim[:, None])
        acc, m_i, l_i = attn_fwd_tile(acc, m_i, l_i, _dot(q, tl.trans(k)), v, valid, qk_scale)
    o, lse = attn_fwd_finish(acc, m_i, l_i)
    _store_tile(Out + b * s_ob + h.to(tl.int64) * s_oh, o.to(Out.dtype.element_ty), offs_m, s_ot, offs_d,
                Tq, D, EVEN_D)
    tl.store(LSE + (b * Hq + h) * Tq + offs_m, lse, mask=rmask)


@triton.jit
def _moc_dq_dense_kernel(Q, K, V, DO, DQ, LSE2, DELTA, Sel, Lim,
                         s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,
                         s_db, s_dt, s_dh, s_dqb, s_dqt, s_dqh,
                         Hq, Tq, GROUP, C, PREFIX, CHUNK, qk_scale, sm_scale,
                         D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    """dQ in the dense core's order, as :func:`_moc_fwd_dense_kernel`: below every row's limit a
    row that did not select a tile's chunk gets lse2 = +inf there (p = 0, the core's unmasked
    step); across the causal edge, the per-pair mask."""
    EVEN_D: tl.constexpr = D == BLOCK_D
    b, h, offs_m, offs_d, rmask, q, k_base, v_base, lim, sel_rows, n_full, hi = _dense_block(
        Q, K, V, Sel, Lim, s_qb, s_qt, s_qh, s_kb, s_kh, s_vb, s_vh, Hq, Tq, GROUP, C, PREFIX,
        D, BLOCK_D, BLOCK_M, BLOCK_N, EVEN_D)
    do = _load_tile(DO + b * s_db + h.to(tl.int64) * s_dh, offs_m, s_dt, offs_d, Tq, D, True, EVEN_D)
    row = (b * Hq + h) * Tq + offs_m
    lse2 = tl.load(LSE2 + row, mask=rmask, other=float("inf"))
    delta = tl.load(DELTA + row, mask=rmask, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if PREFIX > 0:
        dq = attn_bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, s_kt, s_vt, lim - 1, offs_d,
                               0, PREFIX, qk_scale, PREFIX, 0, D, BLOCK_N, True, True, EVEN_D)
    for start_n in range(_loop_bound(PREFIX), _loop_bound(n_full), BLOCK_N):
        cols, k, v, keep = _dense_tile(sel_rows, rmask, start_n, CHUNK, k_base, v_base, s_kt, s_vt, offs_d, hi,
                                       D, BLOCK_N, EVEN_D, False)
        dq = attn_bwd_dq_tile(dq, q, do, tl.where(keep, lse2, float("inf")), delta, k, v, keep, qk_scale, False)
    for start_n in range(_loop_bound(n_full), _loop_bound(hi), BLOCK_N):
        cols, k, v, keep = _dense_tile(sel_rows, rmask, start_n, CHUNK, k_base, v_base, s_kt, s_vt, offs_d, hi,
                                       D, BLOCK_N, EVEN_D, True)
        valid = keep[:, None] & (cols[None, :] < lim[:, None])
        dq = attn_bwd_dq_tile(dq, q, do, lse2, delta, k, v, valid, qk_scale, True)
    dq = dq * sm_scale
    _store_tile(DQ + b * s_dqb + h.to(tl.int64) * s_dqh, dq.to(DQ.dtype.element_ty), offs_m, s_dqt,
                offs_d, Tq, D, EVEN_D)


@triton.jit
def _moc_dq_kernel(Q, K, V, DO, DQ, LSE2, DELTA, Sel, Lim, Bounds, QList, QCount,
                   s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,
                   s_db, s_dt, s_dh, s_dqb, s_dqt, s_dqh,
                   Hq, Tq, GROUP, C, NQB, PREFIX, qk_scale, sm_scale, TPC,
                   D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, FLAT: tl.constexpr):
    EVEN_D: tl.constexpr = D == BLOCK_D
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
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
    lim = tl.load(Lim + offs_m, mask=rmask, other=0)
    if PREFIX > 0:
        hi = tl.cdiv(PREFIX, BLOCK_N) * BLOCK_N
        dq = attn_bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, s_kt, s_vt, lim - 1, offs_d,
                               0, hi, qk_scale, PREFIX, 0, D, BLOCK_N, True, True, EVEN_D)
    sel_row = (b * Hq + h) * Tq * C
    lst = (b * Hq + h) * NQB * C + pid_m * C
    cnt = tl.load(QCount + (b * Hq + h) * NQB + pid_m)
    if FLAT:
        for i in range(0, _loop_bound(cnt * TPC)):
            k, v, valid = _flat_tile(QList, Bounds, Sel, lst, sel_row, offs_m, rmask, lim, i, TPC, C, PREFIX,
                                     k_base, v_base, s_kt, s_vt, offs_d, D, BLOCK_N, EVEN_D)
            dq = attn_bwd_dq_tile(dq, q, do, lse2, delta, k, v, valid, qk_scale, True)
    else:
        for t in range(0, _loop_bound(cnt)):
            ja, seg, rows = _chunk_segment(QList, Bounds, Sel, lst, t, sel_row, offs_m, rmask, lim, C, PREFIX)
            hi = tl.cdiv(seg, BLOCK_N) * BLOCK_N
            dq = attn_bwd_dq_inner(dq, q, do, lse2, delta, k_base + ja * s_kt, v_base + ja * s_vt, s_kt, s_vt,
                                   rows, offs_d, 0, hi, qk_scale, seg, 0, D, BLOCK_N, True, True, EVEN_D)
    dq = dq * sm_scale
    _store_tile(DQ + b * s_dqb + h.to(tl.int64) * s_dqh, dq.to(DQ.dtype.element_ty), offs_m, s_dqt,
                offs_d, Tq, D, EVEN_D)


@triton.jit
def _moc_dkdv_loop(dk, dv, k, v, q_base, do_base, lse2_base, delta_base, sel_base, Lim, KList, lst, lo, hi,
                   offs_n, offs_d, nmask, in_prefix, chunk_n, c_one, all_rows, s_qt, s_qh, s_dt, s_dh, Tq, C, GROUP,
                   PREFIX, qk_scale, D: tl.constexpr, BLOCK_M: tl.constexpr, EVEN_D: tl.constexpr,
                   MODE: tl.constexpr):
    """:func:`_moc_dkdv_kernel`'s loop over its listed query blocks ``[lo, hi)`` x the GQA group.
    MODE 0: keys of several chunks (a per-(key, row) selection); 1: every key of the block is in
    chunk ``c_one`` (the selection is a per-row vector, the causal limit per pair); 2: as 1, and
    every row's limit is past the block (listed blocks from KMeta's n_diag on), so the mask is
    per row only and folds into lse2 (+inf for a row that did not select the chunk: p = 0);
    ``all_rows``: the block lies inside the prefix (every row sees it)."""
    offs_m0 = tl.arange(0, BLOCK_M)
    for it in range(_loop_bound(lo * GROUP), _loop_bound(hi * GROUP)):
        blk = it // GROUP
        g = it - blk * GROUP
        start_m = tl.load(KList + lst + blk) * BLOCK_M
        offs_m = start_m + offs_m0
        rmask = offs_m < Tq
        q = _load_tile(q_base + g * s_qh, offs_m, s_qt, offs_d, Tq, D, True, EVEN_D)
        lse2 = tl.load(lse2_base + g * Tq + offs_m, mask=rmask, other=float("inf"))
        valid = nmask[:, None]   # read only by MODE 0 and 1
        if MODE == 2:
            s1 = tl.load(sel_base + g * Tq * C + offs_m.to(tl.int64) * C + c_one, mask=rmask, other=0)
            lse2 = tl.where((s1 != 0) | all_rows, lse2, float("inf"))
        elif MODE == 1:
            # key n is visible to row m iff n < lim_m and (n < PREFIX or the row chose the
            # chunk): one compare per pair against a per-row limit (lim <= Tk covers nmask)
            lim = tl.load(Lim + offs_m, mask=rmask, other=0)
            s1 = tl.load(sel_base + g * Tq * C + offs_m.to(tl.int64) * C + c_one, mask=rmask, other=0)
            lim_eff = tl.where(s1 != 0, lim, tl.minimum(lim, PREFIX))
            valid = offs_n[:, None] < lim_eff[None, :]
        else:
            lim = tl.load(Lim + offs_m, mask=rmask, other=0)
            s = tl.load(sel_base + g * Tq * C + offs_m[None, :].to(tl.int64) * C + chunk_n[:, None],
                        mask=rmask[None, :] & nmask[:, None], other=0)
            valid = nmask[:, None] & (offs_n[:, None] < lim[None, :]) & ((s != 0) | in_prefix[:, None])
        do = _load_tile(do_base + g * s_dh, offs_m, s_dt, offs_d, Tq, D, True, EVEN_D)
        delta = tl.load(delta_base + g * Tq + offs_m, mask=rmask, other=0.0)
        dk, dv, _ = attn_bwd_dkdv_tile(dk, dv, k, v, q, do, lse2, delta, valid, qk_scale, MODE != 2)
    return dk, dv


@triton.jit
def _moc_dkdv_kernel(Q, K, V, DO, DK, DV, LSE2, DELTA, Sel, Lim, Bounds, KList, KMeta,
                     s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,
                     s_db, s_dt, s_dh, s_dkb, s_dkt, s_dkh, s_dvb, s_dvt, s_dvh,
                     Hq, Hk, Tq, Tk, GROUP, C, NQB, NKB, PREFIX, qk_scale, sm_scale,
                     D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, ROWS: tl.constexpr):
    """dK/dV of one key block over its listed query blocks x the GQA group (transposed FA2
    form). Key n is visible to row m of head g iff n < lim_m and (n < PREFIX or
    sel[g, m, chunk(n)])."""
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
    meta = KMeta + ((b * Hk + hk) * NKB + pid_n) * 4
    cnt = tl.load(meta)
    c_lo = tl.load(meta + 1)
    c_hi = tl.load(meta + 2)
    # chunk of each key (bounds are ascending; a linear scan over the block's chunk range)
    nmask = offs_n < Tk
    chunk_n = tl.zeros([BLOCK_N], dtype=tl.int32)
    for c in range(_loop_bound(c_lo), _loop_bound(c_hi)):
        start = tl.load(Bounds + c)
        chunk_n = tl.where(offs_n >= start, c, chunk_n)
    in_prefix = offs_n < PREFIX
    h0 = (hk * GROUP).to(tl.int64)
    q_base = Q + b * s_qb + h0 * s_qh
    do_base = DO + b * s_db + h0 * s_dh
    lse2_base = LSE2 + (b * Hq + h0) * Tq
    delta_base = DELTA + (b * Hq + h0) * Tq
    sel_base = Sel + (b * Hq + h0) * Tq * C
    lst = ((b * Hk + hk) * NKB + pid_n) * NQB
    # a key block inside one chunk (chunk sizes multiples of BLOCK_N: the common case) reads one
    # selection byte per query row instead of one per (key, row) pair; with ROWS its listed
    # blocks past the causal cut (KMeta's n_diag on) take the per-row mask alone, unless the key
    # block straddles the prefix end. Each copy of the loop is a top-level loop (pipelined).
    all_rows = n0 + BLOCK_N <= PREFIX
    n_pair = cnt
    if ROWS:
        if all_rows | (n0 >= PREFIX):
            n_pair = tl.load(meta + 3)
    if c_hi - c_lo == 1:
        dk, dv = _moc_dkdv_loop(dk, dv, k, v, q_base, do_base, lse2_base, delta_base, sel_base, Lim, KList, lst,
                                0, n_pair, offs_n, offs_d, nmask, in_prefix, chunk_n, c_lo, all_rows, s_qt, s_qh,
                                s_dt, s_dh, Tq, C, GROUP, PREFIX, qk_scale, D, BLOCK_M, EVEN_D, 1)
        if ROWS:
            dk, dv = _moc_dkdv_loop(dk, dv, k, v, q_base, do_base, lse2_base, delta_base, sel_base, Lim, KList,
                                    lst, n_pair, cnt, offs_n, offs_d, nmask, in_prefix, chunk_n, c_lo, all_rows,
                                    s_qt, s_qh, s_dt, s_dh, Tq, C, GROUP, PREFIX, qk_scale, D, BLOCK_M, EVEN_D, 2)
    else:
        dk, dv = _moc_dkdv_loop(dk, dv, k, v, q_base, do_base, lse2_base, delta_base, sel_base, Lim, KList, lst,
                                0, cnt, offs_n, offs_d, nmask, in_prefix, chunk_n, c_lo, all_rows, s_qt, s_qh,
                                s_dt, s_dh, Tq, C, GROUP, PREFIX, qk_scale, D, BLOCK_M, EVEN_D, 0)
    dk = dk * sm_scale
    _store_tile(DK + b * s_dkb + hk.to(tl.int64) * s_dkh, dk.to(DK.dtype.element_ty), offs_n, s_dkt,
                offs_d, Tk, D, EVEN_D)
    _store_tile(DV + b * s_dvb + hk.to(tl.int64) * s_dvh, dv.to(DV.dtype.element_ty), offs_n, s_dvt,
                offs_d, Tk, D, EVEN_D)


# ---------------------------------------------------------------------------------------------
# key-major path (MoBA-style): per (chunk, head) the rows that selected it, partials merged per row
# ---------------------------------------------------------------------------------------------

@triton.jit
def _moc_kcount_kernel(Sel, ColCnt, NSel, Tq, C, NRB, R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per (row block of R rows, head, batch): ColCnt [B, Hq, NRB, C] = rows of the block that
    selected each chunk; NSel [B, Hq, Tq] = chunks each row selected."""
    rb = tl.program_id(0)
    bh = (tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)).to(tl.int64)
    rows = rb * R + tl.arange(0, R)
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < Tq
    m2 = rmask[:, None] & (cols < C)[None, :]
    x = tl.load(Sel + bh * Tq * C + rows.to(tl.int64)[:, None] * C + cols[None, :], mask=m2, other=0)
    x = (x != 0).to(tl.int32)
    tl.store(ColCnt + (bh * NRB + rb) * C + cols, tl.sum(x, axis=0), mask=cols < C)
    tl.store(NSel + bh * Tq + rows, tl.sum(x, axis=1), mask=rmask)


@triton.jit
def _moc_klist_kernel(Sel, Base, Ent, Tq, C, NRB, NS, R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Counting-sort scatter: for every selected (row i, chunk c) of the block, the entry
    ``e = i * NS + slot`` (slot = rank of c among row i's chunks) goes to position
    ``Base[c] + (selecting rows of the block above i)`` of the per-(batch, head) entry array
    Ent [B, Hq, Tq * NS], whose chunk c segment thus lists its rows in ascending order."""
    rb = tl.program_id(0)
    bh = (tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)).to(tl.int64)
    rows = rb * R + tl.arange(0, R)
    cols = tl.arange(0, BLOCK_C)
    m2 = (rows < Tq)[:, None] & (cols < C)[None, :]
    x = tl.load(Sel + bh * Tq * C + rows.to(tl.int64)[:, None] * C + cols[None, :], mask=m2, other=0)
    x = (x != 0).to(tl.int32)
    slot = tl.cumsum(x, axis=1) - x
    above = tl.cumsum(x, axis=0) - x
    base = tl.load(Base + (bh * NRB + rb) * C + cols, mask=cols < C, other=0)
    dest = base[None, :] + above
    tl.store(Ent + bh * Tq * NS + dest, rows[:, None] * NS + slot, mask=m2 & (x != 0))


@triton.jit
def _find_segment(Off, t, NSEG, LOGS: tl.constexpr):
    """The largest s in [0, NSEG) with Off[s] <= t, for ascending Off with Off[0] = 0 <= t < Off[NSEG]
    (binary search, LOGS >= ceil(log2(NSEG)) steps)."""
    lo = t * 0
    hi = lo + NSEG
    for _ in tl.static_range(LOGS):
        mid = (lo + hi) // 2
        go = tl.load(Off + mid) <= t
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    return lo


@triton.jit
def _km_tile(TileOff, ChunkOff, Cnt, Ent, Lim, Bounds, t, bh, Tq, C, NS, PREFIX,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LOGS: tl.constexpr):
    """Program t of (batch, head) ``bh`` in the key-major work list: its chunk, gathered rows
    (``Tq`` for padding), their entries, key segment ``[ja, ja + seg)``, each row's causal
    argument for the core's mask (``lim - 1 - ja``, -1 for padding) and the key ranges: unmasked
    ``[0, n_full)`` (every row sees every key), masked ``[n_full, hi)``; ``hi = 0`` when ``t``
    is past the last tile."""
    toff = TileOff + bh * (C + 1)
    total = tl.load(toff + C)
    active = t < total
    tt = tl.minimum(t, tl.maximum(total - 1, 0))
    c = _find_segment(toff, tt, C, LOGS)
    j = tt - tl.load(toff + c)
    n = tl.load(Cnt + bh * C + c)
    e0 = tl.load(ChunkOff + bh * C + c)
    r = j * BLOCK_M + tl.arange(0, BLOCK_M)
    rvalid = (r < n) & active
    ent = tl.load(Ent + bh * Tq * NS + e0 + r, mask=rvalid, other=0)
    rows = tl.where(rvalid, ent // NS, Tq)
    ja = tl.maximum(tl.load(Bounds + c), PREFIX)
    jb = tl.load(Bounds + c + 1)
    seg = tl.maximum(jb - ja, 0)
    lim = tl.load(Lim + rows, mask=rvalid, other=0)
    rel = tl.where(rvalid, lim - 1 - ja, -1)
    min_vis = tl.min(tl.where(rvalid, rel + 1, seg), axis=0)
    n_full = tl.minimum((tl.maximum(min_vis, 0) // BLOCK_N) * BLOCK_N, (seg // BLOCK_N) * BLOCK_N)
    hi = tl.cdiv(seg, BLOCK_N) * BLOCK_N
    n_full = tl.where(active, n_full, 0)
    hi = tl.where(active, hi, 0)
    ent = tl.where(rvalid, ent, Tq * NS)
    return rows, ent, rvalid, ja, seg, rel, n_full, hi


@triton.jit
def _moc_km_fwd_kernel(Q, K, V, OP, LP, Ent, TileOff, ChunkOff, Cnt, Lim, Bounds,
                       s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,
                       Hq, Tq, GROUP, C, NS, PREFIX, qk_scale,
                       D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, LOGS: tl.constexpr):
    """One tile of gathered rows against one chunk's keys -> the normalised partial output OP
    [B, Hq, Tq * NS, D] and its log2-sum-exp LP [B, Hq, Tq * NS] at each row's entry."""
    EVEN_D: tl.constexpr = D == BLOCK_D
    t = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    bh = b * Hq + h
    hk = h // GROUP
    rows, ent, rvalid, ja, seg, rel, n_full, hi = _km_tile(TileOff, ChunkOff, Cnt, Ent, Lim, Bounds, t, bh, Tq,
                                                           C, NS, PREFIX, BLOCK_M, BLOCK_N, LOGS)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + b * s_qb + h.to(tl.int64) * s_qh, rows, s_qt, offs_d, Tq, D, True, EVEN_D)
    k_base = K + b * s_kb + hk.to(tl.int64) * s_kh + ja.to(tl.int64) * s_kt
    v_base = V + b * s_vb + hk.to(tl.int64) * s_vh + ja.to(tl.int64) * s_vt
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, m_i, l_i = attn_fwd_inner(acc, m_i, l_i, q, k_base, v_base, s_kt, s_vt, rel, offs_d, 0, n_full,
                                   qk_scale, seg, 0, D, BLOCK_N, False, True, EVEN_D, False)
    acc, m_i, l_i = attn_fwd_inner(acc, m_i, l_i, q, k_base, v_base, s_kt, s_vt, rel, offs_d, n_full, hi,
                                   qk_scale, seg, 0, D, BLOCK_N, True, True, EVEN_D, False)
    o, lp = attn_fwd_finish_log2(acc, m_i, l_i)
    part = bh * Tq * NS
    _store_tile(OP + part * D, o.to(OP.dtype.element_ty), ent.to(tl.int64), D, offs_d, Tq * NS, D, EVEN_D)
    tl.store(LP + part + ent, lp, mask=rvalid)


@triton.jit
def _moc_km_combine_kernel(Q, K, V, OP, LP, NSel, Lim, Out, LSE,
                           s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_ob, s_ot, s_oh,
                           Hq, Tq, GROUP, NS, PREFIX, qk_scale,
                           D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    """Per query block: merge each row's chunk partials (one softmax over their union) with the
    prefix segment ``[0, PREFIX)``, computed here query-major; writes O and lse (natural log)."""
    EVEN_D: tl.constexpr = D == BLOCK_D
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    bh = b * Hq + h
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_s = tl.arange(0, BLOCK_S)
    rmask = offs_m < Tq
    nsel = tl.load(NSel + bh * Tq + offs_m, mask=rmask, other=0)
    part = bh * Tq * NS
    ent = offs_m.to(tl.int64)[:, None] * NS + offs_s[None, :]
    lp = tl.load(LP + part + ent, mask=rmask[:, None] & (offs_s[None, :] < nsel[:, None]), other=float("-inf"))
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_p = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_p = tl.zeros([BLOCK_M], dtype=tl.float32)
    if PREFIX > 0:
        q = _load_tile(Q + b * s_qb + h.to(tl.int64) * s_qh, offs_m, s_qt, offs_d, Tq, D, True, EVEN_D)
        lim = tl.load(Lim + offs_m, mask=rmask, other=0)
        acc, m_p, l_p = attn_fwd_inner(acc, m_p, l_p, q, K + b * s_kb + hk.to(tl.int64) * s_kh,
                                       V + b * s_vb + hk.to(tl.int64) * s_vh, s_kt, s_vt, lim - 1, offs_d,
                                       0, tl.cdiv(PREFIX, BLOCK_N) * BLOCK_N, qk_scale, PREFIX, 0, D, BLOCK_N,
                                       True, True, EVEN_D, False)
    m = tl.maximum(tl.max(lp, axis=1), m_p)
    m_sub = tl.where(m == float("-inf"), 0.0, m)
    wp = tl.math.exp2(m_p - m_sub)
    w = tl.math.exp2(lp - m_sub[:, None])
    acc = acc * wp[:, None]
    l_i = l_p * wp + tl.sum(w, axis=1)
    for s in range(0, _loop_bound(NS)):
        ws = tl.sum(tl.where(offs_s[None, :] == s, w, 0.0), axis=1)
        o_s = _load_tile(OP + (part + s) * D, offs_m.to(tl.int64) * NS, D, offs_d, Tq * NS, D, True, EVEN_D)
        o_s = tl.where((s < nsel)[:, None], o_s.to(tl.float32), 0.0)
        acc += ws[:, None] * o_s
    o, lse = attn_fwd_finish(acc, m_sub, l_i)
    _store_tile(Out + b * s_ob + h.to(tl.int64) * s_oh, o.to(Out.dtype.element_ty), offs_m, s_ot, offs_d,
                Tq, D, EVEN_D)
    tl.store(LSE + bh * Tq + offs_m, lse, mask=rmask)


@triton.jit
def _moc_km_dq_kernel(Q, K, V, DO, DQP, LSE2, DELTA, Ent, TileOff, ChunkOff, Cnt, Lim, Bounds,
                      s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_db, s_dt, s_dh,
                      Hq, Tq, GROUP, C, NS, PREFIX, qk_scale,
                      D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, LOGS: tl.constexpr):
    """Key-major dQ: one tile of gathered rows against one chunk's keys -> the (unscaled) partial
    dQ at each row's entry of DQP [B, Hq, Tq * NS, D]."""
    EVEN_D: tl.constexpr = D == BLOCK_D
    t = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    bh = b * Hq + h
    hk = h // GROUP
    rows, ent, rvalid, ja, seg, rel, n_full, hi = _km_tile(TileOff, ChunkOff, Cnt, Ent, Lim, Bounds, t, bh, Tq,
                                                           C, NS, PREFIX, BLOCK_M, BLOCK_N, LOGS)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + b * s_qb + h.to(tl.int64) * s_qh, rows, s_qt, offs_d, Tq, D, True, EVEN_D)
    do = _load_tile(DO + b * s_db + h.to(tl.int64) * s_dh, rows, s_dt, offs_d, Tq, D, True, EVEN_D)
    lse2 = tl.load(LSE2 + bh * Tq + rows, mask=rvalid, other=float("inf"))
    delta = tl.load(DELTA + bh * Tq + rows, mask=rvalid, other=0.0)
    k_base = K + b * s_kb + hk.to(tl.int64) * s_kh + ja.to(tl.int64) * s_kt
    v_base = V + b * s_vb + hk.to(tl.int64) * s_vh + ja.to(tl.int64) * s_vt
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = attn_bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, s_kt, s_vt, rel, offs_d, 0, n_full,
                           qk_scale, seg, 0, D, BLOCK_N, False, True, EVEN_D)
    dq = attn_bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, s_kt, s_vt, rel, offs_d, n_full, hi,
                           qk_scale, seg, 0, D, BLOCK_N, True, True, EVEN_D)
    _store_tile(DQP + bh * Tq * NS * D, dq.to(DQP.dtype.element_ty), ent.to(tl.int64), D, offs_d, Tq * NS, D,
                EVEN_D)


@triton.jit
def _moc_km_dq_combine_kernel(Q, K, V, DO, DQP, DQ, LSE2, DELTA, NSel, Lim,
                              s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_db, s_dt, s_dh,
                              s_dqb, s_dqt, s_dqh, Hq, Tq, GROUP, NS, PREFIX, qk_scale, sm_scale,
                              D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr):
    """dQ of a query block: the sum of its rows' chunk partials plus the prefix segment
    (query-major here), times the softmax scale."""
    EVEN_D: tl.constexpr = D == BLOCK_D
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    bh = b * Hq + h
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rmask = offs_m < Tq
    nsel = tl.load(NSel + bh * Tq + offs_m, mask=rmask, other=0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if PREFIX > 0:
        q = _load_tile(Q + b * s_qb + h.to(tl.int64) * s_qh, offs_m, s_qt, offs_d, Tq, D, True, EVEN_D)
        do = _load_tile(DO + b * s_db + h.to(tl.int64) * s_dh, offs_m, s_dt, offs_d, Tq, D, True, EVEN_D)
        lse2 = tl.load(LSE2 + bh * Tq + offs_m, mask=rmask, other=float("inf"))
        delta = tl.load(DELTA + bh * Tq + offs_m, mask=rmask, other=0.0)
        lim = tl.load(Lim + offs_m, mask=rmask, other=0)
        dq = attn_bwd_dq_inner(dq, q, do, lse2, delta, K + b * s_kb + hk.to(tl.int64) * s_kh,
                               V + b * s_vb + hk.to(tl.int64) * s_vh, s_kt, s_vt, lim - 1, offs_d,
                               0, tl.cdiv(PREFIX, BLOCK_N) * BLOCK_N, qk_scale, PREFIX, 0, D, BLOCK_N,
                               True, True, EVEN_D)
    part = bh * Tq * NS
    for s in range(0, _loop_bound(NS)):
        p = _load_tile(DQP + (part + s) * D, offs_m.to(tl.int64) * NS, D, offs_d, Tq * NS, D, True, EVEN_D)
        dq += tl.where((s < nsel)[:, None], p.to(tl.float32), 0.0)
    dq = dq * sm_scale
    _store_tile(DQ + b * s_dqb + h.to(tl.int64) * s_dqh, dq.to(DQ.dtype.element_ty), offs_m, s_dqt, offs_d,
                Tq, D, EVEN_D)


@triton.jit
def _moc_km_dkdv_kernel(Q, K, V, DO, DK, DV, DQA, LSE2, DELTA, Ent, ChunkOff, Cnt, Lim, Bounds, KbOff,
                        s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,
                        s_db, s_dt, s_dh, s_dkb, s_dkt, s_dkh, s_dvb, s_dvt, s_dvh, s_aqb, s_aqt, s_aqh,
                        Hq, Tq, Tk, GROUP, C, NS, PREFIX, qk_scale, sm_scale,
                        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, LOGS: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    """Key-major dK/dV: program t takes BLOCK_N keys of one segment (segment c < C: chunk c from
    ``max(start, PREFIX)``; segment C: the prefix ``[0, PREFIX)``) and loops over the rows that
    selected the chunk (every row for the prefix) of each head of the GQA group: dK/dV without
    atomics, no masked-out rows computed. With ATOMIC_DQ it also adds ``scale * dS K`` into the
    fp32 dQ buffer DQA with relaxed atomics (FlashAttention-2 style; not bitwise deterministic)."""
    EVEN_D: tl.constexpr = D == BLOCK_D
    t = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    total = tl.load(KbOff + C + 1)
    active = t < total
    tt = tl.minimum(t, tl.maximum(total - 1, 0))
    sg = _find_segment(KbOff, tt, C + 1, LOGS)
    j = tt - tl.load(KbOff + sg)
    is_pre = sg == C
    cs = tl.minimum(sg, C - 1)
    ja = tl.where(is_pre, 0, tl.maximum(tl.load(Bounds + cs), PREFIX))
    jb = tl.where(is_pre, PREFIX, tl.load(Bounds + cs + 1))
    jb = tl.where(active, jb, 0)
    offs_n = ja + j * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(K + b * s_kb + hk.to(tl.int64) * s_kh, offs_n, s_kt, offs_d, jb, D, True, EVEN_D)
    v = _load_tile(V + b * s_vb + hk.to(tl.int64) * s_vh, offs_n, s_vt, offs_d, jb, D, True, EVEN_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    offs_r = tl.arange(0, BLOCK_M)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * Hq + h
        n = tl.where(is_pre, Tq, tl.load(Cnt + bh * C + cs))
        n = tl.where(active, n, 0)
        e0 = tl.load(ChunkOff + bh * C + cs)
        q_base = Q + b * s_qb + h.to(tl.int64) * s_qh
        do_base = DO + b * s_db + h.to(tl.int64) * s_dh
        for it in range(0, _loop_bound(tl.cdiv(n, BLOCK_M))):
            r = it * BLOCK_M + offs_r
            rvalid = r < n
            ent = tl.load(Ent + bh * Tq * NS + e0 + r, mask=rvalid & (sg != C), other=0)
            rows = tl.where(is_pre, r, ent // NS)
            rows = tl.where(rvalid, rows, Tq)
            q = _load_tile(q_base, rows, s_qt, offs_d, Tq, D, True, EVEN_D)
            do = _load_tile(do_base, rows, s_dt, offs_d, Tq, D, True, EVEN_D)
            lse2 = tl.load(LSE2 + bh * Tq + rows, mask=rvalid, other=float("inf"))
            delta = tl.load(DELTA + bh * Tq + rows, mask=rvalid, other=0.0)
            lim = tl.load(Lim + rows, mask=rvalid, other=0)
            # keys past the segment end (jb) need no mask: their K and V rows load as zeros and
            # their dK / dV rows are not stored, and with zero K they add nothing to dQ
            valid = offs_n[:, None] < lim[None, :]
            dk, dv, dsT = attn_bwd_dkdv_tile(dk, dv, k, v, q, do, lse2, delta, valid, qk_scale, True)
            if ATOMIC_DQ:
                dq = _dot(tl.trans(dsT), k) * sm_scale
                a_ptrs = DQA + b * s_aqb + h.to(tl.int64) * s_aqh + rows[:, None] * s_aqt + offs_d[None, :]
                if EVEN_D:
                    tl.atomic_add(a_ptrs, dq, mask=rvalid[:, None], sem="relaxed")
                else:
                    tl.atomic_add(a_ptrs, dq, mask=rvalid[:, None] & (offs_d[None, :] < D), sem="relaxed")
    dk = dk * sm_scale
    _store_tile(DK + b * s_dkb + hk.to(tl.int64) * s_dkh, dk.to(DK.dtype.element_ty), offs_n, s_dkt,
                offs_d, jb, D, EVEN_D)
    _store_tile(DV + b * s_dvb + hk.to(tl.int64) * s_dvh, dv.to(DV.dtype.element_ty), offs_n, s_dvt,
                offs_d, jb, D, EVEN_D)


# ---------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------

def moc_block_lists(sel: torch.Tensor, bounds: torch.Tensor, lim: torch.Tensor, prefix: int, group: int,
                    block_m: int, block_n: int):
    """Block lists for the kernels, in torch (see the module docstring): the yardstick of the list
    kernels (:func:`_query_block_lists`, :func:`_backward_lists`, which the kernels use) and the
    fallback beyond SELECT_MAX_C chunks.

    Returns ``qlist`` int32 [B, Hq, NQB, C] (ascending chunk ids, first ``qcount`` valid),
    ``qcount`` int32 [B, Hq, NQB], ``klist`` int32 [B, Hk, NKB, NQB] (query block ids) and
    ``kmeta`` int32 [B, Hk, NKB, 4] = (count, first chunk, last chunk + 1, n_diag) per key block
    (listed query blocks from position n_diag on lie entirely past the key block's causal cut).
    """
    B, Hq, Tq, C = sel.shape
    blk = _union_blocks(sel, block_m)
    ci = torch.arange(C, device=sel.device, dtype=torch.int32)
    key = torch.where(blk, ci, ci + C)                                  # selected first, ascending
    qlist = torch.sort(key, dim=-1).values.to(torch.int32) % C
    qcount = blk.sum(-1).to(torch.int32)
    return (qlist.contiguous(), qcount.contiguous(),
            *_key_block_lists(blk, bounds, lim, prefix, group, block_m, block_n))


def _union_blocks(sel: torch.Tensor, block_m: int) -> torch.Tensor:
    """bool [B, Hq, NQB, C]: chunk c selected by some row of query block qb."""
    B, Hq, Tq, C = sel.shape
    nqb = triton.cdiv(max(Tq, 1), block_m)
    pad = nqb * block_m - Tq
    selp = torch.nn.functional.pad(sel, (0, 0, 0, pad)) if pad else sel
    return (selp.view(B, Hq, nqb, block_m, C) != 0).any(3)


def _key_block_lists(blk: torch.Tensor, bounds: torch.Tensor, lim: torch.Tensor, prefix: int, group: int,
                     block_m: int, block_n: int):
    """(klist, kmeta) of :func:`moc_block_lists` from the query-block unions ``blk``."""
    B, Hq, nqb, C = blk.shape
    dev = blk.device
    tk = int(bounds[-1])
    Tq = lim.numel()
    nkb = triton.cdiv(max(tk, 1), block_n)
    pad = nqb * block_m - Tq
    # chunk range [c_first, c_last] touching each key block
    kstart = torch.arange(nkb, device=dev) * block_n
    kend = torch.clamp(kstart + block_n, max=tk) - 1
    b1 = bounds[1:].to(dev)
    c_first = torch.bucketize(kstart.clamp(max=max(tk - 1, 0)), b1, right=True)
    c_last = torch.bucketize(kend.clamp(min=0), b1, right=True)
    cs = torch.cat([torch.zeros((B, Hq, nqb, 1), dtype=torch.long, device=dev), blk.long().cumsum(-1)], -1)
    need = (cs[..., c_last + 1] - cs[..., c_first]) > 0               # [B, Hq, NQB, NKB]
    lim_p = torch.nn.functional.pad(lim, (0, pad)) if pad else lim
    blk_lim = lim_p.view(nqb, block_m).amax(1)                          # [NQB]
    lim_hi = torch.nn.functional.pad(lim, (0, pad), value=2 ** 31 - 1) if pad else lim
    blk_lim_min = lim_hi.view(nqb, block_m).amin(1)                     # [NQB]
    if prefix > 0:
        pref = (kstart < prefix)[None, :] & (blk_lim[:, None] > kstart[None, :])  # [NQB, NKB]
        need = need | pref[None, None]
    need = need & (blk_lim[:, None] > kstart[None, :])[None, None]
    need = need.view(B, Hq // group, group, nqb, nkb).any(2).transpose(-1, -2)  # [B, Hk, NKB, NQB]
    qi = torch.arange(nqb, device=dev, dtype=torch.int32)
    kkey = torch.where(need, qi, qi + nqb)
    klist = (torch.sort(kkey, dim=-1).values % nqb).to(torch.int32).contiguous()
    kcount = need.sum(-1).to(torch.int32)
    # n_diag: list positions up to the last listed query block with a row limit inside the key block
    diag = (blk_lim_min[None, :] <= kend[:, None])[None, None]          # [1, 1, NKB, NQB]
    n_diag = torch.where(need & diag, need.int().cumsum(-1), 0).amax(-1).to(torch.int32)
    kmeta = torch.stack([kcount, c_first.to(torch.int32).expand_as(kcount),
                         (c_last + 1).to(torch.int32).expand_as(kcount), n_diag], -1).contiguous()
    return klist, kmeta


def _query_block_lists(sel: torch.Tensor, block_m: int):
    """(qlist, qcount) of :func:`moc_block_lists` with one small Triton kernel."""
    B, Hq, Tq, C = sel.shape
    nqb = triton.cdiv(max(Tq, 1), block_m)
    qlist = _alloc((B, Hq, nqb, C), torch.int32, sel.device)
    qcount = _alloc((B, Hq, nqb), torch.int32, sel.device)
    bc = triton.next_power_of_2(C)
    sub = max(1, min(block_m, 4096 // bc))
    _moc_qlist_kernel[(nqb, Hq, B)](sel, qcount, qlist, qcount, qcount, qcount, Tq, C, nqb, 1, BLOCK_M=block_m,
                                    SUB=sub, BLOCK_S=block_m, BLOCK_C=bc, LIST=True, UNION=False, num_warps=4)
    return qlist, qcount


def _backward_lists(sel: torch.Tensor, bounds: torch.Tensor, lim: torch.Tensor, prefix: int, group: int,
                    tk: int, bm_dq: int, bm_kv: int, bn_kv: int, dq_lists: bool = True):
    """All lists of the query-major backward in two or three small launches and no host sync:
    ``(qlist, qcount)`` for the dQ kernel (query blocks of ``bm_dq`` rows; None without
    ``dq_lists``: the dense-order dQ reads none) and ``(klist, kmeta)`` for the dK/dV kernel (key
    blocks of ``bn_kv`` keys over query steps of ``bm_kv`` rows); the same lists as
    :func:`moc_block_lists` (which builds them in torch ops)."""
    B, Hq, Tq, C = sel.shape
    dev = sel.device
    bc = triton.next_power_of_2(C)
    nqb, nsb, nkb = triton.cdiv(Tq, bm_dq), triton.cdiv(Tq, bm_kv), triton.cdiv(tk, bn_kv)
    u = _alloc((B, Hq, nsb, C), torch.uint8, dev)
    blk_lim = _alloc((2, nsb), torch.int32, dev)
    qlist = qcount = None
    both = dq_lists and bm_dq % bm_kv == 0   # one launch gives the dQ lists and the dK/dV unions
    if dq_lists:
        qlist = _alloc((B, Hq, nqb, C), torch.int32, dev)
        qcount = _alloc((B, Hq, nqb), torch.int32, dev)
        sub = max(1, min(bm_kv if both else bm_dq, 4096 // bc))
        _moc_qlist_kernel[(nqb, Hq, B)](sel, lim, qlist, qcount, u, blk_lim, Tq, C, nqb, nsb, BLOCK_M=bm_dq,
                                        SUB=sub, BLOCK_S=bm_kv if both else bm_dq, BLOCK_C=bc, LIST=True, UNION=both,
                                        num_warps=4)
    if not both:   # the unions alone (QList / QCount unused: LIST=False)
        sub = max(1, min(bm_kv, 4096 // bc))
        _moc_qlist_kernel[(nsb, Hq, B)](sel, lim, blk_lim, blk_lim, u, blk_lim, Tq, C, nqb, nsb, BLOCK_M=bm_kv,
                                        SUB=sub, BLOCK_S=bm_kv, BLOCK_C=bc, LIST=False, UNION=True, num_warps=4)
    Hk = Hq // group
    klist = _alloc((B, Hk, nkb, nsb), torch.int32, dev)
    kmeta = _alloc((B, Hk, nkb, 4), torch.int32, dev)
    _moc_klist_q_kernel[(nkb, Hk, B)](u, blk_lim, bounds, klist, kmeta, C, nsb, group, int(prefix), tk,
                                      BLOCK_N=bn_kv, BLOCK_Q=triton.next_power_of_2(nsb), LOGS=_logs(C),
                                      num_warps=4)
    return qlist, qcount, klist, kmeta


#: Execution path: "auto" (default; per call by the tile counts, see :func:`_plan`), "query"
#: (query-block-major, the union of each block's chunks) or "key" (key-major: per chunk the rows
#: that selected it). The env var BLOCKZOO_MOC_PATH overrides it (tests, benchmarks).
PATH = "auto"
#: auto picks key-major when its tiles x KM_RATIO <= the query-major tiles (both counted as
#: BLOCK_M rows x one chunk); > 1 charges the partials' write, read and merge (tuned on the H100)
KM_RATIO = 1.6
#: (BLOCK_M, BLOCK_N, num_warps, num_stages) of the key-major kernels ("interp" / "cuda" as BLOCKS)
KM_BLOCKS: dict = {}
#: key-major dQ: "split" (per-(row, chunk) fp32 partials summed by a combine kernel: deterministic)
#: or "atomic" (added by the dK/dV kernel with fp32 atomics: 5 instead of 7 matmuls, no partial
#: buffer, not bitwise deterministic). The env var BLOCKZOO_MOC_BWD overrides it.
KM_BWD = "split"


def _km_blocks(block_d: int, esize: int = 2, kind: str = "fwd") -> tuple[int, int, int, int]:
    """Tiles of the key-major kernels, ``kind`` "fwd" (forward and its combine), "dq" (dQ and its
    combine; its BLOCK_M is the row tile the work lists count in), "dkdv" (BLOCK_N keys per
    program, BLOCK_M gathered rows per step; independent of the lists) or "dkdv_atomic" (the
    dK/dV kernel with ATOMIC_DQ; its own default, "cuda_dkdv_atomic" sets it). H100
    sweeps at T = 32768, D = 128, bf16: 128-row tiles are the fastest forward and 64 x 64 the
    fastest dQ (bench/moc_keymajor.py --tune); dK/dV takes 128 keys over 64-row steps with 8
    warps and 3 stages (bench/moc_profile.py --km-dkdv: backward 15.4 vs 18.0 ms at 64 x 64)."""
    if _interpreting():
        return KM_BLOCKS.get(f"interp_{kind}", KM_BLOCKS.get("interp", BLOCKS.get("interp", (16, 16, 4, 1))))
    for key in (f"cuda_{kind}", "cuda"):
        if key in KM_BLOCKS:
            return KM_BLOCKS[key]
    if esize > 2 and block_d > 64:
        return (32, 32, 4, 2) if block_d <= 128 else (32, 32, 4, 1)
    if block_d <= 128:
        # the atomic-dQ dK/dV has a fifth dot and its tile: 128 x 3 stages exceed shared memory
        return {"fwd": (128, 64, 4, 2), "dq": (64, 64, 4, 2), "dkdv": (64, 128, 8, 3),
                "dkdv_atomic": (64, 64, 4, 2)}[kind]
    return (32, 32, 4, 1)


def _km_bwd_mode() -> str:
    m = os.environ.get("BLOCKZOO_MOC_BWD") or KM_BWD
    if m not in ("split", "atomic"):
        raise ValueError(f"context.moc triton: key-major backward must be 'split' or 'atomic', got {m!r}")
    return m


def _path() -> str:
    p = os.environ.get("BLOCKZOO_MOC_PATH") or PATH
    if p not in ("auto", "query", "key"):
        raise ValueError(f"context.moc triton: path must be 'auto', 'query' or 'key', got {p!r}")
    return p


class KeyMajorLists(NamedTuple):
    """Key-major work lists for one selection (see :func:`key_major_lists`)."""
    ent: torch.Tensor        # int32 [B, Hq, Tq * NS]: per chunk (at chunk_off) its rows' entries i * NS + slot
    chunk_off: torch.Tensor  # int32 [B, Hq, C]: start of chunk c's rows in ent
    cnt: torch.Tensor        # int32 [B, Hq, C]: rows that selected chunk c
    tile_off: torch.Tensor   # int32 [B, Hq, C + 1]: cumulative BLOCK_M-row tiles over the chunks
    nsel: torch.Tensor       # int32 [B, Hq, Tq]: chunks each row selected
    ns: int                  # slots per row (max of nsel, >= 1)
    tiles: int               # total key-major tiles (sum over batch and heads)


def key_major_lists(sel: torch.Tensor, block_m: int, qcount: torch.Tensor | None = None,
                    ratio: float | None = None):
    """Per-chunk row lists by a counting sort (two small kernels and a few torch cumsums).
    Returns ``(KeyMajorLists or None, query_major_tiles)``. ``query_major_tiles`` (``qcount.sum()``)
    comes back in the same host sync as the sizes when ``qcount`` is given, else it is None. With
    ``ratio`` (auto) the lists are only built, and returned, when ``tiles * block_m * ratio <=
    query_major_tiles * qm_block_m`` -- the caller passes ``ratio`` already divided by its
    query-major BLOCK_M, see :func:`_plan`."""
    B, Hq, Tq, C = sel.shape
    dev = sel.device
    bc = triton.next_power_of_2(C)
    r = max(1, min(128, 8192 // bc, triton.next_power_of_2(Tq)))
    nrb = triton.cdiv(Tq, r)
    colcnt = _alloc((B, Hq, nrb, C), torch.int32, dev)
    nsel = _alloc((B, Hq, Tq), torch.int32, dev)
    _moc_kcount_kernel[(nrb, Hq, B)](sel, colcnt, nsel, Tq, C, nrb, R=r, BLOCK_C=bc, num_warps=4)
    cnt = colcnt.sum(2, dtype=torch.int32)
    tiles = (cnt + (block_m - 1)) // block_m
    tile_off = torch.nn.functional.pad(tiles.cumsum(-1, dtype=torch.int32), (1, 0)).contiguous()
    stats = [nsel.amax().long(), tile_off[..., -1].sum()]
    if qcount is not None:
        stats.append(qcount.sum())
    stats = torch.stack(stats).tolist()                         # the one host sync
    q_tiles = int(stats[2]) if qcount is not None else None
    if ratio is not None and q_tiles is not None and int(stats[1]) * block_m * ratio > q_tiles:
        return None, q_tiles
    ns = max(int(stats[0]), 1)
    chunk_off = (cnt.cumsum(-1, dtype=torch.int32) - cnt).contiguous()
    base = (chunk_off[..., None, :] + colcnt.cumsum(2, dtype=torch.int32) - colcnt).contiguous()
    ent = _alloc((B, Hq, Tq * ns), torch.int32, dev)
    _moc_klist_kernel[(nrb, Hq, B)](sel, base, ent, Tq, C, nrb, ns, R=r, BLOCK_C=bc, num_warps=4)
    return KeyMajorLists(ent, chunk_off, cnt.contiguous(), tile_off, nsel, ns, int(stats[1])), q_tiles


def _plan(sel, bm_q: int, bm_k: int, query_major: bool = False, make_lists=None):
    """Which path runs: returns ``(km_lists or None, lists or None)``; ``lists`` are the
    query-major lists built by ``make_lists()`` (default: :func:`_query_block_lists` at ``bm_q``:
    ``(qlist, qcount)``; the first two entries must be those). Auto: key-major when its tiles x
    KM_RATIO (in BLOCK_M-row units of the query-major kernel) <= the query-major tiles (sum
    over query blocks of their union of chunks) -- the measured tile density decides, at the
    price of one host sync; ``query_major``: the router proved on the host that query-major
    wins (:func:`_query_major_proven`), so no sync and no key-major counting. The key-major
    scatter runs only when it is chosen."""
    path = _path()
    C = sel.shape[-1]
    if C == 0 or sel.shape[2] == 0 or triton.next_power_of_2(C) > SELECT_MAX_C:
        if path == "key":
            raise ValueError(f"context.moc triton: the key-major path needs 1..{SELECT_MAX_C} chunks, got {C}")
        return None, None
    if path == "key":
        return key_major_lists(sel, bm_k)[0], None
    lists = make_lists() if make_lists is not None else _query_block_lists(sel, bm_q)
    if path == "query" or query_major:
        return None, lists
    km, _ = key_major_lists(sel, bm_k, lists[1], ratio=KM_RATIO / bm_q)
    return km, lists


def _logs(n: int) -> int:
    return max(1, int(n).bit_length())


def _fwd_km(q, k, v, sel, bounds, lim, prefix, scale, km: KeyMajorLists):
    B, Tq, Hq, D = q.shape
    Tk, Hk = k.shape[1], k.shape[2]
    C = sel.shape[-1]
    BD = _block_d(D)
    bm, bn, warps, stages = _km_blocks(BD, q.element_size())
    ns = km.ns
    pre = min(int(prefix), Tk)
    op = _alloc((B, Hq, Tq * ns, D), q.dtype, q.device)
    lp = _alloc((B, Hq, Tq * ns), torch.float32, q.device)
    qk_scale = float(scale) * LOG2E
    grid_t = triton.cdiv(Tq * ns, bm) + C
    _moc_km_fwd_kernel[(grid_t, Hq, B)](
        q, k, v, op, lp, km.ent, km.tile_off, km.chunk_off, km.cnt, lim, bounds,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        Hq, Tq, Hq // Hk, C, ns, pre, qk_scale,
        D=D, BLOCK_D=BD, BLOCK_M=bm, BLOCK_N=bn, LOGS=_logs(C), num_warps=warps, num_stages=stages)
    o = _alloc((B, Tq, Hq, D), q.dtype, q.device)
    lse = _alloc((B, Hq, Tq), torch.float32, q.device)
    _moc_km_combine_kernel[(triton.cdiv(Tq, bm), Hq, B)](
        q, k, v, op, lp, km.nsel, lim, o, lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        Hq, Tq, Hq // Hk, ns, pre, qk_scale,
        D=D, BLOCK_D=BD, BLOCK_M=bm, BLOCK_N=bn, BLOCK_S=triton.next_power_of_2(ns), num_warps=warps,
        num_stages=stages)
    return o, lse


def _bwd_km(do, q, k, v, lse2, delta, sel, bounds, lim, prefix, scale, km: KeyMajorLists):
    B, Tq, Hq, D = q.shape
    Tk, Hk = k.shape[1], k.shape[2]
    C = sel.shape[-1]
    G = Hq // Hk
    BD = _block_d(D)
    bm, bn, warps, stages = _km_blocks(BD, q.element_size(), "dq")
    atomic = _km_bwd_mode() == "atomic"
    bm_kv, bn_kv, warps_kv, stages_kv = _km_blocks(BD, q.element_size(), "dkdv_atomic" if atomic else "dkdv")
    ns = km.ns
    pre = min(int(prefix), Tk)
    qk_scale = float(scale) * LOG2E
    dqa = torch.zeros((B, Tq, Hq, D), dtype=torch.float32, device=q.device) if atomic else q.new_empty(1, 1, 1, 1)
    dk = _alloc((B, Tk, Hk, D), q.dtype, q.device)
    dv = _alloc((B, Tk, Hk, D), q.dtype, q.device)
    # key blocks per segment: chunk c from max(start, prefix), then the prefix as segment C
    starts = torch.clamp(bounds[:-1], min=pre)
    seg_len = torch.clamp(bounds[1:] - starts, min=0)
    seg_len = torch.cat([seg_len, seg_len.new_full((1,), pre)])
    kb_off = torch.nn.functional.pad(((seg_len + (bn_kv - 1)) // bn_kv).cumsum(0), (1, 0)).to(torch.int32).contiguous()
    _moc_km_dkdv_kernel[(triton.cdiv(Tk, bn_kv) + C + 1, Hk, B)](
        q, k, v, do, dk, dv, dqa, lse2, delta, km.ent, km.chunk_off, km.cnt, lim, bounds, kb_off,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        dqa.stride(0), dqa.stride(1), dqa.stride(2),
        Hq, Tq, Tk, G, C, ns, pre, qk_scale, float(scale),
        D=D, BLOCK_D=BD, BLOCK_M=bm_kv, BLOCK_N=bn_kv, LOGS=_logs(C + 1), ATOMIC_DQ=atomic, num_warps=warps_kv,
        num_stages=stages_kv)
    if atomic:
        return dqa.to(q.dtype), dk, dv
    dq = _alloc((B, Tq, Hq, D), q.dtype, q.device)
    dqp = _alloc((B, Hq, Tq * ns, D), torch.float32, q.device)
    _moc_km_dq_kernel[(triton.cdiv(Tq * ns, bm) + C, Hq, B)](
        q, k, v, do, dqp, lse2, delta, km.ent, km.tile_off, km.chunk_off, km.cnt, lim, bounds,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        Hq, Tq, G, C, ns, pre, qk_scale,
        D=D, BLOCK_D=BD, BLOCK_M=bm, BLOCK_N=bn, LOGS=_logs(C), num_warps=warps, num_stages=stages)
    _moc_km_dq_combine_kernel[(triton.cdiv(Tq, bm), Hq, B)](
        q, k, v, do, dqp, dq, lse2, delta, km.nsel, lim,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2), Hq, Tq, G, ns, pre, qk_scale, float(scale),
        D=D, BLOCK_D=BD, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    return dq, dk, dv


def _dense_launch_chunk(chunk: int, prefix: int, block_n: int, query_major: bool) -> int:
    """CHUNK of the dense-order forward / dQ kernels when they run (the host's rule passed
    ``chunk`` > 0, the chunk and prefix are multiples of the key step, the query-major path is
    taken without the auto decision), else 0: the list walk."""
    ok = chunk > 0 and chunk % block_n == 0 and prefix % block_n == 0
    return int(chunk) if ok and _path() != "key" and (query_major or _path() == "query") else 0


def _tiles_per_chunk(seg_len: int, block_n: int) -> int:
    """TPC of the flattened forward / dQ loop; 0: one pipelined loop per listed chunk."""
    return triton.cdiv(int(seg_len), block_n) if FLAT_CHUNKS and seg_len > 0 else 0


def _fwd_impl(q, k, v, sel, bounds, lim, prefix: int, scale: float, query_major: bool = False, seg_len: int = 0,
              chunk: int = 0):
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    B, Tq, Hq, D, Tk, Hk = _check(q, k, v)
    BD = _block_d(D)
    bm, bn, warps, stages = _blocks(BD, q.element_size(), "fwd")
    C = sel.shape[-1]
    prefix = min(int(prefix), Tk)   # keys past Tk do not exist (the kernels would read past them)
    if B * Tq * Hq * D == 0 or Tk == 0 or C == 0:
        o = _alloc((B, Tq, Hq, D), q.dtype, q.device).zero_()
        return o, _alloc((B, Hq, Tq), torch.float32, q.device).fill_(float("-inf"))
    _check_i32(q, k, v)
    nqb = triton.cdiv(Tq, bm)
    dchunk = _dense_launch_chunk(chunk, prefix, bn, query_major)
    if dchunk:   # dense-order walk (the host's density rule chose it): no chunk lists
        o = _alloc((B, Tq, Hq, D), q.dtype, q.device)
        lse = _alloc((B, Hq, Tq), torch.float32, q.device)
        _check_i32(o)
        _moc_fwd_dense_kernel[(nqb, Hq, B)](
            q, k, v, o, lse, sel, lim,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
            Hq, Tq, Hq // Hk, C, int(prefix), int(dchunk), float(scale) * LOG2E,
            D=D, BLOCK_D=BD, BLOCK_M=bm, BLOCK_N=bn, NEG_SCALE=scale < 0, num_warps=warps, num_stages=stages)
        return o, lse
    km, lists = _plan(sel, bm, _km_blocks(BD, q.element_size())[0], query_major)
    if km is not None:
        return _fwd_km(q, k, v, sel, bounds, lim, prefix, scale, km)
    if lists is None:
        qlist, qcount, _, _ = moc_block_lists(sel, bounds, lim, prefix, Hq // Hk, bm, bn)
    else:
        qlist, qcount = lists
    o = _alloc((B, Tq, Hq, D), q.dtype, q.device)
    lse = _alloc((B, Hq, Tq), torch.float32, q.device)
    _check_i32(o)
    tpc = _tiles_per_chunk(seg_len, bn)
    _moc_fwd_kernel[(nqb, Hq, B)](
        q, k, v, o, lse, sel, lim, bounds, qlist, qcount,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        Hq, Tq, Hq // Hk, C, nqb, int(prefix), float(scale) * LOG2E, max(tpc, 1),
        D=D, BLOCK_D=BD, BLOCK_M=bm, BLOCK_N=bn, FLAT=tpc > 0, num_warps=warps, num_stages=stages)
    return o, lse


def _bwd_impl(do, q, k, v, o, lse, sel, bounds, lim, prefix: int, scale: float, query_major: bool = False,
              seg_len: int = 0, chunk: int = 0):
    q, k, v, o, do = (_unit_last(t) for t in (q, k, v, o, do))
    do = do.to(q.dtype)
    B, Tq, Hq, D, Tk, Hk = _check(q, k, v)
    BD = _block_d(D)
    es = q.element_size()
    bm, bn, warps, stages = _blocks(BD, es, "dq")
    bm_kv, bn_kv, warps_kv, stages_kv = _blocks(BD, es, "dkdv")
    C = sel.shape[-1]
    prefix = min(int(prefix), Tk)
    if B * Tq * Hq * D == 0 or B * Tk * Hk * D == 0 or C == 0:
        return (_alloc((B, Tq, Hq, D), q.dtype, q.device).zero_(), _alloc((B, Tk, Hk, D), q.dtype, q.device).zero_(),
                _alloc((B, Tk, Hk, D), q.dtype, q.device).zero_())
    _check_i32(q, k, v, o, do)
    delta, lse2 = bwd_row_stats(o, do, lse, BD)
    G = Hq // Hk
    dchunk = _dense_launch_chunk(chunk, prefix, bn, query_major)
    km, lists = _plan(sel, bm, _km_blocks(BD, es, "dq")[0], query_major,
                      lambda: _backward_lists(sel, bounds, lim, prefix, G, Tk, bm, bm_kv, bn_kv, not dchunk))
    if km is not None:
        return _bwd_km(do, q, k, v, lse2, delta, sel, bounds, lim, prefix, scale, km)
    if lists is None:   # too many chunks for the list kernels: torch lists
        qlist, qcount, _, _ = moc_block_lists(sel, bounds, lim, prefix, G, bm, bn)
        _, _, klist, kmeta = moc_block_lists(sel, bounds, lim, prefix, G, bm_kv, bn_kv)
    else:
        qlist, qcount, klist, kmeta = lists
    dq = _alloc((B, Tq, Hq, D), q.dtype, q.device)
    dk = _alloc((B, Tk, Hk, D), q.dtype, q.device)
    dv = _alloc((B, Tk, Hk, D), q.dtype, q.device)
    qk_scale = float(scale) * LOG2E
    nqb, nsb, nkb = triton.cdiv(Tq, bm), triton.cdiv(Tq, bm_kv), triton.cdiv(Tk, bn_kv)
    _moc_dkdv_kernel[(nkb, Hk, B)](
        q, k, v, do, dk, dv, lse2, delta, sel, lim, bounds, klist, kmeta,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        Hq, Hk, Tq, Tk, G, C, nsb, nkb, int(prefix), qk_scale, float(scale),
        D=D, BLOCK_D=BD, BLOCK_M=bm_kv, BLOCK_N=bn_kv, ROWS=ROW_MASKS, num_warps=warps_kv, num_stages=stages_kv)
    if dchunk:   # dense-order walk (as the forward)
        _moc_dq_dense_kernel[(nqb, Hq, B)](
            q, k, v, do, dq, lse2, delta, sel, lim,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2),
            Hq, Tq, G, C, int(prefix), int(dchunk), qk_scale, float(scale),
            D=D, BLOCK_D=BD, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
        return dq, dk, dv
    tpc = _tiles_per_chunk(seg_len, bn)
    _moc_dq_kernel[(nqb, Hq, B)](
        q, k, v, do, dq, lse2, delta, sel, lim, bounds, qlist, qcount,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        Hq, Tq, G, C, nqb, int(prefix), qk_scale, float(scale), max(tpc, 1),
        D=D, BLOCK_D=BD, BLOCK_M=bm, BLOCK_N=bn, FLAT=tpc > 0, num_warps=warps, num_stages=stages)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# custom ops
# ---------------------------------------------------------------------------------------------

def _define_ops():
    ns = getattr(torch.ops, "blockzoo", None)
    if ns is not None and hasattr(ns, "moc_fwd") and hasattr(ns, "moc_bwd"):
        return ns.moc_fwd, ns.moc_bwd

    @torch.library.custom_op("blockzoo::moc_fwd", mutates_args=())
    def fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sel: torch.Tensor, bounds: torch.Tensor,
               lim: torch.Tensor, prefix: int, scale: float, query_major: bool,
               seg_len: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _fwd_impl(q, k, v, sel, bounds, lim, prefix, scale, query_major, seg_len, chunk)

    @torch.library.custom_op("blockzoo::moc_bwd", mutates_args=())
    def bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
               lse: torch.Tensor, sel: torch.Tensor, bounds: torch.Tensor, lim: torch.Tensor, prefix: int,
               scale: float, query_major: bool, seg_len: int,
               chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _bwd_impl(do, q, k, v, o, lse, sel, bounds, lim, prefix, scale, query_major, seg_len, chunk)

    @fwd_op.register_fake
    def _(q, k, v, sel, bounds, lim, prefix, scale, query_major, seg_len, chunk):
        B, Tq, Hq, D = q.shape
        return q.new_empty((B, Tq, Hq, D)), q.new_empty((B, Hq, Tq), dtype=torch.float32)

    @bwd_op.register_fake
    def _(do, q, k, v, o, lse, sel, bounds, lim, prefix, scale, query_major, seg_len, chunk):
        return q.new_empty(tuple(q.shape)), k.new_empty(tuple(k.shape)), k.new_empty(tuple(k.shape))

    def setup(ctx, inputs, output):
        q, k, v, sel, bounds, lim, prefix, scale, query_major, seg_len, chunk = inputs
        o, lse = output
        ctx.save_for_backward(q, k, v, o, lse, sel, bounds, lim)
        ctx.prefix, ctx.scale, ctx.query_major, ctx.seg_len, ctx.chunk = prefix, scale, query_major, seg_len, chunk
        ctx.set_materialize_grads(False)

    def backward(ctx, do, dlse):
        q, k, v, o, lse, sel, bounds, lim = ctx.saved_tensors
        if dlse is not None:
            raise NotImplementedError("context.moc triton: gradient through lse is not supported")
        if do is None:
            do = torch.zeros_like(o)
        dq, dk, dv = bwd_op(do, q, k, v, o, lse, sel, bounds, lim, ctx.prefix, ctx.scale, ctx.query_major,
                            ctx.seg_len, ctx.chunk)
        return dq, dk, dv, None, None, None, None, None, None, None, None

    fwd_op.register_autograd(backward, setup_context=setup)
    return fwd_op, bwd_op


_fwd_op, _bwd_op = _define_ops()


#: chunk counts above this (next power of two) route with the torch selection instead of
#: :func:`_moc_select_kernel` (one program holds a row tile x all chunks in registers)
SELECT_MAX_C = 8192
_ROUTE_KEYS = ("causal", "chunk_size", "top_k", "prefix", "boundaries", "drop_off", "drop_in", "seed")


class _Geometry(NamedTuple):
    """Routing facts that depend only on the shapes (``reference.routing_geometry``), built once
    per shape: what the router and the kernels read on the device, and the chunk lengths."""
    bounds: torch.Tensor     # long [C + 1] (``chunk_scores``)
    bounds32: torch.Tensor   # int32 [C + 1]
    lim32: torch.Tensor      # int32 [Tq]
    own32: torch.Tensor      # int32 [Tq]
    lens: list               # chunk lengths (host)


def _shape_key(tq, tk, causal, chunk_size, boundaries) -> tuple:
    if boundaries is not None:
        boundaries = tuple(int(x) for x in (boundaries.tolist() if hasattr(boundaries, "tolist") else boundaries))
    return int(tq), int(tk), bool(causal), int(chunk_size), boundaries


def _geometry(tq: int, tk: int, causal: bool, chunk_size: int, boundaries, device) -> _Geometry:
    """:class:`_Geometry`, cached per shape and device: a call after the first makes no device
    tensor from host data (a host-to-device copy waits for the stream) and reads nothing back."""
    return _geometry_cached(*_shape_key(tq, tk, causal, chunk_size, boundaries), str(torch.device(device)))


@functools.lru_cache(maxsize=64)
def _geometry_cached(tq, tk, causal, chunk_size, boundaries, device) -> _Geometry:
    from ...plugins.context.reference import routing_geometry
    bounds, lim, own = routing_geometry(tq, tk, causal, chunk_size, boundaries, "cpu")
    lens = (bounds[1:] - bounds[:-1]).tolist()
    return _Geometry(bounds.to(device), *(t.int().to(device) for t in (bounds, lim, own)), lens)


@functools.lru_cache(maxsize=64)
def _router_rows(tq, tk, causal, chunk_size, boundaries):
    """Host geometry per row, as the router counts it: ``(bounds, lim, has, cand)``; ``has``: the
    row has an own chunk; ``cand``: its candidate chunks, those before the own one (causal, the
    row having keys), every chunk but the own one otherwise. Shared by the path proof
    (:func:`_proof_counts`) and the dense-order rule (:func:`_pair_share`)."""
    from ...plugins.context.reference import routing_geometry
    bounds, lim, own = routing_geometry(tq, tk, causal, chunk_size, boundaries, "cpu")
    C = bounds.numel() - 1
    has = own >= 0
    cand = torch.where(has & (lim > 0), own, torch.zeros_like(own)) if causal else C - has.long()
    return bounds, lim, has, cand


@functools.lru_cache(maxsize=256)
def _proof_counts(tq, tk, causal, chunk_size, boundaries, top_k: int, dropping: bool, bm: int):
    """``(pairs, bound)`` of :func:`_query_major_proven`, from the host geometry."""
    bounds, lim, has, cand = _router_rows(tq, tk, causal, chunk_size, boundaries)
    pairs = int(has.sum()) + (0 if dropping else int(torch.clamp(cand, max=int(top_k)).sum()))
    nqb = triton.cdiv(tq, bm)
    blk_lim = torch.nn.functional.pad(lim, (0, nqb * bm - tq)).view(nqb, bm).amax(1)
    bound = int(torch.searchsorted(bounds[:-1].contiguous(), blk_lim, side="left").sum()) * bm
    return pairs, bound


def _query_major_proven(tq, tk, causal, chunk_size, boundaries, top_k: int, drop_off: float, bm: int) -> bool:
    """True when the shapes alone show that auto would pick the query-major path for any
    selection the router can make, so the forward and backward skip the auto decision and its
    host sync. Key-major tiles x BLOCK_M_k >= the (row, chunk) pairs selected, at least
    ``min(top_k, candidates) + 1`` per row with keys (own chunk only under drop-off);
    query-major tiles <= per query block of ``bm`` rows, the chunks its last row can see. Auto
    picks query-major when ``km tiles x BLOCK_M_k x KM_RATIO > qm tiles x bm`` (:func:`_plan`):
    implied when ``pairs x KM_RATIO > bound x bm``. ``bm``: the largest query block of the
    kernels (the bound grows with it)."""
    pairs, bound = _proof_counts(*_shape_key(tq, tk, causal, chunk_size, boundaries), int(top_k), drop_off > 0,
                                 int(bm))
    return pairs * KM_RATIO > bound


def moc_route(q: torch.Tensor, k: torch.Tensor, causal: bool = True, chunk_size: int = 64, top_k: int = 4,
              prefix: int = 0, boundaries=None, drop_off: float = 0.0, drop_in: float = 0.0, seed: int = 0):
    """The router on the GPU: chunk means and scores (torch: a segment sum and one matmul), then
    :func:`_moc_select_kernel` for the candidates, top-k and own chunk. Returns
    ``(sel uint8 [B, Hq, Tq, C], bounds int32 [C + 1], lim int32 [Tq], prefix)``, the same
    selection as ``plugins.context.reference.moc_routing``. The shape-only geometry is cached
    (:func:`_geometry`), so this path makes no host sync. The training options (drop-off /
    drop-in, drawn from a seeded CPU generator so every backend sees the same draws) take the
    torch path, as do more than SELECT_MAX_C chunks."""
    from ...plugins.context.reference import chunk_scores, moc_routing
    B, Tq, Hq, _ = q.shape
    geo = _geometry(Tq, k.shape[1], causal, chunk_size, boundaries, q.device)
    C = len(geo.lens)
    if drop_off > 0 or drop_in > 0 or C == 0 or Tq == 0 or triton.next_power_of_2(C) > SELECT_MAX_C:
        r = moc_routing(q, k, causal, chunk_size, top_k, prefix, boundaries, drop_off, drop_in, seed)
        return _as_kernel_tensors(r)
    scores = chunk_scores(q, k, geo.bounds, geo.lens).float()
    sel = _alloc(scores.shape, torch.uint8, q.device)
    bc = triton.next_power_of_2(C)
    br = max(1, min(64, 8192 // bc, triton.next_power_of_2(Tq)))
    _moc_select_kernel[(triton.cdiv(Tq, br), Hq, B)](
        scores, geo.own32, geo.lim32, sel, Tq, C, min(int(top_k), C), CAUSAL=bool(causal), BLOCK_R=br, BLOCK_C=bc,
        num_warps=4)
    return sel, geo.bounds32, geo.lim32, int(prefix)


def _as_kernel_tensors(routing):
    sel = routing.sel.to(dtype=torch.uint8).contiguous()
    return sel, routing.bounds.to(torch.int32).contiguous(), routing.lim.to(torch.int32).contiguous(), \
        int(routing.prefix)


def _routing_tensors(q, k, params, routing):
    if routing is None:
        return moc_route(q, k, **{n: params[n] for n in _ROUTE_KEYS if n in params})
    sel, bounds, lim, prefix = _as_kernel_tensors(routing)
    return sel.to(q.device), bounds.to(q.device), lim.to(q.device), prefix


def _route_shape(q, k, params) -> tuple:
    """The router's shape key (:func:`_shape_key`) for q, k and the op's ``params``."""
    return _shape_key(q.shape[1], k.shape[1], params.get("causal", True), params.get("chunk_size", 64),
                      params.get("boundaries"))


def _proven_for(q, k, params) -> bool:
    """:func:`_query_major_proven` for the router's own selection under ``params`` (auto path only)."""
    if _path() != "auto" or q.shape[1] == 0 or k.shape[1] == 0:
        return False
    shape = _route_shape(q, k, params)
    C = len(_geometry(*shape, q.device).lens)
    if C == 0 or triton.next_power_of_2(C) > SELECT_MAX_C:
        return False
    BD, es = _block_d(q.shape[-1]), q.element_size()
    bm = max(_blocks(BD, es, "fwd")[0], _blocks(BD, es, "dq")[0])
    return _query_major_proven(*shape, params.get("top_k", 4), params.get("drop_off", 0.0), bm)


@functools.lru_cache(maxsize=256)
def _flat_seg_len(tk: int, chunk_size: int, boundaries, prefix: int) -> int:
    """The longest chunk segment ``[max(start, prefix), end)`` when the flattened forward / dQ
    loop (every listed chunk walked as ``ceil(longest / BLOCK_N)`` tiles) wastes at most one
    longest segment's worth of keys over all chunks together (fixed chunk sizes: only the last
    chunk and the chunks the prefix cuts are short); 0 otherwise (variable boundaries: one loop
    per chunk)."""
    from ...plugins.context.reference import chunk_bounds
    bounds = chunk_bounds(tk, chunk_size, boundaries)
    segs = [max(0, b1 - max(b0, prefix)) for b0, b1 in zip(bounds[:-1], bounds[1:], strict=True)]
    longest = max(segs, default=0)
    return longest if longest > 0 and sum(longest - s for s in segs) <= longest else 0


#: the forward and dQ walk key tiles in the dense core's order (:func:`_moc_fwd_dense_kernel`,
#: :func:`_moc_dq_dense_kernel`: no chunk lists, unselected chunks masked per row, not skipped)
#: when the chunks are fixed and the router's expected share of (row, chunk) pairs, own chunks
#: included, is at least this (from the shapes alone: rows choose min(top_k, candidates) + 1 of
#: candidates + 1 chunks). Per-token routing then covers nearly every chunk in a 64-row block's
#: union, and the list walk visits the same tiles at a higher cost per tile. 0: whenever the
#: chunks allow it; > 1: never. H100, T = 8192 (share 0.79), chunk 512, top_k 8: forward 0.67
#: vs 0.82-0.87 ms through the lists; dQ 0.83 vs 0.89 ms (random), 0.83 vs 0.80 ms (coherent,
#: whose lists skip 12% of the tiles). T = 16384 has share 0.48 (its coherent unions cover 58%
#: of the tiles) and keeps the lists.
DENSE_ORDER_MIN = 0.75


@functools.lru_cache(maxsize=256)
def _pair_share(tq, tk, causal, chunk_size, boundaries, top_k: int) -> float:
    """The router's share of (row, chunk) pairs over the rows with keys, :data:`DENSE_ORDER_MIN`'s
    measure: sum of min(top_k, cand) + 1 over sum of cand + 1."""
    _, lim, has, cand = _router_rows(tq, tk, causal, chunk_size, boundaries)
    rows = has & (lim > 0)
    total = int((cand + 1)[rows].sum())
    return int((torch.clamp(cand, max=int(top_k)) + 1)[rows].sum()) / total if total else 0.0


def _dense_chunk_for(q, k, params) -> int:
    """The fixed chunk size when the forward should walk in dense order (:data:`DENSE_ORDER_MIN`), else 0."""
    if q.shape[1] == 0 or k.shape[1] == 0 or params.get("boundaries") is not None:
        return 0
    shape = _route_shape(q, k, params)
    if _pair_share(*shape, int(params.get("top_k", 4))) < DENSE_ORDER_MIN:
        return 0
    return int(shape[3])


def _seg_len_for(q, k, params, prefix: int) -> int:
    if q.shape[1] == 0 or k.shape[1] == 0:
        return 0
    _, tk, _, chunk_size, boundaries = _route_shape(q, k, params)
    return _flat_seg_len(tk, chunk_size, boundaries, int(prefix))


def moc_attention_fwd(q, k, v, scale=None, routing=None, **params):
    """-> (o, lse fp32 [B, Hq, Tq]); params as ``context.moc``."""
    sel, bounds, lim, prefix = _routing_tensors(q, k, params, routing)
    sc = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    proven = routing is None and _proven_for(q, k, params)
    seg_len = _seg_len_for(q, k, params, prefix) if routing is None else 0
    chunk = _dense_chunk_for(q, k, params) if routing is None else 0
    return _fwd_op(q, k, v, sel, bounds, lim, prefix, sc, proven, seg_len, chunk)


def moc_attention(q, k, v, scale=None, routing=None, **params):
    """``context.moc`` forward, autograd-enabled (custom op ``blockzoo::moc_fwd``)."""
    return moc_attention_fwd(q, k, v, scale=scale, routing=routing, **params)[0]
