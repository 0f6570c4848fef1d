"""SwiGLU and exact (erf) GELU on the CPU with Numba, forward and backward.

``swiglu(gu)``: gu [..., 2h] holds gate = gu[..., :h] and up = gu[..., h:];
    out = silu(gate) * up = gate * sigmoid(gate) * up, shape [..., h].
    Backward: dgate = dout * up * s * (1 + gate * (1 - s)), dup = dout * gate * s (s the
    sigmoid), returned together as dgu [..., 2h].
``gelu(x)`` = 0.5 x (1 + erf(x / sqrt 2)) = x Phi(x) (the exact form, not the tanh
    approximation), computed as x * (1 - erfc(|x|/sqrt 2)/2) or x * erfc(|x|/sqrt 2)/2 by
    sign, so that small negative-tail values keep their relative accuracy.
    Backward: dx = dy * (0.5 (1 + erf(x / sqrt 2)) + x exp(-x^2 / 2) / sqrt(2 pi)).

Both run in parallel over rows (swiglu) or over fixed-size chunks of the flattened tensor
(gelu, elementwise); exp and erfc are the vectorisable float32 versions of ``_common`` (libm
for float64).
"""

from __future__ import annotations

import math

from ._common import (
    as_rows,
    check_floats,
    empty,
    ferfc,
    fexp,
    jitable,
    kernel,
    prange,
    unary_autograd,
)

__all__ = ["swiglu", "gelu", "swiglu_fwd", "swiglu_bwd", "gelu_fwd", "gelu_bwd",
           "SwiGLUFunction", "GELUFunction"]

_CHUNK = 16384  # elements per parallel task for the elementwise GELU kernels


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@kernel(parallel=True)
def _swiglu_fwd_kernel(gu, out):
    """gu [N, 2h] -> out [N, h]."""
    n, hw = out.shape
    one = gu.dtype.type(1)
    for i in prange(n):
        g = gu[i, :hw]
        u = gu[i, hw:]
        o = out[i]
        for c in range(hw):
            gc = g[c]
            s = one / (one + fexp(-gc))
            o[c] = gc * s * u[c]


@kernel(parallel=True)
def _swiglu_bwd_kernel(gu, dout, dgu):
    """gu [N, 2h], dout [N, h] -> dgu [N, 2h]."""
    n, hw = dout.shape
    one = gu.dtype.type(1)
    for i in prange(n):
        g = gu[i, :hw]
        u = gu[i, hw:]
        d = dout[i]
        dg = dgu[i, :hw]
        du = dgu[i, hw:]
        for c in range(hw):
            gc = g[c]
            s = one / (one + fexp(-gc))
            dc = d[c]
            dg[c] = dc * u[c] * s * (one + gc * (one - s))
            du[c] = dc * gc * s


@jitable
def _gelu_fwd_chunk(x, y, i0, i1):
    half = x.dtype.type(0.5)
    one = x.dtype.type(1)
    rsqrt2 = x.dtype.type(1 / math.sqrt(2))
    xs = x[i0:i1]
    ys = y[i0:i1]
    for i in range(xs.shape[0]):  # from 0: numba then knows i >= 0 (no wraparound code)
        v = xs[i]
        e = half * ferfc(abs(v) * rsqrt2)  # Phi(-|v|), accurate in the tail
        cdf = e if v < 0 else one - e
        ys[i] = v * cdf


@jitable
def _gelu_bwd_chunk(x, dy, dx, i0, i1):
    half = x.dtype.type(0.5)
    one = x.dtype.type(1)
    rsqrt2 = x.dtype.type(1 / math.sqrt(2))
    rsqrt2pi = x.dtype.type(1 / math.sqrt(2 * math.pi))
    xs = x[i0:i1]
    dys = dy[i0:i1]
    dxs = dx[i0:i1]
    for i in range(xs.shape[0]):
        v = xs[i]
        e = half * ferfc(abs(v) * rsqrt2)
        cdf = e if v < 0 else one - e
        pdf = fexp(-half * v * v) * rsqrt2pi
        dxs[i] = dys[i] * (cdf + v * pdf)


# The chunk bodies are separate (jitable) functions: LLVM vectorises them as plain loops; the
# same loop written inline in the prange body was not vectorised (3x slower, measured).
@kernel(parallel=True)
def _gelu_fwd_kernel(x, y, chunk):
    n = x.shape[0]
    for t in prange((n + chunk - 1) // chunk):
        _gelu_fwd_chunk(x, y, t * chunk, min(n, (t + 1) * chunk))


@kernel(parallel=True)
def _gelu_bwd_kernel(x, dy, dx, chunk):
    n = x.shape[0]
    for t in prange((n + chunk - 1) // chunk):
        _gelu_bwd_chunk(x, dy, dx, t * chunk, min(n, (t + 1) * chunk))


# ----------------------------------------------------------------------------------------------
# torch-facing functions
# ----------------------------------------------------------------------------------------------
def _check_swiglu(gu):
    check_floats("swiglu", gu=gu)
    if gu.dim() == 0 or gu.shape[-1] % 2:
        raise ValueError(f"swiglu: the last dim of gu must be even (gate | up), got shape "
                         f"{tuple(gu.shape)}")


def swiglu_fwd(gu):
    _check_swiglu(gu)
    hw = gu.shape[-1] // 2
    out = empty(gu.shape[:-1] + (hw,), gu.dtype)
    if out.numel():
        _swiglu_fwd_kernel(as_rows(gu.detach()).numpy(), out.view(-1, hw).numpy())
    return out


def swiglu_bwd(dout, gu):
    check_floats("swiglu_bwd", dout=dout, gu=gu)
    hw = gu.shape[-1] // 2
    dgu = empty(gu.shape, gu.dtype)
    if dout.numel():
        _swiglu_bwd_kernel(as_rows(gu.detach()).numpy(), as_rows(dout.detach()).numpy(),
                           dgu.view(-1, 2 * hw).numpy())
    else:
        dgu.zero_()
    return dgu


def gelu_fwd(x):
    check_floats("gelu", x=x)
    y = empty(x.shape, x.dtype)
    if x.numel():
        _gelu_fwd_kernel(x.detach().contiguous().view(-1).numpy(), y.view(-1).numpy(), _CHUNK)
    return y


def gelu_bwd(dy, x):
    check_floats("gelu_bwd", dy=dy, x=x)
    dx = empty(x.shape, x.dtype)
    if x.numel():
        _gelu_bwd_kernel(x.detach().contiguous().view(-1).numpy(),
                         dy.detach().contiguous().view(-1).numpy(), dx.view(-1).numpy(),
                         _CHUNK)
    return dx


SwiGLUFunction = unary_autograd("SwiGLUFunction", swiglu_fwd, swiglu_bwd)
GELUFunction = unary_autograd("GELUFunction", gelu_fwd, gelu_bwd)


def swiglu(gu):
    """silu(gate) * up with gu = [gate | up] on the last dim; autograd-enabled."""
    _check_swiglu(gu)
    return SwiGLUFunction.apply(gu)


def gelu(x):
    """Exact erf GELU, autograd-enabled."""
    check_floats("gelu", x=x)
    return GELUFunction.apply(x)
