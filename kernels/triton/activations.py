"""MLP activations in Triton: SwiGLU and exact (erf) GELU, forward and backward.

Public entry points::

    out = swiglu(gu)   # gu [..., 2h]: gate = gu[..., :h], up = gu[..., h:]; out = silu(gate) * up
    y = gelu(x)        # x * Phi(x) = 0.5 * x * (1 + erf(x / sqrt(2)))  (exact GELU)

Computed in fp32, stored in the input dtype. Wrapped as ``torch.library`` custom ops
(``blockzoo::swiglu_fwd``/``swiglu_bwd``/``gelu_fwd``/``gelu_bwd``) with fake and autograd
registrations. CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``. Imports only torch,
triton and the standard library.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._alloc import empty
from ._common import INTERPRET, _cast

__all__ = ["swiglu", "gelu", "INTERPRET"]

TILE = 4096            # elements of the output per program
MAX_BLOCK_H = 2048     # widest column block of the SwiGLU tile
GELU_BLOCK = 4096




# ======================================================================================
# kernels
# ======================================================================================
@triton.jit
def _swiglu_fwd_kernel(GU, OUT, M, HD, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (rows < M)[:, None] & (cols < HD)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    in_offs = r64 * (2 * HD) + cols[None, :]
    g = tl.load(GU + in_offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU + in_offs + HD, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    out = g * s * u
    tl.store(OUT + r64 * HD + cols[None, :], _cast(out, OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DOUT, GU, DGU, M, HD, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (rows < M)[:, None] & (cols < HD)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    in_offs = r64 * (2 * HD) + cols[None, :]
    do = tl.load(DOUT + r64 * HD + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GU + in_offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU + in_offs + HD, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    silu = g * s
    dg = do * u * s * (1.0 + g * (1.0 - s))
    du = do * silu
    tl.store(DGU + in_offs, _cast(dg, DGU.dtype.element_ty), mask=mask)
    tl.store(DGU + in_offs + HD, _cast(du, DGU.dtype.element_ty), mask=mask)


@triton.jit
def _gauss_cdf_pdf(x):
    """Phi(x) and phi(x) in fp32, relative error ~5e-7 everywhere (lower tail included).

    Phi(x) = 0.5 * erfc(-x / sqrt 2): ``0.5 * (1 + erf(.))`` cancels for x << 0 (relative error
    1 at x = -6 in fp32). erfc(|z|) = t * exp(-z^2 + P(t)), t = 1 / (1 + |z| / 2), with the
    Chebyshev-fitted P of Numerical Recipes' erfcc (fractional error < 1.2e-7), and
    exp(-x^2 / 2) evaluated as exp(-hi) * exp(-lo) with x^2 / 2 = hi + lo split exactly
    (Dekker: x = xh + xl, xh with 12 significant bits), so no rounding of x^2 enters the
    exponent."""
    ax = tl.abs(x)
    xh = (ax.to(tl.uint32, bitcast=True) & 0xFFFFF000).to(tl.float32, bitcast=True)
    xl = ax - xh
    hi = 0.5 * xh * xh                      # exact
    lo = xh * xl + 0.5 * xl * xl            # exact products, one rounding in the sum
    g = tl.exp(-hi) * tl.exp(-lo)           # exp(-x^2 / 2)
    t = 1.0 / (1.0 + 0.35355339059327373 * ax)   # 1 / (1 + |z| / 2), z = x / sqrt 2
    p = 0.17087277
    p = -0.82215223 + t * p
    p = 1.48851587 + t * p
    p = -1.13520398 + t * p
    p = 0.27886807 + t * p
    p = -0.18628806 + t * p
    p = 0.09678418 + t * p
    p = 0.37409196 + t * p
    p = 1.00002368 + t * p
    p = -1.26551223 + t * p
    r = t * g * tl.exp(p)                   # erfc(|x| / sqrt 2)
    cdf = tl.where(x < 0, 0.5 * r, 1.0 - 0.5 * r)
    return cdf, g * 0.3989422804014327


@triton.jit
def _gelu_fwd_kernel(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    cdf, _ = _gauss_cdf_pdf(x)
    tl.store(Y + offs, _cast(x * cdf, Y.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_bwd_kernel(DY, X, DX, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    cdf, pdf = _gauss_cdf_pdf(x)
    tl.store(DX + offs, _cast(dy * (cdf + x * pdf), DX.dtype.element_ty), mask=mask)


# ======================================================================================
# launchers
# ======================================================================================
def _check(t: torch.Tensor, name: str) -> None:
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{name}: dtype {t.dtype} not supported (fp32, fp16, bf16)")
    if t.device.type == "cuda" or (t.device.type == "cpu" and INTERPRET):
        return
    raise RuntimeError(f"blockzoo triton {name}: tensors on {t.device} need CUDA, or CPU "
                       "with TRITON_INTERPRET=1 set before Python started")


def _new(shape, dtype, device):
    """Outputs and scratch: NaN-filled inside ``kernels._alloc.poisoned()`` (tests)."""
    return empty(shape, dtype=dtype, device=device)


def _guard(device: torch.device):
    import contextlib
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _swiglu_cfg(M: int, HD: int, cfg: dict | None):
    bh = min(triton.next_power_of_2(HD), MAX_BLOCK_H)
    bm = max(1, min(TILE // bh, triton.next_power_of_2(max(M, 1))))
    c = dict(BLOCK_M=bm, BLOCK_H=bh, num_warps=max(1, min(16, bm * bh // 512)))
    if cfg:
        c.update(cfg)
    return c


def _swiglu_fwd(gu: torch.Tensor, cfg: dict | None = None) -> torch.Tensor:
    _check(gu, "swiglu")
    two_h = gu.shape[-1]
    if two_h % 2:
        raise ValueError(f"swiglu: last dim must be even (gate | up), got {two_h}")
    HD = two_h // 2
    out = _new((*gu.shape[:-1], HD), gu.dtype, gu.device)
    if out.numel() == 0:
        return out
    g2 = gu.contiguous().view(-1, two_h)
    M = g2.shape[0]
    c = _swiglu_cfg(M, HD, cfg)
    grid = (triton.cdiv(M, c["BLOCK_M"]), triton.cdiv(HD, c["BLOCK_H"]))
    with _guard(gu.device):
        _swiglu_fwd_kernel[grid](g2, out, M, HD, BLOCK_M=c["BLOCK_M"], BLOCK_H=c["BLOCK_H"],
                                 num_warps=c["num_warps"])
    return out


def _swiglu_bwd(dout: torch.Tensor, gu: torch.Tensor, cfg: dict | None = None) -> torch.Tensor:
    _check(gu, "swiglu")
    two_h = gu.shape[-1]
    HD = two_h // 2
    dgu = _new(gu.shape, gu.dtype, gu.device)
    if dgu.numel() == 0:
        return dgu
    g2 = gu.contiguous().view(-1, two_h)
    M = g2.shape[0]
    d2 = dout.contiguous().view(-1, HD)
    c = _swiglu_cfg(M, HD, cfg)
    grid = (triton.cdiv(M, c["BLOCK_M"]), triton.cdiv(HD, c["BLOCK_H"]))
    with _guard(gu.device):
        _swiglu_bwd_kernel[grid](d2, g2, dgu, M, HD, BLOCK_M=c["BLOCK_M"],
                                 BLOCK_H=c["BLOCK_H"], num_warps=c["num_warps"])
    return dgu


def _gelu_fwd(x: torch.Tensor, cfg: dict | None = None) -> torch.Tensor:
    _check(x, "gelu")
    y = _new(x.shape, x.dtype, x.device)
    n = x.numel()
    if n == 0:
        return y
    c = dict(BLOCK=GELU_BLOCK, num_warps=8)
    if cfg:
        c.update(cfg)
    with _guard(x.device):
        _gelu_fwd_kernel[(triton.cdiv(n, c["BLOCK"]),)](x.contiguous(), y, n, BLOCK=c["BLOCK"],
                                                        num_warps=c["num_warps"])
    return y


def _gelu_bwd(dy: torch.Tensor, x: torch.Tensor, cfg: dict | None = None) -> torch.Tensor:
    _check(x, "gelu")
    dx = _new(x.shape, x.dtype, x.device)
    n = x.numel()
    if n == 0:
        return dx
    c = dict(BLOCK=GELU_BLOCK, num_warps=8)
    if cfg:
        c.update(cfg)
    with _guard(x.device):
        _gelu_bwd_kernel[(triton.cdiv(n, c["BLOCK"]),)](dy.contiguous(), x.contiguous(), dx, n,
                                                        BLOCK=c["BLOCK"],
                                                        num_warps=c["num_warps"])
    return dx


# ======================================================================================
# custom ops
# ======================================================================================
def _op_exists(name: str) -> bool:
    try:
        getattr(torch.ops.blockzoo, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def _swiglu_fwd_impl(gu: torch.Tensor) -> torch.Tensor:
    return _swiglu_fwd(gu)


def _swiglu_bwd_impl(dout: torch.Tensor, gu: torch.Tensor) -> torch.Tensor:
    return _swiglu_bwd(dout, gu)


def _gelu_fwd_impl(x: torch.Tensor) -> torch.Tensor:
    return _gelu_fwd(x)


def _gelu_bwd_impl(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return _gelu_bwd(dy, x)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _swiglu_backward(ctx, dout):
    (gu,) = ctx.saved_tensors
    return torch.ops.blockzoo.swiglu_bwd(dout, gu)


def _gelu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _gelu_backward(ctx, dy):
    (x,) = ctx.saved_tensors
    return torch.ops.blockzoo.gelu_bwd(dy, x)


if not _op_exists("swiglu_fwd"):
    torch.library.custom_op("blockzoo::swiglu_fwd", mutates_args=())(_swiglu_fwd_impl)
    torch.library.register_fake(
        "blockzoo::swiglu_fwd",
        lambda gu: gu.new_empty((*gu.shape[:-1], gu.shape[-1] // 2)))
    torch.library.register_autograd("blockzoo::swiglu_fwd", _swiglu_backward,
                                    setup_context=_swiglu_setup)
if not _op_exists("swiglu_bwd"):
    torch.library.custom_op("blockzoo::swiglu_bwd", mutates_args=())(_swiglu_bwd_impl)
    torch.library.register_fake("blockzoo::swiglu_bwd", lambda dout, gu: gu.new_empty(gu.shape))
if not _op_exists("gelu_fwd"):
    torch.library.custom_op("blockzoo::gelu_fwd", mutates_args=())(_gelu_fwd_impl)
    torch.library.register_fake("blockzoo::gelu_fwd", lambda x: x.new_empty(x.shape))
    torch.library.register_autograd("blockzoo::gelu_fwd", _gelu_backward,
                                    setup_context=_gelu_setup)
if not _op_exists("gelu_bwd"):
    torch.library.custom_op("blockzoo::gelu_bwd", mutates_args=())(_gelu_bwd_impl)
    torch.library.register_fake("blockzoo::gelu_bwd", lambda dy, x: x.new_empty(x.shape))


# ======================================================================================
# public API
# ======================================================================================
def swiglu(gu: torch.Tensor) -> torch.Tensor:
    """``silu(gu[..., :h]) * gu[..., h:]`` for ``gu`` of shape ``[..., 2h]``; differentiable."""
    if gu.dim() == 0 or gu.shape[-1] % 2:
        raise ValueError(f"swiglu: last dim must be even (gate | up), got shape {tuple(gu.shape)}")
    return torch.ops.blockzoo.swiglu_fwd(gu)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact GELU, ``x * Phi(x) = 0.5 * x * (1 + erf(x / sqrt(2)))``; differentiable.

    Phi is evaluated as 0.5 * erfc(-x / sqrt 2) (see ``_gauss_cdf_pdf``): ~5e-7 relative error
    also in the lower tail, where the textbook ``1 + erf`` form (and torch's fp32 GELU) cancels."""
    return torch.ops.blockzoo.gelu_fwd(x)
