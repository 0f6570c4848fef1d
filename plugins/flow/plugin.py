"""Registers the flow.* components (coupling, actnorm, inv1x1, aif) and their backends through
the public hooks. The digits_density task registers from ``tasks.py`` (same hooks)."""

from __future__ import annotations

import math

import torch

from ...registry import Backend, Capabilities, Case, Component, Inputs, hookimpl
from .params import ActNormParams, AIFParams, CouplingParams, Inv1x1Params
from .reference import actnorm_reference, aif_surrogate_reference, coupling_reference, inv1x1_reference

GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CPU_FLOATS = (torch.float32, torch.float64)
TRITON_MAX_D = 8192


def describe_coupling(x, s=None, t=None, params=None) -> Inputs:
    return Inputs.from_tensors({"x": x, "s": s, "t": t})


def describe_actnorm(x, loc=None, log_scale=None, params=None) -> Inputs:
    return Inputs.from_tensors({"x": x, "loc": loc, "log_scale": log_scale})


def describe_inv1x1(x, lower=None, upper=None, log_s=None, sign=None, params=None) -> Inputs:
    return Inputs.from_tensors({"x": x, "lower": lower, "upper": upper, "log_s": log_s, "sign": sign})


def describe_aif(vjf, jgv=None, params=None) -> Inputs:
    return Inputs.from_tensors({"vjf": vjf, "jgv": jgv})


def _rows_rule(max_d: int | None = None):
    def rule(inputs: Inputs) -> list[str]:
        shp = inputs.shape.get("x")
        if shp is None:
            return []
        if len(shp) != 2:
            return [f"x must be [B, D], got {len(shp)} dims"]
        if max_d is not None and shp[1] > max_d:
            return [f"D={shp[1]} > {max_d} (rows are held whole in registers)"]
        return []
    return rule


# ---------------------------------------------------------------------------------------------
# cases (small: the Triton interpreter runs them all)
def coupling_cases() -> list[Case]:
    def c(id, b, d, **params):
        return Case(id, {"x": (b, d), "s": (b, d), "t": (b, d)}, params, scale={"s": 1.5})
    return [
        c("B7-D40-alt", 7, 40),
        c("B5-D63-half-p1", 5, 63, mask="half", parity=1),
        c("B9-D40-alt-p1-inv", 9, 40, parity=1, inverse=True),
        c("B3-D63-half-inv", 3, 63, mask="half", inverse=True),
        c("B4-D1-half-all-transformed", 4, 1, mask="half", parity=0),
        c("B130-D64-clamp0.5", 130, 64, clamp=0.5),
        c("B6-D17-alt-clamp5-inv", 6, 17, clamp=5.0, inverse=True),
    ]


def actnorm_cases() -> list[Case]:
    def c(id, b, d, **params):
        return Case(id, {"x": (b, d), "loc": (d,), "log_scale": (d,)}, params,
                    scale={"log_scale": 0.5, "loc": 0.5})
    return [c("B7-D40", 7, 40), c("B5-D63-inv", 5, 63, inverse=True), c("B130-D64", 130, 64),
            c("B1-D1", 1, 1), c("B33-D17-inv", 33, 17, inverse=True)]


def inv1x1_cases() -> list[Case]:
    def c(id, b, d, **params):
        sc = 0.5 / math.sqrt(d)   # keeps the random unit-triangular factors well conditioned
        return Case(id, {"x": (b, d), "lower": (d, d), "upper": (d, d), "log_s": (d,), "sign": (d,)},
                    params, grad=("x", "lower", "upper", "log_s"),
                    scale={"lower": sc, "upper": sc, "log_s": 0.3, "sign": 0.0}, offset={"sign": 1.0})
    return [c("B7-D40", 7, 40), c("B5-D63-inv", 5, 63, inverse=True), c("B3-D1", 3, 1),
            c("B4-D16-inv", 4, 16, inverse=True)]


def aif_cases() -> list[Case]:
    return [Case("B7-D40", {"vjf": (7, 40), "jgv": (7, 40)}), Case("B3-D63", {"vjf": (3, 63), "jgv": (3, 63)})]


def coupling_bench_cases(device: str) -> list[Case]:
    shapes = ((65536, 64), (65536, 256), (16384, 1024)) if device == "cuda" else ((8192, 64), (2048, 256))
    return [Case(f"{b}x{d}", {"x": (b, d), "s": (b, d), "t": (b, d)}) for b, d in shapes]


def actnorm_bench_cases(device: str) -> list[Case]:
    # CPU: 65536 x 64, a few ms per call. At 8192 x 64 a forward+backward is 0.6-1.5 ms, mostly
    # autograd and thread wake-up, not the kernel: Numba / reference swung 0.47x-2.95x between
    # runs on the 2-core box (min of 15 interleaved samples each), against 3.4x-5.4x here.
    shapes = ((65536, 64), (65536, 256)) if device == "cuda" else ((65536, 64),)
    return [Case(f"{b}x{d}", {"x": (b, d), "loc": (d,), "log_scale": (d,)}) for b, d in shapes]


def coupling_cost(shapes, params, mode: str) -> dict:
    b, d = shapes["x"]
    elems = 4 * b * d + b                     # read x, s, t; write y, logdet
    if mode != "fwd":                         # + backward: read x, s, t, dy, dld; write dx, ds, dt
        elems += 7 * b * d + b
    return {"bytes": elems, "elements": b * d}


def actnorm_cost(shapes, params, mode: str) -> dict:
    b, d = shapes["x"]
    elems = 2 * b * d + b
    if mode != "fwd":
        elems += 3 * b * d
    return {"bytes": elems, "elements": b * d}


def _copy_baseline(device: str) -> dict:
    def copy(x, *args, **kwargs):
        return x.clone()
    return {"copy": copy}


# ---------------------------------------------------------------------------------------------
# backends
def _numba_coupling(x, s, t, **kw):
    from ...kernels.numba.flow import coupling
    return coupling(x, s, t, **kw)


def _triton_coupling(x, s, t, **kw):
    from ...kernels.triton.flow import coupling
    return coupling(x, s, t, **kw)


def _numba_actnorm(x, loc, log_scale, **kw):
    from ...kernels.numba.flow import actnorm
    return actnorm(x, loc, log_scale, **kw)


def _triton_actnorm(x, loc, log_scale, **kw):
    from ...kernels.triton.flow import actnorm
    return actnorm(x, loc, log_scale, **kw)


# ---------------------------------------------------------------------------------------------
# module factories (imports deferred: module.py imports core)
def _coupling_module(ctx, params):
    from .module import Coupling
    return Coupling(ctx, params)


def _actnorm_module(ctx, params):
    from .module import ActNorm
    return ActNorm(ctx, params)


def _inv1x1_module(ctx, params):
    from .module import Inv1x1
    return Inv1x1(ctx, params)


def _aif_module(ctx, params):
    from .module import AIF
    return AIF(ctx, params)


@hookimpl
def blockzoo_register_components(registry) -> None:
    registry.add_component(Component(
        id="flow.coupling", slot="flow", params=CouplingParams, describe=describe_coupling,
        module=_coupling_module, cases=coupling_cases, op_params=("mask", "parity", "clamp", "inverse"),
        bench_cases=coupling_bench_cases, cost=coupling_cost, baselines=_copy_baseline,
        doc="affine coupling: conditioner output (s, t) -> soft-clamped log-scale -> transform of the "
            "masked dims -> per-row log-det; forward and inverse; x, s, t [B, D]",
        source="Dinh, Sohl-Dickstein, Bengio: Density estimation using Real NVP (ICLR 2017)"))
    registry.add_component(Component(
        id="flow.actnorm", slot="flow", params=ActNormParams, describe=describe_actnorm,
        module=_actnorm_module, cases=actnorm_cases, op_params=("inverse",),
        bench_cases=actnorm_bench_cases, cost=actnorm_cost, baselines=_copy_baseline,
        doc="activation normalisation y = (x + loc) * exp(log_scale), data-dependent init; x [B, D]",
        source="Kingma, Dhariwal: Glow (NeurIPS 2018)"))
    registry.add_component(Component(
        id="flow.inv1x1", slot="flow", params=Inv1x1Params, describe=describe_inv1x1,
        module=_inv1x1_module, cases=inv1x1_cases, op_params=("inverse",),
        doc="invertible linear map in LU form W = P L (U + diag(sign exp(log_s))) (Glow's 1x1 conv on "
            "flat vectors); x [B, D]",
        source="Kingma, Dhariwal: Glow (NeurIPS 2018)"))
    registry.add_component(Component(
        id="flow.aif", slot="flow", params=AIFParams, describe=describe_aif, module=_aif_module,
        cases=aif_cases, op_params=(),
        doc="approximately invertible flow: free-form encoder/decoder trained with reconstruction + a "
            "Hutchinson log-det surrogate (a whole flow model; its op is the surrogate's last step)",
        source="press description 'Approximately Invertible Flows' (no paper found); our definition "
               "follows free-form flows, Draxler et al. (AISTATS 2024)"))


@hookimpl
def blockzoo_register_backends(registry) -> None:
    ref_caps = Capabilities(dtypes=GPU_DTYPES + (torch.float64,), rules=(_rows_rule(),))
    for cid, fn, doc in (("flow.coupling", coupling_reference, "torch ops, fp32 math (the oracle)"),
                         ("flow.actnorm", actnorm_reference, "torch ops, fp32 math (the oracle)"),
                         ("flow.inv1x1", inv1x1_reference, "torch matmul / triangular solves (the oracle)")):
        registry.add_backend(Backend(cid, "reference", fn, ref_caps, priority=0, doc=doc))
    registry.add_backend(Backend("flow.aif", "reference", aif_surrogate_reference,
                                 Capabilities(dtypes=GPU_DTYPES + (torch.float64,)), priority=0,
                                 doc="per-row sum(vjf * stopgrad(jgv))"))
    numba_caps = Capabilities(devices=("cpu",), dtypes=CPU_FLOATS, requires=("numba>=0.60",),
                              rules=(_rows_rule(),))
    triton_caps = Capabilities(devices=("cuda",), dtypes=GPU_DTYPES, requires=("triton>=3.6",),
                               min_compute_capability=(8, 0), interpreted_on_cpu=True,
                               rules=(_rows_rule(TRITON_MAX_D),))
    registry.add_backend(Backend("flow.coupling", "numba", _numba_coupling, numba_caps, priority=20,
                                 doc="one parallel pass over rows, forward/inverse and backward"))
    registry.add_backend(Backend("flow.coupling", "triton", _triton_coupling, triton_caps, priority=30,
                                 doc="fused clamp -> transform -> log-det in one kernel, and its backward"))
    registry.add_backend(Backend("flow.actnorm", "numba", _numba_actnorm, numba_caps, priority=20,
                                 doc="one parallel pass over rows; per-thread column partial sums in backward"))
    registry.add_backend(Backend("flow.actnorm", "triton", _triton_actnorm, triton_caps, priority=30,
                                 doc="one pass forward (y + log-det); backward dx + per-program partial sums"))


# the digits_density task (tasks.py) registers through this module's tasks hook
from .tasks import blockzoo_register_tasks  # noqa: E402, F401
