"""Numba CPU backend of ``example.shortconv``: forward and backward kernels parallel over
channels, wrapped in a ``torch.autograd.Function``. This module (and numba) is imported on the
backend's first call, not when the plugin loads."""

import math

import numpy as np
import torch
from numba import njit, prange

from blockzoo.kernels import empty  # NaN-poisoned inside the conformance kit's checks


@njit(parallel=True, cache=True)
def _forward(x, w, silu, z, y):
    b_n, t_n, c_n = x.shape
    k_n = w.shape[1]
    for c in prange(c_n):
        for b in range(b_n):
            for t in range(t_n):
                acc = 0.0
                for j in range(min(k_n, t + 1)):
                    acc += w[c, j] * x[b, t - j, c]
                z[b, t, c] = acc
                y[b, t, c] = acc / (1.0 + math.exp(-acc)) if silu else acc


@njit(inline="always")
def _dz(dy, z, silu):
    """d loss / d z from d loss / d y (silu'(z) = s (1 + z (1 - s)), s = sigmoid(z))."""
    if not silu:
        return dy
    s = 1.0 / (1.0 + math.exp(-z))
    return dy * s * (1.0 + z * (1.0 - s))


@njit(parallel=True, cache=True)
def _backward(x, w, z, dy, silu, dx, dw):
    b_n, t_n, c_n = x.shape
    k_n = w.shape[1]
    for c in prange(c_n):
        for j in range(k_n):
            dw[c, j] = 0.0
        for b in range(b_n):
            for t in range(t_n):
                g = _dz(dy[b, t, c], z[b, t, c], silu)
                for j in range(min(k_n, t + 1)):
                    dw[c, j] += g * x[b, t - j, c]
            for t in range(t_n):
                acc = 0.0
                for j in range(min(k_n, t_n - t)):
                    acc += w[c, j] * _dz(dy[b, t + j, c], z[b, t + j, c], silu)
                dx[b, t, c] = acc


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


class _ShortConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, silu):
        xc, wc = x.detach().contiguous(), weight.detach().contiguous()
        z = torch.empty_like(xc)
        y = empty(xc.shape, dtype=xc.dtype)
        _forward(xc.numpy(), wc.numpy(), silu, z.numpy(), y.numpy())
        ctx.save_for_backward(xc, wc, z)
        ctx.silu = silu
        return y

    @staticmethod
    def backward(ctx, dy):
        xc, wc, z = ctx.saved_tensors
        dx = empty(xc.shape, dtype=xc.dtype)
        dw = empty(wc.shape, dtype=wc.dtype)
        _backward(xc.numpy(), wc.numpy(), z.numpy(), _np(dy.to(xc.dtype)), ctx.silu,
                               dx.numpy(), dw.numpy())
        return dx, dw, None


def shortconv_numba(x, weight, kernel_size: int = 4, activation: str = "silu"):
    from .reference import check_shapes
    check_shapes(x, weight, kernel_size)
    if x.dtype != weight.dtype:
        raise ValueError(f"example.shortconv (numba): x is {x.dtype} but weight is {weight.dtype}")
    return _ShortConv.apply(x, weight, activation == "silu")
