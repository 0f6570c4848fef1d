"""Flow layers in Triton: fused affine coupling and actnorm, forward / inverse and backward.

Public entry points::

    y, logdet = coupling(x, s, t, mask, parity, clamp, inverse)
    y, logdet = actnorm(x, loc, log_scale, inverse)

Same maths as ``plugins/flow/reference.py``. The coupling kernel takes the conditioner's output
(s, t; the conditioner network itself is ordinary torch layers) and does, in one pass over a
tile of rows: soft clamp ``log_s = clamp * tanh(s / clamp)`` -> affine transform of the
transformed dims (pass-through dims copied; the mask is computed from the column index, never
loaded) -> the per-row log-det reduction. Its backward recomputes ``log_s`` and ``exp(+-log_s)``
from x, s, t (nothing but the inputs is saved) and writes dx, ds, dt in one pass.
ActNorm: one pass forward (y and the per-row log-det); backward writes dx and per-program
partial column sums of dloc / dlog_scale (a ``[programs, D]`` fp32 buffer summed once, no
atomics). Math in fp32, outputs in x's dtype.

Both are ``torch.library`` custom ops (``blockzoo::flow_coupling_fwd`` / ``_bwd``,
``blockzoo::flow_actnorm_fwd`` / ``_bwd``) with registered fake and autograd, so they compose
with autograd and ``torch.compile``. CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
Rows are held whole in registers: D <= ``MAX_D``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._alloc import empty
from ._common import INTERPRET, _cast

__all__ = ["coupling", "actnorm", "MAX_D", "INTERPRET"]

MAX_D = 8192
TILE = 4096          # target elements per program (BLOCK_M x BLOCK_D)
MAX_BLOCK_M = 128


def _config(M: int, D: int) -> dict:
    bd = triton.next_power_of_2(max(D, 1))
    bm = max(1, min(MAX_BLOCK_M, TILE // bd, triton.next_power_of_2(max(M, 1))))
    warps = 4 if bm * bd <= 4096 else 8
    return {"BLOCK_M": bm, "BLOCK_D": bd, "num_warps": warps}


# ======================================================================================
# kernels
# ======================================================================================
@triton.jit
def _tanh(u):
    # tanh from one exp of a non-positive argument: no overflow, odd by construction
    e = tl.exp(-2.0 * tl.abs(u))
    th = (1.0 - e) / (1.0 + e)
    return tl.where(u < 0, -th, th)


@triton.jit
def _keep_cols(cols, D, MASK_HALF: tl.constexpr, PARITY: tl.constexpr):
    if MASK_HALF:
        if PARITY == 0:
            keep = cols < D // 2
        else:
            keep = cols >= D // 2
    else:
        keep = (cols % 2) == PARITY
    return keep


@triton.jit
def _coupling_fwd_kernel(X, S, T, Y, LD, M, D, clamp,
                         MASK_HALF: tl.constexpr, PARITY: tl.constexpr, INVERSE: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < M
    cmask = cols < D
    keep = _keep_cols(cols, D, MASK_HALF, PARITY)
    mask = rmask[:, None] & cmask[None, :]
    tmask = mask & (~keep)[None, :]           # s, t are read on the transformed dims only
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(S + offs, mask=tmask, other=0.0).to(tl.float32)
    t = tl.load(T + offs, mask=tmask, other=0.0).to(tl.float32)
    ls = clamp * _tanh(s / clamp)             # 0 where masked (s = 0 there)
    if INVERSE:
        y = (x - t) * tl.exp(-ls)
        ld = -tl.sum(ls, axis=1)
    else:
        y = x * tl.exp(ls) + t
        ld = tl.sum(ls, axis=1)
    y = tl.where(keep[None, :], x, y)
    tl.store(Y + offs, _cast(y, Y.dtype.element_ty), mask=mask)
    tl.store(LD + rows, _cast(ld, LD.dtype.element_ty), mask=rmask)


@triton.jit
def _coupling_bwd_kernel(X, S, T, DY, DLD, DX, DS, DT, M, D, clamp,
                         HAS_DY: tl.constexpr, HAS_DLD: tl.constexpr,
                         MASK_HALF: tl.constexpr, PARITY: tl.constexpr, INVERSE: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < M
    cmask = cols < D
    keep = _keep_cols(cols, D, MASK_HALF, PARITY)
    mask = rmask[:, None] & cmask[None, :]
    tmask = mask & (~keep)[None, :]
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(S + offs, mask=tmask, other=0.0).to(tl.float32)
    t = tl.load(T + offs, mask=tmask, other=0.0).to(tl.float32)
    if HAS_DY:
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        dy = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if HAS_DLD:
        g = tl.load(DLD + rows, mask=rmask, other=0.0).to(tl.float32)
    else:
        g = tl.zeros([BLOCK_M], dtype=tl.float32)
    th = _tanh(s / clamp)
    ls = clamp * th
    if INVERSE:
        e = tl.exp(-ls)
        xo = (x - t) * e
        dx = dy * e
        dt = -dy * e
        dls = -dy * xo - g[:, None]
    else:
        e = tl.exp(ls)
        dx = dy * e
        dt = dy
        dls = dy * x * e + g[:, None]
    ds = dls * (1.0 - th * th)
    keep2 = keep[None, :]
    dx = tl.where(keep2, dy, dx)
    ds = tl.where(keep2, 0.0, ds)
    dt = tl.where(keep2, 0.0, dt)
    tl.store(DX + offs, _cast(dx, DX.dtype.element_ty), mask=mask)
    tl.store(DS + offs, _cast(ds, DS.dtype.element_ty), mask=mask)
    tl.store(DT + offs, _cast(dt, DT.dtype.element_ty), mask=mask)


@triton.jit
def _actnorm_fwd_kernel(X, LOC, LS, Y, LD, M, D, INVERSE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < M
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    loc = tl.load(LOC + cols, mask=cmask, other=0.0).to(tl.float32)
    ls = tl.load(LS + cols, mask=cmask, other=0.0).to(tl.float32)
    # log-det: one sum of the D parameters, in fp64 (it can be much smaller than its terms);
    # D values per program, negligible next to the tile's traffic
    tot = tl.sum(tl.load(LS + cols, mask=cmask, other=0.0).to(tl.float64), axis=0)
    if INVERSE:
        y = x * tl.exp(-ls)[None, :] - loc[None, :]
        tot = -tot
    else:
        y = (x + loc[None, :]) * tl.exp(ls)[None, :]
    tl.store(Y + offs, _cast(y, Y.dtype.element_ty), mask=mask)
    ld = (tl.zeros([BLOCK_M], dtype=tl.float64) + tot).to(tl.float32)
    tl.store(LD + rows, _cast(ld, LD.dtype.element_ty), mask=rmask)


@triton.jit
def _actnorm_bwd_kernel(X, LOC, LS, DY, DX, PLOC, PLS, M, D, INVERSE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """dx, and this program's partial column sums of dloc and (the data part of) dlog_scale in
    row ``pid`` of the fp32 [programs, D] buffers."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < M
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    loc = tl.load(LOC + cols, mask=cmask, other=0.0).to(tl.float32)
    ls = tl.load(LS + cols, mask=cmask, other=0.0).to(tl.float32)
    if INVERSE:
        g = dy * tl.exp(-ls)[None, :]
        ploc = -tl.sum(dy, axis=0)
        pls = -tl.sum(g * x, axis=0)
    else:
        g = dy * tl.exp(ls)[None, :]
        ploc = tl.sum(g, axis=0)
        pls = tl.sum(g * (x + loc[None, :]), axis=0)
    tl.store(DX + offs, _cast(g, DX.dtype.element_ty), mask=mask)
    tl.store(PLOC + pid * D + cols, ploc, mask=cmask)
    tl.store(PLS + pid * D + cols, pls, mask=cmask)


# ======================================================================================
# launchers
# ======================================================================================
def _check_device(t: torch.Tensor) -> None:
    if t.device.type == "cuda" or (t.device.type == "cpu" and INTERPRET):
        return
    raise RuntimeError(f"blockzoo triton flow kernels: tensors on {t.device} need CUDA, or CPU with "
                       "TRITON_INTERPRET=1 set before Python started")


class _DeviceGuard:
    def __init__(self, device: torch.device):
        self.ctx = torch.cuda.device(device) if device.type == "cuda" else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *a):
        if self.ctx is not None:
            self.ctx.__exit__(*a)


def _coupling_fwd(x, s, t, mask_half: bool, parity: int, clamp: float, inverse: bool, cfg=None):
    _check_device(x)
    M, D = x.shape
    y = empty((M, D), dtype=x.dtype, device=x.device)
    ld = empty((M,), dtype=x.dtype, device=x.device)
    if M == 0:
        return y, ld
    c = dict(_config(M, D), **(cfg or {}))
    with _DeviceGuard(x.device):
        _coupling_fwd_kernel[(triton.cdiv(M, c["BLOCK_M"]),)](
            x, s, t, y, ld, M, D, float(clamp), MASK_HALF=mask_half, PARITY=int(parity), INVERSE=inverse,
            BLOCK_M=c["BLOCK_M"], BLOCK_D=c["BLOCK_D"], num_warps=c["num_warps"])
    return y, ld


def _coupling_bwd(x, s, t, dy, dld, mask_half: bool, parity: int, clamp: float, inverse: bool):
    M, D = x.shape
    dx = empty((M, D), dtype=x.dtype, device=x.device)
    ds = empty((M, D), dtype=s.dtype, device=x.device)
    dt = empty((M, D), dtype=t.dtype, device=x.device)
    if M == 0:
        return dx, ds, dt
    c = _config(M, D)
    with _DeviceGuard(x.device):
        _coupling_bwd_kernel[(triton.cdiv(M, c["BLOCK_M"]),)](
            x, s, t, dy.contiguous() if dy is not None else x, dld.contiguous() if dld is not None else x,
            dx, ds, dt, M, D, float(clamp), HAS_DY=dy is not None, HAS_DLD=dld is not None,
            MASK_HALF=mask_half, PARITY=int(parity), INVERSE=inverse,
            BLOCK_M=c["BLOCK_M"], BLOCK_D=c["BLOCK_D"], num_warps=c["num_warps"])
    return dx, ds, dt


def _actnorm_fwd(x, loc, log_scale, inverse: bool):
    _check_device(x)
    M, D = x.shape
    y = empty((M, D), dtype=x.dtype, device=x.device)
    ld = empty((M,), dtype=x.dtype, device=x.device)
    if M == 0:
        return y, ld
    c = _config(M, D)
    with _DeviceGuard(x.device):
        _actnorm_fwd_kernel[(triton.cdiv(M, c["BLOCK_M"]),)](
            x, loc, log_scale, y, ld, M, D, INVERSE=inverse,
            BLOCK_M=c["BLOCK_M"], BLOCK_D=c["BLOCK_D"], num_warps=c["num_warps"])
    return y, ld


def _actnorm_bwd(x, loc, log_scale, dy, inverse: bool):
    M, D = x.shape
    dx = empty((M, D), dtype=x.dtype, device=x.device)
    if M == 0:
        z = torch.zeros(D, dtype=torch.float32, device=x.device)
        return dx, z, z.clone()
    c = _config(M, D)
    G = triton.cdiv(M, c["BLOCK_M"])
    ploc = empty((G, D), dtype=torch.float32, device=x.device)
    pls = empty((G, D), dtype=torch.float32, device=x.device)
    with _DeviceGuard(x.device):
        _actnorm_bwd_kernel[(G,)](
            x, loc, log_scale, dy.contiguous(), dx, ploc, pls, M, D, INVERSE=inverse,
            BLOCK_M=c["BLOCK_M"], BLOCK_D=c["BLOCK_D"], num_warps=c["num_warps"])
    return dx, ploc.sum(0), pls.sum(0)


# ======================================================================================
# torch.library custom ops
# ======================================================================================
def _op_exists(name: str) -> bool:
    try:
        getattr(torch.ops.blockzoo, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def _cfwd_impl(x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, mask_half: bool, parity: int,
               clamp: float, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _coupling_fwd(x, s, t, mask_half, parity, clamp, inverse)


def _cfwd_fake(x, s, t, mask_half, parity, clamp, inverse):
    return x.new_empty(x.shape), x.new_empty((x.shape[0],))


def _cbwd_impl(x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, dy: torch.Tensor | None,
               dld: torch.Tensor | None, mask_half: bool, parity: int, clamp: float, inverse: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _coupling_bwd(x, s, t, dy, dld, mask_half, parity, clamp, inverse)


def _cbwd_fake(x, s, t, dy, dld, mask_half, parity, clamp, inverse):
    return x.new_empty(x.shape), s.new_empty(s.shape), t.new_empty(t.shape)


def _cfwd_setup(ctx, inputs, output):
    x, s, t, mask_half, parity, clamp, inverse = inputs
    ctx.save_for_backward(x, s, t)
    ctx.args = (mask_half, parity, clamp, inverse)
    ctx.set_materialize_grads(False)


def _cfwd_backward(ctx, dy, dld):
    x, s, t = ctx.saved_tensors
    if dy is None and dld is None:
        return (None,) * 7
    dx, ds, dt = torch.ops.blockzoo.flow_coupling_bwd(x, s, t, dy, dld, *ctx.args)
    need = ctx.needs_input_grad
    return (dx if need[0] else None, ds if need[1] else None, dt if need[2] else None,
            None, None, None, None)


def _afwd_impl(x: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor, inverse: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
    return _actnorm_fwd(x, loc, log_scale, inverse)


def _afwd_fake(x, loc, log_scale, inverse):
    return x.new_empty(x.shape), x.new_empty((x.shape[0],))


def _abwd_impl(x: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor, dy: torch.Tensor, inverse: bool
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _actnorm_bwd(x, loc, log_scale, dy, inverse)


def _abwd_fake(x, loc, log_scale, dy, inverse):
    d = x.shape[1]
    return (x.new_empty(x.shape), x.new_empty((d,), dtype=torch.float32),
            x.new_empty((d,), dtype=torch.float32))


def _afwd_setup(ctx, inputs, output):
    x, loc, log_scale, inverse = inputs
    ctx.save_for_backward(x, loc, log_scale)
    ctx.inverse = inverse
    ctx.set_materialize_grads(False)


def _afwd_backward(ctx, dy, dld):
    x, loc, log_scale = ctx.saved_tensors
    need = ctx.needs_input_grad
    if dy is None and dld is None:
        return None, None, None, None
    if dy is not None:
        dx, dloc, dls = torch.ops.blockzoo.flow_actnorm_bwd(x, loc, log_scale, dy, ctx.inverse)
    else:
        dx = torch.zeros_like(x)
        dloc = torch.zeros(x.shape[1], dtype=torch.float32, device=x.device)
        dls = torch.zeros_like(dloc)
    if dld is not None:
        g = dld.float().sum()
        dls = dls + (-g if ctx.inverse else g)
    return (dx if need[0] else None, dloc.to(loc.dtype) if need[1] else None,
            dls.to(log_scale.dtype) if need[2] else None, None)


if not _op_exists("flow_coupling_fwd"):
    torch.library.custom_op("blockzoo::flow_coupling_fwd", mutates_args=())(_cfwd_impl)
    torch.library.register_fake("blockzoo::flow_coupling_fwd", _cfwd_fake)
    torch.library.register_autograd("blockzoo::flow_coupling_fwd", _cfwd_backward, setup_context=_cfwd_setup)
if not _op_exists("flow_coupling_bwd"):
    torch.library.custom_op("blockzoo::flow_coupling_bwd", mutates_args=())(_cbwd_impl)
    torch.library.register_fake("blockzoo::flow_coupling_bwd", _cbwd_fake)
if not _op_exists("flow_actnorm_fwd"):
    torch.library.custom_op("blockzoo::flow_actnorm_fwd", mutates_args=())(_afwd_impl)
    torch.library.register_fake("blockzoo::flow_actnorm_fwd", _afwd_fake)
    torch.library.register_autograd("blockzoo::flow_actnorm_fwd", _afwd_backward, setup_context=_afwd_setup)
if not _op_exists("flow_actnorm_bwd"):
    torch.library.custom_op("blockzoo::flow_actnorm_bwd", mutates_args=())(_abwd_impl)
    torch.library.register_fake("blockzoo::flow_actnorm_bwd", _abwd_fake)


# ======================================================================================
# public API
# ======================================================================================
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(op: str, x, **same):
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be [B, D], got shape {tuple(x.shape)}")
    if not 1 <= x.shape[1] <= MAX_D:
        raise ValueError(f"{op}: D must be in 1..{MAX_D}, got {x.shape[1]}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{op}: dtype {x.dtype} not supported (float32, float16, bfloat16)")
    for k, (t, shape) in same.items():
        if tuple(t.shape) != shape or t.device != x.device or t.dtype != x.dtype:
            raise ValueError(f"{op}: {k} must be {shape} {x.dtype} on {x.device}, got "
                             f"{tuple(t.shape)} {t.dtype} {t.device}")


def coupling(x, s, t, mask: str = "alternate", parity=0, clamp: float = 2.0, inverse: bool = False):
    """Fused affine coupling: returns ``(y, logdet)`` (see the module docstring)."""
    _check("flow.coupling", x, s=(s, tuple(x.shape)), t=(t, tuple(x.shape)))
    if mask not in ("alternate", "half"):
        raise ValueError(f"flow.coupling: mask must be 'alternate' or 'half', got {mask!r}")
    return torch.ops.blockzoo.flow_coupling_fwd(x.contiguous(), s.contiguous(), t.contiguous(),
                                                mask == "half", int(parity or 0), float(clamp), bool(inverse))


def actnorm(x, loc, log_scale, inverse: bool = False):
    """Fused actnorm ``y = (x + loc) * exp(log_scale)`` (or the inverse): returns ``(y, logdet)``."""
    d = x.shape[-1] if x.dim() else 0
    _check("flow.actnorm", x, loc=(loc, (d,)), log_scale=(log_scale, (d,)))
    return torch.ops.blockzoo.flow_actnorm_fwd(x.contiguous(), loc.contiguous(), log_scale.contiguous(),
                                               bool(inverse))
