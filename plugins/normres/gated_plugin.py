"""Registration of normres.dyt and normres.agu (fused (gated) residual + DyT squash).

Called from ``plugin.py``'s hookimpls (a pluggy module holds one implementation per hook)."""

from __future__ import annotations

import functools
import math

import torch

from ...registry import Case, Component, Inputs
from .backends import NormresBackends, register_normres_backends
from .params import AGUParams, DyTParams
from .reference import agu_reference, dyt_reference


def describe_dyt(x, delta=None, weight=None, bias=None, alpha=None, params=None) -> Inputs:
    return Inputs.from_tensors({"x": x, "delta": delta, "weight": weight, "bias": bias, "alpha": alpha})


def describe_agu(x, delta=None, weight=None, bias=None, alpha=None, gate=None, gate_w=None,
                 params=None) -> Inputs:
    return Inputs.from_tensors({"x": x, "delta": delta, "weight": weight, "bias": bias, "alpha": alpha,
                                "gate": gate, "gate_w": gate_w})


# bias around 1 keeps y = w * tanh(alpha h) + b away from 0, where a single-element output would be
# judged by the relative error of a cancellation (|w tanh| and |b| both ~1) instead of the op
_OFFSET = {"weight": 1.0, "bias": 1.0, "alpha": 0.5, "gate": 1.0}
_SCALE = {"weight": 0.1, "bias": 0.1, "alpha": 0.1, "gate": 1.0, "gate_w": 0.5}
# N1 has ONE row: there every parameter gradient is a single product, not a sum (see _grads).
_WIDTHS = ((40, (2, 3)), (63, (5,)), (257, (3, 7)), (1, (1,)), (128, (1, 2, 3)))


def _grads(shapes: dict) -> tuple[str, ...]:
    """The gradients the matrix compares. alpha's gradient is the sum over ALL elements of
    dy * w * (1 - t^2) * h: with the matrix's random zero-mean cotangent it cancels to about
    sqrt(n) * rms(term) * |Z|, while two correct fp32 evaluations differ by about
    sqrt(n) * ulp * rms(term); the relative error of a 1-element tensor is then ulp / |Z|,
    over the fp32 tolerance for |Z| < ~0.02 (a few % of draws: seed 1814965170, normres.dyt
    N1 with 4 rows, failed at 1.03e-5 with |a - e| = 6e-8, one ulp of the terms). So the
    matrix compares alpha's gradient where it is one product (the single-element N1 cases,
    every variant) and tests/test_kernel_normres_gated.py checks it on every shape against
    fp64 with the error bound of a sum, |a - e| <= tol * sum(|terms|)."""
    names = tuple(k for k, v in shapes.items() if v)
    n = math.prod(shapes["x"])
    return names if n == 1 else tuple(k for k in names if k != "alpha")


def _case(cid: str, shapes: dict, params: dict | None = None) -> Case:
    return Case(cid, shapes, params or {}, grad=_grads(shapes), offset=_OFFSET, scale=_SCALE)


def dyt_cases() -> list[Case]:
    out = [_case(f"N{n}", {"x": (*lead, n), "delta": (*lead, n), "weight": (n,), "bias": (n,), "alpha": (1,)})
           for n, lead in _WIDTHS]
    out.append(_case("no-delta", {"x": (3, 50), "delta": None, "weight": (50,), "bias": (50,), "alpha": (1,)}))
    out.append(_case("no-affine", {"x": (3, 33), "delta": (3, 33), "weight": None, "bias": None, "alpha": (1,)}))
    out.append(_case("const-alpha", {"x": (2, 65), "delta": (2, 65), "weight": (65,), "bias": None,
                                     "alpha": None}, {"alpha_init": 0.8}))
    return out


def agu_cases() -> list[Case]:
    out = []
    for variant in ("gate_dyt", "scale_dyt"):
        for gate in ("static", "input"):
            for n, lead in _WIDTHS:
                shapes = {"x": (*lead, n), "delta": (*lead, n), "weight": (n,), "bias": (n,), "alpha": (1,),
                          "gate": (n,), "gate_w": (n,) if gate == "input" else None}
                out.append(_case(f"{variant}-{gate}-N{n}", shapes, {"variant": variant, "gate": gate}))
    out.append(_case("no-delta", {"x": (3, 50), "delta": None, "weight": (50,), "bias": (50,), "alpha": (1,),
                                  "gate": None, "gate_w": None}))
    out.append(_case("no-affine", {"x": (3, 33), "delta": (3, 33), "weight": None, "bias": None, "alpha": (1,),
                                   "gate": (33,), "gate_w": (33,)}, {"gate": "input", "alpha_init": 0.7}))
    out.append(_case("const-alpha", {"x": (2, 65), "delta": (2, 65), "weight": (65,), "bias": None,
                                     "alpha": None, "gate": (65,), "gate_w": None},
                     {"variant": "scale_dyt", "alpha_init": 0.8}))
    return out


def _bench_shapes(device: str):
    return ((16384, 4096), (8192, 8192), (262144, 256), (65536, 1024), (4096, 16384)) if device == "cuda" \
        else ((4096, 4096), (16384, 256), (1024, 1024))


def dyt_bench_cases(device: str) -> list[Case]:
    return [Case(f"{r}x{n}", {"x": (r, n), "delta": (r, n), "weight": (n,), "bias": (n,), "alpha": (1,)},
                 offset=_OFFSET, scale=_SCALE) for r, n in _bench_shapes(device)]


def agu_bench_cases(device: str) -> list[Case]:
    return [Case(f"{r}x{n}", {"x": (r, n), "delta": (r, n), "weight": (n,), "bias": (n,), "alpha": (1,),
                              "gate": (n,), "gate_w": None}, offset=_OFFSET, scale=_SCALE)
            for r, n in _bench_shapes(device)]


def _eager(x, delta=None, weight=None, bias=None, alpha=None, gate=None, gate_w=None,
           variant="add", alpha_init=0.5):
    """torch eager, same math in the input dtype (no fp32 upcast): the baseline to beat."""
    if delta is None:
        h = x
    elif variant == "add" or gate is None:
        h = x + delta
    else:
        g = torch.sigmoid(gate if gate_w is None else gate + gate_w * x)
        h = torch.lerp(delta, x, g) if variant == "gate_dyt" else x + g * delta
    y = torch.tanh((alpha if alpha is not None else alpha_init) * h)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y, h


def _copy(x, *args, **kwargs):
    return x.clone()


def dyt_baselines(device: str) -> dict:
    def eager(x, delta=None, weight=None, bias=None, alpha=None, alpha_init=0.5):
        return _eager(x, delta, weight, bias, alpha, alpha_init=alpha_init)
    return {"torch-eager": eager, "copy": _copy}


def agu_baselines(device: str) -> dict:
    return {"torch-eager": _eager, "copy": _copy}


def gated_cost(shapes, params, mode: str) -> dict:
    """Bytes in units of elements x element size (as norm_cost): fwd reads x (+delta), writes y
    (+h); bwd reads dy, dh and h (dyt) or x, delta (agu), writes dx (+ddelta for agu)."""
    x = math.prod(shapes["x"])
    has_d = bool(shapes.get("delta"))
    gated = bool(shapes.get("gate")) and has_d
    tensors = 2 + (2 if has_d else 0)
    if mode != "fwd":
        tensors += (5 if gated else 3) + (1 if gated else 0)
    return {"bytes": tensors * x, "elements": x}


def _kernel(module: str, variant_fixed: str | None, x, delta=None, weight=None, bias=None, alpha=None,
            gate=None, gate_w=None, variant: str = "add", alpha_init: float = 0.5):
    if module == "triton":
        from ...kernels.triton.normres_gated import gated_dyt
    else:
        from ...kernels.numba.normres_gated import gated_dyt
    return gated_dyt(x, delta, weight, bias, alpha if alpha is not None else alpha_init, gate, gate_w,
                     variant_fixed or variant)


def _module(cid: str, gated: bool):
    def factory(ctx, params):
        from .module import GatedDyT
        return GatedDyT(ctx, cid, params, gated)
    return factory


def register_components(registry) -> None:
    registry.add_component(Component(
        id="normres.dyt", slot="normres", params=DyTParams, describe=describe_dyt,
        module=_module("normres.dyt", False), cases=dyt_cases, op_params=("alpha_init",),
        bench_cases=dyt_bench_cases, baselines=dyt_baselines, cost=gated_cost,
        doc="fused residual add + Dynamic Tanh: (y, h) = (w * tanh(alpha * h) + b, x + delta)",
        source="Zhu, Chen, He, LeCun, Liu: Transformers without Normalization (CVPR 2025)"))
    registry.add_component(Component(
        id="normres.agu", slot="normres", params=AGUParams, describe=describe_agu,
        module=_module("normres.agu", True), cases=agu_cases, op_params=("variant", "alpha_init"),
        bench_cases=agu_bench_cases, baselines=agu_baselines, cost=gated_cost,
        doc="gated residual + DyT squash: h = g*x + (1-g)*delta (or x + g*delta), "
            "g = sigmoid(gate [+ gate_w*x]); y = w * tanh(alpha * h) + b",
        source="press description 'Adaptive Gating Units' (no paper); our definition, docs/components/agu.md"))


def _kernels(variant_fixed: str | None, module: str):
    return functools.partial(_kernel, module, variant_fixed)


def register_backends(registry) -> None:
    register_normres_backends(registry, (
        NormresBackends(cid, ref, functools.partial(_kernels, fixed), "torch math, fp32 gate and squash",
                        "fused (gated) residual + DyT forward and backward")
        for cid, ref, fixed in (("normres.dyt", dyt_reference, "add"), ("normres.agu", agu_reference, None))))
