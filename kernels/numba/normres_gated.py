"""Fused residual (plain or gated) + DyT squash on the CPU with Numba (normres.dyt, normres.agu).

``gated_dyt(x, delta, weight, bias, alpha, gate, gate_w, variant) -> (y, h)``:
    add        h = x + delta
    gate_dyt   h = g * x + (1 - g) * delta,  g = sigmoid(gate [+ gate_w * x])
    scale_dyt  h = x + g * delta
    (delta None: h is x itself, the gate is unused)
    y = weight * tanh(alpha * h) + bias          (weight / bias / gate per channel, alpha scalar)

Forward: one row-parallel pass (prange), h and y written once. Backward: one pass over
contiguous chunks of rows (one chunk per thread) that recomputes g and h (gated variants; DyT
reads the saved h), writes dx (and ddelta), and sums dweight, dbias, dalpha, dgate, dgate_w
into the chunk's own row of [chunks, W] buffers, summed afterwards (no contention).
tanh and sigmoid go through ``fexp`` (a vectorisable float32 exp; libm for float64).
"""

from __future__ import annotations

import numpy as np
import torch

from .._alloc import _fill, poison_enabled
from ._common import as_rows, check_floats, fexp, kernel, np_view, num_threads, prange
from ._common import empty as _empty

__all__ = ["gated_dyt", "gated_dyt_fwd", "gated_dyt_bwd", "GatedDyTFunction", "MODES"]

MODES = {"add": 0, "gate_dyt": 1, "scale_dyt": 2}


def _out(shape, dtype) -> torch.Tensor:
    """Outputs: numba's huge-page-advised allocation, NaN-poisoned inside kernels._alloc.poisoned()."""
    t = _empty(shape, dtype)
    return _fill(t) if poison_enabled() else t


@kernel(parallel=True)
def _fwd_kernel(x, d, has_d, mode, w, b, alpha, gl, gw, has_gw, y, h):
    """x, d [N, W] -> y [N, W], h [N, W] (written if has_d); w, b, gl, gw [W] (ones / zeros
    stand in for None); alpha a scalar."""
    n, width = x.shape
    one = x.dtype.type(1)
    two = x.dtype.type(2)
    a = x.dtype.type(alpha)
    for i in prange(n):
        xi = x[i]
        yi = y[i]
        if has_d:
            di = d[i]
            hi = h[i]
            if mode == 0:
                for c in range(width):
                    hi[c] = xi[c] + di[c]
            else:
                for c in range(width):
                    z = gl[c]
                    if has_gw:
                        z += gw[c] * xi[c]
                    g = one / (one + fexp(-z))
                    if mode == 1:
                        hi[c] = di[c] + g * (xi[c] - di[c])
                    else:
                        hi[c] = xi[c] + g * di[c]
            src = hi
        else:
            src = xi
        for c in range(width):
            u = a * src[c]
            e = fexp(-two * abs(u))
            t = (one - e) / (one + e)
            t = -t if u < 0 else t
            yi[c] = t * w[c] + b[c]


@kernel(parallel=True)
def _bwd_kernel(dy, dh, has_dh, hx, d, mode, w, alpha, gl, gw, has_gw, nchunks,
                dx, dd, dw_part, db_part, da_part, dg_part, dgw_part):
    """hx is h (mode 0) or x (gated, with d = delta). Writes dx (and dd for gated modes) and
    the per-chunk partial sums [nchunks, W] of dweight, dbias, dalpha (per column), dgate,
    dgate_w (the last two only for gated modes)."""
    n, width = dy.shape
    zero = dy.dtype.type(0)
    one = dy.dtype.type(1)
    two = dy.dtype.type(2)
    a = dy.dtype.type(alpha)
    rows_per = (n + nchunks - 1) // nchunks
    for ch in prange(nchunks):
        r0 = ch * rows_per
        r1 = min(n, r0 + rows_per)
        dwp = dw_part[ch]
        dbp = db_part[ch]
        dap = da_part[ch]
        dgp = dg_part[ch]
        dgwp = dgw_part[ch]
        for c in range(width):
            dwp[c] = zero
            dbp[c] = zero
            dap[c] = zero
        if mode != 0:
            for c in range(width):
                dgp[c] = zero
                dgwp[c] = zero
        for i in range(r0, r1):
            dyi = dy[i]
            xi = hx[i]
            dxi = dx[i]
            if mode == 0:
                for c in range(width):
                    hn = xi[c]
                    u = a * hn
                    e = fexp(-two * abs(u))
                    t = (one - e) / (one + e)
                    t = -t if u < 0 else t
                    dpre = dyi[c] * w[c] * (one - t * t)
                    v = dpre * a
                    if has_dh:
                        v += dh[i, c]
                    dxi[c] = v
                    dwp[c] += dyi[c] * t
                    dbp[c] += dyi[c]
                    dap[c] += dpre * hn
            else:
                di = d[i]
                ddi = dd[i]
                for c in range(width):
                    xv = xi[c]
                    dv = di[c]
                    z = gl[c]
                    if has_gw:
                        z += gw[c] * xv
                    g = one / (one + fexp(-z))
                    if mode == 1:
                        hn = dv + g * (xv - dv)
                    else:
                        hn = xv + g * dv
                    u = a * hn
                    e = fexp(-two * abs(u))
                    t = (one - e) / (one + e)
                    t = -t if u < 0 else t
                    dpre = dyi[c] * w[c] * (one - t * t)
                    dhn = dpre * a
                    if has_dh:
                        dhn += dh[i, c]
                    gg = g * (one - g)
                    if mode == 1:
                        dz = dhn * (xv - dv) * gg
                        dxv = dhn * g
                        ddv = dhn - dxv
                    else:
                        dz = dhn * dv * gg
                        dxv = dhn
                        ddv = dhn * g
                    if has_gw:
                        dxv += dz * gw[c]
                    dxi[c] = dxv
                    ddi[c] = ddv
                    dwp[c] += dyi[c] * t
                    dbp[c] += dyi[c]
                    dap[c] += dpre * hn
                    dgp[c] += dz
                    dgwp[c] += dz * xv


# ----------------------------------------------------------------------------------------------
# torch-facing functions
# ----------------------------------------------------------------------------------------------
def _np_dtype(dtype):
    return np.float32 if dtype == torch.float32 else np.float64


def _vec(t, width, dtype, fill):
    if t is None:
        return np.full(width, fill, dtype=_np_dtype(dtype))
    return np_view(t.detach().reshape(-1))


def _alpha(alpha) -> float:
    return float(alpha.detach().reshape(-1)[0]) if isinstance(alpha, torch.Tensor) else float(alpha)


def _check(x, delta, weight, bias, alpha, gate, gate_w):
    dtype = check_floats("gated_dyt", x=x, delta=delta, weight=weight, bias=bias,
                         alpha=alpha if isinstance(alpha, torch.Tensor) else None, gate=gate, gate_w=gate_w)
    if x.dim() == 0:
        raise ValueError("gated_dyt: x must have at least one dimension")
    width = x.shape[-1]
    if delta is not None and delta.shape != x.shape:
        raise ValueError(f"gated_dyt: delta {tuple(delta.shape)} must have x's shape {tuple(x.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("gate", gate), ("gate_w", gate_w)):
        if t is not None and tuple(t.shape) != (width,):
            raise ValueError(f"gated_dyt: {name} must have shape ({width},), got {tuple(t.shape)}")
    if isinstance(alpha, torch.Tensor) and alpha.numel() != 1:
        raise ValueError(f"gated_dyt: alpha must have one element, got shape {tuple(alpha.shape)}")
    return dtype


def gated_dyt_fwd(x, delta, weight, bias, alpha, gate, gate_w, mode):
    """Forward only: (y, h); h is x itself when delta is None."""
    dtype = x.dtype
    shape = x.shape
    x2 = as_rows(x.detach())
    nrows, width = x2.shape
    npd = _np_dtype(dtype)
    y = _out(shape, dtype)
    if delta is not None:
        h = _out(shape, dtype)
        d_np, h_np = as_rows(delta.detach()).numpy(), h.view(nrows, width).numpy()
    else:
        h = x
        d_np, h_np = np.empty((0, 0), npd), np.empty((0, 0), npd)
    if x2.numel():
        _fwd_kernel(x2.numpy(), d_np, delta is not None, mode, _vec(weight, width, dtype, 1),
                    _vec(bias, width, dtype, 0), _alpha(alpha), _vec(gate, width, dtype, 0),
                    _vec(gate_w, width, dtype, 0), gate_w is not None,
                    y.view(nrows, width).numpy(), h_np)
    return y, h


def gated_dyt_bwd(dy, dh, hx, delta, weight, alpha, gate, gate_w, mode):
    """Backward: (dx, ddelta or None (mode 0: ddelta = dx), dw, db, dalpha [1], dgate, dgate_w)
    with parameter gradients in the activations' dtype (dgate / dgate_w None for mode 0)."""
    dtype = hx.dtype
    shape = hx.shape
    h2 = as_rows(hx.detach())
    nrows, width = h2.shape
    npd = _np_dtype(dtype)
    dx = _out(shape, dtype)
    dd = _out(shape, dtype) if mode != 0 else None
    nchunks = max(1, min(nrows, num_threads()))
    gw_cols = width if mode != 0 else 0
    parts = [np.zeros((nchunks, width), npd) for _ in range(3)] + \
            [np.zeros((nchunks, gw_cols), npd) for _ in range(2)]
    if nrows and width:
        _bwd_kernel(as_rows(dy.detach()).numpy(),
                    as_rows(dh.detach()).numpy() if dh is not None else np.empty((0, 0), npd),
                    dh is not None, h2.numpy(),
                    as_rows(delta.detach()).numpy() if mode != 0 else np.empty((0, 0), npd), mode,
                    _vec(weight, width, dtype, 1), _alpha(alpha), _vec(gate, width, dtype, 0),
                    _vec(gate_w, width, dtype, 0), gate_w is not None, nchunks,
                    dx.view(nrows, width).numpy(),
                    dd.view(nrows, width).numpy() if dd is not None else np.empty((0, 0), npd),
                    *parts)
    sums = [torch.from_numpy(p).sum(0) for p in parts]
    dw, db, dacol, dg, dgw = sums
    da = dacol.sum().reshape(1)
    if mode == 0:
        dg = dgw = None
    return dx, dd, dw, db, da, dg, dgw


class GatedDyTFunction(torch.autograd.Function):
    """apply(x, delta, weight, bias, alpha, gate, gate_w, mode) -> (y, h) (delta given) or y."""

    @staticmethod
    def forward(ctx, x, delta, weight, bias, alpha, gate, gate_w, mode):
        y, h = gated_dyt_fwd(x, delta, weight, bias, alpha, gate, gate_w, mode)
        ctx.mode = mode
        ctx.has_delta = delta is not None
        ctx.has_bias = bias is not None
        hx = h if (mode == 0 and delta is not None) else x
        ctx.save_for_backward(hx, delta if mode != 0 else None, weight, alpha, gate, gate_w)
        if delta is None:
            return y
        return y, h

    @staticmethod
    def backward(ctx, dy, dh=None):
        hx, delta, weight, alpha, gate, gate_w = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dd, dw, db, da, dg, dgw = gated_dyt_bwd(dy, dh, hx, delta, weight, alpha, gate, gate_w,
                                                    ctx.mode)
        if dd is None:
            dd = dx
        return (dx if need[0] else None,
                dd if (need[1] and ctx.has_delta) else None,
                dw if (need[2] and weight is not None) else None,
                db if (need[3] and ctx.has_bias) else None,
                da.reshape(alpha.shape) if need[4] else None,
                dg if (need[5] and dg is not None) else None,
                dgw if (need[6] and dgw is not None) else None,
                None)


def gated_dyt(x, delta=None, weight=None, bias=None, alpha=0.5, gate=None, gate_w=None,
              variant: str = "add"):
    """Fused (gated) residual + DyT, autograd-enabled: returns (y, h). CPU float32 / float64."""
    if variant not in MODES:
        raise ValueError(f"gated_dyt: variant must be one of {tuple(MODES)}, got {variant!r}")
    _check(x, delta, weight, bias, alpha, gate, gate_w)
    mode = MODES[variant]
    if mode == 0 or gate is None or delta is None:
        mode, gate, gate_w = 0, None, None
    if not isinstance(alpha, torch.Tensor):
        alpha = torch.full((1,), float(alpha), dtype=x.dtype)
    if delta is None:
        return GatedDyTFunction.apply(x, None, weight, bias, alpha, None, None, 0), x
    y, h = GatedDyTFunction.apply(x, delta, weight, bias, alpha, gate, gate_w, mode)
    return y, h
