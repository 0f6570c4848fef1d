"""Mixture-of-Depths token routing (``depth.mod``) in Triton: the gather / routed-scatter path.

* :func:`mod_gather` ``(x [B, T, C], index [B, k]) -> x[b, index[b]]`` [B, k, C]; backward
  writes the row gradients back to the routed positions (zeros elsewhere).
* :func:`mod_scatter` (the ``depth.mod`` op) ``(x, router, y, index=None) -> out``:
  ``out = x``, and ``out[b, idx] = x[b, idx] + gate(router[b, idx]) * y[b, j]`` for the routed
  rows; backward ``dx = dout``, ``dy = gate * dout[idx]``, ``drouter[idx] = gate' *
  rowsum(dout[idx] * y)`` (zeros elsewhere).

The top-k selection is the shared torch function ``plugins.depth.reference.mod_select``
(positions unique and sorted, so the scatters need no atomics). Each program handles BLOCK_R
routed rows and loops over the channels in BLOCK_C steps.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._alloc import empty
from .attention import _interpreting

__all__ = ["mod_gather", "mod_scatter"]

BLOCK_R = 16


def _block_c(c: int) -> int:
    return min(256 if not _interpreting() else 64, max(16, triton.next_power_of_2(c)))


@triton.jit
def _rows_kernel(SRC, DST, IDX, K, C, s_sb, s_st, s_db, s_dt,
                 GATHER: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """GATHER: dst[b, j] = src[b, idx[b, j]]; else dst[b, idx[b, j]] = src[b, j]."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    j = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    jm = j < K
    pos = tl.load(IDX + b * K + j, mask=jm, other=0)
    if GATHER:
        src_rows, dst_rows = pos, j
    else:
        src_rows, dst_rows = j, pos
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        m = jm[:, None] & (cols[None, :] < C)
        x = tl.load(SRC + b * s_sb + src_rows[:, None] * s_st + cols[None, :], mask=m, other=0.0)
        tl.store(DST + b * s_db + dst_rows[:, None] * s_dt + cols[None, :], x.to(DST.dtype.element_ty), mask=m)


@triton.jit
def _gate(r, SIGMOID: tl.constexpr):
    if SIGMOID:
        return 1.0 / (1.0 + tl.exp(-r))
    return r


@triton.jit
def _update_kernel(X, R, Y, IDX, OUT, T, K, C, s_xb, s_xt, s_yb, s_yt, s_ob, s_ot,
                   SIGMOID: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[b, idx[b, j]] = x[b, idx[b, j]] + gate(r[b, idx[b, j]]) * y[b, j] (fp32 math)."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    j = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    jm = j < K
    pos = tl.load(IDX + b * K + j, mask=jm, other=0)
    w = _gate(tl.load(R + b * T + pos, mask=jm, other=0.0).to(tl.float32), SIGMOID)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        m = jm[:, None] & (cols[None, :] < C)
        x = tl.load(X + b * s_xb + pos[:, None] * s_xt + cols[None, :], mask=m, other=0.0).to(tl.float32)
        y = tl.load(Y + b * s_yb + j[:, None] * s_yt + cols[None, :], mask=m, other=0.0).to(tl.float32)
        tl.store(OUT + b * s_ob + pos[:, None] * s_ot + cols[None, :], (x + w[:, None] * y).to(OUT.dtype.element_ty),
                 mask=m)


@triton.jit
def _update_bwd_kernel(DO, R, Y, IDX, DY, DR, T, K, C, s_db, s_dt, s_yb, s_yt, s_gb, s_gt,
                       SIGMOID: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """dy[b, j] = gate * dout[b, idx]; dr[b, idx] = gate' * rowsum(dout[b, idx] * y[b, j])."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    j = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    jm = j < K
    pos = tl.load(IDX + b * K + j, mask=jm, other=0)
    r = tl.load(R + b * T + pos, mask=jm, other=0.0).to(tl.float32)
    w = _gate(r, SIGMOID)
    dot = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        m = jm[:, None] & (cols[None, :] < C)
        g = tl.load(DO + b * s_db + pos[:, None] * s_dt + cols[None, :], mask=m, other=0.0).to(tl.float32)
        y = tl.load(Y + b * s_yb + j[:, None] * s_yt + cols[None, :], mask=m, other=0.0).to(tl.float32)
        dot += tl.sum(g * y, 1)
        tl.store(DY + b * s_gb + j[:, None] * s_gt + cols[None, :], (w[:, None] * g).to(DY.dtype.element_ty), mask=m)
    if SIGMOID:
        dw = w * (1.0 - w)
    else:
        dw = w * 0.0 + 1.0
    tl.store(DR + b * T + pos, (dw * dot).to(DR.dtype.element_ty), mask=jm)


def _rows(src, dst, idx, gather: bool):
    B, K = idx.shape
    if B == 0 or K == 0 or src.shape[2] == 0:
        return dst
    C = src.shape[2]
    grid = (triton.cdiv(K, BLOCK_R), B)
    _rows_kernel[grid](src, dst, idx, K, C, src.stride(0), src.stride(1), dst.stride(0), dst.stride(1),
                       GATHER=gather, BLOCK_R=BLOCK_R, BLOCK_C=_block_c(C))
    return dst


def _check_dev(*ts):
    for t in ts:
        if t.device.type != "cuda" and not _interpreting():
            raise RuntimeError("depth.mod (triton) needs CUDA tensors (or TRITON_INTERPRET=1 for CPU)")


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, idx):
        x = x.contiguous()
        out = empty((x.shape[0], idx.shape[1], x.shape[2]), dtype=x.dtype, device=x.device)
        _rows(x, out, idx, True)
        ctx.save_for_backward(idx)
        ctx.t = x.shape[1]
        return out

    @staticmethod
    def backward(ctx, g):
        (idx,) = ctx.saved_tensors
        g = g.contiguous()
        dx = torch.zeros((g.shape[0], ctx.t, g.shape[2]), dtype=g.dtype, device=g.device)
        return _rows(g, dx, idx, False), None


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, router, y, idx, sigmoid):
        x, router, y = x.contiguous(), router.contiguous(), y.contiguous()
        out = x.clone()
        B, K = idx.shape
        T, C = x.shape[1], x.shape[2]
        if B and K and C:
            _update_kernel[(triton.cdiv(K, BLOCK_R), B)](
                x, router, y, idx, out, T, K, C, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
                out.stride(0), out.stride(1), SIGMOID=sigmoid, BLOCK_R=BLOCK_R, BLOCK_C=_block_c(C))
        ctx.save_for_backward(router, y, idx)
        ctx.sigmoid = sigmoid
        return out

    @staticmethod
    def backward(ctx, g):
        router, y, idx = ctx.saved_tensors
        g = g.contiguous()
        B, K = idx.shape
        T, C = g.shape[1], g.shape[2]
        dy = empty(tuple(y.shape), dtype=y.dtype, device=y.device)
        dr = torch.zeros_like(router)
        if B and K:
            if C:
                _update_bwd_kernel[(triton.cdiv(K, BLOCK_R), B)](
                    g, router, y, idx, dy, dr, T, K, C, g.stride(0), g.stride(1), y.stride(0), y.stride(1),
                    dy.stride(0), dy.stride(1), SIGMOID=ctx.sigmoid, BLOCK_R=BLOCK_R, BLOCK_C=_block_c(C))
            else:
                dy.zero_()
        return g, dr, dy, None, None


def mod_gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, T, C], index [B, k] (unique positions per row) -> [B, k, C], autograd-enabled."""
    _check_dev(x)
    return _Gather.apply(x, index.to(device=x.device, dtype=torch.int64).contiguous())


def mod_scatter(x, router, y, index=None, capacity: float = 0.125, gate: str = "sigmoid") -> torch.Tensor:
    """The ``depth.mod`` op (see the module docstring), autograd-enabled."""
    from ...plugins.depth.reference import resolve_index
    _check_dev(x, router, y)
    idx = resolve_index(x, router, y, index, capacity).contiguous()
    if gate not in ("sigmoid", "raw"):
        raise ValueError(f"gate must be 'sigmoid' or 'raw', got {gate!r}")
    return _Scatter.apply(x, router, y, idx, gate == "sigmoid")
