"""Quantised attention: the PyTorch reference of ``precision.int8`` and ``precision.qaas``.

Layout q [B, Tq, Hq, D], k/v [B, Tk, Hk, D], Hq % Hk == 0 (GQA: query head h reads kv head
h // (Hq // Hk)); causal masks are bottom-right aligned (as ``attention.dense``). Rows that see no
key return 0.

The reference EMULATES the kernels' quantisation exactly (same block sizes, same roundings, the
same online-softmax key-tile order where a rounding depends on it), so the Triton and Numba
kernels are compared with it in the generated matrix; :func:`dense_fp32` (fp32 unquantised
attention) is the accuracy yardstick, and :func:`accuracy` gives cosine similarity, relative L1
and RMSE against it.

Shared quantisation rules (every backend does exactly this, in fp32):

* INT8 block quantisation of ``x`` [B, T, H, D] with ``block`` rows: ``amax`` = max |x| over the
  block's rows and the head dim (per batch and head), ``inv = 127 / amax`` (0 when amax = 0),
  codes = clamp(round_half_even(x * inv), -127, 127), dequantisation scale ``amax / 127``.
* FP8 E4M3 block quantisation: the same with 448 and round-to-nearest-even to E4M3
  (``torch.float8_e4m3fn``), saturating at 448.
* V per channel (both components; ``pv="fp8"``): ``amax`` over tokens per (batch, kv head,
  channel), codes = fp8(v * 448 / amax), scale ``amax / 448``.
* ``precision.int8``: the softmax scale and log2(e) are folded into Q before quantising
  (``q * (scale * log2 e)``; scores are in log2 units), K is smoothed by its per-(batch, head)
  mean over tokens (softmax is invariant to it), S = (Qi Ki^T) * (sq * sk) (exact integer dot);
  online softmax over key tiles of ``k_block`` keys, ``p = exp2(s - m_running)`` in fp32, the
  row sum ``l`` from the fp32 p, and the PV product from FP8 P codes and the fp8 V codes
  (``pv="fp8"``) or from fp16 p and fp16 v (``pv="fp16"``). FP8 P carries the scale 448 as an
  exponent offset: ``p = exp2(s - (m_running - log2 448))`` (so p in [0, 448]), rounded to E4M3;
  ``l`` sums the same p, so the 448 cancels in ``acc / l``.
* ``precision.qaas`` (our definition of a press description, see docs/components/qaas.md):
  per-tile FP8 Q and K (no smoothing; the softmax scale goes into the Q descale), and per key
  tile t and row i with tile row max ``mt``: keep ``b_ij = [s_ij >= mt + log2 tau_h]``; the
  kept probabilities of the tile are replaced by their mean ``c_it`` (so ``sum_j b_ij c_it`` is
  the kept mass), the PV product is ``b @ V8`` (exact in FP8: b is 0 or 1), and the output is
  ``gamma_h * sum_t c_it (b_t @ V) / sum_t kept_mass_t``. ``binary=False`` keeps P in FP8 as
  ``precision.int8`` does (tau unused).

Gradients (straight-through): ``precision.int8`` returns the exact fp32 dense-attention
gradient (all roundings treated as identity). ``precision.qaas`` differentiates a surrogate
whose value is the unrounded form of the same formula: roundings are identity, and the keep
step ``[z >= 0]`` (``z = (s - mt - log2 tau) / temperature``) has the derivative of
``sigmoid(z)``, which gives tau its gradient; gamma's gradient is exact. The backends' backward
passes use these same definitions.
"""

from __future__ import annotations

import functools
import math

import torch

from ..attention.reference import attention_reference, causal_mask, check_shapes, expand_kv

LOG2E = 1.4426950408889634
INT8_MAX = 127.0
FP8_MAX = 448.0
LOG2_448 = 8.807354922057604  # log2(448), fp32-rounded where used


# ----------------------------------------------------------------------------------------------
# rounding and block quantisation (shared by the reference and the host wrappers)
# ----------------------------------------------------------------------------------------------
def round_int8(x: torch.Tensor) -> torch.Tensor:
    """Round half to even, clamp to [-127, 127]; fp32 codes."""
    return torch.round(x).clamp_(-INT8_MAX, INT8_MAX)


def round_fp8(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest even FP8 E4M3 (saturating at +-448); fp32 values."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(torch.float32)


def block_amax(x: torch.Tensor, block: int) -> torch.Tensor:
    """max |x| per block of ``block`` rows and per head: x [B, T, H, D] -> [B, ceil(T/block), H]."""
    b, t, h, d = x.shape
    nb = -(-t // block)
    pad = nb * block - t
    xp = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)) if pad else x
    return xp.reshape(b, nb, block, h, d).abs().amax(dim=(2, 4))


def quant_blocks(x: torch.Tensor, block: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Block quantisation of fp32 x [B, T, H, D]: (codes fp32 [B, T, H, D], scale [B, nb, H])."""
    qmax = INT8_MAX if kind == "int8" else FP8_MAX
    amax = block_amax(x, block)
    qm = torch.tensor(qmax, dtype=torch.float32, device=x.device)
    inv = torch.where(amax > 0, qm / amax, torch.zeros_like(amax))
    scale = amax / qm
    inv_rows = inv.repeat_interleave(block, dim=1)[:, : x.shape[1]]
    y = x * inv_rows[..., None]
    codes = round_int8(y) if kind == "int8" else round_fp8(y)
    return codes, scale


def quant_v_channels(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel FP8 V: v fp32 [B, T, H, D] -> (codes fp32 [B, T, H, D], scale [B, H, D])."""
    amax = v.abs().amax(dim=1)
    qm = torch.tensor(FP8_MAX, dtype=torch.float32, device=v.device)
    inv = torch.where(amax > 0, qm / amax, torch.zeros_like(amax))
    return round_fp8(v * inv[:, None]), amax / qm


def key_mean(k: torch.Tensor) -> torch.Tensor:
    """Per-(batch, head) key mean over tokens in fp32: [B, 1, H, D] (the smoothing of int8)."""
    return k.mean(dim=1, keepdim=True, dtype=torch.float32)


def resolve_scale(d: int, scale: float | None) -> float:
    return 1.0 / math.sqrt(d) if scale is None else float(scale)


def check_tau_gamma(q: torch.Tensor, tau: torch.Tensor, gamma: torch.Tensor) -> None:
    hq = q.shape[2]
    for name, t in (("tau", tau), ("gamma", gamma)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (hq,):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"precision.qaas: {name} must be a tensor of shape [Hq] = ({hq},); got {got}")


def log2_tau(tau: torch.Tensor) -> torch.Tensor:
    """log2 of the threshold fraction, clamped to (0, 1]: fp32 [Hq]."""
    return torch.log2(tau.detach().float().clamp(min=2.0**-100, max=1.0))


def _row_scales(scale: torch.Tensor, block: int, t: int, hq: int) -> torch.Tensor:
    """[B, nb, H] per-block scales -> [B, Hq, T] per row (GQA-expanded over heads)."""
    rows = scale.repeat_interleave(block, dim=1)[:, :t]        # [B, T, H]
    rows = rows.transpose(1, 2)                                 # [B, H, T]
    g = hq // rows.shape[1]
    return rows if g == 1 else rows.repeat_interleave(g, dim=1)


def _valid(tq: int, tk0: int, tk1: int, tk: int, causal: bool, device) -> torch.Tensor:
    j = torch.arange(tk0, tk1, device=device)
    ok = (j < tk)[None, :].expand(tq, -1)
    if causal:
        i = torch.arange(tq, device=device)[:, None]
        ok = ok & (j[None, :] <= i + (tk - tq))
    return ok


# ----------------------------------------------------------------------------------------------
# exact emulation of the kernels' forward (no autograd)
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def int8_forward(q, k, v, causal: bool = True, scale: float | None = None, q_block: int = 64,
                 k_block: int = 128, pv: str = "fp8", smooth_k: bool = True) -> torch.Tensor:
    """The int8 kernels' forward, emulated in fp32 torch ops: o fp32 [B, Tq, Hq, D]."""
    check_shapes(q, k, v)
    b, tq, hq, d = q.shape
    tk = k.shape[1]
    c = torch.tensor(resolve_scale(d, scale) * LOG2E, dtype=torch.float32)
    qs = q.float() * c.to(q.device)
    kf = k.float()
    if smooth_k:
        kf = kf - key_mean(k)
    qi, sq = quant_blocks(qs, q_block, "int8")
    ki, sk = quant_blocks(kf, k_block, "int8")
    if pv == "fp8":
        vq, vs = quant_v_channels(v.float())
    elif pv == "fp16":
        vq = v.float().to(torch.float16).float()
        vs = torch.ones(b, v.shape[2], d, dtype=torch.float32, device=v.device)
    else:
        raise ValueError(f"precision.int8: pv must be 'fp8' or 'fp16'; got {pv!r}")
    return _online(qi, ki, vq, vs, _row_scales(sq, q_block, tq, hq), sk, causal, k_block, tk, pv,
                   None, None).to(torch.float32)


def _online(qc, kc, vq, vs, sq_rows, sk, causal, k_block, tk, pmode, log2tau, gamma, keep_given=None):
    """Online softmax over key tiles; pmode 'fp8' / 'fp16' (P rounded) or 'binary' (qaas).

    ``keep_given`` [B, Hq, Tq, Tk] (binary only): use these keep decisions instead of
    ``s >= mt + log2 tau`` (see :func:`qaas_forward`)."""
    b, tq, hq, d = qc.shape
    dev = qc.device
    kx, vx = expand_kv(kc, hq), expand_kv(vq, hq)
    g = hq // kc.shape[2]
    sk_x = sk if g == 1 else sk.repeat_interleave(g, dim=2)    # [B, nbk, Hq]
    vs_x = vs if g == 1 else vs.repeat_interleave(g, dim=1)    # [B, Hq, D]
    qh = qc.permute(0, 2, 1, 3)                                 # [B, H, Tq, D]
    m = torch.full((b, hq, tq), -math.inf, dtype=torch.float32, device=dev)
    lsum = torch.zeros((b, hq, tq), dtype=torch.float32, device=dev)
    acc = torch.zeros((b, hq, tq, d), dtype=torch.float32, device=dev)
    nbk = -(-tk // k_block)
    for jb in range(nbk):
        j0, j1 = jb * k_block, min(tk, (jb + 1) * k_block)
        kt = kx[:, j0:j1].permute(0, 2, 3, 1)                   # [B, H, D, n]
        s = torch.matmul(qh, kt)                                # exact for integer / fp8 codes
        s = s * (sq_rows[..., None] * sk_x[:, jb][:, :, None, None])
        valid = _valid(tq, j0, j1, tk, causal, dev)
        s = torch.where(valid, s, -math.inf)
        mt = s.amax(-1)
        m_new = torch.maximum(m, mt)
        m_sub = torch.where(m_new == -math.inf, torch.zeros_like(m_new), m_new)
        # FP8 P: the factor 448 (P's FP8 scale) enters as an exponent offset, p = 448 exp2(s - m)
        m_exp = m_sub - LOG2_448 if pmode == "fp8" else m_sub
        p = torch.exp2(s - m_exp[..., None])
        alpha = torch.exp2(m - m_sub)
        vt = vx[:, j0:j1].permute(0, 2, 1, 3)                   # [B, H, n, D]
        if pmode == "binary":
            if keep_given is None:
                keep = valid & (s >= (mt + log2tau[None, :, None])[..., None])
            else:
                keep = valid & keep_given[..., j0:j1].to(device=dev, dtype=torch.bool)
            kp = torch.where(keep, p, 0.0)
            n = keep.sum(-1).to(torch.float32)
            kept = kp.sum(-1)
            cc = torch.where(n > 0, kept / n.clamp(min=1), 0.0)
            bv = torch.matmul(keep.to(torch.float32), vt)
            acc = acc * alpha[..., None] + cc[..., None] * bv
            lsum = lsum * alpha + kept
        else:
            lsum = lsum * alpha + p.sum(-1)
            pq = round_fp8(p) if pmode == "fp8" else p.to(torch.float16).float()
            acc = acc * alpha[..., None] + torch.matmul(pq, vt)
        m = m_new
    inv_l = torch.where(lsum > 0, 1.0 / torch.where(lsum > 0, lsum, 1.0), 0.0)
    o = acc * inv_l[..., None] * vs_x[:, :, None, :]
    if gamma is not None:
        o = o * gamma.float()[None, :, None, None]
    return o.permute(0, 2, 1, 3)


@torch.no_grad()
def qaas_forward(q, k, v, tau, gamma, causal: bool = True, scale: float | None = None, q_block: int = 128,
                 k_block: int | None = None, binary: bool = True, keep: torch.Tensor | None = None) -> torch.Tensor:
    """The qaas kernels' forward, emulated in fp32 torch ops: o fp32 [B, Tq, Hq, D].

    ``keep`` [B, Hq, Tq, Tk] (bool or 0/1; binary only): evaluate with these keep decisions
    instead of the reference's own. The conformance check passes a kernel's recorded decisions
    (``kernels.triton.precision.record_decisions``): a decision is a step of a score, and the
    GPU's FP8 tensor-core dot rounds scores differently from this exact fp32 sum, so it may
    decide otherwise where a score lies within that rounding of the threshold;
    :func:`decision_report` checks that this is the only place it does."""
    check_shapes(q, k, v)
    check_tau_gamma(q, tau, gamma)
    k_block = qaas_k_block(k_block, binary)
    b, tq, hq, d = q.shape
    tk = k.shape[1]
    if keep is not None and tuple(keep.shape) != (b, hq, tq, tk):
        raise ValueError(f"precision.qaas: keep must have shape [B, Hq, Tq, Tk] = {(b, hq, tq, tk)}; "
                         f"got {tuple(keep.shape)}")
    c = torch.tensor(resolve_scale(d, scale) * LOG2E, dtype=torch.float32, device=q.device)
    qc, sq = quant_blocks(q.float(), q_block, "fp8")
    kc, sk = quant_blocks(k.float(), k_block, "fp8")
    sq = sq * c                                                  # descale with the softmax scale folded in
    vq, vs = quant_v_channels(v.float())
    return _online(qc, kc, vq, vs, _row_scales(sq, q_block, tq, hq), sk, causal, k_block, tk,
                   "binary" if binary else "fp8", log2_tau(tau).to(q.device), gamma.detach(), keep)


# ----------------------------------------------------------------------------------------------
# differentiable surrogates (straight-through gradients) and the public reference ops
# ----------------------------------------------------------------------------------------------
def dense_fp32(q, k, v, causal: bool = True, scale: float | None = None) -> torch.Tensor:
    """fp32 (fp64 for fp64) unquantised attention: the accuracy yardstick."""
    acc = torch.promote_types(q.dtype, torch.float32)
    return attention_reference(q.to(acc), k.to(acc), v.to(acc), causal=causal, scale=scale)


def _straight_through(value: torch.Tensor, surrogate: torch.Tensor | None, dtype) -> torch.Tensor:
    if surrogate is None:
        return value.to(dtype)
    return (value.to(surrogate.dtype) + (surrogate - surrogate.detach())).to(dtype)


def _needs_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in ts)


def int8_reference(q, k, v, causal: bool = True, scale: float | None = None, q_block: int = 64,
                   k_block: int = 128, pv: str = "fp8", smooth_k: bool = True) -> torch.Tensor:
    """``precision.int8``: emulated quantised forward; gradient of fp32 dense attention."""
    val = int8_forward(q, k, v, causal, scale, q_block, k_block, pv, smooth_k)
    sur = dense_fp32(q, k, v, causal, scale) if _needs_grad(q, k, v) else None
    return _straight_through(val, sur, q.dtype)


def qaas_surrogate(q, k, v, tau, gamma, causal: bool = True, scale: float | None = None,
                   k_block: int | None = None, binary: bool = True, temperature: float = 1.0) -> torch.Tensor:
    """Differentiable unrounded qaas (the straight-through path): fp32 [B, Tq, Hq, D]."""
    k_block = qaas_k_block(k_block, binary)
    acc = torch.promote_types(q.dtype, torch.float32)
    gam = gamma.to(acc)[None, None, :, None]
    if not binary:
        return dense_fp32(q, k, v, causal, scale) * gam
    b, tq, hq, d = q.shape
    tk = k.shape[1]
    qf, kf, vf = q.to(acc), expand_kv(k, hq).to(acc), expand_kv(v, hq).to(acc)
    s = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * (resolve_scale(d, scale) * LOG2E)
    valid = causal_mask(tq, tk, q.device) if causal else torch.ones(tq, tk, dtype=torch.bool, device=q.device)
    s = s.masked_fill(~valid, -math.inf)
    nbk = -(-tk // k_block)
    pad = nbk * k_block - tk
    sp = torch.nn.functional.pad(s, (0, pad), value=-math.inf) if pad else s
    mt = sp.reshape(b, hq, tq, nbk, k_block).amax(-1)                   # tile row max
    mt_x = mt.repeat_interleave(k_block, dim=-1)[..., :tk]
    mt_x = torch.where(torch.isinf(mt_x), torch.zeros_like(mt_x), mt_x)
    lt = torch.log2(tau.to(acc).clamp(min=2.0**-100, max=1.0))[None, :, None, None]
    z = (torch.where(valid, s, 0.0) - mt_x - lt) / temperature
    hard = ((z >= 0) & valid).to(acc)
    soft = torch.sigmoid(z) * valid
    keep = hard + (soft - soft.detach())
    mrow = s.amax(-1, keepdim=True)
    mrow = torch.where(torch.isinf(mrow), torch.zeros_like(mrow), mrow)
    p = torch.exp2(torch.where(valid, s, -math.inf) - mrow)
    kp = keep * p

    def tile_sum(x):
        xp = torch.nn.functional.pad(x, (0, pad)) if pad else x
        return xp.reshape(b, hq, tq, nbk, k_block).sum(-1)
    n_t, kept_t = tile_sum(keep), tile_sum(kp)
    c_t = torch.where(tile_sum(hard) > 0, kept_t / n_t.clamp(min=1e-30), 0.0)
    total = kept_t.sum(-1, keepdim=True)
    w = keep * c_t.repeat_interleave(k_block, dim=-1)[..., :tk]
    w = w / torch.where(total > 0, total, 1.0)[..., :1]
    o = torch.einsum("bhqk,bkhd->bqhd", w, vf)
    return o * gam


def qaas_reference(q, k, v, tau, gamma, causal: bool = True, scale: float | None = None, q_block: int = 128,
                   k_block: int | None = None, binary: bool = True, temperature: float = 1.0,
                   keep: torch.Tensor | None = None) -> torch.Tensor:
    """``precision.qaas``: emulated quantised forward; straight-through surrogate gradient.
    ``keep``: given keep decisions (see :func:`qaas_forward`); they change the forward value only."""
    fwd = qaas_forward if keep is None else functools.partial(qaas_forward, keep=keep)
    return qaas_apply(fwd, q, k, v, tau, gamma, causal=causal, scale=scale, q_block=q_block,
                      k_block=k_block, binary=binary, temperature=temperature)


#: precision.qaas's default key tile (``k_block``) by ``binary``: 64 keys for binary P, 128 for FP8 P
#: (on the H100, 2026-11-24, B=8 T=4096 causal: FP8 P 1.31x -> 1.54x FA2 with 128-key tiles;
#: binary P 1.21x -> 1.19x, so binary keeps 64; docs/performance.md)
QAAS_K_BLOCK = {True: 64, False: 128}


def qaas_k_block(k_block: int | None, binary: bool) -> int:
    """``k_block``, or when None the default for ``binary`` (:data:`QAAS_K_BLOCK`)."""
    return QAAS_K_BLOCK[bool(binary)] if k_block is None else int(k_block)


def qaas_apply(forward, q, k, v, tau, gamma, **kw) -> torch.Tensor:
    """Run a backend's qaas ``forward(q, k, v, tau, gamma, causal, scale, q_block, k_block,
    binary)`` and attach the straight-through gradient.

    Without gradients: the forward with gamma applied (in the kernel). With gradients: the
    forward with gamma = 1 (``u``), then ``gamma * (u + s - s.detach())`` with ``s`` the
    surrogate for gamma = 1, so gamma's gradient is exact (``sum(u * do)``) and the other
    inputs get the surrogate's."""
    kw["k_block"] = qaas_k_block(kw.get("k_block"), kw.get("binary", True))
    fkw = {n: kw[n] for n in ("causal", "scale", "q_block", "k_block", "binary") if n in kw}
    if not _needs_grad(q, k, v, tau, gamma):
        return forward(q, k, v, tau, gamma, **fkw).to(q.dtype)
    ones = torch.ones(q.shape[2], dtype=torch.float32, device=q.device)
    with torch.no_grad():
        u = forward(q.detach(), k.detach(), v.detach(), tau.detach(), ones, **fkw)
    skw = {n: kw[n] for n in ("causal", "scale", "k_block", "binary", "temperature") if n in kw}
    sur = qaas_surrogate(q, k, v, tau, ones, **skw)
    acc = sur.dtype
    o = (u.detach().to(acc) + (sur - sur.detach())) * gamma.to(acc)[None, None, :, None]
    return o.to(q.dtype)


# ----------------------------------------------------------------------------------------------
# a kernel's binary decisions vs the exact ones (qaas on FP8 tensor cores)
# ----------------------------------------------------------------------------------------------
#: Model of an FP8 tensor-core dot (Hopper wgmma, k = 32 per instruction): each instruction adds
#: ``FP8_DOT_GROUP`` exact products and the running accumulator after aligning them to the
#: largest exponent among them, keeping ``FP8_DOT_BITS`` fraction bits below it (truncated).
#: DeepSeek-V3's report (arXiv 2412.19437, sec. 3.3.2) measured "around 14 bits" of accumulation
#: precision for FP8 GEMM on Hopper; 13 fraction bits is that. Each of the G + 1 aligned terms then
#: loses less than 2^-13 of the group's largest magnitude.
FP8_DOT_BITS = 13
FP8_DOT_GROUP = 32


@torch.no_grad()
def fp8_dot_scores(qc, sq, kc, sk, q_block: int, k_block: int, bits: int = FP8_DOT_BITS,
                   group: int = FP8_DOT_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact scores of the quantised Q/K and a bound on a tensor-core dot's error in them.

    qc [B, Tq, Hq, D] / kc [B, Tk, Hk, D]: codes (any dtype holding the FP8 or INT8 values);
    sq [B, nbq, Hq] (softmax scale folded in) / sk [B, nbk, Hk]: block scales. Returns fp64
    [B, Hq, Tq, Tk]: ``s = (qc . kc) sq sk`` summed exactly, and the bound: per group of
    ``group`` channels (in channel order, as the kernel's K loop), ``(group + 1) 2^-bits
    max(|partial sum before|, max|q| max|k| of the group)``, times ``sq sk``, plus 2^-21 |s| for
    the fp32 descale (two roundings)."""
    b, tq, hq, d = qc.shape
    tk = kc.shape[1]
    qd = qc.to(torch.float64).permute(0, 2, 1, 3)
    kd = expand_kv(kc.to(torch.float64), hq).permute(0, 2, 1, 3)
    scale = (_row_scales(sq.double(), q_block, tq, hq)[..., :, None]
             * _row_scales(sk.double(), k_block, tk, hq)[..., None, :])
    partial = torch.zeros(b, hq, tq, tk, dtype=torch.float64, device=qc.device)
    err = torch.zeros_like(partial)
    for g0 in range(0, d, group):
        qg, kg = qd[..., g0:g0 + group], kd[..., g0:g0 + group]
        mprod = qg.abs().amax(-1)[..., :, None] * kg.abs().amax(-1)[..., None, :]
        err += (group + 1) * torch.maximum(partial.abs(), mprod)
        partial += qg @ kg.transpose(-1, -2)
    s = partial * scale
    return s, err * 2.0**-bits * scale + 2.0**-21 * s.abs()


def _tile_max(x: torch.Tensor, k_block: int) -> torch.Tensor:
    """Max over each key tile, broadcast back: x [..., Tk] -> [..., Tk]."""
    tk = x.shape[-1]
    nbk = -(-tk // k_block)
    pad = nbk * k_block - tk
    xp = torch.nn.functional.pad(x, (0, pad), value=-math.inf) if pad else x
    m = xp.reshape(*x.shape[:-1], nbk, k_block).amax(-1)
    return m.repeat_interleave(k_block, dim=-1)[..., :tk]


@torch.no_grad()
def decision_report(record: dict, causal: bool, q_block: int, k_block: int, binary: bool = True,
                    bits: int = FP8_DOT_BITS) -> dict:
    """Check a qaas kernel's recorded scores and keep decisions (``kernels.triton.precision.
    record_decisions``) against the exact ones. Returns counts; a correct kernel has

    * ``score_err_ratio`` <= 1: |kernel score - exact score| within :func:`fp8_dot_scores`' bound;
    * ``masked_bad`` = 0: masked entries are -inf and not kept;
    * ``own_mismatch`` = 0: its decisions are exactly ``s >= tile max(s) + log2 tau`` (fp32) on
      its own scores;
    * ``flips_outside`` = 0: where it decides otherwise than the exact scores do, the exact score
      lies within ``margin`` of the exact threshold, ``margin`` = the score's bound + the largest
      bound in its tile (the tile max moves by at most that) + fp32 rounding of the threshold.
    """
    s_k = record["scores"]
    keep_k = record["keep"].to(torch.bool)
    lt = record["log2_tau"].float()
    qc, sq, kc, sk = record["codes"]
    s_e, bnd = fp8_dot_scores(qc, sq, kc, sk, q_block, k_block, bits)
    b, hq, tq, tk = s_k.shape
    valid = _valid(tq, 0, tk, tk, causal, s_k.device).expand(b, hq, tq, tk)
    fin = valid & torch.isfinite(s_k)
    err = (s_k.double() - s_e).abs()
    ratio = torch.where(fin, err / bnd.clamp(min=1e-300), 0.0)
    out = {"n_valid": int(valid.sum()), "nonfinite_valid": int((valid & ~torch.isfinite(s_k)).sum()),
           "masked_bad": int((~valid & (~torch.isneginf(s_k) | keep_k)).sum()),
           "score_err_max": float(torch.where(fin, err, 0.0).max()) if s_k.numel() else 0.0,
           "score_err_ratio": float(ratio.max()) if s_k.numel() else 0.0}
    if not binary:
        return out
    lt_x = lt[None, :, None, None]
    s_m = torch.where(valid, s_k, -math.inf)
    thr_k = _tile_max(s_m, k_block) + lt_x                      # fp32, as in the kernel
    own = valid & (s_k >= thr_k)
    s_em = torch.where(valid, s_e, -math.inf)
    thr_e = _tile_max(s_em, k_block) + lt_x.double()
    keep_e = valid & (s_e >= thr_e)
    bnd_t = _tile_max(torch.where(valid, bnd, 0.0), k_block)
    dist = torch.where(valid, (s_e - thr_e).abs(), math.inf)
    margin = bnd + bnd_t + 2.0**-22 * (thr_e.abs() + s_e.abs()).nan_to_num(0.0, 0.0, 0.0)
    flips = keep_k != keep_e
    out.update(own_mismatch=int((own != keep_k).sum()), kept=int(keep_k.sum()), flips=int(flips.sum()),
               flips_outside=int((flips & ~(dist <= margin)).sum()),
               flip_dist_max=float(torch.where(flips, dist, 0.0).max()) if flips.any() else 0.0,
               margin_median=float(torch.where(valid, margin, math.nan).nanmedian()) if valid.any() else 0.0)
    return out


# ----------------------------------------------------------------------------------------------
# accuracy against fp32 attention
# ----------------------------------------------------------------------------------------------
def accuracy(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Cosine similarity, relative L1 (sum|o - r| / sum|r|) and RMSE of ``out`` vs ``ref``."""
    a = out.detach().double().flatten().cpu()
    r = ref.detach().double().flatten().cpu()
    cos = float(torch.nn.functional.cosine_similarity(a, r, dim=0)) if a.numel() else 1.0
    rel_l1 = float((a - r).abs().sum() / r.abs().sum().clamp(min=1e-300))
    rmse = float(((a - r) ** 2).mean().sqrt())
    return {"cos": cos, "rel_l1": rel_l1, "rmse": rmse}


def outlier_inputs(b: int, t: int, hq: int, hk: int, d: int, dtype=torch.float32, device="cpu",
                   seed: int = 0, n_outliers: int = 4, low: float = 20.0, high: float = 100.0):
    """Random q, k, v with a few outlier channels (20-100x larger) like real activations.

    k: ``n_outliers`` channels carry a large offset per (batch, head) shared by all tokens
    (20-100x the unit noise; the channel-wise key outliers that key smoothing removes) and,
    on top, token noise 2x larger than elsewhere; v: a few channels scaled by 20-100 (what the
    per-channel V scale is for); q: unit noise with the same channels as k 2x larger."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, hq, d, generator=gen)
    k = torch.randn(b, t, hk, d, generator=gen)
    v = torch.randn(b, t, hk, d, generator=gen)
    ch = torch.randperm(d, generator=gen)[:n_outliers]
    mag = low + (high - low) * torch.rand(n_outliers, generator=gen)
    sign = torch.randint(0, 2, (b, 1, hk, n_outliers), generator=gen) * 2.0 - 1.0
    q[..., ch] *= 2.0
    k[..., ch] = 2.0 * k[..., ch] + sign * mag
    chv = torch.randperm(d, generator=gen)[:n_outliers]
    v[..., chv] *= low + (high - low) * torch.rand(n_outliers, generator=gen)
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)
