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


_GATED_MODES = {"add": 0, "gate_dyt": 1, "scale_dyt": 2}


def gated_dyt_reference(x, delta=None, weight=None, bias=None, alpha=None, gate=None, gate_w=None,
                        variant: str = "add", alpha_init: float = 0.5):
    """Shared math of normres.dyt (variant "add") and normres.agu; returns (y, h_new).

    add:       h' = x + delta
    gate_dyt:  h' = g * x + (1 - g) * delta,  g = sigmoid(gate (+ gate_w * x))
    scale_dyt: h' = x + g * delta
    (delta None: h' = x, the gate is unused) then y = weight * tanh(alpha * h') + bias.
    All math in fp32 (fp64 for fp64): h' is returned rounded to x's dtype, the squash sees the
    unrounded fp32 value (what the fused kernels do: the sum never leaves registers)."""
    if variant not in _GATED_MODES:
        raise ValueError(f"unknown variant {variant!r}")
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    if delta is None:
        hf = xf
    elif variant == "add" or gate is None:
        hf = xf + delta.to(acc)
    else:
        df = delta.to(acc)
        z = gate.to(acc)
        if gate_w is not None:
            z = z + gate_w.to(acc) * xf
        g = torch.sigmoid(z)
        hf = g * xf + (1 - g) * df if variant == "gate_dyt" else xf + g * df
    h = x if delta is None else hf.to(x.dtype)
    a = alpha.to(acc) if alpha is not None else alpha_init
    yf = torch.tanh(a * hf)
    if weight is not None:
        yf = yf * weight.to(acc)
    if bias is not None:
        yf = yf + bias.to(acc)
    return yf.to(x.dtype), h


def dyt_reference(x, delta=None, weight=None, bias=None, alpha=None, alpha_init: float = 0.5):
    return gated_dyt_reference(x, delta, weight, bias, alpha, None, None, "add", alpha_init)


def agu_reference(x, delta=None, weight=None, bias=None, alpha=None, gate=None, gate_w=None,
                  variant: str = "gate_dyt", alpha_init: float = 0.5):
    return gated_dyt_reference(x, delta, weight, bias, alpha, gate, gate_w, variant, alpha_init)
