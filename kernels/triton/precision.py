"""Quantised attention in Triton: ``precision.int8`` (SageAttention-style) and ``precision.qaas``.

Two kernels per call, the quantisation rules being exactly those of
``plugins/precision/reference.py`` (module docstring there):

1. :func:`_quant_kernel`, a small pre-pass, one program per (row block, head, batch): loads a
   [block, D] tile of q or k in fp32 (times the folded softmax scale, minus the key mean for
   smoothed int8 keys), takes max |x|, writes INT8 or FP8 E4M3 codes and the fp32 block scale.
   (int8's Q skips it by default: the attention kernel quantises its own Q block with the same
   operations, ``CFG["fuse_q"]``; bit-identical codes.)
   V goes per channel: amax over tokens in torch (one reduction), codes written by
   :func:`_quant_v_kernel` TRANSPOSED ([B, H, D, T]) so the PV dot reads a K-major fp8 operand
   (what Hopper's FP8 wgmma wants).
2. :func:`_qattn_fwd_kernel`, the attention: one program per (query block of ``q_block`` rows,
   head, batch), the same structure as the shared core (``attention._attn_fwd_kernel``: the
   heaviest causal blocks first, :func:`attention._fwd_kv_ranges` for the unmasked / masked key
   ranges, :func:`attention._load_tile` / ``_store_tile`` / ``_loop_bound``). Its inner loop
   :func:`qattn_fwd_inner` is the core's ``attn_fwd_inner`` with quantised tiles: ``tl.dot`` on
   INT8 codes (int32 accumulate) or FP8 codes (fp32 accumulate), descale by the two block scales,
   fp32 online softmax in exp2 units, then P as FP8 (``448 exp2(s - m)``), fp16, or binary (qaas) in a
   second FP8 / fp16 dot with the V codes. The key tile is ``k_block`` (BLOCK_N) and the query
   tile ``q_block`` (BLOCK_M), so the scales and the online-softmax order match the reference.

Under ``TRITON_INTERPRET=1`` (CI): the interpreter's INT8 dot is exact, but NumPy has no FP8
type and the interpreter's fp32 -> fp8e4nv conversion mis-rounds values whose rounding carries
into the exponent (7.8 -> 4.0 in Triton 3.6). There the codes are produced by an exact
round-to-nearest-even E4M3 emulation in fp32 bit arithmetic (:func:`_round_fp8`), stored as
fp32 values that are exactly representable in FP8, and the dots run in fp32 on them: products
of two FP8 (or INT8) codes are exact in fp32 and the sums are fp32, as on the tensor cores, so
the interpreted kernel computes the same quantised function (only the summation order differs).
Compiled, the codes are real ``torch.float8_e4m3fn`` / ``int8`` tensors and the dots are
tensor-core FP8 / INT8 dots (compute capability 8.9+ for FP8).

Backward: ``precision.int8`` registers autograd on its custom op ``blockzoo::qattn_int8`` whose
backward recomputes the dense forward with the shared core and runs its backward
(``attention.attention_fwd`` / ``attention_bwd``): the straight-through gradient, i.e. that of
unquantised attention (SageAttention is an inference kernel). ``precision.qaas``'s backward is
the reference's torch surrogate (``reference.qaas_apply``, O(T^2) memory): no
Triton backward kernel for it.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ...plugins.precision.reference import check_tau_gamma, key_mean, log2_tau, qaas_apply, qaas_k_block
from .attention import (
    LOG2E,
    _alloc,
    _fwd_kv_ranges,
    _interpreting,
    _load_tile,
    _loop_bound,
    _store_tile,
    _unit_last,
    attention_bwd,
    attention_fwd,
)
from .attention import _check as _check_qkv

__all__ = ["int8_attention", "qaas_attention", "qaas_forward", "quantise", "quant_kv", "record_decisions", "CFG"]

INTERP = _interpreting()
#: (num_warps, num_stages) of the attention kernel; BLOCK_M/BLOCK_N are the params' q_block/k_block.
#: warps=None: 8 for q_block >= 128, else 4 (H100 measurements in docs/performance.md).
#: fuse_q: int8's attention kernel quantises its Q block itself (no Q pre-pass pass over memory).
#: fused_kv: K and V are quantised by the two-launch pre-pass :func:`quant_kv` (statistics, then
#: codes); False: the older path (torch reductions + :func:`quantise` + :func:`_quant_v`), kept
#: for timing comparisons. kv_programs: about how many programs the statistics launch spreads
#: over (it picks chunks of whole key blocks per (batch, head), a power of two of them);
#: kv_warps / kv_stages: warps and pipeline stages of both pre-pass launches (kv_stages None:
#: Triton's default). Defaults from
#: bench/precision_prepass_tune.py on the H100 (2026-11-24, B*T = 32768, H=16, D=128, bf16): 512
#: programs x 4 warps 0.294-0.298 ms against 0.317-0.327 ms for the earlier 1024 x 8 (floor at the
#: copy rate 0.232 ms), bit-identical codes.
CFG = {"warps": None, "stages": 3, "fuse_q": True, "fused_kv": True, "kv_programs": 512, "kv_warps": 4,
       "kv_stages": None}

if INTERP:
    @triton.jit
    def _rint(y):
        return (y + 12582912.0) - 12582912.0  # 1.5 * 2^23: fp32 add rounds half to even

    @triton.jit
    def _mul_rn(a, b):
        return a * b
else:
    from triton.language.extra import libdevice

    @triton.jit
    def _rint(y):
        return libdevice.rint(y)

    @triton.jit
    def _mul_rn(a, b):
        # a rounded product that the compiler may not fuse with a following subtraction into
        # an FMA (one rounding), so ``x * mult - mean`` rounds twice, as in the reference
        return libdevice.mul_rn(a, b)


@triton.jit
def _round_fp8(y):
    """Exact round-to-nearest-even of fp32 ``y`` (|y| <= 448 + rounding) to E4M3 values (fp32)."""
    a = tl.abs(y)
    bits = a.to(tl.int32, bitcast=True)
    lsb = (bits >> 20) & 1
    nrm = ((bits + 0x7FFFF + lsb) & -1048576).to(tl.float32, bitcast=True)  # 3 mantissa bits kept
    sub = (a + 16384.0) - 16384.0                                              # multiples of 2^-9
    r = tl.where(a < 0.015625, sub, nrm)
    r = tl.minimum(r, 448.0)
    return tl.where(y < 0, -r, r)


@triton.jit
def _to_code(y, KIND: tl.constexpr, FP8_NATIVE: tl.constexpr):
    """KIND 0: INT8 code; KIND 1: FP8 E4M3 code (native fp8, or exact fp32 emulation)."""
    # one return per static branch: code after a return is still compiled by Triton
    if KIND == 0:
        r = tl.minimum(tl.maximum(_rint(y), -127.0), 127.0)
        if FP8_NATIVE:
            c = r.to(tl.int8)
        else:
            c = r
    else:
        if FP8_NATIVE:
            c = tl.minimum(tl.maximum(y, -448.0), 448.0).to(tl.float8e4nv)
        else:
            c = _round_fp8(y)
    return c


@triton.jit
def _quant_kernel(X, MEAN, C, S, s_xb, s_xt, s_xh, s_cb, s_ct, s_ch, s_mb, s_mh, T, H, NB, mult,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, KIND: tl.constexpr,
                  QMAX: tl.constexpr, HAS_MEAN: tl.constexpr, FP8_NATIVE: tl.constexpr):
    EVEN_D: tl.constexpr = D == BLOCK_D
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    x = _load_tile(X + b * s_xb + h.to(tl.int64) * s_xh, rows, s_xt, offs_d, T, D, True, EVEN_D)
    x = x.to(tl.float32)
    x = _mul_rn(x, tl.zeros_like(x) + mult)
    if HAS_MEAN:
        mu = tl.load(MEAN + b * s_mb + h * s_mh + offs_d, mask=offs_d < D, other=0.0)
        x = tl.where((rows[:, None] < T) & (offs_d[None, :] < D), x - mu[None, :], 0.0)
    amax = tl.max(tl.max(tl.abs(x), 1), 0)
    # IEEE-rounded divisions (a plain fp32 '/' compiles to an approximate division), so the
    # scales and codes equal the reference's bit for bit
    inv = tl.where(amax > 0, tl.math.div_rn(QMAX + tl.zeros_like(amax), tl.where(amax > 0, amax, 1.0)), 0.0)
    codes = _to_code(x * inv, KIND, FP8_NATIVE)
    _store_tile(C + b * s_cb + h.to(tl.int64) * s_ch, codes, rows, s_ct, offs_d, T, D, EVEN_D)
    tl.store(S + (b * NB + pid) * H + h, tl.math.div_rn(amax, QMAX + tl.zeros_like(amax)))


@triton.jit
def _quant_v_kernel(V, INV, C, s_vb, s_vt, s_vh, s_cb, s_ch, s_cd, T, H,
                    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, FP8_NATIVE: tl.constexpr):
    """Per-channel FP8 V codes, written transposed: C[b, h, d, t] = fp8(v[b, t, h, d] * inv[b, h, d])."""
    EVEN_D: tl.constexpr = D == BLOCK_D
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    x = _load_tile(V + b * s_vb + h.to(tl.int64) * s_vh, rows, s_vt, offs_d, T, D, True, EVEN_D).to(tl.float32)
    inv = tl.load(INV + (b * H + h) * D + offs_d, mask=offs_d < D, other=0.0)
    codes = _to_code(x * inv[None, :], 1, FP8_NATIVE)
    ptrs = C + b * s_cb + h.to(tl.int64) * s_ch + offs_d[:, None] * s_cd + rows[None, :]
    tl.store(ptrs, tl.trans(codes), mask=(offs_d[:, None] < D) & (rows[None, :] < T))


@triton.jit
def _quant_tile(x, QMAX: tl.constexpr, KIND: tl.constexpr, FP8_NATIVE: tl.constexpr):
    """Codes and fp32 scale of one fp32 tile (zeros where masked): :func:`_quant_kernel`'s rule."""
    amax = tl.max(tl.max(tl.abs(x), 1), 0)
    inv = tl.where(amax > 0, tl.math.div_rn(QMAX + tl.zeros_like(amax), tl.where(amax > 0, amax, 1.0)), 0.0)
    return _to_code(x * inv, KIND, FP8_NATIVE), tl.math.div_rn(amax, QMAX + tl.zeros_like(amax))


@triton.jit
def _kv_finals(KSUM, VMAX, b, h, H, t_f, offs_d, BLOCK_D: tl.constexpr, NCH: tl.constexpr,
               K_SUM: tl.constexpr, V_AMAX: tl.constexpr):
    """Finish the NCH chunk partials of (b, h) in a fixed order: the key mean ``sum / T`` (IEEE
    division; zeros without K_SUM) and the V channel max |v| and ``448 / amax`` (0 where amax = 0).
    Loads are ``.cg`` (cached in L2, not L1)."""
    parts = ((b * H + h) * NCH + tl.arange(0, NCH))[:, None] * BLOCK_D + offs_d[None, :]
    mu = tl.zeros([BLOCK_D], dtype=tl.float32)
    amax = tl.zeros([BLOCK_D], dtype=tl.float32)
    if K_SUM:
        ksum = tl.sum(tl.load(KSUM + parts, cache_modifier=".cg"), 0)
        mu = tl.math.div_rn(ksum, tl.zeros_like(ksum) + t_f)  # t_f: T as fp32 (exact)
    if V_AMAX:
        amax = tl.max(tl.load(VMAX + parts, cache_modifier=".cg"), 0)
    inv = tl.where(amax > 0, tl.math.div_rn(448.0 + tl.zeros_like(amax), tl.where(amax > 0, amax, 1.0)), 0.0)
    return mu, amax, inv


@triton.jit
def _kv_codes_block(k_base, v_base, kc_base, vt_base, SK, b, h, blk, mu, inv, offs_d,
                    s_kt, s_vt, s_ct, s_td, T, H, NB,
                    D: tl.constexpr, BLOCK: tl.constexpr, EVEN_D: tl.constexpr,
                    K_CODES: tl.constexpr, V_CODES: tl.constexpr, FP8_NATIVE: tl.constexpr):
    """Codes of key block ``blk`` that need the finished statistics. K_CODES: INT8 codes of the
    smoothed block ``k - mu`` and its scale (:func:`_quant_kernel`'s operations); V_CODES: FP8
    codes ``fp8(v * inv)`` of the same rows, stored transposed at ``vt_base`` ([D, T], unit t)."""
    rows = blk * BLOCK + tl.arange(0, BLOCK)
    if K_CODES:
        x = _load_tile(k_base, rows, s_kt, offs_d, T, D, True, EVEN_D)
        x = tl.where((rows[:, None] < T) & (offs_d[None, :] < D), x.to(tl.float32) - mu[None, :], 0.0)
        codes, sc = _quant_tile(x, 127.0, 0, FP8_NATIVE)
        _store_tile(kc_base, codes, rows, s_ct, offs_d, T, D, EVEN_D)
        tl.store(SK + (b * NB + blk) * H + h, sc)
    if V_CODES:
        y = _load_tile(v_base, rows, s_vt, offs_d, T, D, True, EVEN_D)
        vc = _to_code(y.to(tl.float32) * inv[None, :], 1, FP8_NATIVE)
        tl.store(vt_base + offs_d[:, None] * s_td + rows[None, :], tl.trans(vc),
                 mask=(offs_d[:, None] < D) & (rows[None, :] < T))


@triton.jit
def _kv_stats_kernel(K, V, KC, SK, VT, VS, KSUM, VMAX,
                     s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_cb, s_ct, s_ch, s_tb, s_th, s_td,
                     T, H, NB, BPC,
                     D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, NCH: tl.constexpr,
                     K_SUM: tl.constexpr, K_CODES: tl.constexpr, KIND: tl.constexpr, QMAX: tl.constexpr,
                     V_AMAX: tl.constexpr, V_F16: tl.constexpr, FP8_NATIVE: tl.constexpr):
    """K/V pre-pass, first launch: one program per (chunk of BPC blocks of BLOCK rows, head, batch)
    reads its K and V rows once. K_SUM: per-channel partial sum of K (fp32) -> KSUM[b, h, chunk];
    V_AMAX: per-channel partial max |V| -> VMAX[b, h, chunk]. What needs no global statistic is
    finished here: K_CODES (unsmoothed K: block codes and scales, as :func:`_quant_kernel`) and
    V_F16 (fp16 V written transposed, unit scales). The second launch, :func:`_kv_codes_kernel`,
    finishes the partials and writes the codes that need them."""
    EVEN_D: tl.constexpr = D == BLOCK_D
    c = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK)
    k_base = K + b * s_kb + h.to(tl.int64) * s_kh
    v_base = V + b * s_vb + h.to(tl.int64) * s_vh
    kc_base = KC + b * s_cb + h.to(tl.int64) * s_ch
    vt_base = VT + b * s_tb + h.to(tl.int64) * s_th
    ksum = tl.zeros([BLOCK_D], dtype=tl.float32)
    vmax = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j in range(0, _loop_bound(BPC)):
        blk = c * BPC + j
        rows = blk * BLOCK + offs_r
        if K_SUM or K_CODES:
            x = _load_tile(k_base, rows, s_kt, offs_d, T, D, True, EVEN_D).to(tl.float32)
            if K_SUM:
                ksum += tl.sum(x, 0)
            if K_CODES:
                codes, sc = _quant_tile(x, QMAX, KIND, FP8_NATIVE)
                _store_tile(kc_base, codes, rows, s_ct, offs_d, T, D, EVEN_D)
                tl.store(SK + (b * NB + blk) * H + h, sc, mask=blk < NB)
        if V_AMAX or V_F16:
            y = _load_tile(v_base, rows, s_vt, offs_d, T, D, True, EVEN_D)
            if V_AMAX:
                vmax = tl.maximum(vmax, tl.max(tl.abs(y.to(tl.float32)), 0))
            if V_F16:
                tl.store(vt_base + offs_d[:, None] * s_td + rows[None, :], tl.trans(y.to(tl.float32).to(tl.float16)),
                         mask=(offs_d[:, None] < D) & (rows[None, :] < T))
    part = ((b * H + h) * NCH + c) * BLOCK_D + offs_d
    if K_SUM:
        tl.store(KSUM + part, ksum)
    if V_AMAX:
        tl.store(VMAX + part, vmax)
    if V_F16:
        tl.store(VS + (b * H + h) * D + offs_d, tl.zeros([BLOCK_D], dtype=tl.float32) + 1.0,
                 mask=(offs_d < D) & (c == 0))


@triton.jit
def _kv_codes_kernel(K, V, KC, SK, VT, VS, KSUM, VMAX,
                     s_kb, s_kt, s_kh, s_vb, s_vt, s_vh, s_cb, s_ct, s_ch, s_tb, s_th, s_td,
                     T, H, NB, t_f,
                     D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, NCH: tl.constexpr,
                     K_CODES: tl.constexpr, V_CODES: tl.constexpr, FP8_NATIVE: tl.constexpr):
    """K/V pre-pass, second launch: one program per (block of BLOCK rows, head, batch) finishes
    the partials of :func:`_kv_stats_kernel` (:func:`_kv_finals`) and writes the codes that need
    them (:func:`_kv_codes_block`); block 0 also writes the V descale ``amax / 448``."""
    EVEN_D: tl.constexpr = D == BLOCK_D
    blk = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mu, amax, inv = _kv_finals(KSUM, VMAX, b, h, H, t_f, offs_d, BLOCK_D, NCH, K_CODES, V_CODES)
    _kv_codes_block(K + b * s_kb + h.to(tl.int64) * s_kh, V + b * s_vb + h.to(tl.int64) * s_vh,
                    KC + b * s_cb + h.to(tl.int64) * s_ch, VT + b * s_tb + h.to(tl.int64) * s_th, SK, b, h, blk,
                    mu, inv, offs_d, s_kt, s_vt, s_ct, s_td, T, H, NB, D, BLOCK, EVEN_D, K_CODES, V_CODES,
                    FP8_NATIVE)
    if V_CODES:
        tl.store(VS + (b * H + h) * D + offs_d, tl.math.div_rn(amax, 448.0 + tl.zeros_like(amax)),
                 mask=(offs_d < D) & (blk == 0))


@triton.jit
def _qdot(a, b, INT: tl.constexpr, FP8_NATIVE: tl.constexpr):
    if FP8_NATIVE:
        if INT:
            r = tl.dot(a, b, out_dtype=tl.int32).to(tl.float32)
        else:
            r = tl.dot(a, b, out_dtype=tl.float32)
    else:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32))
    return r


@triton.jit
def _qattn_fwd_kernel(QC, KC, VT, SQ, SK, VS, LT, GAMMA, Out, DBG_S, DBG_K,
                      s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vh, s_vd, s_ob, s_ot, s_oh,
                      Hq, Hk, Tq, Tk, NBQ, NBK, GROUP, diag, q_mult,
                      D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      CAUSAL: tl.constexpr, QK_INT: tl.constexpr, PMODE: tl.constexpr,
                      HAS_GAMMA: tl.constexpr, FP8_NATIVE: tl.constexpr, DEBUG: tl.constexpr,
                      Q_RAW: tl.constexpr):
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
    if Q_RAW:
        # int8: QC is the raw q; its block of BLOCK_M = q_block rows is quantised here, in
        # registers, with exactly the pre-pass's operations (:func:`_quant_kernel`, no mean)
        x = _load_tile(QC + b * s_qb + h.to(tl.int64) * s_qh, offs_m, s_qt, offs_d, Tq, D, True, EVEN_D)
        x = x.to(tl.float32)
        x = _mul_rn(x, tl.zeros_like(x) + q_mult)
        amax = tl.max(tl.max(tl.abs(x), 1), 0)
        inv = tl.where(amax > 0, tl.math.div_rn(127.0 + tl.zeros_like(amax), tl.where(amax > 0, amax, 1.0)), 0.0)
        q = _to_code(x * inv, 0, FP8_NATIVE)
        sq = tl.math.div_rn(amax, 127.0 + tl.zeros_like(amax))
    else:
        q = _load_tile(QC + b * s_qb + h.to(tl.int64) * s_qh, offs_m, s_qt, offs_d, Tq, D, True, EVEN_D)
        sq = tl.load(SQ + (b * NBQ + pid_m) * Hq + h)
    k_base = KC + b * s_kb + hk.to(tl.int64) * s_kh
    vt_base = VT + b * s_vb + hk.to(tl.int64) * s_vh
    sk_base = SK + b * NBK * Hk + hk
    lt = tl.load(LT + h)  # log2 tau (binary P); a dummy valid pointer otherwise
    # DEBUG: this program's rows of the [B, Hq, Tq, Tk] score / keep-decision records
    dbg_off = ((b * Hq + h) * Tq).to(tl.int64) * Tk
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_full, n_end = _fwd_kv_ranges(m0, Tk, diag, BLOCK_M, BLOCK_N, CAUSAL)
    acc, m_i, l_i = qattn_fwd_inner(acc, m_i, l_i, q, sq, k_base, vt_base, sk_base, s_kt, s_vd, Hk,
                                    offs_m, offs_d, 0, n_full, Tk, diag, lt, D, BLOCK_N, False, CAUSAL, EVEN_D, QK_INT, PMODE,
                                    FP8_NATIVE, DBG_S + dbg_off, DBG_K + dbg_off, Tq, DEBUG)
    acc, m_i, l_i = qattn_fwd_inner(acc, m_i, l_i, q, sq, k_base, vt_base, sk_base, s_kt, s_vd, Hk,
                                    offs_m, offs_d, n_full, n_end, Tk, diag, lt, D, BLOCK_N, True, CAUSAL, EVEN_D, QK_INT, PMODE,
                                    FP8_NATIVE, DBG_S + dbg_off, DBG_K + dbg_off, Tq, DEBUG)
    inv_l = tl.where(l_i > 0, 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)
    vs = tl.load(VS + (b * Hk + hk) * D + offs_d, mask=offs_d < D, other=0.0)
    o = acc * inv_l[:, None] * vs[None, :]
    if HAS_GAMMA:
        o = o * tl.load(GAMMA + h)
    _store_tile(Out + b * s_ob + h.to(tl.int64) * s_oh, o.to(Out.dtype.element_ty), offs_m, s_ot, offs_d, Tq,
                D, EVEN_D)


@triton.jit
def qattn_fwd_inner(acc, m_i, l_i, q, sq, k_base, vt_base, sk_base, stride_kn, stride_vd, stride_sk,
                       offs_m, offs_d, lo, hi, Tk, diag, lt,
                       D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                       EVEN_D: tl.constexpr, QK_INT: tl.constexpr, PMODE: tl.constexpr,
                       FP8_NATIVE: tl.constexpr, dbg_s, dbg_k, Tq, DEBUG: tl.constexpr):
    """``attention.attn_fwd_inner`` with quantised tiles over key blocks ``[lo, hi)``.

    ``q``: the query codes tile, ``sq`` its scale (softmax scale folded in); the scale of key
    block j is at ``sk_base + j * stride_sk``; ``vt_base``: this (batch, kv head)'s transposed
    V codes. PMODE 0: FP8 P (``exp2(s - m + log2 448)``); 1: fp16 P; 2: binary P with the per-(row, tile)
    mean kept probability (``lt`` = log2 tau). ``l_i`` is the row sum (PMODE 0/1) or the kept
    mass (2). DEBUG: also store the descaled scores (log2 units) at ``dbg_s`` and the keep
    decisions (PMODE 2) at ``dbg_k``, rows of ``Tk`` (this program's ``[Tq, Tk]`` block).
    """
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(_loop_bound(lo), _loop_bound(hi), BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        acc, m_i, l_i = _qattn_step(acc, m_i, l_i, q, sq, k_base, vt_base, sk_base, stride_kn, stride_vd,
                                    stride_sk, offs_m, offs_d, offs_n0, start_n, Tk, diag, lt, D, BLOCK_N,
                                    MASKED, CAUSAL, EVEN_D, QK_INT, PMODE, FP8_NATIVE, dbg_s, dbg_k, Tq, DEBUG)
    return acc, m_i, l_i


@triton.jit
def _qattn_step(acc, m_i, l_i, q, sq, k_base, vt_base, sk_base, stride_kn, stride_vd, stride_sk,
                offs_m, offs_d, offs_n0, start_n, Tk, diag, lt,
                D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                EVEN_D: tl.constexpr, QK_INT: tl.constexpr, PMODE: tl.constexpr, FP8_NATIVE: tl.constexpr,
                dbg_s, dbg_k, Tq, DEBUG: tl.constexpr):
    """One key tile of the quantised online softmax (see :func:`qattn_fwd_inner`)."""
    cols = start_n + offs_n0
    k = _load_tile(k_base, cols, stride_kn, offs_d, Tk, D, MASKED, EVEN_D)
    sk = tl.load(sk_base + (start_n // BLOCK_N) * stride_sk)
    s = _qdot(q, tl.trans(k), QK_INT, FP8_NATIVE) * (sq * sk)
    if MASKED:
        valid = cols[None, :] < Tk
        if CAUSAL:
            valid = valid & (cols[None, :] <= offs_m[:, None] + diag)
        s = tl.where(valid, s, float("-inf"))
    if DEBUG:
        dmask = (offs_m[:, None] < Tq) & (cols[None, :] < Tk)
        tl.store(dbg_s + offs_m[:, None] * Tk + cols[None, :], s, mask=dmask)
    mt = tl.max(s, 1)
    m_new = tl.maximum(m_i, mt)
    if MASKED:
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_sub = m_new
    if PMODE == 0:
        # FP8 P with the factor 448 as an exponent offset: p = 448 exp2(s - m) in [0, 448]
        p = tl.math.exp2(s - (m_sub - 8.807354922057604)[:, None])
    else:
        p = tl.math.exp2(s - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    vptrs = vt_base + offs_d[:, None] * stride_vd + cols[None, :]
    if MASKED:
        vt = tl.load(vptrs, mask=(offs_d[:, None] < D) & (cols[None, :] < Tk), other=0.0)
    else:
        if EVEN_D:
            vt = tl.load(vptrs)
        else:
            vt = tl.load(vptrs, mask=offs_d[:, None] < D, other=0.0)
    v = tl.trans(vt)
    if PMODE == 2:
        keep = s >= (mt + lt)[:, None]
        if MASKED:
            keep = keep & valid
        if DEBUG:
            tl.store(dbg_k + offs_m[:, None] * Tk + cols[None, :], keep.to(tl.int8), mask=dmask)
        kp = tl.where(keep, p, 0.0)
        n = tl.sum(keep.to(tl.float32), 1)
        kept = tl.sum(kp, 1)
        cc = tl.where(n > 0, kept / tl.maximum(n, 1.0), 0.0)
        if FP8_NATIVE:
            bv = tl.dot(keep.to(tl.float32).to(tl.float8e4nv), v, out_dtype=tl.float32)
        else:
            bv = tl.dot(keep.to(tl.float32), v.to(tl.float32))
        acc = acc * alpha[:, None] + cc[:, None] * bv
        l_i = l_i * alpha + kept
    else:
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if PMODE == 0:
            if FP8_NATIVE:
                pc = p.to(tl.float8e4nv)  # cvt.rn.satfinite: p <= 448 up to exp2 rounding
            else:
                pc = _round_fp8(p)
            acc = acc + _qdot(pc, v, False, FP8_NATIVE)
        else:
            if FP8_NATIVE:
                acc = tl.dot(p.to(tl.float16), v, acc, out_dtype=tl.float32)
            else:
                acc = tl.dot(p.to(tl.float16).to(tl.float32), v.to(tl.float32), acc)
    return acc, m_new, l_i


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------
def _bd(D: int) -> int:
    return max(32, triton.next_power_of_2(D))  # INT8 / FP8 dots need K >= 32


def _check(q, k, v, q_block: int, k_block: int):
    _check_qkv(q, k, v)
    for name, val in (("q_block", q_block), ("k_block", k_block)):
        if val < 32 or val > 256 or val & (val - 1):
            raise ValueError(f"{name} must be a power of two in [32, 256] for the Triton kernels; got {val}")


def quantise(x: torch.Tensor, block: int, kind: str, mult: float = 1.0, mean: torch.Tensor | None = None):
    """Block-quantise x [B, T, H, D] with the Triton pre-pass: (codes, scale fp32 [B, nb, H]).

    ``kind`` "int8" or "fp8"; codes are int8 / float8_e4m3fn compiled, fp32 under the interpreter.
    ``x`` is multiplied by ``mult`` (fp32) and ``mean`` [B, 1, H, D] fp32 is subtracted first."""
    B, T, H, D = x.shape
    x = _unit_last(x)
    nb = triton.cdiv(T, block)
    native = not INTERP
    cdt = (torch.int8 if kind == "int8" else torch.float8_e4m3fn) if native else torch.float32
    codes = _alloc((B, T, H, D), cdt, x.device)
    scale = _alloc((B, nb, H), torch.float32, x.device)
    if x.numel() == 0:
        return codes, scale
    m = mean if mean is not None else scale
    _quant_kernel[(nb, H, B)](
        x, m, codes, scale, x.stride(0), x.stride(1), x.stride(2), codes.stride(0), codes.stride(1),
        codes.stride(2), m.stride(0) if mean is not None else 0, m.stride(2) if mean is not None else 0,
        T, H, nb, float(mult), D=D, BLOCK_D=_bd(D), BLOCK=block, KIND=0 if kind == "int8" else 1,
        QMAX=127.0 if kind == "int8" else 448.0, HAS_MEAN=mean is not None, FP8_NATIVE=native, num_warps=4)
    return codes, scale


def _quant_v(v: torch.Tensor, pv: str):
    """V codes transposed [B, Hk, D, Tk] and the per-channel descale [B, Hk, D] (fp32)."""
    B, T, H, D = v.shape
    if pv == "fp16":
        vt = v.to(torch.float16).permute(0, 2, 3, 1).contiguous()
        return vt, torch.ones((B, H, D), dtype=torch.float32, device=v.device)
    vmin, vmax = torch.aminmax(v, dim=1)                                    # one pass, no |v| copy
    amax = torch.maximum(vmax, -vmin).float()                               # [B, H, D]
    qm = torch.tensor(448.0, dtype=torch.float32, device=v.device)
    inv = torch.where(amax > 0, qm / amax, torch.zeros_like(amax)).contiguous()
    native = not INTERP
    vt = _alloc((B, H, D, T), torch.float8_e4m3fn if native else torch.float32, v.device)
    v = _unit_last(v)
    BLK = 64
    _quant_v_kernel[(triton.cdiv(T, BLK), H, B)](
        v, inv, vt, v.stride(0), v.stride(1), v.stride(2), vt.stride(0), vt.stride(1), vt.stride(2), T, H,
        D=D, BLOCK_D=_bd(D), BLOCK=BLK, FP8_NATIVE=native, num_warps=4)
    return vt, amax / qm


def _kv_chunks(B: int, H: int, nb: int) -> int:
    """Chunks per (batch, head) of the statistics launch: a power of two <= nb and <= 64."""
    want = max(1, -(-int(CFG["kv_programs"]) // max(1, B * H)))
    nch = 1
    while nch * 2 <= min(want, nb, 64):
        nch *= 2
    return nch


def quant_kv(k: torch.Tensor, v: torch.Tensor, k_block: int, kind: str = "int8", smooth: bool = False,
             pv: str = "fp8"):
    """K and V quantised in two launches that each read K and V once.

    Returns (kc [B, Tk, Hk, D], sk fp32 [B, nb, Hk], vt [B, Hk, D, Tk], vs fp32 [B, Hk, D]) with
    exactly the rules of :func:`quantise` (K blocks of ``k_block`` rows, ``kind`` "int8" / "fp8",
    ``smooth``: minus the per-(batch, head) key mean, int8 only) and :func:`_quant_v` (``pv``
    "fp8": per-channel FP8 codes; "fp16": fp16 V, unit scales). :func:`_kv_stats_kernel` reads K
    and V once for the per-chunk key sums and V channel maxima (and writes whatever needs no
    global statistic); :func:`_kv_codes_kernel` reads them again for the codes that do. The mean
    is ``(sum of the chunk sums) / Tk`` in fp32 (IEEE division); its summation order differs
    from torch's ``mean``, as any two GPU reductions do."""
    if smooth and kind != "int8":
        raise ValueError(f"quant_kv: smooth=True is int8's key smoothing; got kind={kind!r}")
    if pv not in ("fp8", "fp16"):
        raise ValueError(f"quant_kv: pv must be 'fp8' or 'fp16'; got {pv!r}")
    B, T, H, D = k.shape
    k, v = _unit_last(k), _unit_last(v)
    native = not INTERP
    dev = k.device
    cdt = (torch.int8 if kind == "int8" else torch.float8_e4m3fn) if native else torch.float32
    vdt = torch.float16 if pv == "fp16" else (torch.float8_e4m3fn if native else torch.float32)
    nb = triton.cdiv(T, k_block)
    kc = _alloc((B, T, H, D), cdt, dev)
    sk = _alloc((B, nb, H), torch.float32, dev)
    vt = _alloc((B, H, D, T), vdt, dev)
    vs = _alloc((B, H, D), torch.float32, dev)
    if kc.numel() == 0:
        return kc, sk, vt, vs  # nothing to read (the attention launch returns before using them)
    bd = _bd(D)
    nch = _kv_chunks(B, H, nb)
    v_amax = pv == "fp8"
    part = _alloc((2, B, H, nch, bd), torch.float32, dev) if (smooth or v_amax) else sk
    strides = (k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
               kc.stride(0), kc.stride(1), kc.stride(2), vt.stride(0), vt.stride(1), vt.stride(2))
    warps = 4 if INTERP else int(CFG["kv_warps"])
    extra = {"num_stages": int(CFG["kv_stages"])} if CFG["kv_stages"] and not INTERP else {}
    _kv_stats_kernel[(nch, H, B)](
        k, v, kc, sk, vt, vs, part[0], part[-1], *strides, T, H, nb, triton.cdiv(nb, nch),
        D=D, BLOCK_D=bd, BLOCK=k_block, NCH=nch, K_SUM=smooth, K_CODES=not smooth, KIND=0 if kind == "int8" else 1,
        QMAX=127.0 if kind == "int8" else 448.0, V_AMAX=v_amax, V_F16=pv == "fp16", FP8_NATIVE=native,
        num_warps=warps, **extra)
    if smooth or v_amax:
        _kv_codes_kernel[(nb, H, B)](
            k, v, kc, sk, vt, vs, part[0], part[-1], *strides, T, H, nb, float(T),
            D=D, BLOCK_D=bd, BLOCK=k_block, NCH=nch, K_CODES=smooth, V_CODES=v_amax, FP8_NATIVE=native,
            num_warps=warps, **extra)
    return kc, sk, vt, vs


def _launch(qc, kc, vt, sq, sk, vs, lt, gamma, B, Tq, Hq, D, Tk, Hk, causal, q_block, k_block, qk_int, pmode,
            out_dtype, device, record=None, q_mult=None):
    o = _alloc((B, Tq, Hq, D), out_dtype, device)
    if record is not None:
        # the kernel's own scores (-inf where masked or never visited) and keep decisions
        record["scores"] = torch.full((B, Hq, Tq, Tk), float("-inf"), dtype=torch.float32, device=device)
        record["keep"] = torch.zeros((B, Hq, Tq, Tk), dtype=torch.int8, device=device)
    if o.numel() == 0:
        return o
    if Tk == 0:
        return o.zero_()
    grid = (triton.cdiv(Tq, q_block), Hq, B)
    dummy = sk
    dbg_s, dbg_k = (record["scores"], record["keep"]) if record is not None else (dummy, dummy)
    _qattn_fwd_kernel[grid](
        qc, kc, vt, sq, sk, vs, lt if lt is not None else dummy, gamma if gamma is not None else dummy, o,
        dbg_s, dbg_k,
        qc.stride(0), qc.stride(1), qc.stride(2), kc.stride(0), kc.stride(1), kc.stride(2),
        vt.stride(0), vt.stride(1), vt.stride(2), o.stride(0), o.stride(1), o.stride(2),
        Hq, Hk, Tq, Tk, triton.cdiv(Tq, q_block), sk.shape[1], Hq // Hk, Tk - Tq,
        1.0 if q_mult is None else float(q_mult),
        D=D, BLOCK_D=_bd(D), BLOCK_M=q_block, BLOCK_N=k_block, CAUSAL=bool(causal), QK_INT=qk_int,
        PMODE=pmode, HAS_GAMMA=gamma is not None, FP8_NATIVE=not INTERP, DEBUG=record is not None,
        Q_RAW=q_mult is not None,
        num_warps=4 if INTERP else (CFG["warps"] or (8 if q_block >= 128 else 4)),
        num_stages=1 if INTERP else CFG["stages"])
    return o


def _int8_fwd_impl(q, k, v, causal: bool, scale: float, q_block: int, k_block: int, pv: str, smooth_k: bool):
    _check(q, k, v, q_block, k_block)
    B, Tq, Hq, D = q.shape
    Tk, Hk = k.shape[1], k.shape[2]
    if pv not in ("fp8", "fp16"):
        raise ValueError(f"precision.int8: pv must be 'fp8' or 'fp16'; got {pv!r}")
    if CFG["fuse_q"]:  # the attention kernel quantises its own Q block (no Q pre-pass)
        qc, sq, q_mult = _unit_last(q), None, scale * LOG2E
    else:
        (qc, sq), q_mult = quantise(q, q_block, "int8", mult=scale * LOG2E), None
    if CFG["fused_kv"]:
        kc, sk, vt, vs = quant_kv(k, v, k_block, "int8", smooth=smooth_k, pv=pv)
    else:
        kc, sk = quantise(k, k_block, "int8", mean=key_mean(k) if smooth_k and Tk > 0 else None)
        vt, vs = _quant_v(v, pv)
    return _launch(qc, kc, vt, sq, sk, vs.contiguous(), None, None, B, Tq, Hq, D, Tk, Hk, causal, q_block, k_block,
                   True, 0 if pv == "fp8" else 1, q.dtype, q.device, q_mult=q_mult)


def _define_ops():
    ns = getattr(torch.ops, "blockzoo", None)
    if ns is not None and hasattr(ns, "qattn_int8"):
        return ns.qattn_int8

    @torch.library.custom_op("blockzoo::qattn_int8", mutates_args=())
    def int8_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float, q_block: int,
                k_block: int, pv: str, smooth_k: bool) -> torch.Tensor:
        return _int8_fwd_impl(q, k, v, causal, scale, q_block, k_block, pv, smooth_k)

    def fake(q, k, v, causal, scale, q_block, k_block, pv, smooth_k):
        return q.new_empty(tuple(q.shape))

    def setup(ctx, inputs, output):
        q, k, v, causal, scale = inputs[:5]
        ctx.save_for_backward(q, k, v)
        ctx.causal, ctx.scale = causal, scale

    def backward(ctx, do):
        # straight-through: the gradient of unquantised attention, from the shared dense core
        q, k, v = ctx.saved_tensors
        o, lse = attention_fwd(q, k, v, ctx.causal, ctx.scale)
        dq, dk, dv = attention_bwd(do, q, k, v, o, lse, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None, None, None, None, None

    int8_op.register_fake(fake)
    int8_op.register_autograd(backward, setup_context=setup)
    return int8_op


_int8_op = _define_ops()


def int8_attention(q, k, v, causal: bool = True, scale: float | None = None, q_block: int = 64,
                   k_block: int = 128, pv: str = "fp8", smooth_k: bool = True) -> torch.Tensor:
    """``precision.int8``: o [B, Tq, Hq, D] in q's dtype; backward = dense core (straight-through)."""
    scale = 1.0 / (q.shape[-1] ** 0.5) if scale is None else float(scale)
    return _int8_op(q, k, v, bool(causal), scale, int(q_block), int(k_block), str(pv), bool(smooth_k))


_RECORDS: list[list[dict]] = []


@contextlib.contextmanager
def record_decisions():
    """Record what every :func:`qaas_forward` launched inside the block computed and decided.

    Yields a list; each qaas forward launch appends a dict: ``scores`` fp32 [B, Hq, Tq, Tk], the
    kernel's own descaled scores (log2 units; -inf where masked), ``keep`` int8 [B, Hq, Tq, Tk],
    its binary keep decisions (all 0 unless ``binary``), ``codes`` = (qc, sq, kc, sk), the
    quantised Q/K and scales it used, and ``log2_tau`` [Hq]. It is the normal launch with two
    extra stores (constexpr ``DEBUG``), so the decisions are those of the output it returns.
    For tests: the records are dense O(T^2)."""
    rec: list[dict] = []
    _RECORDS.append(rec)
    try:
        yield rec
    finally:
        _RECORDS.remove(rec)


@torch.no_grad()
def qaas_forward(q, k, v, tau, gamma, causal: bool = True, scale: float | None = None, q_block: int = 128,
                 k_block: int | None = None, binary: bool = True) -> torch.Tensor:
    """The qaas forward kernels (no autograd): o [B, Tq, Hq, D] in q's dtype (``k_block`` None:
    ``reference.QAAS_K_BLOCK[binary]``)."""
    k_block = qaas_k_block(k_block, binary)
    _check(q, k, v, q_block, k_block)
    check_tau_gamma(q, tau, gamma)
    B, Tq, Hq, D = q.shape
    Tk, Hk = k.shape[1], k.shape[2]
    scale = 1.0 / (D ** 0.5) if scale is None else float(scale)
    qc, sq = quantise(q, q_block, "fp8")
    # the softmax scale into Q's descale, in fp32 (a Python scalar is cast to fp32, as the
    # reference's fp32 tensor; no host-to-device copy)
    sq = sq.mul_(scale * LOG2E)
    if CFG["fused_kv"]:
        kc, sk, vt, vs = quant_kv(k, v, k_block, "fp8", smooth=False, pv="fp8")
    else:
        kc, sk = quantise(k, k_block, "fp8")
        vt, vs = _quant_v(v, "fp8")
    lt = log2_tau(tau).to(q.device).contiguous()
    g = gamma.detach().float().contiguous()
    record = {"codes": (qc, sq, kc, sk), "log2_tau": lt} if _RECORDS else None
    o = _launch(qc, kc, vt, sq, sk, vs.contiguous(), lt, g, B, Tq, Hq, D, Tk, Hk, causal, q_block, k_block,
                False, 2 if binary else 0, q.dtype, q.device, record)
    for rec in _RECORDS:
        rec.append(record)
    return o


def qaas_attention(q, k, v, tau, gamma, causal: bool = True, scale: float | None = None, q_block: int = 128,
                   k_block: int | None = None, binary: bool = True, temperature: float = 1.0) -> torch.Tensor:
    """``precision.qaas``: Triton forward; straight-through gradient from the reference surrogate."""
    return qaas_apply(qaas_forward, q, k, v, tau, gamma, causal=causal, scale=scale, q_block=q_block,
                      k_block=k_block, binary=binary, temperature=temperature)
