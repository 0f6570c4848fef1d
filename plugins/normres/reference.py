"""Reference fused residual add + norm: h = x + delta; y = norm(h) * weight (+ bias).

Returns (y, h): ``h`` is the residual stream that continues past the norm, ``y`` the normalised
input to the next sublayer. Statistics in fp32, outputs in the input dtype.
"""

from __future__ import annotations

import torch


def add_norm_reference(x, delta=None, weight=None, bias=None, eps: float = 1e-5, kind: str = "layernorm"):
    h = x if delta is None else x + delta
    acc = torch.promote_types(h.dtype, torch.float32)
    hf = h.to(acc)
    if kind == "layernorm":
        mean = hf.mean(-1, keepdim=True)
        var = (hf - mean).pow(2).mean(-1, keepdim=True)
        yf = (hf - mean) * torch.rsqrt(var + eps)
    elif kind == "rmsnorm":
        yf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    else:
        raise ValueError(f"unknown norm kind {kind!r}")
    if weight is not None:
        yf = yf * weight.to(acc)
    if bias is not None:
        yf = yf + bias.to(acc)
    return yf.to(x.dtype), h


def layernorm_reference(x, delta=None, weight=None, bias=None, eps: float = 1e-5):
    return add_norm_reference(x, delta, weight, bias, eps, "layernorm")


def rmsnorm_reference(x, delta=None, weight=None, bias=None, eps: float = 1e-6):
    return add_norm_reference(x, delta, weight, bias, eps, "rmsnorm")
