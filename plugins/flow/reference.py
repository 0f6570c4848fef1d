"""PyTorch references of the flow layers (the oracles), forward and inverse with log-det.

Layout: x [B, D] (any leading dims are allowed by the modules, which flatten them). Every op
returns ``(y, logdet)`` with ``logdet`` [B] the log |det dy/dx| of the direction that ran
(the inverse returns the log-det of the inverse map, i.e. minus the forward's at the same point).
Math in fp32 (fp64 for fp64 inputs), results in x's dtype.

* ``flow.coupling`` (affine coupling, Dinh et al. 2017, RealNVP). A fixed mask splits the dims
  into pass-through (conditioning) dims and transformed dims. The conditioner network (ordinary
  torch layers in the module) sees the pass-through dims and outputs s, t [B, D]; the op does
  ``log_s = clamp * tanh(s / clamp)`` (soft clamp, ours), then on the transformed dims
  ``y = x * exp(log_s) + t`` and ``logdet = sum(log_s)``; pass-through dims are copied, and
  s, t on them are ignored (their gradient is zero).
  Inverse: ``x = (y - t) * exp(-log_s)``, ``logdet = -sum(log_s)``.
* ``flow.actnorm`` (Glow, Kingma & Dhariwal 2018): ``y = (x + loc) * exp(log_scale)``,
  ``logdet = sum(log_scale)`` per row. Inverse ``x = y * exp(-log_scale) - loc``.
* ``flow.inv1x1`` (Glow's invertible 1x1 convolution in LU form; on flat vectors it is a
  D x D linear map): ``W = L (U + diag(sign * exp(log_s)))`` with L unit lower triangular (the
  strictly lower part of ``lower``), U strictly upper (of ``upper``); ``y = x W^T``,
  ``logdet = sum(log|sign| + log_s)``. The fixed permutation P of Glow's ``W = P L U`` is applied
  by the module (a permutation has log-det 0). Inverse by two triangular solves.
* ``flow.aif`` surrogate: ``sum(vjf * stopgrad(jgv))`` per row, the Hutchinson-style estimate
  whose gradient is that of log|det f'(x)| (Draxler et al. 2024); see core/flow_model.py.
"""

from __future__ import annotations

import torch


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def coupling_mask(dim: int, mask: str = "alternate", parity: int | None = 0,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """bool [dim]: True for the pass-through (conditioning) dims."""
    p = int(parity or 0)
    col = torch.arange(dim, device=device)
    if mask == "alternate":
        return (col % 2) == p
    if mask == "half":
        first = col < dim // 2
        return first if p == 0 else ~first
    raise ValueError(f"coupling mask must be 'alternate' or 'half', got {mask!r}")


def _check_rows(name: str, x: torch.Tensor, **others: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name}: x must be [B, D], got shape {tuple(x.shape)}")
    for k, t in others.items():
        if t is not None and tuple(t.shape) != tuple(x.shape):
            raise ValueError(f"{name}: {k} must have x's shape {tuple(x.shape)}, got {tuple(t.shape)}")


def coupling_reference(x, s, t, mask: str = "alternate", parity: int | None = 0, clamp: float = 2.0,
                       inverse: bool = False):
    _check_rows("flow.coupling", x, s=s, t=t)
    acc = _acc(x.dtype)
    xf, sf, tf = x.to(acc), s.to(acc), t.to(acc)
    keep = coupling_mask(x.shape[-1], mask, parity, x.device)
    log_s = clamp * torch.tanh(sf / clamp)
    log_s = torch.where(keep, torch.zeros_like(log_s), log_s)
    if not inverse:
        y = torch.where(keep, xf, xf * torch.exp(log_s) + tf)
        ld = log_s.sum(-1)
    else:
        y = torch.where(keep, xf, (xf - tf) * torch.exp(-log_s))
        ld = -log_s.sum(-1)
    return y.to(x.dtype), ld.to(x.dtype)


def actnorm_reference(x, loc, log_scale, inverse: bool = False):
    if x.dim() != 2:
        raise ValueError(f"flow.actnorm: x must be [B, D], got shape {tuple(x.shape)}")
    d = x.shape[-1]
    for k, p in (("loc", loc), ("log_scale", log_scale)):
        if tuple(p.shape) != (d,):
            raise ValueError(f"flow.actnorm: {k} must have shape ({d},), got {tuple(p.shape)}")
    acc = _acc(x.dtype)
    xf, lf, sf = x.to(acc), loc.to(acc), log_scale.to(acc)
    # the log-det is one sum of D parameters, the same for every row: summed in fp64 (it may be
    # much smaller than its terms, and no per-row averaging hides its rounding)
    tot = sf.double().sum()
    if not inverse:
        y = (xf + lf) * torch.exp(sf)
        ld = tot
    else:
        y = xf * torch.exp(-sf) - lf
        ld = -tot
    return y.to(x.dtype), ld.expand(x.shape[0]).to(x.dtype)


def lu_weight(lower, upper, log_s, sign):
    """W = L (U + diag(sign * exp(log_s))), L unit lower, U strictly upper."""
    d = lower.shape[-1]
    eye = torch.eye(d, dtype=lower.dtype, device=lower.device)
    L = torch.tril(lower, -1) + eye
    U = torch.triu(upper, 1) + torch.diag(sign * torch.exp(log_s))
    return L, U


def inv1x1_reference(x, lower, upper, log_s, sign, inverse: bool = False):
    if x.dim() != 2:
        raise ValueError(f"flow.inv1x1: x must be [B, D], got shape {tuple(x.shape)}")
    d = x.shape[-1]
    for k, p, shp in (("lower", lower, (d, d)), ("upper", upper, (d, d)), ("log_s", log_s, (d,)),
                      ("sign", sign, (d,))):
        if tuple(p.shape) != shp:
            raise ValueError(f"flow.inv1x1: {k} must have shape {shp}, got {tuple(p.shape)}")
    acc = _acc(x.dtype)
    L, U = lu_weight(lower.to(acc), upper.to(acc), log_s.to(acc), sign.to(acc))
    xf = x.to(acc)
    ld = (torch.log(sign.to(acc).abs()) + log_s.to(acc)).sum()
    if not inverse:
        y = xf @ (L @ U).T
    else:
        a = torch.linalg.solve_triangular(L, xf.T, upper=False, unitriangular=True)
        y = torch.linalg.solve_triangular(U, a, upper=True).T
        ld = -ld
    return y.to(x.dtype), ld.expand(x.shape[0]).to(x.dtype)


def aif_surrogate_reference(vjf, jgv):
    """Per-row ``sum(vjf * stopgrad(jgv))``: vjf = v^T f'(x), jgv = g'(z) v (both [B, D])."""
    _check_rows("flow.aif", vjf, jgv=jgv)
    acc = _acc(vjf.dtype)
    return (vjf.to(acc) * jgv.detach().to(acc)).sum(-1).to(vjf.dtype)
