"""Flow layers on the CPU with Numba: affine coupling and actnorm, forward / inverse, backward.

``coupling(x, s, t, mask, parity, clamp, inverse) -> (y, logdet)`` and
``actnorm(x, loc, log_scale, inverse) -> (y, logdet)``, the same maths as
``plugins/flow/reference.py`` (see its docstring), computed in the input dtype (float32 or
float64) with the per-row log-det accumulated in one pass over the row.

Coupling: one parallel pass over rows, forward and backward (the backward recomputes
``log_s = clamp * tanh(s / clamp)`` and ``exp(+-log_s)`` from the saved inputs rather than
storing them). Actnorm: forward one pass over rows; backward one pass over contiguous row
chunks (one per thread), each reducing its dloc / dlog_scale partial sums into its own row,
summed afterwards (no contention).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from ._common import check_floats, empty, fexp, jitable, kernel, np_view, num_threads, prange

__all__ = ["coupling", "actnorm", "CouplingFunction", "ActNormFunction"]


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@jitable
def _soft_clamp(sv, c):
    """(log_s, tanh(s / c)) with log_s = c * tanh(s / c); tanh from one fexp of a non-positive
    argument (no overflow; vectorises, unlike libm tanh)."""
    u = sv / c
    e = fexp(-2 * abs(u))
    th = (1 - e) / (1 + e)
    th = -th if u < 0 else th
    return c * th, th


@kernel(parallel=True)
def _coupling_fwd_kernel(x, s, t, keep, clamp, inverse, y, ld):
    """Branch-free inner loop (selects, not branches, on the mask) so LLVM vectorises it."""
    n, d = x.shape
    c = x.dtype.type(clamp)
    zero = x.dtype.type(0)
    sgn = x.dtype.type(-1) if inverse else x.dtype.type(1)
    for i in prange(n):
        acc = zero
        xi = x[i]
        si = s[i]
        ti = t[i]
        yi = y[i]
        if inverse:   # the direction is hoisted out of the inner loops so each one vectorises
            for j in range(d):
                ls, _ = _soft_clamp(si[j], c)
                ls = zero if keep[j] else ls
                v = (xi[j] - ti[j]) * fexp(-ls)
                yi[j] = xi[j] if keep[j] else v
                acc += ls
        else:
            for j in range(d):
                ls, _ = _soft_clamp(si[j], c)
                ls = zero if keep[j] else ls
                v = xi[j] * fexp(ls) + ti[j]
                yi[j] = xi[j] if keep[j] else v
                acc += ls
        ld[i] = sgn * acc


@kernel(parallel=True)
def _coupling_bwd_kernel(x, s, t, keep, clamp, inverse, dy, dld, dx, ds, dt):
    """dy [N, D] and dld [N] (zeros stand in for missing cotangents) -> dx, ds, dt [N, D]."""
    n, d = x.shape
    c = x.dtype.type(clamp)
    zero = x.dtype.type(0)
    one = x.dtype.type(1)
    for i in prange(n):
        g = dld[i]
        xi = x[i]
        si = s[i]
        ti = t[i]
        dyi = dy[i]
        dxi = dx[i]
        dsi = ds[i]
        dti = dt[i]
        if inverse:
            for j in range(d):
                k = keep[j]
                ls, th = _soft_clamp(si[j], c)
                gy = dyi[j] * fexp(-ls)
                dls = -gy * (xi[j] - ti[j]) - g          # -dy * x_out - dld
                dxi[j] = dyi[j] if k else gy
                dsi[j] = zero if k else dls * (one - th * th)
                dti[j] = zero if k else -gy
        else:
            for j in range(d):
                k = keep[j]
                ls, th = _soft_clamp(si[j], c)
                gy = dyi[j] * fexp(ls)
                dls = gy * xi[j] + g
                dxi[j] = dyi[j] if k else gy
                dsi[j] = zero if k else dls * (one - th * th)
                dti[j] = zero if k else dyi[j]


@kernel(parallel=True)
def _actnorm_fwd_kernel(x, shift, scale, y):
    """y = (x + shift) * scale (forward: shift = loc, scale = exp(log_scale)) or
    y = x * scale + shift (inverse: scale = exp(-log_scale), shift = -loc): rows in parallel."""
    n, d = x.shape
    for i in prange(n):
        xi = x[i]
        yi = y[i]
        for j in range(d):
            yi[j] = (xi[j] + shift[j]) * scale[j]


@kernel(parallel=True)
def _actnorm_bwd_kernel(x, shift, scale, dy, nchunks, dx, dshift_part, dscale_part):
    """For y = (x + shift) * scale: dx = dy * scale, and per-chunk column sums of
    dy * scale (-> dshift) and dy * (x + shift) * scale (-> dlog_scale) [nchunks, D]."""
    n, d = x.shape
    zero = x.dtype.type(0)
    rows_per = (n + nchunks - 1) // nchunks
    for ch in prange(nchunks):
        r0 = ch * rows_per
        r1 = min(n, r0 + rows_per)
        pl = dshift_part[ch]
        ps = dscale_part[ch]
        for j in range(d):
            pl[j] = zero
            ps[j] = zero
        for i in range(r0, r1):
            xi = x[i]
            dyi = dy[i]
            dxi = dx[i]
            for j in range(d):
                gj = dyi[j] * scale[j]
                dxi[j] = gj
                pl[j] += gj
                ps[j] += gj * (xi[j] + shift[j])


# ----------------------------------------------------------------------------------------------
# torch-facing functions
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def _keep(d: int, mask: str, parity) -> np.ndarray:
    """bool [d], True on pass-through dims (cached: read-only, shared between calls)."""
    from ...plugins.flow.reference import coupling_mask
    keep = coupling_mask(d, mask, parity).numpy().astype(np.bool_)
    keep.setflags(write=False)
    return keep


def _check_2d(op: str, x, **same):
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be [B, D], got shape {tuple(x.shape)}")
    for k, t in same.items():
        if tuple(t.shape) != tuple(x.shape):
            raise ValueError(f"{op}: {k} must have x's shape {tuple(x.shape)}, got {tuple(t.shape)}")


def _zeros_or(t, shape, dtype):
    return np.zeros(shape, dtype=np.float32 if dtype == torch.float32 else np.float64) if t is None else np_view(t)


class CouplingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, s, t, mask, parity, clamp, inverse):
        n, d = x.shape
        keep = _keep(d, mask, parity)
        y = empty((n, d), x.dtype)
        ld = empty((n,), x.dtype)
        if n and d:
            _coupling_fwd_kernel(np_view(x), np_view(s), np_view(t), keep, float(clamp), bool(inverse),
                                 y.numpy(), ld.numpy())
        elif n:
            ld.zero_()
        ctx.save_for_backward(x, s, t)
        ctx.keep, ctx.clamp, ctx.inverse = keep, float(clamp), bool(inverse)
        ctx.set_materialize_grads(False)
        return y, ld

    @staticmethod
    def backward(ctx, dy, dld):
        x, s, t = ctx.saved_tensors
        if dy is None and dld is None:
            return (None,) * 7
        n, d = x.shape
        dx, ds, dt = empty((n, d), x.dtype), empty((n, d), x.dtype), empty((n, d), x.dtype)
        if n and d:
            _coupling_bwd_kernel(np_view(x), np_view(s), np_view(t), ctx.keep, ctx.clamp, ctx.inverse,
                                 _zeros_or(dy, (n, d), x.dtype), _zeros_or(dld, (n,), x.dtype),
                                 dx.numpy(), ds.numpy(), dt.numpy())
        need = ctx.needs_input_grad
        return (dx if need[0] else None, ds if need[1] else None, dt if need[2] else None,
                None, None, None, None)


def _actnorm_affine(loc, log_scale, inverse: bool):
    """(shift, scale) with y = (x + shift) * scale for either direction:
    forward shift = loc, scale = exp(log_scale); inverse x = y * exp(-ls) - loc = (y - loc * exp(ls)) * exp(-ls)."""
    ls = log_scale.detach()
    if not inverse:
        return np_view(loc), np_view(torch.exp(ls))
    return np_view(-loc.detach() * torch.exp(ls)), np_view(torch.exp(-ls))


class ActNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, loc, log_scale, inverse):
        n, d = x.shape
        y = empty((n, d), x.dtype)
        if n and d:
            shift, scale = _actnorm_affine(loc, log_scale, bool(inverse))
            _actnorm_fwd_kernel(np_view(x), shift, scale, y.numpy())
        total = log_scale.detach().double().sum()          # fp64, as the reference
        ld = (-total if inverse else total).to(x.dtype).expand(n).clone()
        ctx.save_for_backward(x, loc, log_scale)
        ctx.inverse = bool(inverse)
        ctx.set_materialize_grads(False)
        return y, ld

    @staticmethod
    def backward(ctx, dy, dld):
        x, loc, log_scale = ctx.saved_tensors
        n, d = x.shape
        if dy is None and dld is None:
            return None, None, None, None
        nchunks = max(1, min(n, num_threads()))
        npd = np.float32 if x.dtype == torch.float32 else np.float64
        p_shift = np.zeros((nchunks, d), dtype=npd)
        p_ls = np.zeros((nchunks, d), dtype=npd)
        if dy is not None and n and d:
            dx = empty((n, d), x.dtype)
            shift, scale = _actnorm_affine(loc, log_scale, ctx.inverse)
            _actnorm_bwd_kernel(np_view(x), shift, scale, np_view(dy), nchunks, dx.numpy(), p_shift, p_ls)
        else:
            dx = torch.zeros((n, d), dtype=x.dtype)
        g_shift = torch.from_numpy(p_shift).sum(0)      # sum dy * scale
        g_ls = torch.from_numpy(p_ls).sum(0)            # sum dy * y  (= d/d log(scale) through scale)
        if not ctx.inverse:
            dloc, dls = g_shift, g_ls
        else:
            # shift = -loc * exp(ls), scale = exp(-ls): dshift/dloc = -exp(ls);
            # d/dls: through scale -g_ls, through shift -loc*exp(ls) * g_shift
            e = torch.exp(log_scale.detach())
            dloc = -g_shift * e
            dls = -g_ls - loc.detach() * e * g_shift
        if dld is not None:
            g = dld.sum()
            dls = dls + (-g if ctx.inverse else g)
        need = ctx.needs_input_grad
        return (dx if need[0] else None, dloc if need[1] else None, dls if need[2] else None, None)


def coupling(x, s, t, mask: str = "alternate", parity=0, clamp: float = 2.0, inverse: bool = False):
    """Affine coupling (see plugins/flow/reference.py). CPU float32 / float64, [B, D]."""
    check_floats("flow.coupling", x=x, s=s, t=t)
    _check_2d("flow.coupling", x, s=s, t=t)
    return CouplingFunction.apply(x.contiguous(), s.contiguous(), t.contiguous(), mask, parity, clamp, inverse)


def actnorm(x, loc, log_scale, inverse: bool = False):
    """ActNorm y = (x + loc) * exp(log_scale) (or its inverse). CPU float32 / float64, [B, D]."""
    check_floats("flow.actnorm", x=x, loc=loc, log_scale=log_scale)
    if x.dim() != 2:
        raise ValueError(f"flow.actnorm: x must be [B, D], got shape {tuple(x.shape)}")
    d = x.shape[1]
    for k, p in (("loc", loc), ("log_scale", log_scale)):
        if tuple(p.shape) != (d,):
            raise ValueError(f"flow.actnorm: {k} must have shape ({d},), got {tuple(p.shape)}")
    return ActNormFunction.apply(x.contiguous(), loc.contiguous(), log_scale.contiguous(), inverse)
