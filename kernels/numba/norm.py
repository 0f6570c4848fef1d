"""Fused residual add + LayerNorm / RMSNorm on the CPU with Numba, forward and backward.

``add_norm(x, delta, weight, bias, eps, kind) -> (y, h)``:
    h = x + delta            (delta None: h is x itself, returned as is)
    y = norm(h) * weight + bias   over the last dim; weight / bias may be None
kind "layernorm": norm(h) = (h - mean) / sqrt(var + eps) (biased variance);
kind "rmsnorm":   norm(h) = h / sqrt(mean(h^2) + eps).
Statistics are accumulated in the input dtype (fp32 for float32, fp64 for float64) with a
two-pass (mean, then centred variance) row pass held in cache.

Forward: one parallel pass over rows (prange): h written once, y written once; mean and
1/std saved per row. Backward: one parallel pass over contiguous chunks of rows (one chunk per
thread): with g = dy * weight and xhat = (h - mean) * rstd,
    dh_total = dh + rstd * (g - mean(g) - xhat * mean(g * xhat))   (layernorm)
    dh_total = dh + rstd * (g - xhat * mean(g * xhat))              (rmsnorm)
and dx = ddelta = dh_total; dweight = sum(dy * xhat), dbias = sum(dy) are reduced per chunk
into their own rows and summed afterwards (no contention).
"""

from __future__ import annotations

import numpy as np
import torch

from ._common import as_rows, check_floats, empty, kernel, np_view, num_threads, prange

__all__ = ["add_norm", "add_norm_fwd", "add_norm_bwd", "AddNormFunction"]

_KINDS = {"layernorm": False, "rmsnorm": True}
# reassociation (vectorised row sums) but no FMA contraction: g - mean(g) must cancel exactly
# when it should (e.g. width 1), which needs g rounded the same way in both passes.
_FASTMATH = {"reassoc", "nsz", "arcp"}


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@kernel(parallel=True, fastmath=_FASTMATH)
def _fwd_kernel(x, delta, has_delta, w, b, eps, rms, y, h, mean, rstd):
    """x, delta [N, W] -> y [N, W], h [N, W] (written if has_delta), mean / rstd [N].
    w / b [W] are always given (ones / zeros stand in for None)."""
    n, width = x.shape
    zero = x.dtype.type(0)
    one = x.dtype.type(1)
    inv_w = one / x.dtype.type(width)
    epsv = x.dtype.type(eps)
    for i in prange(n):
        if has_delta:
            src = h[i]
            xi = x[i]
            di = delta[i]
            for c in range(width):
                src[c] = xi[c] + di[c]
        else:
            src = x[i]
        mu = zero
        if not rms:
            s = zero
            for c in range(width):
                s += src[c]
            mu = s * inv_w
        ss = zero
        for c in range(width):
            t = src[c] - mu
            ss += t * t
        rs = one / np.sqrt(ss * inv_w + epsv)
        mean[i] = mu
        rstd[i] = rs
        yi = y[i]
        for c in range(width):
            yi[c] = (src[c] - mu) * rs * w[c] + b[c]


@kernel(parallel=True, fastmath=_FASTMATH)
def _bwd_kernel(dy, dh, has_dh, h, mean, rstd, w, rms, need_wb, nchunks, dx, dw_part, db_part):
    """dy, dh, h [N, W]; mean, rstd [N]; w [W] (ones for None) -> dx [N, W] (= dh + dnorm),
    dw_part / db_part [nchunks, W]: per-chunk sums of dy * xhat and dy (if need_wb)."""
    n, width = dy.shape
    zero = dy.dtype.type(0)
    inv_w = dy.dtype.type(1) / dy.dtype.type(width)
    rows_per = (n + nchunks - 1) // nchunks
    for ch in prange(nchunks):
        r0 = ch * rows_per
        r1 = min(n, r0 + rows_per)
        zrow = np.zeros(width, dy.dtype)
        dwp = dw_part[ch]
        dbp = db_part[ch]
        if need_wb:
            for c in range(width):
                dwp[c] = zero
                dbp[c] = zero
        for i in range(r0, r1):
            dyi = dy[i]
            hi = h[i]
            dxi = dx[i]
            dhi = dh[i] if has_dh else zrow
            mu = mean[i]
            rs = rstd[i]
            # pass 1: sum(g), sum(g * (h - mean)) with g = dy * w
            s1 = zero
            s2 = zero
            for c in range(width):
                g = dyi[c] * w[c]
                s1 += g
                s2 += g * (hi[c] - mu)
            a2 = s2 * rs * inv_w  # mean(g * xhat)
            a1 = zero if rms else s1 * inv_w  # mean(g)
            # pass 2: dx = dh + rs * (g - a1 - xhat * a2), plus the weight / bias sums
            if need_wb:
                for c in range(width):
                    xh = (hi[c] - mu) * rs
                    dxi[c] = dhi[c] + rs * (dyi[c] * w[c] - a1 - xh * a2)
                    dwp[c] += dyi[c] * xh
                    dbp[c] += dyi[c]
            else:
                for c in range(width):
                    xh = (hi[c] - mu) * rs
                    dxi[c] = dhi[c] + rs * (dyi[c] * w[c] - a1 - xh * a2)


# ----------------------------------------------------------------------------------------------
# torch-facing functions
# ----------------------------------------------------------------------------------------------
def _rms_flag(kind):
    try:
        return _KINDS[kind]
    except KeyError:
        raise ValueError(f"add_norm: kind must be 'layernorm' or 'rmsnorm', got {kind!r}") from None


def _np_dtype(dtype):
    return np.float32 if dtype == torch.float32 else np.float64


def _weight_np(t, width, dtype, fill):
    """weight / bias as a contiguous numpy vector; ones / zeros stand in for None."""
    if t is None:
        return np.full(width, fill, dtype=_np_dtype(dtype))
    return np_view(t)


def _check(x, delta, weight, bias):
    dtype = check_floats("add_norm", x=x, delta=delta, weight=weight, bias=bias)
    if x.dim() == 0:
        raise ValueError("add_norm: x must have at least one dimension")
    width = x.shape[-1]
    if delta is not None and delta.shape != x.shape:
        raise ValueError(f"add_norm: delta {tuple(delta.shape)} must have x's shape "
                         f"{tuple(x.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (width,):
            raise ValueError(f"add_norm: {name} must have shape ({width},), got {tuple(t.shape)}")
    return dtype


def add_norm_fwd(x, delta, weight, bias, eps, kind):
    """Forward only: returns (y, h, mean [N], rstd [N]); h is x itself when delta is None."""
    rms = _rms_flag(kind)
    dtype = _check(x, delta, weight, bias)
    shape = x.shape
    x2 = as_rows(x.detach())
    nrows, width = x2.shape
    y = empty(shape, dtype)
    mean = empty((nrows,), dtype)
    rstd = empty((nrows,), dtype)
    if delta is not None:
        h = empty(shape, dtype)
        d_np, h_np = as_rows(delta.detach()).numpy(), h.view(nrows, width).numpy()
    else:
        h = x
        d_np, h_np = np.empty((0, 0), dtype=_np_dtype(dtype)), x2.numpy()
    if x2.numel():
        _fwd_kernel(x2.numpy(), d_np, delta is not None, _weight_np(weight, width, dtype, 1),
                    _weight_np(bias, width, dtype, 0), float(eps), rms,
                    y.view(nrows, width).numpy(), h_np, mean.numpy(), rstd.numpy())
    return y, h, mean, rstd


def add_norm_bwd(dy, dh, h, mean, rstd, weight, kind, need_weight_grads=True):
    """Backward: returns (dh_total, dweight, dbias) where dh_total = dh + dnorm/dh . dy is the
    gradient of both x and delta; dweight / dbias are None unless need_weight_grads."""
    rms = _rms_flag(kind)
    dtype = check_floats("add_norm_bwd", dy=dy, dh=dh, h=h, weight=weight)
    shape = h.shape
    h2 = as_rows(h.detach())
    nrows, width = h2.shape
    dx = empty(shape, dtype)
    nchunks = max(1, min(nrows, num_threads()))
    npd = _np_dtype(dtype)
    wcols = width if need_weight_grads else 0
    dw_part = np.empty((nchunks, wcols), dtype=npd)
    db_part = np.empty((nchunks, wcols), dtype=npd)
    if nrows and width:
        _bwd_kernel(as_rows(dy.detach()).numpy(),
                    as_rows(dh.detach()).numpy() if dh is not None else np.empty((0, 0), npd),
                    dh is not None, h2.numpy(), np_view(mean), np_view(rstd),
                    _weight_np(weight, width, dtype, 1), rms, bool(need_weight_grads), nchunks,
                    dx.view(nrows, width).numpy(), dw_part, db_part)
    elif dh is not None:
        dx.copy_(dh)
    else:
        dx.zero_()
    if not need_weight_grads:
        return dx, None, None
    if nrows == 0:
        return dx, torch.zeros(width, dtype=dtype), torch.zeros(width, dtype=dtype)
    dw = torch.from_numpy(dw_part).sum(0)
    db = torch.from_numpy(db_part).sum(0)
    return dx, dw, db


class AddNormFunction(torch.autograd.Function):
    """apply(x, delta, weight, bias, eps, kind) -> (y, h) if delta is given, else y."""

    @staticmethod
    def forward(ctx, x, delta, weight, bias, eps, kind):
        y, h, mean, rstd = add_norm_fwd(x, delta, weight, bias, eps, kind)
        ctx.set_materialize_grads(False)
        ctx.kind = kind
        ctx.has_delta = delta is not None
        ctx.has_bias = bias is not None
        ctx.save_for_backward(h if delta is not None else x, mean, rstd, weight)
        if delta is None:
            return y
        return y, h

    @staticmethod
    def backward(ctx, dy, dh=None):
        h, mean, rstd, weight = ctx.saved_tensors
        nx, nd, nw, nb = ctx.needs_input_grad[:4]
        if dy is None:
            if dh is None:
                return None, None, None, None, None, None
            dx, dw, db = dh, None, None
        else:
            dx, dw, db = add_norm_bwd(dy, dh, h, mean, rstd, weight, ctx.kind,
                                      need_weight_grads=bool(nw or nb))
        return (dx if nx else None, dx if (nd and ctx.has_delta) else None,
                dw if nw else None, db if (nb and ctx.has_bias) else None, None, None)


def add_norm(x, delta, weight, bias, eps, kind):
    """Fused residual add + norm, autograd-enabled: returns (y, h).

    h = x + delta (delta None: h is x itself); y = norm(h) * weight (+ bias) with kind
    "layernorm" or "rmsnorm" over the last dim. CPU float32 / float64 tensors."""
    _rms_flag(kind)
    _check(x, delta, weight, bias)
    if delta is None:
        return AddNormFunction.apply(x, None, weight, bias, eps, kind), x
    y, h = AddNormFunction.apply(x, delta, weight, bias, eps, kind)
    return y, h
