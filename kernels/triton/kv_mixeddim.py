"""Decode attention over token.mixeddim's packed cache in Triton (``plugins/token/mixeddim.py``).

Public contract::

    o_n, o_r, s_pool, s_tail = pooled_decode(q, qp, kbuf, vbuf, tok_off, elem_base, step,
                                             tail_k, tail_v, scale=None, scores=True)

q, qp ``[B, Tq, Hq, D]``: the new queries in natural channel order and in their kv head's key
rank order. The pools: ``kbuf``, ``vbuf`` flat; level ``l`` (width ``w_l = (l + 1) * step``) holds
the tokens ``tok_off[l, r] <= i < tok_off[l, r + 1]`` of row ``r = b * Hk + hk`` at elements
``elem_base[l] + (i - tok_off[l, 0]) * w_l + [0, w_l)`` (rank order). The tail ``[B, Hk, t, D]``
(natural order, unit last stride) holds the newest tokens, the step's ``Tq`` new ones last
(bottom-right causal within the tail; every pooled token is older than every query).

One program per (kv head, batch) holds the ``G * Tq`` query rows of its kv group (padded to
``BLOCK_M >= 16`` for the MMAs) and runs ONE online softmax over every level's tokens of its row
(scores ``qp[:w_l] . k[:w_l]``: the tile's columns ``>= w_l`` are masked to zero) and then the
tail (``q . k``). Two fp32 accumulators share the running max and sum: ``acc_r`` (pool values,
value rank order) and ``acc_n`` (tail values, natural order); the caller maps ``o_r`` back to
natural order and adds. ``scores=True``: a second pass over the keys recomputes the logits and
writes ``sum over the program's rows of exp(s - lse)`` per token (``s_pool [N]``, ``s_tail
[B, Hk, t]``, fp32): the attention each token received, as the reference's probabilities give
it. No split-K: ``B * Hk`` programs (fine for large batches; a long single-sequence decode would
want a split like ``kv_decode.decode_attention``'s).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._alloc import empty
from ..numba.kv_mixeddim import check_pooled
from .attention import LOG2E, _dot, _dot_acc, _interpreting, _loop_bound

__all__ = ["pooled_decode"]


@triton.jit
def _pooled_kernel(Q, QP, KB, VB, TOK, EB, TK, TV, OR, ON, LSE2, SP, ST,
                   s_qb, s_qt, s_qh, s_tkb, s_tkh, s_tkt, s_tvb, s_tvh, s_tvt, s_ob, s_ot, s_oh,
                   Hk, Tq, Tt, GROUP, L, STEP, R, qk_scale,
                   D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   SCORES: tl.constexpr):
    hk = tl.program_id(0)
    b = tl.program_id(1)
    r = b * Hk + hk
    rows = tl.arange(0, BLOCK_M)
    g = rows // Tq
    qi = rows - g * Tq
    h = (hk * GROUP + g).to(tl.int64)
    rmask = rows < GROUP * Tq
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    dmask = offs_d < D
    q_off = b.to(tl.int64) * s_qb + qi[:, None] * s_qt + h[:, None] * s_qh + offs_d[None, :]
    q = tl.load(Q + q_off, mask=rmask[:, None] & dmask[None, :], other=0.0)
    qp = tl.load(QP + q_off, mask=rmask[:, None] & dmask[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc_r = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc_n = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # pass 1a: the pools, level by level (runtime widths)
    for lev in range(0, _loop_bound(L)):
        w = (lev + 1) * STEP
        row0 = TOK + lev * (R + 1)
        tb = tl.load(row0).to(tl.int32)
        t0 = tl.load(row0 + r).to(tl.int32)
        t1 = tl.load(row0 + r + 1).to(tl.int32)
        eb = tl.load(EB + lev)
        for start in range(_loop_bound(t0), _loop_bound(t1), BLOCK_N):
            cols = start + offs_n
            cmask = cols < t1
            el = eb + (cols - tb).to(tl.int64)[:, None] * w + offs_d[None, :]
            kvmask = cmask[:, None] & (offs_d[None, :] < w)
            k = tl.load(KB + el, mask=kvmask, other=0.0)
            s = _dot(qp, tl.trans(k)) * qk_scale
            s = tl.where(cmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_sub[:, None])
            alpha = tl.math.exp2(m_i - m_sub)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(VB + el, mask=kvmask, other=0.0)
            acc_r = _dot_acc(p.to(v.dtype), v, acc_r * alpha[:, None])
            acc_n = acc_n * alpha[:, None]
            m_i = m_new
    # pass 1b: the full-width tail (bottom-right causal)
    diag = Tt - Tq
    tk_base = TK + b.to(tl.int64) * s_tkb + hk.to(tl.int64) * s_tkh
    tv_base = TV + b.to(tl.int64) * s_tvb + hk.to(tl.int64) * s_tvh
    for start in range(0, Tt, BLOCK_N):
        cols = start + offs_n
        cmask = cols < Tt
        kvmask = cmask[:, None] & dmask[None, :]
        k = tl.load(tk_base + cols[:, None].to(tl.int64) * s_tkt + offs_d[None, :], mask=kvmask, other=0.0)
        s = _dot(q, tl.trans(k)) * qk_scale
        valid = cmask[None, :] & (cols[None, :] <= qi[:, None] + diag)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(tv_base + cols[:, None].to(tl.int64) * s_tvt + offs_d[None, :], mask=kvmask, other=0.0)
        acc_n = _dot_acc(p.to(v.dtype), v, acc_n * alpha[:, None])
        acc_r = acc_r * alpha[:, None]
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o_off = b.to(tl.int64) * s_ob + qi[:, None] * s_ot + h[:, None] * s_oh + offs_d[None, :]
    omask = rmask[:, None] & dmask[None, :]
    tl.store(OR + o_off, acc_r / l_safe[:, None], mask=omask)
    tl.store(ON + o_off, acc_n / l_safe[:, None], mask=omask)
    lse2 = tl.where(l_i > 0, m_i + tl.math.log2(l_safe), float("inf"))
    tl.store(LSE2 + (b * Hk + hk) * BLOCK_M + rows, lse2)
    if SCORES:
        # pass 2: the probabilities with the final lse, summed over the program's rows
        for lev in range(0, _loop_bound(L)):
            w = (lev + 1) * STEP
            row0 = TOK + lev * (R + 1)
            tb = tl.load(row0).to(tl.int32)
            t0 = tl.load(row0 + r).to(tl.int32)
            t1 = tl.load(row0 + r + 1).to(tl.int32)
            eb = tl.load(EB + lev)
            for start in range(_loop_bound(t0), _loop_bound(t1), BLOCK_N):
                cols = start + offs_n
                cmask = cols < t1
                el = eb + (cols - tb).to(tl.int64)[:, None] * w + offs_d[None, :]
                k = tl.load(KB + el, mask=cmask[:, None] & (offs_d[None, :] < w), other=0.0)
                s = _dot(qp, tl.trans(k)) * qk_scale
                p = tl.math.exp2(s - lse2[:, None])
                p = tl.where(rmask[:, None] & cmask[None, :], p, 0.0)
                tl.store(SP + cols, tl.sum(p, 0), mask=cmask)
        for start in range(0, Tt, BLOCK_N):
            cols = start + offs_n
            cmask = cols < Tt
            k = tl.load(tk_base + cols[:, None].to(tl.int64) * s_tkt + offs_d[None, :],
                        mask=cmask[:, None] & dmask[None, :], other=0.0)
            s = _dot(q, tl.trans(k)) * qk_scale
            p = tl.math.exp2(s - lse2[:, None])
            p = tl.where(rmask[:, None] & cmask[None, :] & (cols[None, :] <= qi[:, None] + diag), p, 0.0)
            tl.store(ST + (b * Hk + hk).to(tl.int64) * Tt + cols, tl.sum(p, 0), mask=cmask)


def pooled_decode(q: torch.Tensor, qp: torch.Tensor, kbuf: torch.Tensor, vbuf: torch.Tensor, tok_off: torch.Tensor,
                  elem_base: torch.Tensor, step: int, tail_k: torch.Tensor, tail_v: torch.Tensor,
                  scale: float | None = None, scores: bool = True):
    """(o_n, o_r) [B, Tq, Hq, D] fp32 (tail part, natural order; pool part, value rank order;
    both already divided by the shared softmax sum) and, with ``scores``, the attention each
    pooled token (``[N]``) and each tail token (``[B, Hk, t]``) received, fp32 (else None)."""
    b, tq, hq, d, hk, levels = check_pooled(q, qp, kbuf, vbuf, tok_off, elem_base, step, tail_k, tail_v)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    G = hq // hk
    q, qp = q.contiguous(), qp.contiguous().to(q.dtype)
    if tail_k.stride(-1) != 1:
        tail_k = tail_k.contiguous()
    if tail_v.stride(-1) != 1:
        tail_v = tail_v.contiguous()
    dev = q.device
    tt = tail_k.shape[2]
    n_tok = int(tok_off[-1, -1]) if levels else 0
    o_r = empty((b, tq, hq, d), dtype=torch.float32, device=dev)
    o_n = empty((b, tq, hq, d), dtype=torch.float32, device=dev)
    BM = max(16, triton.next_power_of_2(G * tq))
    BD = max(16, triton.next_power_of_2(d))
    lse2 = empty((b * hk, BM), dtype=torch.float32, device=dev)
    s_pool = empty((max(n_tok, 1),), dtype=torch.float32, device=dev)
    s_tail = empty((b, hk, max(tt, 1)), dtype=torch.float32, device=dev)
    kb = kbuf if kbuf.numel() else torch.zeros(1, dtype=tail_k.dtype, device=dev)
    vb = vbuf if vbuf.numel() else torch.zeros(1, dtype=tail_v.dtype, device=dev)
    bn, warps = (16, 1) if _interpreting() else ((64, 4) if BD <= 128 else (32, 4))
    _pooled_kernel[(hk, b)](
        q, qp, kb, vb, tok_off.contiguous(), elem_base.contiguous(), tail_k, tail_v, o_r, o_n, lse2, s_pool, s_tail,
        q.stride(0), q.stride(1), q.stride(2), tail_k.stride(0), tail_k.stride(1), tail_k.stride(2),
        tail_v.stride(0), tail_v.stride(1), tail_v.stride(2), o_r.stride(0), o_r.stride(1), o_r.stride(2),
        hk, tq, tt, G, levels, step, b * hk, scale * LOG2E,
        D=d, BLOCK_D=BD, BLOCK_M=BM, BLOCK_N=bn, SCORES=scores, num_warps=warps)
    if not scores:
        return o_n, o_r, None, None
    return o_n, o_r, s_pool[:n_tok], s_tail[..., :tt]
