"""Mixture-of-Depths token routing (``depth.mod``) on the CPU with Numba: the gather and the
routed scatter (same contract as ``kernels/triton/mod.py``), forward and backward, parallel over
(batch, routed row). The top-k selection is the shared ``plugins.depth.reference.mod_select``.
"""

from __future__ import annotations

import math

import torch

from ._common import check_floats, empty, kernel, np_view, prange

__all__ = ["mod_gather", "mod_scatter"]


@kernel(parallel=True)
def _rows(src, dst, idx, gather):
    B, K = idx.shape
    C = src.shape[2]
    for bj in prange(B * K):
        b = bj // K
        j = bj - b * K
        p = idx[b, j]
        for c in range(C):
            if gather:
                dst[b, j, c] = src[b, p, c]
            else:
                dst[b, p, c] = src[b, j, c]


@kernel(parallel=True)
def _update(x, r, y, idx, out, sigmoid):
    B, K = idx.shape
    C = x.shape[2]
    for bj in prange(B * K):
        b = bj // K
        j = bj - b * K
        p = idx[b, j]
        w = 1.0 / (1.0 + math.exp(-r[b, p])) if sigmoid else r[b, p]
        for c in range(C):
            out[b, p, c] = x[b, p, c] + w * y[b, j, c]


@kernel(parallel=True)
def _update_bwd(g, r, y, idx, dy, dr, sigmoid):
    B, K = idx.shape
    C = g.shape[2]
    for bj in prange(B * K):
        b = bj // K
        j = bj - b * K
        p = idx[b, j]
        w = 1.0 / (1.0 + math.exp(-r[b, p])) if sigmoid else r[b, p]
        dot = 0.0
        for c in range(C):
            dot += g[b, p, c] * y[b, j, c]
            dy[b, j, c] = w * g[b, p, c]
        dr[b, p] = (w * (1.0 - w) if sigmoid else 1.0) * dot


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, idx):
        out = empty((x.shape[0], idx.shape[1], x.shape[2]), x.dtype)
        if out.numel():
            _rows(np_view(x), out.numpy(), idx.numpy(), True)
        ctx.save_for_backward(idx)
        ctx.t = x.shape[1]
        return out

    @staticmethod
    def backward(ctx, g):
        (idx,) = ctx.saved_tensors
        dx = torch.zeros((g.shape[0], ctx.t, g.shape[2]), dtype=g.dtype)
        if g.numel():
            _rows(np_view(g), dx.numpy(), idx.numpy(), False)
        return dx, None


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, router, y, idx, sigmoid):
        out = x.detach().clone().contiguous()
        if idx.numel() and x.shape[2]:
            _update(np_view(x), np_view(router), np_view(y), idx.numpy(), out.numpy(), sigmoid)
        ctx.save_for_backward(router, y, idx)
        ctx.sigmoid = sigmoid
        return out

    @staticmethod
    def backward(ctx, g):
        router, y, idx = ctx.saved_tensors
        dy = empty(tuple(y.shape), y.dtype)
        dr = torch.zeros_like(router)
        if idx.numel():
            _update_bwd(np_view(g), np_view(router), np_view(y), idx.numpy(), dy.numpy(), dr.numpy(),
                        ctx.sigmoid)
        else:
            dy.zero_()
        return g, dr, dy, None, None


def mod_gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, T, C], index [B, k] -> [B, k, C], autograd-enabled (CPU float32/float64)."""
    check_floats("mod_gather", x=x)
    return _Gather.apply(x, index.to(torch.int64).contiguous())


def mod_scatter(x, router, y, index=None, capacity: float = 0.125, gate: str = "sigmoid") -> torch.Tensor:
    """The ``depth.mod`` op: out = x; out[idx] += gate(router[idx]) * y. Autograd-enabled."""
    from ...plugins.depth.reference import resolve_index
    check_floats("depth.mod", x=x, router=router, y=y)
    if gate not in ("sigmoid", "raw"):
        raise ValueError(f"gate must be 'sigmoid' or 'raw', got {gate!r}")
    idx = resolve_index(x, router, y, index, capacity).contiguous()
    return _Scatter.apply(x, router, y, idx, gate == "sigmoid")
