"""Quantised attention on the CPU with Numba: ``precision.int8`` and ``precision.qaas``.

Emulates exactly the quantisation of ``plugins/precision/reference.py`` (and of the Triton
kernels), in fp32: block quantisation of Q and K (INT8 round-half-even clamped to +-127, or FP8
E4M3 round-to-nearest-even, saturating), per-channel FP8 V, then an online softmax over key
tiles of ``k_block`` keys, in the same tile order, with P rounded to FP8 (``448 exp2(s - m)``) / fp16 or
binarised (qaas). The QK^T and PV products are fp32 ``np.dot`` on the codes: products of INT8 or
FP8 codes are exact in fp32, so only the summation order differs from the reference.

Compiled without fastmath (the roundings must not be reassociated away); tasks (batch, query
head, query block) run in parallel with ``prange``.

Backward (forward-only kernels here):

* ``precision.int8``: straight-through, the gradient of unquantised attention computed by the
  Numba dense attention kernels (``kernels/numba/attention.py``: its forward is re-run to get
  O and the log-sum-exp, then its backward);
* ``precision.qaas``: the reference's torch surrogate (``reference.qaas_apply``),
  not a Numba kernel.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ...plugins.precision.reference import check_tau_gamma, key_mean, log2_tau, qaas_apply
from ._common import check_floats, empty, jitable, kernel, np_view, prange
from .attention import attention_bwd as _dense_bwd
from .attention import attention_fwd as _dense_fwd

__all__ = ["int8_attention", "qaas_attention", "quantise"]

LOG2E = 1.4426950408889634


@jitable
def _rne(x):
    return np.rint(x)


@jitable
def _fp8(y):
    """Round an fp32 value to the nearest E4M3 value (ties to even), saturating at 448."""
    a = abs(y)
    if a < 0.015625:                      # subnormal range: multiples of 2^-9
        r = np.rint(a * 512.0) / 512.0
    else:
        _m, e = math.frexp(a)             # a = m 2^e, m in [0.5, 1): ulp = 2^(e-4)
        ulp = math.ldexp(1.0, e - 4)
        r = np.rint(a / ulp) * ulp
    if r > 448.0:
        r = 448.0
    return np.float32(-r if y < 0 else r)


@jitable
def _fp16(y):
    """Round a non-negative fp32 value <= 1 to the nearest fp16 value (ties to even)."""
    if y < 6.103515625e-05:               # subnormal range: multiples of 2^-24
        return np.float32(np.rint(y * 16777216.0) / 16777216.0)
    _m, e = math.frexp(y)                 # 10 mantissa bits: ulp = 2^(e-11)
    ulp = math.ldexp(1.0, e - 11)
    return np.float32(np.rint(y / ulp) * ulp)


@kernel(parallel=True, fastmath=False)
def _quant_kernel(x, mean, has_mean, mult, block, kind, codes, scale):
    """x fp32 [B, T, H, D] -> codes fp32 (exact INT8 / FP8 values), scale [B, nb, H]."""
    nb_, t_, h_, d_ = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
    nb = scale.shape[1]
    qmax = np.float32(127.0) if kind == 0 else np.float32(448.0)
    for task in prange(nb_ * nb * h_):
        b = task // (nb * h_)
        r = task - b * nb * h_
        j = r // h_
        h = r - j * h_
        t0 = j * block
        t1 = min(t_, t0 + block)
        amax = np.float32(0.0)
        for t in range(t0, t1):
            for c in range(d_):
                y = np.float32(x[b, t, h, c] * mult)
                if has_mean:
                    y = np.float32(y - mean[b, h, c])
                if abs(y) > amax:
                    amax = abs(y)
        inv = np.float32(qmax / amax) if amax > 0 else np.float32(0.0)
        scale[b, j, h] = np.float32(amax / qmax)
        for t in range(t0, t1):
            for c in range(d_):
                y = np.float32(x[b, t, h, c] * mult)
                if has_mean:
                    y = np.float32(y - mean[b, h, c])
                y = np.float32(y * inv)
                if kind == 0:
                    codes[b, t, h, c] = min(max(_rne(y), -127.0), 127.0)
                else:
                    codes[b, t, h, c] = _fp8(y)


@kernel(parallel=True, fastmath=False, blas=True)
def _attn_kernel(qc, sq, kc, sk, vq, vs, lt, gamma, causal, qb, kb, pmode, o):
    """qc [B,Tq,Hq,D], kc/vq [B,Tk,Hk,D] fp32 codes; sq [B,nbq,Hq] (softmax scale folded in),
    sk [B,nbk,Hk], vs [B,Hk,D]; pmode 0 fp8 P, 1 fp16 P, 2 binary. o fp32 [B,Tq,Hq,D]."""
    nb_, tq, hq, d = qc.shape
    tk, hk = kc.shape[1], kc.shape[2]
    g = hq // hk
    nbq = (tq + qb - 1) // qb
    nbk = (tk + kb - 1) // kb
    diag = tk - tq
    for task in prange(nb_ * hq * nbq):
        b = task // (hq * nbq)
        r = task - b * hq * nbq
        h = r // nbq
        ib = r - h * nbq
        hh = h // g
        i0 = ib * qb
        i1 = min(tq, i0 + qb)
        nr = i1 - i0
        qblk = np.ascontiguousarray(qc[b, i0:i1, h, :])
        s_q = sq[b, ib, h]
        m = np.full(nr, -np.inf, dtype=np.float32)
        lsum = np.zeros(nr, dtype=np.float32)
        acc = np.zeros((nr, d), dtype=np.float32)
        # causal: key blocks past the block's last row see nothing; skipping them is exact (a
        # fully masked tile leaves m, l and acc unchanged bit for bit)
        nbk_vis = min(nbk, (i1 - 1 + diag) // kb + 1) if causal else nbk
        for jb in range(max(nbk_vis, 0)):
            j0 = jb * kb
            j1 = min(tk, j0 + kb)
            nc = j1 - j0
            kblk = np.ascontiguousarray(kc[b, j0:j1, hh, :])
            vblk = np.ascontiguousarray(vq[b, j0:j1, hh, :])
            s = np.dot(qblk, kblk.T)
            s_k = sk[b, jb, hh]
            pq = np.zeros((nr, nc), dtype=np.float32)
            for i in range(nr):
                lim = i0 + i + diag
                mt = np.float32(-np.inf)
                for c in range(nc):
                    val = np.float32(s[i, c] * np.float32(s_q * s_k))
                    if causal and j0 + c > lim:
                        val = np.float32(-np.inf)
                    s[i, c] = val
                    if val > mt:
                        mt = val
                m_new = max(m[i], mt)
                m_sub = np.float32(0.0) if m_new == -np.inf else m_new
                alpha = np.float32(np.exp2(np.float32(m[i] - m_sub)))
                tot = np.float32(0.0)
                if pmode == 2:
                    n = 0
                    for c in range(nc):
                        if s[i, c] != -np.inf and s[i, c] >= np.float32(mt + lt[h]):
                            n += 1
                            tot += np.float32(np.exp2(np.float32(s[i, c] - m_sub)))
                            pq[i, c] = 1.0
                    cc = np.float32(tot / n) if n > 0 else np.float32(0.0)
                    for c in range(nc):
                        pq[i, c] *= cc
                    lsum[i] = np.float32(lsum[i] * alpha + tot)
                else:
                    # FP8 P: the factor 448 as an exponent offset (as the reference and Triton)
                    m_exp = np.float32(m_sub - np.float32(8.807354922057604)) if pmode == 0 else m_sub
                    for c in range(nc):
                        p = np.float32(np.exp2(np.float32(s[i, c] - m_exp)))
                        tot += p
                        if pmode == 0:
                            pq[i, c] = _fp8(p)
                        else:
                            pq[i, c] = _fp16(p)
                    lsum[i] = np.float32(lsum[i] * alpha + tot)
                for c in range(d):
                    acc[i, c] *= alpha
                m[i] = m_new
            # binary P: pq holds b * cc (the tile's mean kept probability per row)
            acc += np.dot(pq, vblk)
        for i in range(nr):
            inv_l = np.float32(1.0 / lsum[i]) if lsum[i] > 0 else np.float32(0.0)
            for c in range(d):
                val = np.float32(np.float32(acc[i, c] * inv_l) * vs[b, hh, c])
                if gamma.shape[0] > 0:
                    val = np.float32(val * gamma[h])
                o[b, i0 + i, h, c] = val


def quantise(x: torch.Tensor, block: int, kind: str, mult: float = 1.0, mean: torch.Tensor | None = None):
    """Block quantisation (fp32 codes, fp32 scale [B, nb, H]); the reference's rules."""
    xf = np_view(x.detach().float())
    b, t, h, d = x.shape
    nb = -(-t // block)
    codes = np.zeros((b, t, h, d), dtype=np.float32)
    scale = np.zeros((b, nb, h), dtype=np.float32)
    mu = (np_view(mean.reshape(b, h, d)) if mean is not None else np.zeros((b, h, d), dtype=np.float32))
    if x.numel():
        _quant_kernel(xf, mu, mean is not None, np.float32(mult), int(block), 0 if kind == "int8" else 1, codes,
                      scale)
    return codes, scale


def _quant_v(v: torch.Tensor):
    vf = v.detach().float()
    amax = vf.abs().amax(dim=1)                                   # [B, H, D]
    qm = torch.tensor(448.0, dtype=torch.float32)
    inv = torch.where(amax > 0, qm / amax, torch.zeros_like(amax))
    codes = (vf * inv[:, None]).clamp(-448.0, 448.0)
    return np_view(codes), amax / qm


def _fp8_codes(x: np.ndarray) -> np.ndarray:
    return _fp8_array(np.ascontiguousarray(x.reshape(-1))).reshape(x.shape)


@kernel(parallel=True, fastmath=False)
def _fp8_array(x):
    out = np.empty_like(x)
    for i in prange(x.shape[0]):
        out[i] = _fp8(x[i])
    return out


def _run(q, k, v, causal, scale, q_block, k_block, pmode, int8, smooth_k, lt=None, gamma=None):
    check_floats("precision", q=q, k=k, v=v)
    if q.dim() != 4 or k.shape != v.shape or q.shape[2] % max(k.shape[2], 1) or q.shape[3] != k.shape[3]:
        raise ValueError(f"precision: q [B, Tq, Hq, D], k/v [B, Tk, Hk, D] with Hq % Hk == 0 needed; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, tq, hq, d = q.shape
    tk = k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    c = float(torch.tensor(scale * LOG2E, dtype=torch.float32))
    if int8:
        qc, sq = quantise(q, q_block, "int8", mult=c)
        kc, sk = quantise(k, k_block, "int8", mean=key_mean(k) if smooth_k and tk > 0 else None)
    else:
        qc, sq = quantise(q, q_block, "fp8")
        kc, sk = quantise(k, k_block, "fp8")
        sq = (torch.from_numpy(sq) * torch.tensor(c, dtype=torch.float32)).numpy()
    if pmode == 1:
        vq = np_view(v.detach().float().to(torch.float16).float())
        vs = np.ones((b, k.shape[2], d), dtype=np.float32)
    else:
        vraw, vs_t = _quant_v(v)
        vq = _fp8_codes(vraw)
        vs = np_view(vs_t)
    out = torch.zeros((b, tq, hq, d), dtype=torch.float32)
    if out.numel() and tk:
        lt_a = np_view(lt) if lt is not None else np.zeros(hq, dtype=np.float32)
        g_a = np_view(gamma) if gamma is not None else np.zeros(0, dtype=np.float32)
        _attn_kernel(qc, sq, kc, sk, vq, vs, lt_a, g_a, bool(causal), int(q_block), int(k_block), int(pmode),
                     out.numpy())
    res = empty(tuple(q.shape), q.dtype)
    res.copy_(out)
    return res


class _Int8Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, q_block, k_block, pv, smooth_k):
        if pv not in ("fp8", "fp16"):
            raise ValueError(f"precision.int8: pv must be 'fp8' or 'fp16'; got {pv!r}")
        ctx.save_for_backward(q, k, v)
        ctx.causal, ctx.scale = causal, scale
        return _run(q, k, v, causal, scale, q_block, k_block, 0 if pv == "fp8" else 1, True, smooth_k)

    @staticmethod
    def backward(ctx, do):
        q, k, v = ctx.saved_tensors
        o, lse = _dense_fwd(q, k, v, ctx.causal, ctx.scale)
        dq, dk, dv = _dense_bwd(do.contiguous(), q, k, v, o, lse, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None, None, None, None, None


def int8_attention(q, k, v, causal: bool = True, scale: float | None = None, q_block: int = 64,
                   k_block: int = 128, pv: str = "fp8", smooth_k: bool = True) -> torch.Tensor:
    """``precision.int8`` on the CPU: quantised forward; backward = Numba dense attention."""
    return _Int8Function.apply(q, k, v, bool(causal), scale, int(q_block), int(k_block), pv, bool(smooth_k))


def qaas_attention(q, k, v, tau, gamma, causal: bool = True, scale: float | None = None, q_block: int = 128,
                   k_block: int | None = None, binary: bool = True, temperature: float = 1.0) -> torch.Tensor:
    """``precision.qaas`` on the CPU: quantised forward; backward = the reference's torch surrogate."""
    check_tau_gamma(q, tau, gamma)
    return qaas_apply(_qaas_forward, q, k, v, tau, gamma, causal=causal, scale=scale, q_block=q_block,
                      k_block=k_block, binary=binary, temperature=temperature)


@torch.no_grad()
def _qaas_forward(q, k, v, tau, gamma, causal, scale, q_block, k_block, binary):
    """(through :func:`qaas_apply`, which resolves ``k_block``)"""
    return _run(q.detach(), k.detach(), v.detach(), causal, scale, q_block, k_block, 2 if binary else 0, False,
                False, lt=log2_tau(tau).contiguous(), gamma=gamma.detach().float().contiguous())
