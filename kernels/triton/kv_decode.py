"""Decode-time kernels for the KV cache (``core/cache.py``, ``plugins/token``) in Triton.

Public contract::

    o, lse = decode_attention(q, k, v, scale=None, num_splits=None)
    o, lse, lg = decode_attention(q, k, v, return_logits=True)         # + the pass's logits
    s = token_scores(q, k, lse, scale=None, per_query_head=False)
    h2o_step(lg, lse, acc, pos, k, v, seen, sinks, recent, evict)       # in place
    o, evicted = decode_h2o(q, k, v, pos, acc, seen, keep, sinks, recent)  # the two above
    idx = select_topk(scores, positions, seen, keep, sinks, recent)     # torch ops
    k2, v2, ... = compact(idx, k, v, ...)                               # Triton gather for [B,Hk,T,D]

Layout: ``q`` is ``[B, Tq, Hq, D]`` (the new queries, as the mixer has them); the cache ``k``,
``v`` is ``[B, Hk, T, D]`` (any strides with a unit-stride last dim; the new tokens are its last
``Tq`` entries). GQA: query head ``h`` reads kv head ``h // (Hq // Hk)``. Causality is
bottom-right (query ``i`` sees key ``j`` iff ``j <= i + T - Tq``), so Tq = 1 sees everything.

decode_attention: split-K ("flash-decoding"). Grid ``(S, Hk, B)``: program ``(s, hk, b)`` holds
all ``G * Tq`` query rows of kv group ``hk`` (``G = Hq // Hk``; row ``r`` is query head
``hk * G + r // Tq``, query ``r % Tq``), padded to ``BLOCK_M >= 16`` rows so that the two dots
are tensor-core MMAs, and streams the keys of split ``s`` (``[s * L, (s + 1) * L)``, ``L`` a
multiple of ``BLOCK_N``) through the shared online-softmax loop :func:`attention.attn_fwd_inner`
(K and V are read once per kv head, not once per query head). Interior blocks take the unmasked
path; only the last block (ragged ``T``) and the last ``Tq - 1`` keys (causal) are masked. Each
split writes a normalised partial output and its log-sum-exp (fp32, ``[B, Hq, Tq, S, D]`` and
``[B, Hq, Tq, S]``); a combine kernel (one program per (batch, head, query)) merges them with
weights ``exp(lse_s - max)``. ``S`` is chosen so that ``B * Hk * S`` fills the GPU (about 4
programs per SM) with at least 4 key blocks per split; ``num_splits`` overrides it.
More than :data:`MAX_ROWS` query rows per kv head (a long multi-token step or a prefill) go
to the shared attention core (``attention.attention_fwd`` on ``[B, T, Hk, D]`` views).

token_scores: ``sum_{i, h in group} exp(s_{h,i,j} - lse_{h,i})`` per kv head and token
(``[B, Hk, T]`` fp32; ``per_query_head=True``: ``[B, Hq, T]`` summed over queries only, for
SnapKV's per-head pooling), i.e. the attention each cached token received, given the ``lse``
of the attention pass, without materialising ``[B, Hq, Tq, T]``. Grid ``(T / BLOCK_N, Ho, B)``:
a program loads one K block once and loops over the flattened (head, query) rows that can see
it (rows of queries ``i < j0 - diag`` are skipped), so no atomics. It re-reads K (half the
bytes of the decode pass).

select_topk (``kernels/select.py``, torch ops, re-exported here): the same kept set as
``plugins.token.reference.select`` by ``torch.topk`` over unique int64 keys instead of a sort.

The fused H2O step (issue 7): with ``return_logits`` every split also stores its scaled logits
``qk * scale * log2 e`` (fp32, ``[B, Hq, Tq, T]``, rows padded to 16 floats; for Tq = 1 that is
``4 * Hq / (2 * Hk * D * 2)`` of the K+V bytes, 3% at Hq/Hk = 4, D = 128, bf16), so the
probabilities are ``exp2(lg - lse * log2 e)`` once the combine has the final lse and the score
kernel's second pass over K is gone. ``h2o_step`` (after :func:`decode_attention`): grid
``(T / BLOCK_T, Hk, B)``, each program sums the probabilities of its token chunk over the group's
(head, query) rows (one row at a time in row order, so every tiling gives the same bits), adds
them to ``acc`` in place and writes the chunk's candidate to leave (lowest acc among the
unprotected, ties to the newest position); a second launch per (batch, kv head) picks the best
candidate and moves the newest token into its slot (as ``evict_one``). ``h2o_chunking`` sizes the
chunks (about 8 programs per SM, 256..8192 tokens). ``decode_h2o`` is the whole step, what
``core/cache.py`` runs for token.h2o on this backend; it skips the combine kernel: after the split
pass ONE kernel (grid of token chunks) merges the splits (o, lse; the rows spread over the chunks'
programs), recomputes each group row's final lse from the partials with the combine's own helper
(same bits), accumulates, writes the chunks' candidates, and the last chunk of each row to finish
(a per-row atomic counter, left at 0) picks and moves, so a step is two launches. It gives the
same bits as ``decode_attention`` + ``h2o_step`` (tested), which it falls back to when there is no
split pass (more than ``MAX_ROWS`` query rows per kv head).

evict_one: the decoding step's eviction in place, one launch: per (batch, kv head) the leaving
token (lowest score among the unprotected, ties to the newest) gets the newest token's K, V,
position and running score (``core/cache.py`` then drops the last slot).

compact: a Triton row gather for ``[B, Hk, T, D]`` tensors (one program per block of kept rows,
the index block read once, rows copied with D-wide vector loads); per-token tensors of other
ranks (positions, running scores) use ``torch.gather``.

All outputs are allocated through ``kernels._alloc`` (NaN-poisoned in tests). Under
``TRITON_INTERPRET=1`` everything runs on CPU tensors (slowly).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from .._alloc import empty
from ..select import FEW_EVICTIONS, _sortable_keys, select_topk  # noqa: F401  (torch ops, re-exported)
from .attention import (
    LOG2E,
    _block_d,
    _dot,
    _dot_acc,
    _interpreting,
    _loop_bound,
    attn_fwd_finish_log2,
    attn_fwd_inner,
)

__all__ = ["decode_attention", "token_scores", "select_topk", "compact", "evict_one", "h2o_step", "decode_h2o",
           "MAX_ROWS", "DECODE_CFG"]

#: most query rows (GQA group x new queries) one decode program holds; more go to the core.
MAX_ROWS = 64
#: most key splits (the combine kernel holds one [splits, D] tile)
MAX_SPLITS = 128
#: (BLOCK_N, num_warps, num_stages) of the split kernel per BLOCK_D bucket; see docs/notes/kv_decode.md.
#: (BLOCK_D bucket, 2- or 4-byte elements) -> (BLOCK_N, num_warps, num_stages) candidates, best
#: first; the first that fits in shared memory is kept (see docs/notes/kv_decode.md for the sweep).
DECODE_CFG = {
    (64, 2): [(64, 4, 3), (32, 4, 2)], (128, 2): [(128, 4, 3), (64, 4, 3)], (256, 2): [(32, 4, 2), (16, 4, 2)],
    (64, 4): [(64, 4, 3), (32, 4, 2)], (128, 4): [(64, 4, 3), (32, 4, 2)], (256, 4): [(32, 4, 2), (16, 4, 1)],
}
_CHOSEN: dict = {}
#: decode_h2o: L2 eviction hints in the split pass (``BLOCKZOO_H2O_L2_HINTS=0`` turns them
#: off; see decode_h2o). On by default: on the H100 (B=16, T=32768, 25%, CUDA-graph timing,
#: 2026-11-23) they cut the policy's cost from 11.4% to 7.2% of the kept decode at 8:8 heads and
#: from 19.2% to 18.6% at 32:8 (bench/kv_decode_gpu.py --policy-only).
H2O_L2_HINTS = os.environ.get("BLOCKZOO_H2O_L2_HINTS", "1") == "1"
_COUNTERS: dict = {}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SM_COUNT: dict = {}


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _load_kv(base, rows, stride_row, offs_d, n_rows, D: tl.constexpr, CHECK_ROWS: tl.constexpr,
             EVEN_D: tl.constexpr, POLICY: tl.constexpr):
    """``attention._load_tile`` with an L2 eviction hint (POLICY: "" or "evict_first")."""
    ptrs = base + rows[:, None] * stride_row + offs_d[None, :]
    if CHECK_ROWS:
        if EVEN_D:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0, eviction_policy=POLICY)
        else:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < D), other=0.0,
                        eviction_policy=POLICY)
    else:
        if EVEN_D:
            x = tl.load(ptrs, eviction_policy=POLICY)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < D, other=0.0, eviction_policy=POLICY)
    return x


@triton.jit
def _split_inner_logits(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, rmask, offs_d,
                        lg_rows, lo, hi, qk_scale, Tk, diag, D: tl.constexpr, BLOCK_N: tl.constexpr,
                        MASKED: tl.constexpr, EVEN_D: tl.constexpr, L2_HINTS: tl.constexpr):
    """``attention.attn_fwd_inner`` (causal) that also stores ``qk * qk_scale`` of the valid rows
    (``rmask``) and keys ``< Tk`` at ``lg_rows + key``: the logits the H2O step turns into
    probabilities with the final lse (:func:`h2o_step`), so that no second pass reads K.
    L2_HINTS: K / V stream through L2 with "evict_first" and the logits are stored "evict_last",
    so that the policy kernel right after finds them in L2 (they are 3% of the bytes)."""
    KV_POLICY: tl.constexpr = "evict_first" if L2_HINTS else ""
    LG_POLICY: tl.constexpr = "evict_last" if L2_HINTS else ""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(_loop_bound(lo), _loop_bound(hi), BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n0
        k = _load_kv(k_base, cols, stride_kn, offs_d, Tk, D, MASKED, EVEN_D, KV_POLICY)
        s = _dot(q, tl.trans(k)) * qk_scale
        lg_ptrs = lg_rows[:, None] + cols[None, :]
        if MASKED:
            tl.store(lg_ptrs, s, mask=rmask[:, None] & (cols[None, :] < Tk), eviction_policy=LG_POLICY)
            valid = (cols[None, :] < Tk) & (cols[None, :] <= offs_m[:, None] + diag)
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            tl.store(lg_ptrs, s, mask=rmask[:, None], eviction_policy=LG_POLICY)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_sub = m_new
        p = tl.math.exp2(s - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = _load_kv(v_base, cols, stride_vn, offs_d, Tk, D, MASKED, EVEN_D, KV_POLICY)
        acc = _dot_acc(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _decode_split_kernel(Q, K, V, OP, LP, LG,
                         s_qb, s_qt, s_qh, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt,
                         Hq, Tq, T, GROUP, split_len, S, qk_scale, diag, n_full, LDT,
                         D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, NEG_SCALE: tl.constexpr, LOGITS: tl.constexpr,
                         L2_HINTS: tl.constexpr):
    EVEN_D: tl.constexpr = D == BLOCK_D
    sid = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    g = rows // Tq
    qi = rows - g * Tq
    h = hk * GROUP + g
    rmask = rows < GROUP * Tq
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = Q + b * s_qb + qi[:, None] * s_qt + h[:, None].to(tl.int64) * s_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=rmask[:, None] & (offs_d[None, :] < D), other=0.0)
    k_base = K + b * s_kb + hk.to(tl.int64) * s_kh
    v_base = V + b * s_vb + hk.to(tl.int64) * s_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo = sid * split_len
    hi = tl.minimum(lo + split_len, T)
    # keys < n_full (a multiple of BLOCK_N) are inside [0, T) and visible to every query row
    u_end = tl.maximum(lo, tl.minimum(hi, n_full))
    if LOGITS:  # the same sweep, also writing every row's scaled logits (log2 units) to LG
        lg_rows = LG + ((b * Hq + h) * Tq + qi).to(tl.int64) * LDT  # [BLOCK_M] row starts
        acc, m_i, l_i = _split_inner_logits(acc, m_i, l_i, q, k_base, v_base, s_kt, s_vt, qi, rmask, offs_d,
                                            lg_rows, lo, u_end, qk_scale, T, diag, D, BLOCK_N, False, EVEN_D,
                                            L2_HINTS)
        acc, m_i, l_i = _split_inner_logits(acc, m_i, l_i, q, k_base, v_base, s_kt, s_vt, qi, rmask, offs_d,
                                            lg_rows, u_end, hi, qk_scale, T, diag, D, BLOCK_N, True, EVEN_D,
                                            L2_HINTS)
    else:
        acc, m_i, l_i = attn_fwd_inner(acc, m_i, l_i, q, k_base, v_base, s_kt, s_vt, qi, offs_d,
                                       lo, u_end, qk_scale, T, diag, D, BLOCK_N,
                                       False, True, EVEN_D, NEG_SCALE)
        acc, m_i, l_i = attn_fwd_inner(acc, m_i, l_i, q, k_base, v_base, s_kt, s_vt, qi, offs_d,
                                       u_end, hi, qk_scale, T, diag, D, BLOCK_N,
                                       True, True, EVEN_D, NEG_SCALE)
    o, lse2 = attn_fwd_finish_log2(acc, m_i, l_i)  # log2 units
    prow = ((b * Hq + h) * Tq + qi) * S + sid  # [BLOCK_M] partial index
    tl.store(LP + prow, lse2, mask=rmask)
    o_ptrs = OP + prow[:, None] * D + offs_d[None, :]
    tl.store(o_ptrs, o, mask=rmask[:, None] & (offs_d[None, :] < D))


@triton.jit
def _row_lse(LP, base, S, valid):
    """Final log-sum-exp (natural log) of one (batch, head, query) row from its splits' partial
    lse (log2 units, ``LP[base : base + S]``); ``valid`` False gives -inf. ``base`` / ``valid``
    may be row vectors (then each row is computed by the same operations, elementwise). Also the row's max and
    sum of weights ``exp2(lse_s - max)``. The splits are visited one at a time in order (scalar
    loads; S is small), so the bits do not depend on the launch's warps or tiles: the combine and
    the fused H2O combine compute the same lse."""
    m = tl.where(valid, float("-inf"), float("-inf"))  # (the shape of valid: a scalar or a row vector)
    for s in range(0, _loop_bound(S)):
        m = tl.maximum(m, tl.load(LP + base + s, mask=valid, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    tot = tl.where(valid, 0.0, 0.0)
    for s in range(0, _loop_bound(S)):
        tot += tl.math.exp2(tl.load(LP + base + s, mask=valid, other=float("-inf")) - m_safe)
    tot_safe = tl.where(tot == 0.0, 1.0, tot)
    lse = tl.where(tot == 0.0, float("-inf"), (m_safe + tl.math.log2(tot_safe)) * 0.6931471805599453)
    return lse, m_safe, tot_safe


@triton.jit
def _combine_row(OP, LP, Out, LSE, b, h, qi, Hq, Tq, S, s_ob, s_ot, s_oh,
                 D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Merge the S split partials of row (b, h, qi): o (q's dtype) and lse (natural log), the
    splits added one at a time in order (the same bits in any launch configuration)."""
    prow = (b * Hq + h) * Tq + qi
    base = prow * S
    lse, m_safe, tot_safe = _row_lse(LP, base, S, prow >= 0)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    o = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s in range(0, _loop_bound(S)):
        w = tl.math.exp2(tl.load(LP + base + s) - m_safe)
        o += w * tl.load(OP + (base + s) * D + offs_d, mask=dmask, other=0.0)
    o = o / tot_safe
    tl.store(Out + b * s_ob + qi * s_ot + h.to(tl.int64) * s_oh + offs_d, o.to(Out.dtype.element_ty), mask=dmask)
    tl.store(LSE + prow, lse)


@triton.jit
def _decode_combine_kernel(OP, LP, Out, LSE, s_ob, s_ot, s_oh, Hq, Tq, S,
                           D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    row = tl.program_id(0)  # h * Tq + qi
    b = tl.program_id(1).to(tl.int64)
    h = row // Tq
    qi = row - h * Tq
    _combine_row(OP, LP, Out, LSE, b, h, qi, Hq, Tq, S, s_ob, s_ot, s_oh, D, BLOCK_D, BLOCK_S)


@triton.jit
def _token_scores_kernel(Q, K, LSE, SC, s_qb, s_qt, s_qh, s_kb, s_kh, s_kt,
                         Hq, Ho, Tq, T, GROUP, HPO, qk_scale, diag,
                         D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    """Scores of key block ``pid_n`` for output head ``ho`` (query heads ``ho*HPO ..``)."""
    EVEN_D: tl.constexpr = D == BLOCK_D
    pid_n = tl.program_id(0)
    ho = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    hk = (ho * HPO) // GROUP
    k_ptrs = K + b * s_kb + hk.to(tl.int64) * s_kh + offs_n[:, None] * s_kt + offs_d[None, :]
    if EVEN_D:
        kt = tl.load(k_ptrs, mask=offs_n[:, None] < T, other=0.0)
    else:
        kt = tl.load(k_ptrs, mask=(offs_n[:, None] < T) & (offs_d[None, :] < D), other=0.0)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    # queries i < n0 - diag see no key of this block: skip them
    i_lo = tl.minimum(tl.maximum(n0 - diag, 0), Tq)
    nq = Tq - i_lo
    n_rows = HPO * nq
    r0 = tl.arange(0, BLOCK_M)
    for start in range(0, _loop_bound(n_rows), BLOCK_M):
        r = start + r0
        g = r // tl.maximum(nq, 1)
        qi = i_lo + r - g * nq
        h = ho * HPO + g
        rmask = r < n_rows
        q_ptrs = Q + b * s_qb + qi[:, None] * s_qt + h[:, None].to(tl.int64) * s_qh + offs_d[None, :]
        q = tl.load(q_ptrs, mask=rmask[:, None] & (offs_d[None, :] < D), other=0.0)
        lse = tl.load(LSE + (b * Hq + h) * Tq + qi, mask=rmask, other=float("inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        qk = _dot(kt, tl.trans(q))  # [BLOCK_N, BLOCK_M]
        p = tl.math.exp2(qk * qk_scale - lse2[None, :])
        valid = (offs_n[:, None] < T) & rmask[None, :] & (offs_n[:, None] <= qi[None, :] + diag)
        acc += tl.sum(tl.where(valid, p, 0.0), 1)
    tl.store(SC + (b * Ho + ho) * T + offs_n, acc, mask=offs_n < T)


@triton.jit
def _gather_rows_kernel(IDX, X, Y, s_ib, s_ih, s_xb, s_xh, s_xt, s_yb, s_yh, s_yt, KEEP,
                        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    hk = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < KEEP
    src = tl.load(IDX + b * s_ib + hk * s_ih + rows, mask=rmask, other=0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    m = rmask[:, None] & (offs_d[None, :] < D)
    x = tl.load(X + b * s_xb + hk * s_xh + src[:, None] * s_xt + offs_d[None, :], mask=m)
    tl.store(Y + b * s_yb + hk * s_yh + rows[:, None].to(tl.int64) * s_yt + offs_d[None, :], x, mask=m)


@triton.jit
def _chunk_candidate(sc, p, offs, tmask, seen, sinks, recent):
    """The token of one chunk that would leave: the lowest score ``sc`` among the unprotected
    (position ``p`` >= sinks and < seen - recent), ties to the newest position. Returns its
    (score, position, slot); position -1 when the chunk has no unprotected token."""
    free = tmask & (p >= sinks) & (p < seen - recent)
    sc = tl.where(free, sc, float("inf"))
    bm = tl.min(sc, 0)
    cand = free & (sc == bm)
    bp = tl.max(tl.where(cand, p, -1), 0)
    bi = tl.max(tl.where(cand & (p == bp), offs, -1), 0).to(tl.int32)
    return bm, bp, bi


@triton.jit
def _better(bm, bp, bi, best_s, best_p, best_i):
    """Merge a candidate into the running best (lower score wins, ties to the newer position)."""
    better = (bp >= 0) & ((bm < best_s) | ((bm == best_s) & (bp > best_p)))
    return tl.where(better, bm, best_s), tl.where(better, bp, best_p), tl.where(better, bi, best_i)


@triton.jit
def _no_best():
    """The empty running best of :func:`_better` (typed like the loop's values)."""
    return (tl.zeros([], dtype=tl.float32) + float("inf"), tl.zeros([], dtype=tl.int64) - 1,
            tl.zeros([], dtype=tl.int32) - 1)


@triton.jit
def _move_newest(best_i, last, K, V, POS, ACC, b, h, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_pb, s_ph, s_ab, s_ah,
                 D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_ACC: tl.constexpr, VOLATILE: tl.constexpr):
    """The newest token (slot ``last``) moves into slot ``best_i`` (K, V, position and, with
    HAS_ACC, the running score); nothing when there is no candidate or it is the newest itself.
    VOLATILE: pos / acc[last] were written by another program of the same launch."""
    move = (best_i >= 0) & (best_i != last)
    dst = tl.maximum(best_i, 0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    md = (offs_d < D) & move
    kr = K + b * s_kb + h * s_kh
    tl.store(kr + dst * s_kt + offs_d, tl.load(kr + last * s_kt + offs_d, mask=md), mask=md)
    vr = V + b * s_vb + h * s_vh
    tl.store(vr + dst * s_vt + offs_d, tl.load(vr + last * s_vt + offs_d, mask=md), mask=md)
    one = tl.arange(0, 2)
    m1 = (one == 0) & move
    pr = POS + b * s_pb + h * s_ph
    tl.store(pr + dst + one, tl.load(pr + last + one, mask=m1, volatile=VOLATILE), mask=m1)
    if HAS_ACC:
        ar = ACC + b * s_ab + h * s_ah
        tl.store(ar + dst + one, tl.load(ar + last + one, mask=m1, volatile=VOLATILE), mask=m1)


@triton.jit
def _evict_one_kernel(SC, POS, K, V, ACC, s_sb, s_sh, s_pb, s_ph, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt,
                      s_ab, s_ah, Hk, n, seen, sinks, recent,
                      D: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, HAS_ACC: tl.constexpr):
    """One (batch, kv head) row: the leaving token is the unprotected one with the lowest score,
    ties to the newest (the complement of the selector's "highest score, ties to the older");
    the row's last slot (the newest token) is copied into its slot. The caller drops slot n-1."""
    row = tl.program_id(0)
    b = (row // Hk).to(tl.int64)
    h = (row % Hk).to(tl.int64)
    sc_row = SC + b * s_sb + h * s_sh
    pos_row = POS + b * s_pb + h * s_ph
    best_s, best_p, best_i = _no_best()
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < n
        p = tl.load(pos_row + offs, mask=m, other=0).to(tl.int64)
        sc = tl.load(sc_row + offs, mask=m, other=float("inf")).to(tl.float32)
        bm, bp, bi = _chunk_candidate(sc, p, offs, m, seen, sinks, recent)
        best_s, best_p, best_i = _better(bm, bp, bi, best_s, best_p, best_i)
    _move_newest(best_i, n - 1, K, V, POS, ACC, b, h, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_pb, s_ph, s_ab, s_ah,
                 D, BLOCK_D, HAS_ACC, False)


@triton.jit
def _group_prob_sum(LG, LSE, LP, row0, nrows, Tq, S, LDT, diag, offs, tmask,
                    FROM_PARTIALS: tl.constexpr, UNROLL: tl.constexpr, BLOCK_T: tl.constexpr):
    """``sum over the group's (head, query) rows r < nrows of exp2(lg_r - lse_r * log2 e)`` for the
    tokens ``offs`` (visible keys only), rows added one at a time in row order (the same bits for
    any tile size / warp count / UNROLL: a row is taken out of the [UNROLL, BLOCK_T] tile by a sum
    with zeros, which is exact). The rows' lse are read from LSE (natural log), or with
    FROM_PARTIALS computed from the split partials LP by the combine's own helper (the same bits
    as the lse the combine stores). The logits tile is loaded before the lse are computed."""
    tot = tl.zeros([BLOCK_T], dtype=tl.float32)
    rr = tl.arange(0, UNROLL)
    for r0 in range(0, _loop_bound(nrows), UNROLL):
        r = r0 + rr
        rok = r < nrows
        qi = r % Tq
        m2 = rok[:, None] & tmask[None, :]
        lg = tl.load(LG + (row0 + r)[:, None] * LDT + offs[None, :], mask=m2, other=float("-inf"))
        if FROM_PARTIALS:
            lse, _m, _t = _row_lse(LP, (row0 + r) * S, S, rok)
        else:
            lse = tl.load(LSE + row0 + r, mask=rok, other=float("-inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        valid = m2 & (offs[None, :] <= qi[:, None] + diag)
        p = tl.where(valid, tl.math.exp2(lg - lse2[:, None]), 0.0)
        for u in tl.static_range(UNROLL):
            tot = tot + tl.sum(tl.where(rr[:, None] == u, p, 0.0), 0)
    return tot


@triton.jit
def _load_acc_pos(ACC, POS, b, hk, offs, tmask, s_ab, s_ah, s_pb, s_ph, EVICT: tl.constexpr):
    """The chunk's running scores and (EVICT) positions, issued before the logits."""
    a = tl.load(ACC + b * s_ab + hk.to(tl.int64) * s_ah + offs, mask=tmask, other=0.0)
    if EVICT:
        p = tl.load(POS + b * s_pb + hk.to(tl.int64) * s_ph + offs, mask=tmask, other=0).to(tl.int64)
    else:
        p = offs.to(tl.int64)
    return a, p


@triton.jit
def _acc_and_candidate(tot, a, p, ACC, CS, CP, CI, b, hk, Hk, c, offs, tmask, n_chunks,
                       seen, sinks, recent, s_ab, s_ah, EVICT: tl.constexpr):
    """``acc = a + tot`` for chunk ``c`` of row (b, hk) (``a``, ``p``: its acc and positions from
    :func:`_load_acc_pos`); with EVICT the chunk's candidate to leave (lowest accumulated score
    among the unprotected, ties to the newest position) and its slot go to CS / CP / CI."""
    a = a + tot
    tl.store(ACC + b * s_ab + hk.to(tl.int64) * s_ah + offs, a, mask=tmask)
    if EVICT:
        bm, bp, bi = _chunk_candidate(a, p, offs, tmask, seen, sinks, recent)
        row = b * Hk + hk
        ci = row * n_chunks + c
        tl.store(CS + ci, bm)
        tl.store(CP + ci, bp)
        tl.store(CI + ci, bi)


@triton.jit
def _h2o_accum_kernel(LG, LSE, ACC, POS, CS, CP, CI, s_ab, s_ah, s_pb, s_ph, LDT,
                      Hq, Tq, T, GROUP, diag, n_chunks, seen, sinks, recent,
                      UNROLL: tl.constexpr, BLOCK_T: tl.constexpr, EVICT: tl.constexpr):
    """H2O step, part 1: chunk ``c`` of the tokens of (batch ``b``, kv head ``hk``):
    ``acc += sum over the group's (head, query) rows of exp2(lg - lse * log2 e)`` (visible keys
    only), in place; with EVICT, the chunk's candidate to leave and its slot go to CS / CP / CI
    (part 2, :func:`_h2o_evict_kernel`, picks and moves)."""
    c = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs = c * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = offs < T
    row0 = (b * Hq + hk * GROUP) * Tq  # the group's rows (head, query) are contiguous in LG / LSE
    a, p = _load_acc_pos(ACC, POS, b, hk, offs, tmask, s_ab, s_ah, s_pb, s_ph, EVICT)
    tot = _group_prob_sum(LG, LSE, LSE, row0, GROUP * Tq, Tq, 1, LDT, diag, offs, tmask, False, UNROLL, BLOCK_T)
    _acc_and_candidate(tot, a, p, ACC, CS, CP, CI, b, hk, tl.num_programs(1), c, offs, tmask, n_chunks,
                       seen, sinks, recent, s_ab, s_ah, EVICT)


@triton.jit
def _h2o_combine_kernel(OP, LP, Out, LSE, LG, ACC, POS, CS, CP, CI, CNT, K, V,
                        s_ob, s_ot, s_oh, s_ab, s_ah, s_pb, s_ph, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt,
                        Hq, Tq, T, GROUP, S, LDT, diag, n_chunks, seen, sinks, recent,
                        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                        UNROLL: tl.constexpr, BLOCK_T: tl.constexpr, EVICT: tl.constexpr,
                        BLOCK_C: tl.constexpr):
    """The split-K combine and the whole H2O step in one launch after the split pass. Grid
    ``(n_chunks, Hk, B)``: program (c, hk, b) merges the partials of its share of the group's rows
    (rows ``c, c + n_chunks, ...``: o and lse, as :func:`_decode_combine_kernel`), then for token
    chunk ``c`` recomputes every group row's final lse from the partials (the same helper, so the
    same bits as the stored lse), adds the probabilities ``exp2(lg - lse * log2 e)`` into acc and,
    with EVICT, writes the chunk's candidate; the row's last chunk to finish picks and moves."""
    c = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    nrows = GROUP * Tq
    for r in range(_loop_bound(c), _loop_bound(nrows), _loop_bound(n_chunks)):
        g = r // Tq
        _combine_row(OP, LP, Out, LSE, b, hk * GROUP + g, r - g * Tq, Hq, Tq, S, s_ob, s_ot, s_oh,
                     D, BLOCK_D, BLOCK_S)
    offs = c * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = offs < T
    row0 = (b * Hq + hk * GROUP) * Tq
    a, p = _load_acc_pos(ACC, POS, b, hk, offs, tmask, s_ab, s_ah, s_pb, s_ph, EVICT)
    tot = _group_prob_sum(LG, LSE, LP, row0, nrows, Tq, S, LDT, diag, offs, tmask, True, UNROLL, BLOCK_T)
    Hk = tl.num_programs(1)
    _acc_and_candidate(tot, a, p, ACC, CS, CP, CI, b, hk, Hk, c, offs, tmask, n_chunks,
                       seen, sinks, recent, s_ab, s_ah, EVICT)
    if EVICT:  # the row's last chunk to finish (a per-row counter in CNT, left at 0) picks and moves
        row = b * Hk + hk
        tl.debug_barrier()  # every thread stored its part before the release
        done = tl.atomic_add(CNT + row, 1, sem="acq_rel", scope="gpu")
        if done == n_chunks - 1:
            _pick_and_move(CS, CP, CI, row * n_chunks, n_chunks, POS, K, V, ACC, b, hk.to(tl.int64),
                           s_pb, s_ph, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_ab, s_ah, T, D, BLOCK_C,
                           BLOCK_D, True)
            tl.atomic_xchg(CNT + row, 0, sem="relaxed", scope="gpu")  # ready for the next call


@triton.jit
def _pick_and_move(CS, CP, CI, base, n_chunks, POS, K, V, ACC, b, h, s_pb, s_ph, s_kb, s_kh, s_kt,
                   s_vb, s_vh, s_vt, s_ab, s_ah, n, D: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_D: tl.constexpr, VOLATILE: tl.constexpr):
    """The best of one row's chunk candidates (lowest score, ties to the newest, as
    ``_evict_one_kernel``) leaves: the newest token (slot n-1) moves into its slot (K, V,
    position, acc). The caller drops slot n-1."""
    best_s, best_p, best_i = _no_best()
    for start in range(0, _loop_bound(n_chunks), BLOCK_C):
        offs = start + tl.arange(0, BLOCK_C)
        m = offs < n_chunks
        cp = tl.load(CP + base + offs, mask=m, other=-1, volatile=VOLATILE)
        ok = m & (cp >= 0)
        cs = tl.where(ok, tl.load(CS + base + offs, mask=m, other=float("inf"), volatile=VOLATILE), float("inf"))
        ci = tl.load(CI + base + offs, mask=m, other=-1, volatile=VOLATILE)
        bm = tl.min(cs, 0)
        cand = ok & (cs == bm)
        bp = tl.max(tl.where(cand, cp, -1), 0)
        bi = tl.max(tl.where(cand & (cp == bp), ci, -1), 0).to(tl.int32)
        best_s, best_p, best_i = _better(bm, bp, bi, best_s, best_p, best_i)
    _move_newest(best_i, n - 1, K, V, POS, ACC, b, h, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_pb, s_ph, s_ab, s_ah,
                 D, BLOCK_D, True, VOLATILE)


@triton.jit
def _h2o_evict_kernel(CS, CP, CI, POS, K, V, ACC, s_pb, s_ph, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt,
                      s_ab, s_ah, Hk, n, n_chunks,
                      D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """H2O step, part 2 (per (batch, kv head)): :func:`_pick_and_move` over the chunks' candidates."""
    row = tl.program_id(0)
    b = (row // Hk).to(tl.int64)
    h = (row % Hk).to(tl.int64)
    _pick_and_move(CS, CP, CI, row.to(tl.int64) * n_chunks, n_chunks, POS, K, V, ACC, b, h, s_pb, s_ph,
                   s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_ab, s_ah, n, D, BLOCK_C, BLOCK_D, False)


# ---------------------------------------------------------------------------------------------
# host wrappers
# ---------------------------------------------------------------------------------------------
def _check_device(*ts: torch.Tensor) -> None:
    dev = ts[0].device
    if any(t.device != dev for t in ts):
        raise ValueError("all tensors must be on one device")
    if dev.type != "cuda" and not _interpreting():
        raise RuntimeError("the Triton KV-decode kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU)")


def _check_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"decode_attention expects q [B, Tq, Hq, D] and the cache k, v [B, Hk, T, D]; got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, Tq, Hq, D = q.shape
    if tuple(k.shape) != tuple(v.shape) or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         "(k, v must be [B, Hk, T, D] with q's B and D)")
    Hk, T = k.shape[1], k.shape[2]
    if Hk == 0 or Hq % Hk:
        raise ValueError(f"GQA needs Hq % Hk == 0, got Hq={Hq}, Hk={Hk}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        raise TypeError(f"q, k, v must share one dtype of {_DTYPES}; got {q.dtype}, {k.dtype}, {v.dtype}")
    if D < 1 or D > 256:
        raise ValueError(f"head dim {D} not supported (1..256)")
    _check_device(q, k, v)
    return B, Tq, Hq, D, Hk, T


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if (x.stride(-1) == 1 or x.shape[-1] == 1) else x.contiguous()


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SM_COUNT:
        _SM_COUNT[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SM_COUNT[i]


def default_splits(B: int, Hk: int, T: int, block_n: int, device: torch.device) -> int:
    """Splits so that ``B * Hk * S`` is about 4 programs per SM, each split >= 4 key blocks."""
    n_blocks = triton.cdiv(T, block_n)
    want = triton.cdiv(4 * _sm_count(device), max(B * Hk, 1))
    return max(1, min(want, triton.cdiv(n_blocks, 4), 64))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                     num_splits: int | None = None, cfg: tuple[int, int, int] | None = None,
                     return_logits: bool = False):
    """Attention of the new queries q [B, Tq, Hq, D] over the cache k, v [B, Hk, T, D]
    (bottom-right causal). Returns o [B, Tq, Hq, D] (q's dtype) and lse [B, Hq, Tq] (fp32,
    natural log). ``num_splits`` / ``cfg`` = (BLOCK_N, warps, stages) override the defaults.
    ``return_logits``: also the scaled logits ``lg = (q . k) * scale * log2(e)`` [B, Hq, Tq, T]
    fp32 (every key, the causally hidden ones included), written by the same pass, so that the
    probabilities are ``exp2(lg - lse * log2(e))`` without reading K again (:func:`h2o_step`)."""
    B, Tq, Hq, D, Hk, T = _check_decode(q, k, v)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    G = Hq // Hk
    if T < Tq:
        raise ValueError(f"the cache must hold the {Tq} new tokens (its last entries); it has T={T}")
    if G * Tq > MAX_ROWS:  # long multi-token step: the shared prefill kernel
        from .attention import attention_fwd
        o, lse = attention_fwd(q, k.transpose(1, 2), v.transpose(1, 2), True, scale)
        if not return_logits:
            return o, lse
        # (rare: a long multi-token step) the logits by a torch matmul, fp32
        kf = k.float().repeat_interleave(G, 1)
        lg = torch.einsum("bqhd,bhkd->bhqk", q.float(), kf) * (scale * LOG2E)
        return o, lse, lg.contiguous()
    sp = _split_pass(q, k, v, scale, num_splits, cfg, return_logits)
    if sp.S:
        _decode_combine_kernel[(Hq * Tq, B)](
            sp.op, sp.lp, sp.o, sp.lse, sp.o.stride(0), sp.o.stride(1), sp.o.stride(2), Hq, Tq, sp.S,
            D=D, BLOCK_D=sp.BD, BLOCK_S=sp.BS, num_warps=4 if not _interpreting() else 1)
    return (sp.o, sp.lse, sp.lg) if return_logits else (sp.o, sp.lse)


class _Split:
    """The split pass's outputs: o / lse (to be written by a combine), the logits, the partials."""
    __slots__ = ("o", "lse", "lg", "ldt", "op", "lp", "S", "BD", "BS")


def _split_pass(q, k, v, scale, num_splits, cfg, return_logits, l2_hints=False) -> _Split:
    """Allocate o, lse (and lg) and run the split kernel; ``S == 0``: nothing to combine (empty)."""
    B, Tq, Hq, D = q.shape
    Hk, T = k.shape[1], k.shape[2]
    G = Hq // Hk
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    sp = _Split()
    sp.o = empty((B, Tq, Hq, D), dtype=q.dtype, device=q.device)
    sp.lse = empty((B, Hq, Tq), dtype=torch.float32, device=q.device)
    # logits rows padded to 16 floats (aligned rows: vector stores and loads); returned as a view
    sp.ldt = ldt = triton.cdiv(T, 16) * 16
    sp.lg = lg = (empty((B, Hq, Tq, ldt), dtype=torch.float32, device=q.device)[..., :T] if return_logits
                  else sp.lse)
    sp.S = 0
    if sp.o.numel() == 0:
        sp.lse.fill_(float("-inf"))
        return sp
    BD = _block_d(D)
    bucket = 64 if BD <= 64 else (128 if BD <= 128 else 256)
    key = (bucket, 2 if q.element_size() <= 2 else 4)
    if _interpreting():
        cands = [(16, 1, 1)]
    else:
        cands = [cfg] if cfg else ([_CHOSEN[key]] if key in _CHOSEN else DECODE_CFG[key])
    env = os.environ.get("BLOCKZOO_KV_DECODE_SPLITS")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    diag = T - Tq
    BM = max(16, triton.next_power_of_2(G * Tq))

    def launch(c):
        bn, warps, stages = c
        S = min(num_splits or (int(env) if env else default_splits(B, Hk, T, bn, q.device)), MAX_SPLITS)
        split_len = triton.cdiv(triton.cdiv(T, max(S, 1)), bn) * bn
        S = triton.cdiv(T, split_len)
        n_full = (max(diag + 1, 0) // bn) * bn
        op_ = empty((B, Hq, Tq, S, D), dtype=torch.float32, device=q.device)
        lp = empty((B, Hq, Tq, S), dtype=torch.float32, device=q.device)
        _decode_split_kernel[(S, Hk, B)](
            q, k, v, op_, lp, lg,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            Hq, Tq, T, G, split_len, S, scale * LOG2E, diag, n_full, ldt,
            D=D, BLOCK_D=BD, BLOCK_M=BM, BLOCK_N=bn, NEG_SCALE=scale < 0, LOGITS=return_logits,
            L2_HINTS=bool(return_logits and l2_hints), num_warps=warps, num_stages=stages)
        return op_, lp, S

    err = None
    for c in cands:  # the first candidate that fits (OutOfResources: shared memory)
        try:
            sp.op, sp.lp, sp.S = launch(c)
        except OutOfResources as e:
            err = e
            continue
        if not cfg:
            _CHOSEN[key] = c
        break
    else:
        raise err
    sp.BD, sp.BS = BD, max(2, triton.next_power_of_2(sp.S))
    return sp


def token_scores(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float | None = None,
                 per_query_head: bool = False) -> torch.Tensor:
    """Attention each cached token received: ``[B, Hk, T]`` fp32 summed over the queries and the
    query heads of its kv group (``per_query_head``: ``[B, Hq, T]``, summed over queries only).
    q [B, Tq, Hq, D], k [B, Hk, T, D], lse [B, Hq, Tq] (natural log, from the attention pass)."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"token_scores expects q [B, Tq, Hq, D] and k [B, Hk, T, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}")
    B, Tq, Hq, D = q.shape
    Hk, T = k.shape[1], k.shape[2]
    if Hk == 0 or Hq % Hk:
        raise ValueError(f"GQA needs Hq % Hk == 0, got Hq={Hq}, Hk={Hk}")
    if tuple(lse.shape) != (B, Hq, Tq):
        raise ValueError(f"lse must be [B, Hq, Tq] = {(B, Hq, Tq)}, got {tuple(lse.shape)}")
    if q.dtype != k.dtype or q.dtype not in _DTYPES:
        raise TypeError(f"q, k must share one dtype of {_DTYPES}; got {q.dtype}, {k.dtype}")
    _check_device(q, k, lse)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    G = Hq // Hk
    HPO = 1 if per_query_head else G
    Ho = Hq // HPO
    q, k = _unit_last(q), _unit_last(k)
    lse = lse.contiguous().float()
    sc = empty((B, Ho, T), dtype=torch.float32, device=q.device)
    if sc.numel() == 0:
        return sc
    BD = _block_d(D)
    if _interpreting():
        BN, BM, warps = 16, 16, 1
    else:
        BN = 64 if BD <= 128 else 32
        BM = 16 if HPO * Tq <= 16 else (32 if HPO * Tq <= 32 else 64)
        warps = 4
    _token_scores_kernel[(triton.cdiv(T, BN), Ho, B)](
        q, k, lse, sc, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        Hq, Ho, Tq, T, G, HPO, scale * LOG2E, T - Tq,
        D=D, BLOCK_D=BD, BLOCK_M=BM, BLOCK_N=BN, num_warps=warps)
    return sc


# ---------------------------------------------------------------------------------------------
# selection and compaction
# ---------------------------------------------------------------------------------------------
def compact(idx: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Gather each [B, Hk, T, ...] tensor along T with idx [B, Hk, keep] (as the reference
    ``compact``): 4-D [B, Hk, T, D] tensors with the Triton row gather, others with torch."""
    out = []
    B, Hk, keep = idx.shape
    for x in tensors:
        if x.dim() != 4 or x.device != idx.device or (x.device.type != "cuda" and not _interpreting()):
            ix = idx.view(*idx.shape, *([1] * (x.dim() - 3))).expand(*idx.shape, *x.shape[3:])
            out.append(torch.gather(x, 2, ix))
            continue
        x = _unit_last(x)
        D = x.shape[3]
        y = empty((B, Hk, keep, D), dtype=x.dtype, device=x.device)
        if y.numel():
            BD = triton.next_power_of_2(D)
            BR = 16 if _interpreting() else max(1, min(64, 8192 // (BD * x.element_size())))
            _gather_rows_kernel[(triton.cdiv(keep, BR), Hk, B)](
                idx, x, y, idx.stride(0), idx.stride(1), x.stride(0), x.stride(1), x.stride(2),
                y.stride(0), y.stride(1), y.stride(2), keep, D=D, BLOCK_D=BD, BLOCK_R=BR,
                num_warps=4 if not _interpreting() else 1)
        out.append(y)
    return tuple(out)


def evict_one(scores: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
              acc: torch.Tensor | None, seen: int, sinks: int, recent: int) -> None:
    """In place, one kernel launch: per (batch, kv head) of the cache k, v [B, Hk, n, D] (pos,
    scores, acc [B, Hk, n]), move the newest token (slot n-1) into the slot of the token that
    leaves (lowest score among the unprotected, ties to the newest). The caller then keeps the
    first n-1 slots. The same result as ``drop_few`` + ``core.cache.fill_holes`` with one token
    leaving (tested); the budget must hold the protected tokens (keep >= sinks + recent)."""
    _check_device(scores, k, v, pos)
    B, Hk, n, D = k.shape
    if n == 0:
        return
    for x in (k, v):
        if x.stride(-1) != 1:
            raise ValueError("evict_one needs unit-stride head dims")
    if pos.stride(-1) != 1 or scores.stride(-1) != 1 or (acc is not None and acc.stride(-1) != 1):
        raise ValueError("evict_one needs unit-stride token axes for scores / positions / acc")
    a = acc if acc is not None else scores
    BLOCK = 128 if _interpreting() else 1024
    _evict_one_kernel[(B * Hk,)](
        scores, pos, k, v, a, scores.stride(0), scores.stride(1), pos.stride(0), pos.stride(1),
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        a.stride(0), a.stride(1), Hk, n, seen, sinks, recent,
        D=D, BLOCK=BLOCK, BLOCK_D=triton.next_power_of_2(D), HAS_ACC=acc is not None,
        num_warps=4 if not _interpreting() else 1)


def h2o_chunking(rows: int, n: int, group_rows: int, device: torch.device) -> tuple[int, int]:
    """(tokens per chunk, warps) of the H2O step kernels for ``rows`` = B * Hk rows of ``n``
    tokens with ``group_rows`` = G * Tq logit rows each: the largest power-of-two chunk (at most
    8192 tokens) that still gives about 8 programs per SM, so that each program streams long
    contiguous runs of logits / acc / positions; 4 warps up to 1024 tokens, 8 above. On the H100
    (B=16, 8192 kept, 32:8 and 8:8 heads; bench/kv_decode_gpu.py --policy-only, 2026-11-23) this
    gives (1024, 4), the fastest of (1024, 4), (2048, 8), (4096, 8) and (8192, 8) in every step
    variant then measured (4 programs per SM, (2048, 8), cost 3-8 points of a decode step more)."""
    if _interpreting():
        return 32, 1
    want = max(1, 8 * _sm_count(device))
    bt = triton.next_power_of_2(max(1, triton.cdiv(rows * n, want)))
    if bt > n:  # never more than one chunk's worth beyond the row
        bt = triton.next_power_of_2(n)
    bt = max(256, min(8192, bt))
    return bt, (4 if bt <= 1024 else 8)


def _h2o_launch_args(lg, lse, acc, pos, k, v, evict, cfg):
    """Checks shared by h2o_step and the fused combine; returns the launch geometry."""
    _check_device(lg, lse, acc, pos, k, v)
    B, Hk, n, D = k.shape
    if lg.dim() != 4 or lg.shape[0] != B or lg.shape[3] != n or lg.shape[1] % Hk:
        raise ValueError(f"h2o_step: lg must be [B, Hq, Tq, n] with B={B}, n={n}, Hq a multiple of Hk={Hk}; "
                         f"got {tuple(lg.shape)}")
    Hq, Tq = lg.shape[1], lg.shape[2]
    if tuple(lse.shape) != (B, Hq, Tq) or tuple(acc.shape) != (B, Hk, n) or tuple(pos.shape) != (B, Hk, n):
        raise ValueError(f"h2o_step: lse {tuple(lse.shape)} must be {(B, Hq, Tq)}, acc {tuple(acc.shape)} and pos "
                         f"{tuple(pos.shape)} must be {(B, Hk, n)}")
    if acc.dtype != torch.float32 or lg.dtype != torch.float32:
        raise TypeError(f"h2o_step: acc and lg must be float32; got {acc.dtype}, {lg.dtype}")
    if acc.stride(-1) != 1 or pos.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("h2o_step needs unit-stride token axes for acc / positions and unit-stride head dims")
    G = Hq // Hk
    rows = G * Tq
    BT, warps = h2o_chunking(B * Hk, n, rows, k.device)
    if cfg is not None:
        BT, warps = cfg
        if BT < 16 or BT & (BT - 1):
            raise ValueError(f"h2o_step: cfg tokens per chunk must be a power of two >= 16, got {BT}")
    unroll = min(triton.next_power_of_2(rows), 2 if _interpreting() else 8)
    n_chunks = triton.cdiv(n, BT)
    cs = empty((B, Hk, max(n_chunks, 1)), dtype=torch.float32, device=k.device) if evict else acc
    cp = empty((B, Hk, max(n_chunks, 1)), dtype=torch.int64, device=k.device) if evict else pos
    ci = empty((B, Hk, max(n_chunks, 1)), dtype=torch.int32, device=k.device) if evict else pos
    BC, BDv = max(2, min(triton.next_power_of_2(n_chunks), 1024)), triton.next_power_of_2(D)
    return B, Hk, n, D, Hq, Tq, G, BT, warps, unroll, n_chunks, cs, cp, ci, BC, BDv


def h2o_step(lg: torch.Tensor, lse: torch.Tensor, acc: torch.Tensor, pos: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor, seen: int, sinks: int, recent: int, evict: bool,
             cfg: tuple[int, int] | None = None) -> None:
    """The H2O policy step after :func:`decode_attention` (``return_logits=True``), in place:
    ``acc [B, Hk, n] += `` the attention each cached token received (summed over the queries and
    the query heads of its kv group; ``exp2(lg - lse * log2 e)`` over the visible keys), and with
    ``evict`` the token that leaves (lowest accumulated score among the unprotected, ties to the
    newest position; as :func:`evict_one` with ``scores = acc``) gets the newest token's K, V,
    position and acc; the caller then keeps the first n-1 slots. Two launches: the accumulate
    (chunks of tokens, each writing its candidate) and the per-row pick-and-move. ``cfg`` =
    (tokens per chunk, warps) of the accumulate overrides :func:`h2o_chunking` (the benchmark
    sweeps it). The rows are summed one at a time in row order, so every tile size (and
    :func:`decode_h2o`'s fused combine) gives the same bits."""
    (B, Hk, n, D, Hq, Tq, G, BT, warps, unroll, n_chunks, cs, cp, ci, BC, BDv) = _h2o_launch_args(
        lg, lse, acc, pos, k, v, evict, cfg)
    ldt = lg.stride(2)
    if lg.stride(3) != 1 or lg.stride(1) != Tq * ldt or lg.stride(0) != Hq * Tq * ldt or ldt < n:
        lg = lg.contiguous()  # the kernel wants equally spaced rows (decode_attention's lg has them)
        ldt = n
    if n == 0:
        return
    lse = lse.contiguous()
    _h2o_accum_kernel[(n_chunks, Hk, B)](
        lg, lse, acc, pos, cs, cp, ci, acc.stride(0), acc.stride(1), pos.stride(0), pos.stride(1), ldt,
        Hq, Tq, n, G, n - Tq, n_chunks, seen, sinks, recent,
        UNROLL=unroll, BLOCK_T=BT, EVICT=evict, num_warps=warps)
    if not evict:
        return
    _h2o_evict_kernel[(B * Hk,)](
        cs, cp, ci, pos, k, v, acc, pos.stride(0), pos.stride(1), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), acc.stride(0), acc.stride(1), Hk, n, n_chunks,
        D=D, BLOCK_C=BC, BLOCK_D=BDv, num_warps=1 if _interpreting() else 4)


def _counters(n: int, device: torch.device) -> torch.Tensor:
    """Zeroed int32 counters (one per row) kept per device; decode_h2o's fused kernel leaves them 0."""
    c = _COUNTERS.get(device)
    if c is None or c.numel() < n:
        c = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
        _COUNTERS[device] = c
    return c


def decode_h2o(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, acc: torch.Tensor,
               seen: int, keep: int, sinks: int, recent: int, scale: float | None = None,
               num_splits: int | None = None, cfg: tuple[int, int, int] | None = None,
               step_cfg: tuple[int, int] | None = None,
               l2_hints: bool | None = None) -> tuple[torch.Tensor, bool]:
    """One H2O decoding step over the cache k, v [B, Hk, n, D] (its last Tq entries are the new
    tokens; pos, acc [B, Hk, n]): the decode pass writes its logits, the policy step accumulates
    the attention into ``acc`` and, when exactly one token is over the budget (``n == keep + 1``),
    evicts it in place. Returns (o [B, Tq, Hq, D], evicted): after ``evicted`` the caller keeps
    the first n-1 slots; otherwise (``n <= keep``, or several tokens over) only acc changed.

    The split pass, then ONE kernel that merges the splits (o, lse), accumulates and evicts (the
    last chunk of a row to finish picks; 2 launches per step in all): the same o, acc and
    evictions as :func:`decode_attention` (``return_logits=True``) + :func:`h2o_step`, which it
    runs instead when there is no split pass (more than :data:`MAX_ROWS` query rows per kv head).
    ``step_cfg`` = (tokens per chunk, warps) of the policy kernel (default :func:`h2o_chunking`).
    ``l2_hints`` (default :data:`H2O_L2_HINTS`): the split pass streams K / V with L2
    "evict_first" and stores the logits "evict_last", so the policy kernel reads them from L2."""
    if keep < sinks + recent and k.shape[2] > keep:
        raise ValueError(f"keep={keep} is smaller than the {sinks + recent} protected tokens (sinks + recent)")
    evict = k.shape[2] == keep + 1
    B, Tq, Hq, D, Hk, T = _check_decode(q, k, v)
    if (Hq // Hk) * Tq <= MAX_ROWS and T >= Tq:
        hints = H2O_L2_HINTS if l2_hints is None else bool(l2_hints)
        return _decode_h2o_fused(q, k, v, pos, acc, seen, sinks, recent, scale, num_splits, cfg, evict,
                                 step_cfg, hints), evict
    o, lse, lg = decode_attention(q, k, v, scale, num_splits, cfg, return_logits=True)
    h2o_step(lg, lse, acc, pos, k, v, seen, sinks, recent, evict, cfg=step_cfg)
    return o, evict


def _decode_h2o_fused(q, k, v, pos, acc, seen, sinks, recent, scale, num_splits, cfg, evict, step_cfg, hints):
    """decode_h2o's fused step: the split pass, then :func:`_h2o_combine_kernel` (combine +
    accumulate + candidates + the last chunk's pick-and-move) in one launch."""
    D = q.shape[3]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    sp = _split_pass(q, k, v, scale, num_splits, cfg, True, hints)
    lg = sp.lg
    (B, Hk, n, D, Hq, Tq, G, BT, warps, unroll, n_chunks, cs, cp, ci, BC, BDv) = _h2o_launch_args(
        lg, sp.lse, acc, pos, k, v, evict, step_cfg)
    if not sp.S or n == 0:  # nothing to merge (no query rows): the unfused step does the rest
        h2o_step(lg, sp.lse, acc, pos, k, v, seen, sinks, recent, evict, cfg=step_cfg)
        return sp.o
    cnt = _counters(B * Hk, k.device) if evict else pos
    o = sp.o
    _h2o_combine_kernel[(n_chunks, Hk, B)](
        sp.op, sp.lp, o, sp.lse, lg, acc, pos, cs, cp, ci, cnt, k, v,
        o.stride(0), o.stride(1), o.stride(2), acc.stride(0), acc.stride(1), pos.stride(0), pos.stride(1),
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        Hq, Tq, n, G, sp.S, sp.ldt, n - Tq, n_chunks, seen, sinks, recent,
        D=D, BLOCK_D=sp.BD, BLOCK_S=sp.BS, UNROLL=unroll, BLOCK_T=BT, EVICT=evict, BLOCK_C=BC,
        num_warps=warps)
    return o


def protected_mask_for(positions: torch.Tensor, seen: int, sinks: int, recent: int) -> torch.Tensor:
    """The reference's protected-token mask (re-exported for the benchmark)."""
    from ...plugins.token.reference import protected_mask
    return protected_mask(positions, seen, sinks, recent)
