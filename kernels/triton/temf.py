"""``token.temf`` in Triton: attention over [summaries of earlier chunks | own chunk, causal],
forward and backward, on the shared online-softmax core (:mod:`.attention`).

Layout as the reference (``plugins/token/temf/reference.py``): q [B, T, Hq, D], k/v
[B, T, Hk, D], summaries sk/sv [B, N, S, Hk, D] with N = (T - 1) // chunk (read as one
[B, N*S, Hk, D] key segment, chunk n's summaries at rows n*S .. n*S+S-1). Query row i of chunk
c = i // C sees summary rows r < c*S and keys c*C <= j <= i, under one softmax.

Tiling: a program owns BLOCK_M query rows of ONE chunk (the grid runs over chunks x row blocks
inside a chunk, so BLOCK_M <= C is the useful case; BLOCK_M is clipped to next_pow2(C)). For all
its rows the summary segment is the same set, rows [0, c*S), fully visible: the shared core
:func:`.attention.attn_fwd_inner` runs over it unmasked, then its ragged last block masked by the
key bound ``c*S`` (CAUSAL=False). The own-chunk segment is the core again with the key/query
base pointers moved to the chunk start, so ``j <= i`` in chunk-relative coordinates with key
bound ``min(C, T - c*C)`` is exactly the own-chunk causal mask. One online-softmax state covers
both segments.

Backward (``P = exp(S - lse)`` and ``dS = P (dP - delta)``, ``delta = rowsum(dO * O)``, with the
joint statistics):

* the core's preprocess kernel (delta, lse in log2 units), unchanged;
* dQ: per query tile, :func:`.attention.attn_bwd_dq_inner` over the summary segment and over the
  own chunk (chunk-shifted bases), one accumulator;
* dK/dV of the sequence keys: per (chunk, key block) the core's
  :func:`.attention.attn_bwd_dkdv_inner` over the query blocks of the same chunk (chunk-shifted
  bases, one call per head of the GQA group, summed in registers: no atomics);
* dK/dV of the summaries: per block of summary rows the same core loop over all later query
  blocks. Its causal test ``key <= query + diag`` is fed the key coordinate
  ``(r // S + 1) * C`` (the first query that sees summary row r), so the core's mask is exactly
  "summary of chunk n visible from chunk n + 1 on".

Custom ops: ``blockzoo::temf_fwd(q, k, v, sk, sv, chunk, scale) -> (o, lse)`` and
``blockzoo::temf_bwd(do, q, k, v, sk, sv, o, lse, chunk, scale) -> 5 grads`` with
``register_fake`` and ``register_autograd``. CUDA, or CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._customop import bwd_outputs_like_q, bwd_row_stats, define_attention_ops, resolve_scale
from .attention import (
    LOG2E,
    Cfg,
    _alloc,
    _block_d,
    _check,
    _check_i32,
    _fwd_kv_ranges,
    _interpreting,
    _load_tile,
    _loop_bound,
    _store_tile,
    _unit_last,
    attn_bwd_dkdv_inner,
    attn_bwd_dq_inner,
    attn_fwd_finish,
    attn_fwd_inner,
)

__all__ = ["temf_attention", "temf_fwd", "temf_bwd", "CFGS"]

#: Tile configs per kind ("fwd", "dq": (BLOCK_M query rows, BLOCK_N key step); "dkdv": (BLOCK_N
#: key rows, BLOCK_M query step)), warps, stages. ``CFGS["interp"]`` is used under the
#: interpreter (tests may change it); env ``BLOCKZOO_TEMF_<KIND>_CFG="outer,inner,warps,stages"``
#: forces one on the GPU.
CFGS: dict = {
    "interp": Cfg(16, 16, 4, 1),
    # bf16/fp16, head dim 128: the best of `bench/temf_gpu.py --tune` on an H100 (T = 32768, C = 256,
    # S = 4, 16 heads; 2026-11-23); other head dims use the defaults in _cfg (untuned)
    ("fwd", 128, 2): Cfg(128, 32, 4, 3),
    ("dq", 128, 2): Cfg(64, 32, 4, 3),
    ("dkdv", 128, 2): Cfg(64, 32, 4, 3),
    ("dkdv_sum", 128, 2): Cfg(64, 64, 4, 3),
}

_BIG = tl.constexpr(1 << 30)

#: Summary dK/dV: query-slice count (None: enough programs for ~_SUM_PROGRAMS in all; tests set it)
SUM_SPLITS: int | None = None
_SUM_PROGRAMS = 528


def _cfg(kind: str, block_d: int, esize: int, chunk: int) -> Cfg:
    """kind: "fwd", "dq", "dkdv" (sequence keys, chunk-local) or "dkdv_sum" (summary rows)."""
    if _interpreting():
        c = Cfg(*CFGS["interp"])
    elif os.environ.get(f"BLOCKZOO_TEMF_{kind.upper()}_CFG"):
        c = Cfg(*[int(x) for x in os.environ[f"BLOCKZOO_TEMF_{kind.upper()}_CFG"].split(",")])
    elif (kind, block_d, esize) in CFGS:
        c = Cfg(*CFGS[(kind, block_d, esize)])
    elif esize > 2:  # fp32: 3xTF32 dots, smaller tiles (untuned)
        c = Cfg(64, 32, 4, 2) if block_d <= 64 else Cfg(32, 32, 4, 2)
    elif block_d > 128:
        c = Cfg(64, 32, 4, 2)
    elif kind == "dkdv_sum":  # few summary rows: smaller key blocks for more programs
        c = Cfg(64, 64, 4, 3)
    else:  # bf16/fp16, D <= 128: the core's first candidates
        c = Cfg(128, 64, 8, 3)
    if kind == "dkdv_sum":
        return c
    # a tile never spans two chunks: clip the chunk-local tile to the chunk
    outer = min(c.outer, max(16, triton.next_power_of_2(chunk)))
    inner = min(c.inner, outer) if kind == "dkdv" else c.inner
    return Cfg(outer, inner, c.warps, c.stages)


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _temf_fwd_kernel(Q, K, V, SK, SV, Out, LSE,
                     s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,
                     s_skb, s_skr, s_skh, s_svb, s_svr, s_svh, s_ob, s_ot, s_oh,
                     Hq, T, C, S, GROUP, NSUB, qk_scale,
                     D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, NEG_SCALE: tl.constexpr):
    EVEN_D: tl.constexpr = D == BLOCK_D
    pid = tl.num_programs(0) - 1 - tl.program_id(0)  # later chunks (more summaries) first
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    hk = h // GROUP
    c = pid // NSUB
    m0 = (pid - c * NSUB) * BLOCK_M
    c0 = (c * C).to(tl.int64)
    Lc = tl.minimum(C, T - c * C)
    rel = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + b * s_qb + h.to(tl.int64) * s_qh + c0 * s_qt, rel, s_qt, offs_d, Lc, D, True, EVEN_D)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # summary segment: rows [0, c*S), visible to every row of the tile
    nsum = c * S
    ns_full = (nsum // BLOCK_N) * BLOCK_N
    sk_base = SK + b * s_skb + hk.to(tl.int64) * s_skh
    sv_base = SV + b * s_svb + hk.to(tl.int64) * s_svh
    acc, m_i, l_i = attn_fwd_inner(acc, m_i, l_i, q, sk_base, sv_base, s_skr, s_svr, rel, offs_d,
                                   0, ns_full, qk_scale, nsum, 0, D, BLOCK_N,
                                   False, False, EVEN_D, NEG_SCALE)
    acc, m_i, l_i = attn_fwd_inner(acc, m_i, l_i, q, sk_base, sv_base, s_skr, s_svr, rel, offs_d,
                                   ns_full, nsum, qk_scale, nsum, 0, D, BLOCK_N,
                                   True, False, EVEN_D, NEG_SCALE)

    # own chunk, causal, in chunk-relative coordinates
    k_base = K + b * s_kb + hk.to(tl.int64) * s_kh + c0 * s_kt
    v_base = V + b * s_vb + hk.to(tl.int64) * s_vh + c0 * s_vt
    n_full, n_end = _fwd_kv_ranges(m0, Lc, 0, BLOCK_M, BLOCK_N, True)
    acc, m_i, l_i = attn_fwd_inner(acc, m_i, l_i, q, k_base, v_base, s_kt, s_vt, rel, offs_d,
                                   0, n_full, qk_scale, Lc, 0, D, BLOCK_N,
                                   False, True, EVEN_D, NEG_SCALE)
    acc, m_i, l_i = attn_fwd_inner(acc, m_i, l_i, q, k_base, v_base, s_kt, s_vt, rel, offs_d,
                                   n_full, n_end, qk_scale, Lc, 0, D, BLOCK_N,
                                   True, True, EVEN_D, NEG_SCALE)

    o, lse = attn_fwd_finish(acc, m_i, l_i)
    _store_tile(Out + b * s_ob + h.to(tl.int64) * s_oh + c0 * s_ot, o.to(Out.dtype.element_ty), rel, s_ot,
                offs_d, Lc, D, EVEN_D)
    tl.store(LSE + (b * Hq + h) * T + c0 + rel, lse, mask=rel < Lc)


@triton.jit
def _temf_dq_kernel(Q, K, V, SK, SV, DO, DQ, LSE2, DELTA,
                    s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,
                    s_skb, s_skr, s_skh, s_svb, s_svr, s_svh, s_db, s_dt, s_dh, s_dqb, s_dqt, s_dqh,
                    Hq, T, C, S, GROUP, NSUB, qk_scale, sm_scale,
                    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    EVEN_D: tl.constexpr = D == BLOCK_D
    pid = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    hk = h // GROUP
    c = pid // NSUB
    m0 = (pid - c * NSUB) * BLOCK_M
    c0 = (c * C).to(tl.int64)
    Lc = tl.minimum(C, T - c * C)
    rel = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + b * s_qb + h.to(tl.int64) * s_qh + c0 * s_qt, rel, s_qt, offs_d, Lc, D, True, EVEN_D)
    do = _load_tile(DO + b * s_db + h.to(tl.int64) * s_dh + c0 * s_dt, rel, s_dt, offs_d, Lc, D, True, EVEN_D)
    row = (b * Hq + h) * T + c0 + rel
    rmask = rel < Lc
    lse2 = tl.load(LSE2 + row, mask=rmask, other=float("inf"))
    delta = tl.load(DELTA + row, mask=rmask, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    nsum = c * S
    ns_full = (nsum // BLOCK_N) * BLOCK_N
    sk_base = SK + b * s_skb + hk.to(tl.int64) * s_skh
    sv_base = SV + b * s_svb + hk.to(tl.int64) * s_svh
    dq = attn_bwd_dq_inner(dq, q, do, lse2, delta, sk_base, sv_base, s_skr, s_svr, rel, offs_d,
                           0, ns_full, qk_scale, nsum, 0, D, BLOCK_N, False, False, EVEN_D)
    dq = attn_bwd_dq_inner(dq, q, do, lse2, delta, sk_base, sv_base, s_skr, s_svr, rel, offs_d,
                           ns_full, nsum, qk_scale, nsum, 0, D, BLOCK_N, True, False, EVEN_D)

    k_base = K + b * s_kb + hk.to(tl.int64) * s_kh + c0 * s_kt
    v_base = V + b * s_vb + hk.to(tl.int64) * s_vh + c0 * s_vt
    n_full, n_end = _fwd_kv_ranges(m0, Lc, 0, BLOCK_M, BLOCK_N, True)
    dq = attn_bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, s_kt, s_vt, rel, offs_d,
                           0, n_full, qk_scale, Lc, 0, D, BLOCK_N, False, True, EVEN_D)
    dq = attn_bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, s_kt, s_vt, rel, offs_d,
                           n_full, n_end, qk_scale, Lc, 0, D, BLOCK_N, True, True, EVEN_D)
    dq = dq * sm_scale
    _store_tile(DQ + b * s_dqb + h.to(tl.int64) * s_dqh + c0 * s_dqt, dq.to(DQ.dtype.element_ty), rel, s_dqt,
                offs_d, Lc, D, EVEN_D)


@triton.jit
def _temf_dkdv_local_kernel(Q, K, V, DO, DK, DV, LSE2, DELTA,
                            s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,
                            s_db, s_dt, s_dh, s_dkb, s_dkt, s_dkh, s_dvb, s_dvt, s_dvh,
                            Hq, T, C, GROUP, NSUB, qk_scale, sm_scale,
                            D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr):
    """dK/dV of one block of sequence keys: the queries of the same chunk only."""
    EVEN_D: tl.constexpr = D == BLOCK_D
    pid = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    c = pid // NSUB
    n0 = (pid - c * NSUB) * BLOCK_N
    c0 = (c * C).to(tl.int64)
    Lc = tl.minimum(C, T - c * C)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(K + b * s_kb + hk.to(tl.int64) * s_kh + c0 * s_kt, offs_n, s_kt, offs_d, Lc, D, True, EVEN_D)
    v = _load_tile(V + b * s_vb + hk.to(tl.int64) * s_vh + c0 * s_vt, offs_n, s_vt, offs_d, Lc, D, True, EVEN_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # chunk-relative query blocks: masked diagonal [m_lo, m_a), unmasked [m_a, m_b), masked tail
    m_end = tl.cdiv(Lc, BLOCK_M) * BLOCK_M
    m_lo = tl.minimum((n0 // BLOCK_M) * BLOCK_M, m_end)
    m_a = tl.cdiv(n0 + BLOCK_N - 1, BLOCK_M) * BLOCK_M
    m_a = tl.minimum(tl.maximum(m_a, m_lo), m_end)
    m_b = tl.maximum(m_a, (Lc // BLOCK_M) * BLOCK_M)
    tail = n0 + BLOCK_N > Lc
    m_a = tl.where(tail, m_end, m_a)
    m_b = tl.where(tail, m_end, m_b)
    n_diag = (m_a - m_lo) // BLOCK_M
    n_tail = (m_end - m_b) // BLOCK_M
    n_mid = (m_b - m_a) // BLOCK_M
    for g in range(0, _loop_bound(GROUP)):
        h = (hk * GROUP + g).to(tl.int64)
        q_base = Q + b * s_qb + h * s_qh + c0 * s_qt
        do_base = DO + b * s_db + h * s_dh + c0 * s_dt
        lse2_base = LSE2 + (b * Hq + h) * T + c0
        delta_base = DELTA + (b * Hq + h) * T + c0
        dk, dv = attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, q_base, lse2_base, delta_base,
                                     s_qt, s_qh, s_dt, s_dh, s_qt, s_qh, 1, offs_n, offs_d,
                                     m_a, n_mid, m_b, n_mid * 0, qk_scale, sm_scale, Lc, Lc, 0,
                                     D, BLOCK_M, False, True, EVEN_D, False)
        dk, dv = attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, q_base, lse2_base, delta_base,
                                     s_qt, s_qh, s_dt, s_dh, s_qt, s_qh, 1, offs_n, offs_d,
                                     m_lo, n_diag, m_b, n_tail, qk_scale, sm_scale, Lc, Lc, 0,
                                     D, BLOCK_M, True, True, EVEN_D, False)
    dk = dk * sm_scale
    _store_tile(DK + b * s_dkb + hk.to(tl.int64) * s_dkh + c0 * s_dkt, dk.to(DK.dtype.element_ty), offs_n, s_dkt,
                offs_d, Lc, D, EVEN_D)
    _store_tile(DV + b * s_dvb + hk.to(tl.int64) * s_dvh + c0 * s_dvt, dv.to(DV.dtype.element_ty), offs_n, s_dvt,
                offs_d, Lc, D, EVEN_D)


@triton.jit
def _temf_dkdv_sum_kernel(Q, SK, SV, DO, DSK, DSV, LSE2, DELTA,
                          s_qb, s_qt, s_qh, s_skb, s_skr, s_skh, s_svb, s_svr, s_svh,
                          s_db, s_dt, s_dh, s_gp, s_gb, s_gr, s_gh,
                          Hq, T, C, S, NS, GROUP, NSPLIT, qk_scale, sm_scale,
                          D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr):
    """Partial dK/dV of one block of summary rows from ONE query head and one contiguous slice
    (``split``) of the query blocks; fp32 partials [NSPLIT, B, NS, Hq, D], summed on the host
    (few summary rows: splitting over heads and query slices is what fills the GPU)."""
    EVEN_D: tl.constexpr = D == BLOCK_D
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    blk = pid // NSPLIT
    sp = pid - blk * NSPLIT
    hk = h // GROUP
    n0 = blk * BLOCK_N
    r = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(SK + b * s_skb + hk.to(tl.int64) * s_skh, r, s_skr, offs_d, NS, D, True, EVEN_D)
    v = _load_tile(SV + b * s_svb + hk.to(tl.int64) * s_svh, r, s_svr, offs_d, NS, D, True, EVEN_D)
    # key coordinate for the core's causal test: the first query row that sees summary row r
    kpos = tl.where(r < NS, (r // S + 1) * C, _BIG)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    r1 = tl.minimum(n0 + BLOCK_N, NS) - 1
    q_lo = (n0 // S + 1) * C       # first query that sees some row of the block
    q_hi = (r1 // S + 1) * C       # first query that sees every row of the block
    m_end = tl.cdiv(T, BLOCK_M) * BLOCK_M
    m_lo = tl.minimum((q_lo // BLOCK_M) * BLOCK_M, m_end)
    m_a = tl.minimum(tl.maximum(tl.cdiv(q_hi, BLOCK_M) * BLOCK_M, m_lo), m_end)
    m_b = tl.maximum(m_a, (T // BLOCK_M) * BLOCK_M)
    tail = n0 + BLOCK_N > NS
    m_a = tl.where(tail, m_end, m_a)
    m_b = tl.where(tail, m_end, m_b)
    # this program's slice of the query blocks
    piece = tl.cdiv(tl.cdiv(T, BLOCK_M), NSPLIT) * BLOCK_M
    qa = tl.minimum(sp * piece, m_end)
    qb = tl.minimum(qa + piece, m_end)
    m_lo = tl.minimum(tl.maximum(m_lo, qa), qb)
    m_a = tl.minimum(tl.maximum(m_a, qa), qb)
    m_b = tl.minimum(tl.maximum(m_b, qa), qb)
    m_e = tl.minimum(tl.maximum(m_end, qa), qb)
    n_diag = (m_a - m_lo) // BLOCK_M
    n_tail = (m_e - m_b) // BLOCK_M
    n_mid = (m_b - m_a) // BLOCK_M
    h64 = h.to(tl.int64)
    q_base = Q + b * s_qb + h64 * s_qh
    do_base = DO + b * s_db + h64 * s_dh
    lse2_base = LSE2 + (b * Hq + h64) * T
    delta_base = DELTA + (b * Hq + h64) * T
    dk, dv = attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, q_base, lse2_base, delta_base,
                                 s_qt, s_qh, s_dt, s_dh, s_qt, s_qh, 1, kpos, offs_d,
                                 m_a, n_mid, m_b, n_mid * 0, qk_scale, sm_scale, T, _BIG, 0,
                                 D, BLOCK_M, False, True, EVEN_D, False)
    dk, dv = attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, q_base, lse2_base, delta_base,
                                 s_qt, s_qh, s_dt, s_dh, s_qt, s_qh, 1, kpos, offs_d,
                                 m_lo, n_diag, m_b, n_tail, qk_scale, sm_scale, T, _BIG, 0,
                                 D, BLOCK_M, True, True, EVEN_D, False)
    dk = dk * sm_scale
    off = sp.to(tl.int64) * s_gp + b * s_gb + h64 * s_gh
    _store_tile(DSK + off, dk, r, s_gr, offs_d, NS, D, EVEN_D)
    _store_tile(DSV + off, dv, r, s_gr, offs_d, NS, D, EVEN_D)


# ---------------------------------------------------------------------------------------------
# host wrappers
# ---------------------------------------------------------------------------------------------

def _check_sum(q, k, sk, sv, chunk: int) -> tuple[int, int]:
    """-> (N, S); raises on a shape / dtype / device mismatch."""
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    B, T, _, D = q.shape
    n = max(0, (T - 1) // chunk)
    if sk.dim() != 5 or tuple(sk.shape) != tuple(sv.shape):
        raise ValueError(f"sk / sv must be one shape [B, N, S, Hk, D]; got {tuple(sk.shape)}, {tuple(sv.shape)}")
    if tuple(sk.shape) != (B, n, sk.shape[2], k.shape[2], D):
        raise ValueError(f"sk {tuple(sk.shape)} must be [B={B}, N=(T-1)//chunk={n}, S, Hk={k.shape[2]}, D={D}]")
    if sk.dtype != q.dtype or sv.dtype != q.dtype:
        raise TypeError(f"sk/sv dtype {sk.dtype}/{sv.dtype} must match q ({q.dtype})")
    if sk.device != q.device or sv.device != q.device:
        raise ValueError("sk / sv must be on q's device")
    return n, sk.shape[2]


def _flat(x: torch.Tensor) -> torch.Tensor:
    b, n, s, h, d = x.shape
    return _unit_last(x.reshape(b, n * s, h, d))


def _fwd_impl(q, k, v, sk, sv, chunk: int, scale: float):
    B, T, Hq, D, Tk, Hk = _check(q, k, v)
    if Tk != T:
        raise ValueError(f"token.temf needs k/v of q's length: q has T={T}, k has {Tk}")
    N, S = _check_sum(q, k, sk, sv, chunk)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    skf, svf = _flat(sk), _flat(sv)
    o = _alloc((B, T, Hq, D), q.dtype, q.device)
    lse = _alloc((B, Hq, T), torch.float32, q.device)
    if o.numel() == 0:
        lse.fill_(float("-inf"))
        return o, lse
    _check_i32(q, k, v, o, skf, svf)
    BD = _block_d(D)
    c = _cfg("fwd", BD, q.element_size(), chunk)
    nsub = triton.cdiv(chunk, c.outer)
    grid = (triton.cdiv(T, chunk) * nsub, Hq, B)
    _temf_fwd_kernel[grid](
        q, k, v, skf, svf, o, lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), skf.stride(0), skf.stride(1), skf.stride(2),
        svf.stride(0), svf.stride(1), svf.stride(2), o.stride(0), o.stride(1), o.stride(2),
        Hq, T, chunk, S, Hq // Hk, nsub, float(scale) * LOG2E,
        D=D, BLOCK_D=BD, BLOCK_M=c.outer, BLOCK_N=c.inner, NEG_SCALE=bool(scale < 0),
        num_warps=c.warps, num_stages=c.stages)
    return o, lse


def _bwd_impl(do, q, k, v, sk, sv, o, lse, chunk: int, scale: float):
    B, T, Hq, D, Tk, Hk = _check(q, k, v)
    N, S = _check_sum(q, k, sk, sv, chunk)
    q, k, v = (_unit_last(t) for t in (q, k, v))
    o, do = bwd_outputs_like_q(q, o, do)
    skf, svf = _flat(sk), _flat(sv)
    dq = _alloc((B, T, Hq, D), q.dtype, q.device)
    dk = _alloc((B, T, Hk, D), q.dtype, q.device)
    dv = _alloc((B, T, Hk, D), q.dtype, q.device)
    dsk = _alloc((B, N * S, Hk, D), q.dtype, q.device)
    dsv = _alloc((B, N * S, Hk, D), q.dtype, q.device)
    shp = tuple(sk.shape)
    if dq.numel() == 0:
        for t in (dq, dk, dv, dsk, dsv):
            t.zero_()
        return dq, dk, dv, dsk.view(shp), dsv.view(shp)
    _check_i32(q, k, v, o, do, skf, svf)
    BD = _block_d(D)
    G = Hq // Hk
    qk_scale = float(scale) * LOG2E
    esize = q.element_size()
    delta, lse2 = bwd_row_stats(o, do, lse, BD)

    c = _cfg("dq", BD, esize, chunk)
    nsub = triton.cdiv(chunk, c.outer)
    _temf_dq_kernel[(triton.cdiv(T, chunk) * nsub, Hq, B)](
        q, k, v, skf, svf, do, dq, lse2, delta,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), skf.stride(0), skf.stride(1), skf.stride(2),
        svf.stride(0), svf.stride(1), svf.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        Hq, T, chunk, S, G, nsub, qk_scale, float(scale),
        D=D, BLOCK_D=BD, BLOCK_M=c.outer, BLOCK_N=c.inner, num_warps=c.warps, num_stages=c.stages)

    c = _cfg("dkdv", BD, esize, chunk)
    nsub = triton.cdiv(chunk, c.outer)
    _temf_dkdv_local_kernel[(triton.cdiv(T, chunk) * nsub, Hk, B)](
        q, k, v, do, dk, dv, lse2, delta,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        Hq, T, chunk, G, nsub, qk_scale, float(scale),
        D=D, BLOCK_D=BD, BLOCK_M=c.inner, BLOCK_N=c.outer, num_warps=c.warps, num_stages=c.stages)

    if N * S:
        cs = _cfg("dkdv_sum", BD, esize, chunk)
        nblk = triton.cdiv(N * S, cs.outer)
        nsplit = SUM_SPLITS or max(1, min(triton.cdiv(T, 4 * cs.inner), triton.cdiv(_SUM_PROGRAMS, nblk * Hq * B)))
        pk = _alloc((nsplit, B, N * S, Hq, D), torch.float32, q.device)
        pv = _alloc((nsplit, B, N * S, Hq, D), torch.float32, q.device)
        _temf_dkdv_sum_kernel[(nblk * nsplit, Hq, B)](
            q, skf, svf, do, pk, pv, lse2, delta,
            q.stride(0), q.stride(1), q.stride(2), skf.stride(0), skf.stride(1), skf.stride(2),
            svf.stride(0), svf.stride(1), svf.stride(2), do.stride(0), do.stride(1), do.stride(2),
            pk.stride(0), pk.stride(1), pk.stride(2), pk.stride(3),
            Hq, T, chunk, S, N * S, G, nsplit, qk_scale, float(scale),
            D=D, BLOCK_D=BD, BLOCK_M=cs.inner, BLOCK_N=cs.outer, num_warps=cs.warps, num_stages=cs.stages)
        # sum the query slices and the GQA group's heads (fp32), then round once
        dsk.copy_(pk.view(nsplit, B, N * S, Hk, G, D).sum((0, 4)))
        dsv.copy_(pv.view(nsplit, B, N * S, Hk, G, D).sum((0, 4)))
    return dq, dk, dv, dsk.view(shp), dsv.view(shp)


# ---------------------------------------------------------------------------------------------
# torch.library custom ops
# ---------------------------------------------------------------------------------------------

_fwd_op, _bwd_op = define_attention_ops("temf", "token.temf (triton)", _fwd_impl, _bwd_impl,
                                        grad_tensors=("sk", "sv"), params=(("chunk", int), ("scale", float)))


def temf_attention(q, k, v, sk, sv, chunk: int = 256, scale: float | None = None) -> torch.Tensor:
    """token.temf attention, autograd-enabled: o [B, T, Hq, D] like q."""
    o, _ = _fwd_op(q, k, v, sk, sv, int(chunk), resolve_scale(q, scale))
    return o


def temf_fwd(q, k, v, sk, sv, chunk: int = 256, scale: float | None = None):
    """Forward only: (o, lse fp32 [B, Hq, T], natural log)."""
    return _fwd_op(q, k, v, sk, sv, int(chunk), resolve_scale(q, scale))


def temf_bwd(do, q, k, v, sk, sv, o, lse, chunk: int = 256, scale: float | None = None):
    """(dq, dk, dv, dsk, dsv) in the input dtype."""
    return _bwd_op(do, q, k, v, sk, sv, o, lse, int(chunk), resolve_scale(q, scale))
