"""Mixture-of-Depths Attention (``depth.moda``) in Triton: one fused kernel, forward and backward,
on the shared online-softmax core (:mod:`.attention`).

Layout: q [B, Tq, Hq, D], k/v [B, Tk, Hk, D], depth_k/depth_v [B, Tq*S, Hk, D] token-major (the S
depth slots of query row t are rows ``t*S .. t*S+S-1``). Query row t attends under ONE softmax to
the (causal, bottom-right aligned) sequence keys and to the S depth slots of its own position.

Tiling ("packed GQA"): a program owns TOK query positions x the GP (= GQA group, padded to a power
of two) query heads that share one kv head, i.e. BLOCK_M = TOK * GP rows ordered (token, head).
One online-softmax state ``(acc, m_i, l_i)`` covers both segments:

* the depth segment (run first, in [TOK, GP, D] tiles): slot s of the tile's positions is a
  [TOK, D] tile of depth keys, broadcast over the group's heads and scored by a row-wise dot (CUDA
  cores: per row it is S keys of its own, a block-diagonal pattern that a matmul would waste
  TOK-fold), folded in with one online-softmax step per slot; each depth row is read once for the
  whole group;
* the state is reshaped to [BLOCK_M, D] and the sequence segment runs through the shared core
  :func:`.attention.attn_fwd_inner` unchanged: interior key blocks unmasked, then the causal
  boundary blocks masked, each row passing its TOKEN index as ``offs_m`` to the core's causal
  mask; every K/V tile is loaded once for the whole group.

The order of the segments does not change the result (online softmax); depth first means its
[TOK, GP, D] tiles are dead before the sequence loop starts (fewer live registers).

That is the "rowwise" depth path. The "mma" path (issue 6) runs the depth step on the tensor
cores instead: the packed tile viewed as [TOK/P, P*GP, D] batches of P = 16/GP positions, one
batched dot against the [TOK/P, P*SB, D] depth tile of those positions (SB slots per step),
masked block-diagonally by position (P-fold wasted depth work: 2x at GQA 8:1), and the backward
likewise with five batched dots per step. ``path="auto"`` picks "mma" for GQA >= 2 and "rowwise"
without GQA (:func:`depth_path`).

Backward (same lse / delta as dense attention: the softmax is joint, so ``P = exp(S - lse)`` and
``dS = P (dP - delta)``, ``delta = rowsum(dO * O)``, hold for both segments):

* the core's preprocess kernel (delta, lse in log2 units);
* dK/dV of the sequence keys: the core's key-block kernel (``attn_bwd_dkdv_inner``) run as is with
  the joint statistics;
* one packed dQ kernel: per depth slot ``dq += dS K_d`` and the slot's gradients
  ``dK_d = scale * sum_g dS Q``, ``dV_d = sum_g P dO`` (summed over the group's heads of each
  position inside the [TOK, GP, D] tile, written once: no atomics, deterministic), then
  :func:`.attention.attn_bwd_dq_inner` over the sequence keys into the same dQ accumulator.

Custom ops: ``blockzoo::moda_fwd(q, k, v, depth_k, depth_v, causal, scale, path) -> (o, lse)`` and
``blockzoo::moda_bwd(do, q, k, v, depth_k, depth_v, o, lse, causal, scale, path) -> 5 grads``, with
``register_fake`` and ``register_autograd``. Runs on CUDA, and on CPU tensors under
``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._customop import define_attention_ops, resolve_scale
from .attention import (
    LOG2E,
    Cfg,
    _alloc,
    _attn_bwd_dkdv_kernel,
    _attn_bwd_pre_kernel,
    _block_d,
    _candidates,
    _check,
    _check_i32,
    _dot,
    _dot_acc,
    _fwd_kv_ranges,
    _interpreting,
    _loop_bound,
    _run_tuned,
    _unit_last,
    attn_bwd_dq_inner,
    attn_fwd_finish,
    attn_fwd_inner,
)

__all__ = ["moda_attention", "moda_fwd", "moda_bwd", "depth_path", "CFGS", "MCfg", "PATHS"]

#: Tile configs :class:`MCfg` per (kind, BLOCK_D, element size), kind "fwd" / "dq" (rowwise depth
#: path) or "fwd_mma" / "dq_mma" (mma depth path); tests may set CFGS["interp"] to exercise other
#: tilings (both paths); env ``BLOCKZOO_MODA_<KIND>_CFG`` = "BM,BN,warps,stages[,prefetch[,slots]]"
#: forces one on the GPU.
CFGS: dict = {}

#: Depth-step implementations: "rowwise" (CUDA-core row-wise dots, one slot per step), "mma"
#: (batched tensor-core dots over pairs of positions, block-diagonal mask) or "auto" (see
#: :func:`depth_path`). Default from env ``BLOCKZOO_MODA_DEPTH``; ``moda_attention(path=...)``
#: overrides it per call.
PATHS = ("auto", "rowwise", "mma")
DEPTH_PATH = os.environ.get("BLOCKZOO_MODA_DEPTH", "auto")


def depth_path(group: int, path: str = "auto") -> str:
    """The depth path a call takes. ``auto``: "mma" when the GQA group (Hq / Hk) is >= 3, else
    "rowwise". The mma path packs P = 16 / GP positions per tensor-core tile (GP = the group padded
    to a power of two), so its wasted depth work is P-fold: 2x at GQA 8:1, 8x at 2:1, 16x without
    GQA. On the H100 (bench/gpu_depth.py, tuned tiles, 2026-11-23) mma was 1.1-2.2x faster in
    forward+backward at GQA 8:1 and 1.24x at 4:1, and rowwise 1.33x faster at 2:1 (B=1, T=4096,
    D=64, S=32); without GQA the two runs disagreed (rowwise 0.94x / 1.15x of mma)."""
    if path not in PATHS:
        raise ValueError(f"depth path {path!r} is not one of {PATHS}")
    if path != "auto":
        return path
    return "mma" if group >= 3 else "rowwise"


class MCfg(NamedTuple):
    """(BLOCK_M rows = TOK * GP, BLOCK_N key step, num_warps, num_stages, prefetch depth rows
    (rowwise path), slots: depth rows per step of the mma path, TOK x slots per position (0 = by
    head dim and dtype, see :func:`_mma_tiling`))."""

    outer: int
    inner: int
    warps: int
    stages: int
    prefetch: int = 0
    slots: int = 0


def _cfg(kind: str, block_d: int, esize: int) -> MCfg:
    if _interpreting():
        return MCfg(*CFGS.get("interp", MCfg(16, 16, 4, 1)))
    env = os.environ.get(f"BLOCKZOO_MODA_{kind.upper()}_CFG")
    if env:
        return MCfg(*[int(x) for x in env.split(",")])
    if (kind, block_d, esize) in CFGS:
        return MCfg(*CFGS[(kind, block_d, esize)])
    if kind.endswith("_mma"):
        if esize > 2:  # fp32 (untuned): D > 64 spills in the backward (tf32x3 triples the dots)
            return MCfg(64, 32, 4, 2) if block_d <= 64 else MCfg(32, 32, 4, 2, 0, 16)
        # bf16/fp16: the best of bench/gpu_depth.py --tune-mma on an H100 (T=16384, S=64, GQA 8:1,
        # 2026-11-23; 6 forward and 5 backward candidates); head dim 256 untuned
        if block_d <= 64:
            return MCfg(128, 128, 8, 3) if kind == "fwd_mma" else MCfg(64, 64, 4, 3)
        if block_d <= 128:
            return MCfg(128, 128, 8, 3) if kind == "fwd_mma" else MCfg(128, 128, 8, 2)
        return MCfg(64, 32, 4, 2)
    if esize > 2:  # fp32 (untuned)
        return MCfg(32, 32, 4, 2) if block_d > 64 else MCfg(64, 32, 4, 2)
    # bf16/fp16: the best of bench/gpu_depth.py --tune on an H100 (T=16384, S=64, GQA 8:1,
    # 2026-11-23); head dim 256 untuned
    if block_d <= 64:
        return MCfg(128, 64, 4, 2, 1) if kind == "fwd" else MCfg(64, 64, 4, 2, 1)
    if block_d <= 128:
        return MCfg(128, 128, 8, 2, 1) if kind == "fwd" else MCfg(64, 64, 4, 2, 0)
    return MCfg(64, 32, 4, 2)


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------

if _interpreting():
    # the interpreter has no bf16 arithmetic (see attention._dot): upcast the held tiles
    @triton.jit
    def _hold(x):
        return x.to(tl.float32)
else:
    # compiled: keep 16-bit tiles 16-bit (half the registers); products promote to fp32
    @triton.jit
    def _hold(x):
        return x

@triton.jit
def _packed_rows(pid_m, GROUP, TOK: tl.constexpr, GP: tl.constexpr):
    """Rows of a packed tile: token index and in-group head of each of the TOK*GP rows."""
    r = tl.arange(0, TOK * GP)
    tok = pid_m * TOK + r // GP
    g = r % GP
    return tok, g


@triton.jit
def _load_rows(base, tok, head, s_t, s_h, offs_d, mask_r, D: tl.constexpr, EVEN_D: tl.constexpr):
    ptrs = base + tok[:, None] * s_t + head[:, None] * s_h + offs_d[None, :]
    if EVEN_D:
        return tl.load(ptrs, mask=mask_r[:, None], other=0.0)
    return tl.load(ptrs, mask=mask_r[:, None] & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _store_rows(base, x, tok, head, s_t, s_h, offs_d, mask_r, D: tl.constexpr, EVEN_D: tl.constexpr):
    ptrs = base + tok[:, None] * s_t + head[:, None] * s_h + offs_d[None, :]
    if EVEN_D:
        tl.store(ptrs, x, mask=mask_r[:, None])
    else:
        tl.store(ptrs, x, mask=mask_r[:, None] & (offs_d[None, :] < D))


@triton.jit
def _load_tok_rows(base, rows, s_t, offs_d, tmask, D: tl.constexpr, EVEN_D: tl.constexpr):
    """[TOK, BLOCK_D] tile of rows ``rows`` (one per position), zero where ~tmask / d >= D."""
    ptrs = base + rows[:, None] * s_t + offs_d[None, :]
    if EVEN_D:
        return tl.load(ptrs, mask=tmask[:, None], other=0.0)
    return tl.load(ptrs, mask=tmask[:, None] & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _store_tok_rows(base, x, rows, s_t, offs_d, tmask, D: tl.constexpr, EVEN_D: tl.constexpr):
    ptrs = base + rows[:, None] * s_t + offs_d[None, :]
    if EVEN_D:
        tl.store(ptrs, x, mask=tmask[:, None])
    else:
        tl.store(ptrs, x, mask=tmask[:, None] & (offs_d[None, :] < D))


@triton.jit
def _load3(base, tok1, g1, s_t, s_h, offs_d, mask2, D: tl.constexpr, EVEN_D: tl.constexpr):
    """[TOK, GP, BLOCK_D] tile: position tok1[i], in-group head g1[j] (head offset in ``base``)."""
    ptrs = base + tok1[:, None, None] * s_t + g1[None, :, None] * s_h + offs_d[None, None, :]
    if EVEN_D:
        return tl.load(ptrs, mask=mask2[:, :, None], other=0.0)
    return tl.load(ptrs, mask=mask2[:, :, None] & (offs_d[None, None, :] < D), other=0.0)


@triton.jit
def _depth_fwd_step(acc3, m3, l3, q3, kd, vd, qk_scale):
    sc = tl.sum(q3 * kd[:, None, :], 2) * qk_scale                                  # [TOK, GP]
    m_new = tl.maximum(m3, sc)
    alpha = tl.math.exp2(m3 - m_new)
    p = tl.math.exp2(sc - m_new)
    l3 = l3 * alpha + p
    acc3 = acc3 * alpha[:, :, None] + p[:, :, None] * vd[:, None, :]
    return acc3, m_new, l3


@triton.jit
def moda_depth_fwd(acc3, m3, l3, q3, dk_base, dv_base, s_dkt, s_dvt, tok1, offs_d, S, Tq, qk_scale,
                   D: tl.constexpr, EVEN_D: tl.constexpr, PREFETCH: tl.constexpr):
    """Fold the S depth slots of each row's own position into an online-softmax state kept as
    [TOK, GP(, BLOCK_D)] tiles (position x in-group head): slot s of position t is row
    ``t*S + s`` of ``dk_base`` / ``dv_base`` (already at this batch and kv head), loaded once as a
    [TOK, BLOCK_D] tile and broadcast over the group's heads; the score is a row-wise dot.
    PREFETCH: issue the loads of slot s+1 before the arithmetic of slot s."""
    tmask = tok1 < Tq
    rows = tok1 * S
    if PREFETCH:
        kd = _load_tok_rows(dk_base, rows, s_dkt, offs_d, tmask & (S > 0), D, EVEN_D)
        vd = _load_tok_rows(dv_base, rows, s_dvt, offs_d, tmask & (S > 0), D, EVEN_D)
        for s in range(0, _loop_bound(S)):
            nmask = tmask & (s + 1 < S)
            kd_n = _load_tok_rows(dk_base, rows + s + 1, s_dkt, offs_d, nmask, D, EVEN_D)
            vd_n = _load_tok_rows(dv_base, rows + s + 1, s_dvt, offs_d, nmask, D, EVEN_D)
            acc3, m3, l3 = _depth_fwd_step(acc3, m3, l3, q3, kd.to(tl.float32), vd.to(tl.float32), qk_scale)
            kd, vd = kd_n, vd_n
    else:
        for s in range(0, _loop_bound(S)):
            kd = _load_tok_rows(dk_base, rows + s, s_dkt, offs_d, tmask, D, EVEN_D).to(tl.float32)
            vd = _load_tok_rows(dv_base, rows + s, s_dvt, offs_d, tmask, D, EVEN_D).to(tl.float32)
            acc3, m3, l3 = _depth_fwd_step(acc3, m3, l3, q3, kd, vd, qk_scale)
    return acc3, m3, l3


@triton.jit
def _depth_bwd_step(dq3, q3, do3, lse2_3, delta3, kd, vd, gk_base, gv_base, rows, s_gkt, s_gvt, offs_d, tmask,
                    qk_scale, sm_scale, D: tl.constexpr, EVEN_D: tl.constexpr):
    p = tl.math.exp2(tl.sum(q3 * kd[:, None, :], 2) * qk_scale - lse2_3)              # [TOK, GP]
    ds = p * (tl.sum(do3 * vd[:, None, :], 2) - delta3)
    dq3 += ds[:, :, None] * kd[:, None, :]
    gk = tl.sum(ds[:, :, None] * q3, 1) * sm_scale                                   # [TOK, D]
    gv = tl.sum(p[:, :, None] * do3, 1)
    _store_tok_rows(gk_base, gk.to(gk_base.dtype.element_ty), rows, s_gkt, offs_d, tmask, D, EVEN_D)
    _store_tok_rows(gv_base, gv.to(gv_base.dtype.element_ty), rows, s_gvt, offs_d, tmask, D, EVEN_D)
    return dq3


@triton.jit
def _moda_fwd_kernel(Q, K, V, DK, DV, Out, LSE,
                     s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,
                     s_dkb, s_dkt, s_dkh, s_dvb, s_dvt, s_dvh, s_ob, s_ot, s_oh,
                     Hq, Tq, Tk, S, GROUP, qk_scale, diag,
                     D: tl.constexpr, BLOCK_D: tl.constexpr, TOK: tl.constexpr, GP: tl.constexpr,
                     BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, NEG_SCALE: tl.constexpr,
                     PREFETCH: tl.constexpr):
    EVEN_D: tl.constexpr = D == BLOCK_D
    BLOCK_M: tl.constexpr = TOK * GP
    pid_m = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m  # heaviest query blocks first
    offs_d = tl.arange(0, BLOCK_D)
    tok1 = pid_m * TOK + tl.arange(0, TOK)
    g1 = tl.arange(0, GP)
    mask2 = (tok1[:, None] < Tq) & (g1[None, :] < GROUP)
    q_head0 = Q + b * s_qb + (hk * GROUP).to(tl.int64) * s_qh

    # depth segment first (its [TOK, GP, D] tiles are dead before the sequence loop starts)
    q3 = _hold(_load3(q_head0, tok1, g1, s_qt, s_qh, offs_d, mask2, D, EVEN_D))
    acc3 = tl.zeros([TOK, GP, BLOCK_D], dtype=tl.float32)
    m3 = tl.full([TOK, GP], float("-inf"), dtype=tl.float32)
    l3 = tl.zeros([TOK, GP], dtype=tl.float32)
    acc3, m3, l3 = moda_depth_fwd(acc3, m3, l3, q3, DK + b * s_dkb + hk.to(tl.int64) * s_dkh,
                                  DV + b * s_dvb + hk.to(tl.int64) * s_dvh, s_dkt, s_dvt, tok1, offs_d,
                                  S, Tq, qk_scale, D, EVEN_D, PREFETCH)
    acc = tl.reshape(acc3, [BLOCK_M, BLOCK_D])
    m_i = tl.reshape(m3, [BLOCK_M])
    l_i = tl.reshape(l3, [BLOCK_M])

    # sequence segment: the shared core, the token index as the causal row coordinate
    tok, g = _packed_rows(pid_m, GROUP, TOK, GP)
    head = hk * GROUP + g
    rvalid = (tok < Tq) & (g < GROUP)
    q = _load_rows(Q + b * s_qb, tok, head, s_qt, s_qh, offs_d, rvalid, D, EVEN_D)
    k_base = K + b * s_kb + hk.to(tl.int64) * s_kh
    v_base = V + b * s_vb + hk.to(tl.int64) * s_vh
    n_full, n_end = _fwd_kv_ranges(pid_m * TOK, Tk, diag, TOK, BLOCK_N, CAUSAL)
    acc, m_i, l_i = attn_fwd_inner(acc, m_i, l_i, q, k_base, v_base, s_kt, s_vt, tok, offs_d,
                                   0, n_full, qk_scale, Tk, diag, D, BLOCK_N,
                                   False, CAUSAL, EVEN_D, NEG_SCALE)
    acc, m_i, l_i = attn_fwd_inner(acc, m_i, l_i, q, k_base, v_base, s_kt, s_vt, tok, offs_d,
                                   n_full, n_end, qk_scale, Tk, diag, D, BLOCK_N,
                                   True, CAUSAL, EVEN_D, NEG_SCALE)

    o, lse = attn_fwd_finish(acc, m_i, l_i)
    _store_rows(Out + b * s_ob, o.to(Out.dtype.element_ty), tok, head, s_ot, s_oh, offs_d, rvalid, D, EVEN_D)
    tl.store(LSE + (b * Hq + head) * Tq + tok, lse, mask=rvalid)


@triton.jit
def _moda_dq_kernel(Q, K, V, DK, DV, DO, DQ, DDK, DDV, LSE2, DELTA,
                    s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,
                    s_dkb, s_dkt, s_dkh, s_dvb, s_dvt, s_dvh, s_db, s_dt, s_dh, s_dqb, s_dqt, s_dqh,
                    s_gkb, s_gkt, s_gkh, s_gvb, s_gvt, s_gvh,
                    Hq, Tq, Tk, S, GROUP, qk_scale, sm_scale, diag,
                    D: tl.constexpr, BLOCK_D: tl.constexpr, TOK: tl.constexpr, GP: tl.constexpr,
                    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, PREFETCH: tl.constexpr):
    """dQ (depth + sequence) and the depth slots' dK/dV of one packed tile."""
    EVEN_D: tl.constexpr = D == BLOCK_D
    BLOCK_M: tl.constexpr = TOK * GP
    pid_m = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    offs_d = tl.arange(0, BLOCK_D)

    # depth segment, in [TOK, GP(, D)] tiles: dQ part, and each slot's dK/dV summed over the
    # group's heads of its position (written once: no atomics)
    tok1 = pid_m * TOK + tl.arange(0, TOK)
    g1 = tl.arange(0, GP)
    tmask = tok1 < Tq
    mask2 = tmask[:, None] & (g1[None, :] < GROUP)
    h0 = (hk * GROUP).to(tl.int64)
    q3 = _hold(_load3(Q + b * s_qb + h0 * s_qh, tok1, g1, s_qt, s_qh, offs_d, mask2, D, EVEN_D))
    do3 = _hold(_load3(DO + b * s_db + h0 * s_dh, tok1, g1, s_dt, s_dh, offs_d, mask2, D, EVEN_D))
    row3 = (b * Hq + h0 + g1[None, :]) * Tq + tok1[:, None]
    lse2_3 = tl.load(LSE2 + row3, mask=mask2, other=float("inf"))
    delta3 = tl.load(DELTA + row3, mask=mask2, other=0.0)
    dk_base = DK + b * s_dkb + hk.to(tl.int64) * s_dkh
    dv_base = DV + b * s_dvb + hk.to(tl.int64) * s_dvh
    gk_base = DDK + b * s_gkb + hk.to(tl.int64) * s_gkh
    gv_base = DDV + b * s_gvb + hk.to(tl.int64) * s_gvh
    dq3 = tl.zeros([TOK, GP, BLOCK_D], dtype=tl.float32)
    rows = tok1 * S
    if PREFETCH:
        kd = _load_tok_rows(dk_base, rows, s_dkt, offs_d, tmask & (S > 0), D, EVEN_D)
        vd = _load_tok_rows(dv_base, rows, s_dvt, offs_d, tmask & (S > 0), D, EVEN_D)
        for s in range(0, _loop_bound(S)):
            nmask = tmask & (s + 1 < S)
            kd_n = _load_tok_rows(dk_base, rows + s + 1, s_dkt, offs_d, nmask, D, EVEN_D)
            vd_n = _load_tok_rows(dv_base, rows + s + 1, s_dvt, offs_d, nmask, D, EVEN_D)
            dq3 = _depth_bwd_step(dq3, q3, do3, lse2_3, delta3, kd.to(tl.float32), vd.to(tl.float32), gk_base,
                                  gv_base, rows + s, s_gkt, s_gvt, offs_d, tmask, qk_scale, sm_scale, D, EVEN_D)
            kd, vd = kd_n, vd_n
    else:
        for s in range(0, _loop_bound(S)):
            kd = _load_tok_rows(dk_base, rows + s, s_dkt, offs_d, tmask, D, EVEN_D).to(tl.float32)
            vd = _load_tok_rows(dv_base, rows + s, s_dvt, offs_d, tmask, D, EVEN_D).to(tl.float32)
            dq3 = _depth_bwd_step(dq3, q3, do3, lse2_3, delta3, kd, vd, gk_base, gv_base, rows + s, s_gkt, s_gvt,
                                  offs_d, tmask, qk_scale, sm_scale, D, EVEN_D)
    dq = tl.reshape(dq3, [BLOCK_M, BLOCK_D])

    # sequence segment: the shared core
    tok, g = _packed_rows(pid_m, GROUP, TOK, GP)
    head = hk * GROUP + g
    rvalid = (tok < Tq) & (g < GROUP)
    q = _load_rows(Q + b * s_qb, tok, head, s_qt, s_qh, offs_d, rvalid, D, EVEN_D)
    do = _load_rows(DO + b * s_db, tok, head, s_dt, s_dh, offs_d, rvalid, D, EVEN_D)
    row = (b * Hq + head) * Tq + tok
    lse2 = tl.load(LSE2 + row, mask=rvalid, other=float("inf"))
    delta = tl.load(DELTA + row, mask=rvalid, other=0.0)
    k_base = K + b * s_kb + hk.to(tl.int64) * s_kh
    v_base = V + b * s_vb + hk.to(tl.int64) * s_vh
    n_full, n_end = _fwd_kv_ranges(pid_m * TOK, Tk, diag, TOK, BLOCK_N, CAUSAL)
    dq = attn_bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, s_kt, s_vt, tok, offs_d,
                           0, n_full, qk_scale, Tk, diag, D, BLOCK_N, False, CAUSAL, EVEN_D)
    dq = attn_bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, s_kt, s_vt, tok, offs_d,
                           n_full, n_end, qk_scale, Tk, diag, D, BLOCK_N, True, CAUSAL, EVEN_D)
    dq = dq * sm_scale
    _store_rows(DQ + b * s_dqb, dq.to(DQ.dtype.element_ty), tok, head, s_dqt, s_dqh, offs_d, rvalid, D, EVEN_D)


# ---------------------------------------------------------------------------------------------
# the "mma" depth path: the depth step as batched tensor-core dots
# ---------------------------------------------------------------------------------------------
#
# The tile is the same packed tile (TOK positions x GP heads, rows in (token, head) order), viewed
# as NB = TOK / P batches of P consecutive positions: [NB, P*GP, BLOCK_D] with P*GP >= 16 (the
# smallest tensor-core M). The depth slots of those P positions, a chunk of SB slots each, are one
# [NB, P*SB, BLOCK_D] tile (token-major storage: rows t*S + s). One batched dot gives the
# [NB, P*GP, P*SB] scores; a row sees only the columns of its own position (block-diagonal mask),
# so the tensor cores do P times the useful depth work, and P = 16 / GP is 2 at GQA 8:1.


@triton.jit
def _mma_rows(pid_m, TOK: tl.constexpr, GP: tl.constexpr, P: tl.constexpr):
    """Token index and in-group head of each row of the packed tile, as [NB, P*GP] (NB = TOK/P)."""
    NB: tl.constexpr = TOK // P
    r = tl.arange(0, P * GP)
    tok = pid_m * TOK + tl.arange(0, NB)[:, None] * P + (r // GP)[None, :]
    g = tl.zeros([NB, P * GP], dtype=tl.int32) + (r % GP)[None, :]
    return tok, g


@triton.jit
def _ld3(base, off, offs_d, mask, D: tl.constexpr, EVEN_D: tl.constexpr):
    """[NB, X, BLOCK_D] tile; ``off`` [NB, X] is each row's element offset from ``base``."""
    ptrs = base + off[:, :, None] + offs_d[None, None, :]
    if EVEN_D:
        return tl.load(ptrs, mask=mask[:, :, None], other=0.0)
    return tl.load(ptrs, mask=mask[:, :, None] & (offs_d[None, None, :] < D), other=0.0)


@triton.jit
def _st3(base, off, x, offs_d, mask, D: tl.constexpr, EVEN_D: tl.constexpr):
    ptrs = base + off[:, :, None] + offs_d[None, None, :]
    if EVEN_D:
        tl.store(ptrs, x, mask=mask[:, :, None])
    else:
        tl.store(ptrs, x, mask=mask[:, :, None] & (offs_d[None, None, :] < D))


@triton.jit
def _mma_cols(pid_m, s0, S, Tq, TOK: tl.constexpr, GP: tl.constexpr, P: tl.constexpr, SB: tl.constexpr):
    """Depth columns of slot chunk [s0, s0+SB) for the NB batches: the depth row of each column
    ([NB, P*SB]), its load mask, and the [P*GP, P*SB] visibility (own position, slot < S)."""
    NB: tl.constexpr = TOK // P
    c = tl.arange(0, P * SB)
    ctok = pid_m * TOK + tl.arange(0, NB)[:, None] * P + (c // SB)[None, :]
    sl = s0 + c % SB
    cmask = (ctok < Tq) & (sl < S)[None, :]
    rows = ctok * S + sl[None, :]
    vis = ((tl.arange(0, P * GP) // GP)[:, None] == (c // SB)[None, :]) & (sl < S)[None, :]
    return rows, cmask, vis


@triton.jit
def moda_depth_fwd_mma(acc3, m3, l3, q3, dk_base, dv_base, s_dkt, s_dvt, pid_m, offs_d, S, Tq, qk_scale,
                       D: tl.constexpr, EVEN_D: tl.constexpr, TOK: tl.constexpr, GP: tl.constexpr,
                       P: tl.constexpr, SB: tl.constexpr):
    """Fold the S depth slots of each row's own position into the online-softmax state kept as
    [NB, P*GP(, BLOCK_D)] tiles, SB slots per step, with two batched tensor-core dots per step."""
    for s0 in range(0, _loop_bound(S), SB):
        rows, cmask, vis = _mma_cols(pid_m, s0, S, Tq, TOK, GP, P, SB)
        kd = _ld3(dk_base, rows * s_dkt, offs_d, cmask, D, EVEN_D)                 # [NB, P*SB, BD]
        qk = _dot(q3, tl.permute(kd, (0, 2, 1)))                                    # [NB, P*GP, P*SB]
        sc = tl.where(vis[None, :, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m3, tl.max(sc, 2))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(sc - m_sub[:, :, None])
        alpha = tl.math.exp2(m3 - m_sub)
        l3 = l3 * alpha + tl.sum(p, 2)
        vd = _ld3(dv_base, rows * s_dvt, offs_d, cmask, D, EVEN_D)
        acc3 = _dot_acc(p.to(vd.dtype), vd, acc3 * alpha[:, :, None])
        m3 = m_new
    return acc3, m3, l3


@triton.jit
def moda_depth_dq_mma(dq3, q3, do3, lse2_3, delta3, dk_base, dv_base, gk_base, gv_base,
                      s_dkt, s_dvt, s_gkt, s_gvt, pid_m, offs_d, S, Tq, qk_scale, sm_scale,
                      D: tl.constexpr, EVEN_D: tl.constexpr, TOK: tl.constexpr, GP: tl.constexpr,
                      P: tl.constexpr, SB: tl.constexpr):
    """Depth part of the backward of one packed tile, SB slots per step, five batched dots:
    dQ += dS K_d, and each slot's gradients dK_d = scale * dS^T Q, dV_d = P^T dO (the dots sum the
    group's heads of the slot's position; the mask zeroes the other positions), written once."""
    for s0 in range(0, _loop_bound(S), SB):
        rows, cmask, vis = _mma_cols(pid_m, s0, S, Tq, TOK, GP, P, SB)
        kd = _ld3(dk_base, rows * s_dkt, offs_d, cmask, D, EVEN_D)
        vd = _ld3(dv_base, rows * s_dvt, offs_d, cmask, D, EVEN_D)
        qk = _dot(q3, tl.permute(kd, (0, 2, 1)))
        p = tl.math.exp2(qk * qk_scale - lse2_3[:, :, None])
        p = tl.where(vis[None, :, :], p, 0.0)
        dp = _dot(do3, tl.permute(vd, (0, 2, 1)))
        ds = (p * (dp - delta3[:, :, None])).to(kd.dtype)
        dq3 = _dot_acc(ds, kd, dq3)
        gk = _dot(tl.permute(ds, (0, 2, 1)), q3) * sm_scale                        # [NB, P*SB, BD]
        gv = _dot(tl.permute(p.to(do3.dtype), (0, 2, 1)), do3)
        _st3(gk_base, rows * s_gkt, gk.to(gk_base.dtype.element_ty), offs_d, cmask, D, EVEN_D)
        _st3(gv_base, rows * s_gvt, gv.to(gv_base.dtype.element_ty), offs_d, cmask, D, EVEN_D)
    return dq3


@triton.jit
def _moda_fwd_mma_kernel(Q, K, V, DK, DV, Out, LSE,
                         s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,
                         s_dkb, s_dkt, s_dkh, s_dvb, s_dvt, s_dvh, s_ob, s_ot, s_oh,
                         Hq, Tq, Tk, S, GROUP, qk_scale, diag,
                         D: tl.constexpr, BLOCK_D: tl.constexpr, TOK: tl.constexpr, GP: tl.constexpr,
                         P: tl.constexpr, SB: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                         NEG_SCALE: tl.constexpr):
    EVEN_D: tl.constexpr = D == BLOCK_D
    BLOCK_M: tl.constexpr = TOK * GP
    NB: tl.constexpr = TOK // P
    pid_m = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m  # heaviest query blocks first
    offs_d = tl.arange(0, BLOCK_D)

    # depth segment first, in [NB, P*GP(, BLOCK_D)] tiles
    tok3, g3 = _mma_rows(pid_m, TOK, GP, P)
    mask3 = (tok3 < Tq) & (g3 < GROUP)
    q_head0 = Q + b * s_qb + (hk * GROUP).to(tl.int64) * s_qh
    q3 = _ld3(q_head0, tok3 * s_qt + g3 * s_qh, offs_d, mask3, D, EVEN_D)
    acc3 = tl.zeros([NB, P * GP, BLOCK_D], dtype=tl.float32)
    m3 = tl.full([NB, P * GP], float("-inf"), dtype=tl.float32)
    l3 = tl.zeros([NB, P * GP], dtype=tl.float32)
    acc3, m3, l3 = moda_depth_fwd_mma(acc3, m3, l3, q3, DK + b * s_dkb + hk.to(tl.int64) * s_dkh,
                                      DV + b * s_dvb + hk.to(tl.int64) * s_dvh, s_dkt, s_dvt, pid_m, offs_d,
                                      S, Tq, qk_scale, D, EVEN_D, TOK, GP, P, SB)
    acc = tl.reshape(acc3, [BLOCK_M, BLOCK_D])
    m_i = tl.reshape(m3, [BLOCK_M])
    l_i = tl.reshape(l3, [BLOCK_M])

    # sequence segment: the shared core, the token index as the causal row coordinate
    tok, g = _packed_rows(pid_m, GROUP, TOK, GP)
    head = hk * GROUP + g
    rvalid = (tok < Tq) & (g < GROUP)
    q = _load_rows(Q + b * s_qb, tok, head, s_qt, s_qh, offs_d, rvalid, D, EVEN_D)
    k_base = K + b * s_kb + hk.to(tl.int64) * s_kh
    v_base = V + b * s_vb + hk.to(tl.int64) * s_vh
    n_full, n_end = _fwd_kv_ranges(pid_m * TOK, Tk, diag, TOK, BLOCK_N, CAUSAL)
    acc, m_i, l_i = attn_fwd_inner(acc, m_i, l_i, q, k_base, v_base, s_kt, s_vt, tok, offs_d,
                                   0, n_full, qk_scale, Tk, diag, D, BLOCK_N,
                                   False, CAUSAL, EVEN_D, NEG_SCALE)
    acc, m_i, l_i = attn_fwd_inner(acc, m_i, l_i, q, k_base, v_base, s_kt, s_vt, tok, offs_d,
                                   n_full, n_end, qk_scale, Tk, diag, D, BLOCK_N,
                                   True, CAUSAL, EVEN_D, NEG_SCALE)

    o, lse = attn_fwd_finish(acc, m_i, l_i)
    _store_rows(Out + b * s_ob, o.to(Out.dtype.element_ty), tok, head, s_ot, s_oh, offs_d, rvalid, D, EVEN_D)
    tl.store(LSE + (b * Hq + head) * Tq + tok, lse, mask=rvalid)


@triton.jit
def _moda_dq_mma_kernel(Q, K, V, DK, DV, DO, DQ, DDK, DDV, LSE2, DELTA,
                        s_qb, s_qt, s_qh, s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,
                        s_dkb, s_dkt, s_dkh, s_dvb, s_dvt, s_dvh, s_db, s_dt, s_dh, s_dqb, s_dqt, s_dqh,
                        s_gkb, s_gkt, s_gkh, s_gvb, s_gvt, s_gvh,
                        Hq, Tq, Tk, S, GROUP, qk_scale, sm_scale, diag,
                        D: tl.constexpr, BLOCK_D: tl.constexpr, TOK: tl.constexpr, GP: tl.constexpr,
                        P: tl.constexpr, SB: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """dQ (depth + sequence) and the depth slots' dK/dV of one packed tile (mma depth path)."""
    EVEN_D: tl.constexpr = D == BLOCK_D
    BLOCK_M: tl.constexpr = TOK * GP
    NB: tl.constexpr = TOK // P
    pid_m = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    offs_d = tl.arange(0, BLOCK_D)

    tok3, g3 = _mma_rows(pid_m, TOK, GP, P)
    mask3 = (tok3 < Tq) & (g3 < GROUP)
    h0 = (hk * GROUP).to(tl.int64)
    q3 = _ld3(Q + b * s_qb + h0 * s_qh, tok3 * s_qt + g3 * s_qh, offs_d, mask3, D, EVEN_D)
    do3 = _ld3(DO + b * s_db + h0 * s_dh, tok3 * s_dt + g3 * s_dh, offs_d, mask3, D, EVEN_D)
    row3 = (b * Hq + h0 + g3) * Tq + tok3
    lse2_3 = tl.load(LSE2 + row3, mask=mask3, other=float("inf"))
    delta3 = tl.load(DELTA + row3, mask=mask3, other=0.0)
    dq3 = tl.zeros([NB, P * GP, BLOCK_D], dtype=tl.float32)
    dq3 = moda_depth_dq_mma(dq3, q3, do3, lse2_3, delta3, DK + b * s_dkb + hk.to(tl.int64) * s_dkh,
                            DV + b * s_dvb + hk.to(tl.int64) * s_dvh, DDK + b * s_gkb + hk.to(tl.int64) * s_gkh,
                            DDV + b * s_gvb + hk.to(tl.int64) * s_gvh, s_dkt, s_dvt, s_gkt, s_gvt, pid_m,
                            offs_d, S, Tq, qk_scale, sm_scale, D, EVEN_D, TOK, GP, P, SB)
    dq = tl.reshape(dq3, [BLOCK_M, BLOCK_D])

    # sequence segment: the shared core
    tok, g = _packed_rows(pid_m, GROUP, TOK, GP)
    head = hk * GROUP + g
    rvalid = (tok < Tq) & (g < GROUP)
    q = _load_rows(Q + b * s_qb, tok, head, s_qt, s_qh, offs_d, rvalid, D, EVEN_D)
    do = _load_rows(DO + b * s_db, tok, head, s_dt, s_dh, offs_d, rvalid, D, EVEN_D)
    row = (b * Hq + head) * Tq + tok
    lse2 = tl.load(LSE2 + row, mask=rvalid, other=float("inf"))
    delta = tl.load(DELTA + row, mask=rvalid, other=0.0)
    k_base = K + b * s_kb + hk.to(tl.int64) * s_kh
    v_base = V + b * s_vb + hk.to(tl.int64) * s_vh
    n_full, n_end = _fwd_kv_ranges(pid_m * TOK, Tk, diag, TOK, BLOCK_N, CAUSAL)
    dq = attn_bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, s_kt, s_vt, tok, offs_d,
                           0, n_full, qk_scale, Tk, diag, D, BLOCK_N, False, CAUSAL, EVEN_D)
    dq = attn_bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, s_kt, s_vt, tok, offs_d,
                           n_full, n_end, qk_scale, Tk, diag, D, BLOCK_N, True, CAUSAL, EVEN_D)
    dq = dq * sm_scale
    _store_rows(DQ + b * s_dqb, dq.to(DQ.dtype.element_ty), tok, head, s_dqt, s_dqh, offs_d, rvalid, D, EVEN_D)


# ---------------------------------------------------------------------------------------------
# host wrappers
# ---------------------------------------------------------------------------------------------

def _check_depth(q, k, depth_k, depth_v) -> int:
    B, Tq, Hq, D = q.shape
    if depth_k.dim() != 4 or tuple(depth_k.shape) != tuple(depth_v.shape):
        raise ValueError(f"depth_k / depth_v must be one shape [B, Tq*S, Hk, D]; got {tuple(depth_k.shape)}, "
                         f"{tuple(depth_v.shape)}")
    if depth_k.shape[0] != B or depth_k.shape[2] != k.shape[2] or depth_k.shape[3] != D:
        raise ValueError(f"depth_k {tuple(depth_k.shape)} must be [B={B}, Tq*S, Hk={k.shape[2]}, D={D}]")
    if depth_k.dtype != q.dtype or depth_v.dtype != q.dtype:
        raise TypeError(f"depth_k/depth_v dtype {depth_k.dtype}/{depth_v.dtype} must match q ({q.dtype})")
    if depth_k.device != q.device or depth_v.device != q.device:
        raise ValueError("depth_k / depth_v must be on q's device")
    n = depth_k.shape[1]
    if Tq == 0:
        return 0
    if n % Tq:
        raise ValueError(f"depth_k has {n} rows, not a multiple of Tq={Tq} (token-major [B, Tq*S, Hk, D])")
    return n // Tq


def _tiling(c: MCfg, G: int) -> tuple[int, int]:
    gp = triton.next_power_of_2(G)
    return max(1, c.outer // gp), gp


def _mma_tiling(c: MCfg, G: int, S: int, kind: str, block_d: int, esize: int) -> tuple[int, int, int, int]:
    """(TOK, GP, P, SB) of the mma path: P positions per tensor-core batch (P * GP >= 16), TOK a
    multiple of P, SB slots per step (a power of two, P * SB >= 16) such that one step's depth
    tile holds at most about ``c.slots`` rows (TOK * SB). ``c.slots = 0``: 256 rows (forward) or
    128 (backward) at 16-bit D <= 64, fewer for wider heads and fp32 (sm_90 compiles without
    spills at GQA 8:1 with these)."""
    gp = triton.next_power_of_2(G)
    p = max(1, 16 // gp)
    tok = max(p, c.outer // gp)
    rows = c.slots or max(16, (256 if kind == "fwd_mma" else 128) * 128 // (max(block_d, 64) * esize))
    sb = min(triton.next_power_of_2(max(S, 1)), max(1, rows // tok))
    sb = 1 << (sb.bit_length() - 1)  # a power of two within the bounds above
    return tok, gp, p, max(sb, 16 // p)


def _fwd_impl(q, k, v, depth_k, depth_v, causal: bool, scale: float, path: str = "auto"):
    B, Tq, Hq, D, Tk, Hk = _check(q, k, v)
    S = _check_depth(q, k, depth_k, depth_v)
    path = depth_path(Hq // Hk, path)
    q, k, v, depth_k, depth_v = (_unit_last(t) for t in (q, k, v, depth_k, depth_v))
    o = _alloc((B, Tq, Hq, D), q.dtype, q.device)
    lse = _alloc((B, Hq, Tq), torch.float32, q.device)
    if o.numel() == 0:
        lse.fill_(float("-inf"))
        return o, lse
    _check_i32(q, k, v, o, depth_k, depth_v)
    BD = _block_d(D)
    G = Hq // Hk
    args = (q, k, v, depth_k, depth_v, o, lse,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), depth_k.stride(0), depth_k.stride(1), depth_k.stride(2),
            depth_v.stride(0), depth_v.stride(1), depth_v.stride(2), o.stride(0), o.stride(1), o.stride(2),
            Hq, Tq, Tk, S, G, float(scale) * LOG2E, Tk - Tq)
    if path == "mma":
        c = _cfg("fwd_mma", BD, q.element_size())
        tok, gp, pp, sb = _mma_tiling(c, G, S, "fwd_mma", BD, q.element_size())
        _moda_fwd_mma_kernel[(triton.cdiv(Tq, tok), Hk, B)](
            *args, D=D, BLOCK_D=BD, TOK=tok, GP=gp, P=pp, SB=sb, BLOCK_N=c.inner, CAUSAL=bool(causal),
            NEG_SCALE=bool(scale < 0), num_warps=c.warps, num_stages=c.stages)
        return o, lse
    c = _cfg("fwd", BD, q.element_size())
    tok, gp = _tiling(c, G)
    _moda_fwd_kernel[(triton.cdiv(Tq, tok), Hk, B)](
        *args, D=D, BLOCK_D=BD, TOK=tok, GP=gp, BLOCK_N=c.inner, CAUSAL=bool(causal),
        NEG_SCALE=bool(scale < 0), PREFETCH=bool(c.prefetch), num_warps=c.warps, num_stages=c.stages)
    return o, lse


def _bwd_impl(do, q, k, v, depth_k, depth_v, o, lse, causal: bool, scale: float, path: str = "auto"):
    B, Tq, Hq, D, Tk, Hk = _check(q, k, v)
    S = _check_depth(q, k, depth_k, depth_v)
    path = depth_path(Hq // Hk, path)
    q, k, v, depth_k, depth_v, o, do = (_unit_last(t) for t in (q, k, v, depth_k, depth_v, o, do))
    if do.dtype != q.dtype:
        do = do.to(q.dtype)
    if o.dtype != q.dtype:
        o = o.to(q.dtype)
    dq = _alloc((B, Tq, Hq, D), q.dtype, q.device)
    dk = _alloc((B, Tk, Hk, D), q.dtype, q.device)
    dv = _alloc((B, Tk, Hk, D), q.dtype, q.device)
    ddk = _alloc(tuple(depth_k.shape), q.dtype, q.device)
    ddv = _alloc(tuple(depth_v.shape), q.dtype, q.device)
    if dq.numel() == 0:
        for t in (dq, dk, dv, ddk, ddv):
            t.zero_()
        return dq, dk, dv, ddk, ddv
    _check_i32(q, k, v, o, do, depth_k, depth_v)
    lse = lse.contiguous().float()
    BD = _block_d(D)
    G = Hq // Hk
    qk_scale = float(scale) * LOG2E
    diag = Tk - Tq
    esize = q.element_size()
    delta = _alloc((B, Hq, Tq), torch.float32, q.device)
    lse2 = _alloc((B, Hq, Tq), torch.float32, q.device)
    PRE_M = 64 if BD <= 128 else 32
    _attn_bwd_pre_kernel[(triton.cdiv(Tq, PRE_M), Hq, B)](
        o, do, lse, delta, delta, lse2,
        o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
        Hq, Tq, D=D, BLOCK_D=BD, BLOCK_M=PRE_M, HAS_DLSE=False, num_warps=4)

    if Tk > 0:
        # sequence keys: the core's dK/dV kernel with the joint softmax statistics
        def launch_dkdv(c: Cfg):
            grid = (triton.cdiv(Tk, c.outer), Hk, B)
            _attn_bwd_dkdv_kernel[grid](
                q, k, v, do, dk, dv, dq, lse2, delta,
                q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
                dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
                dq.stride(0), dq.stride(1), dq.stride(2),
                Hq, Hk, Tq, Tk, G, qk_scale, float(scale), diag,
                D=D, BLOCK_D=BD, BLOCK_M=c.inner, BLOCK_N=c.outer, CAUSAL=bool(causal),
                ATOMIC_DQ=False, num_warps=c.warps, num_stages=c.stages)

        _run_tuned("dkdv", ("dkdv", BD, bool(causal), q.dtype, False), _candidates("dkdv", BD, esize),
                   launch_dkdv)
    else:
        dk.zero_(), dv.zero_()

    args = (q, k, v, depth_k, depth_v, do, dq, ddk, ddv, lse2, delta,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), depth_k.stride(0), depth_k.stride(1), depth_k.stride(2),
            depth_v.stride(0), depth_v.stride(1), depth_v.stride(2), do.stride(0), do.stride(1), do.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2), ddk.stride(0), ddk.stride(1), ddk.stride(2),
            ddv.stride(0), ddv.stride(1), ddv.stride(2),
            Hq, Tq, Tk, S, G, qk_scale, float(scale), diag)
    if path == "mma":
        c = _cfg("dq_mma", BD, esize)
        tok, gp, pp, sb = _mma_tiling(c, G, S, "dq_mma", BD, esize)
        _moda_dq_mma_kernel[(triton.cdiv(Tq, tok), Hk, B)](
            *args, D=D, BLOCK_D=BD, TOK=tok, GP=gp, P=pp, SB=sb, BLOCK_N=c.inner, CAUSAL=bool(causal),
            num_warps=c.warps, num_stages=c.stages)
        return dq, dk, dv, ddk, ddv
    c = _cfg("dq", BD, esize)
    tok, gp = _tiling(c, G)
    _moda_dq_kernel[(triton.cdiv(Tq, tok), Hk, B)](
        *args, D=D, BLOCK_D=BD, TOK=tok, GP=gp, BLOCK_N=c.inner, CAUSAL=bool(causal),
        PREFETCH=bool(c.prefetch), num_warps=c.warps, num_stages=c.stages)
    return dq, dk, dv, ddk, ddv


# ---------------------------------------------------------------------------------------------
# torch.library custom ops
# ---------------------------------------------------------------------------------------------

_fwd_op, _bwd_op = define_attention_ops(
    "moda", "depth.moda (triton)", _fwd_impl, _bwd_impl, grad_tensors=("depth_k", "depth_v"),
    params=(("causal", bool), ("scale", float), ("path", str)))


def _path(path: str | None) -> str:
    path = DEPTH_PATH if path is None else path
    if path not in PATHS:
        raise ValueError(f"depth.moda (triton): path={path!r} is not one of {PATHS} "
                         "(argument `path` or env BLOCKZOO_MODA_DEPTH)")
    return path


def moda_attention(q, k, v, depth_k, depth_v, causal: bool = True, scale: float | None = None,
                   path: str | None = None) -> torch.Tensor:
    """MoDA, autograd-enabled: o [B, Tq, Hq, D] like q. ``path``: the depth-step implementation,
    "auto" (default, :func:`depth_path`), "rowwise" or "mma"; None = :data:`DEPTH_PATH`."""
    o, _ = _fwd_op(q, k, v, depth_k, depth_v, bool(causal), resolve_scale(q, scale), _path(path))
    return o


def moda_fwd(q, k, v, depth_k, depth_v, causal: bool = True, scale: float | None = None,
             path: str | None = None):
    """Forward only: (o, lse fp32 [B, Hq, Tq], natural log)."""
    return _fwd_op(q, k, v, depth_k, depth_v, bool(causal), resolve_scale(q, scale), _path(path))


def moda_bwd(do, q, k, v, depth_k, depth_v, o, lse, causal: bool = True, scale: float | None = None,
             path: str | None = None):
    """(dq, dk, dv, d_depth_k, d_depth_v) in the input dtype."""
    return _bwd_op(do, q, k, v, depth_k, depth_v, o, lse, bool(causal), resolve_scale(q, scale), _path(path))
