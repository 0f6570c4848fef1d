"""Registers mlp.swiglu and mlp.gelu. The matmuls run in torch (cuBLAS / the CPU BLAS) in every
backend; the backends differ in the fused activation kernel between them."""

from __future__ import annotations

import torch

from ...registry import Backend, Capabilities, Case, Component, Inputs, hookimpl
from .params import GELUParams, SwiGLUParams
from .reference import gelu_reference, swiglu_reference


def describe_mlp(x, w_in, w_out, params=None) -> Inputs:
    return Inputs.from_tensors({"x": x, "w_in": w_in, "w_out": w_out})


def mlp_cases(gated: bool):
    def cases() -> list[Case]:
        out = []
        for d, h, lead in ((40, 24, (2, 7)), (63, 37, (5,)), (16, 1, (1, 1, 3)), (128, 96, (3, 17))):
            shapes = {"x": (*lead, d), "w_in": ((2 if gated else 1) * h, d), "w_out": (d, h)}
            out.append(Case(f"d{d}-h{h}", shapes, scale={"w_in": d ** -0.5, "w_out": h ** -0.5}))
        return out
    return cases


def mlp_bench_cases(gated: bool):
    def cases(device: str) -> list[Case]:
        sizes = ((8192, 4096, 11008 if gated else 16384),) if device == "cuda" else ((2048, 512, 1376 if gated else 2048),)
        return [Case(f"N{n}-d{d}-h{h}", {"x": (n, d), "w_in": ((2 if gated else 1) * h, d), "w_out": (d, h)},
                     scale={"w_in": d ** -0.5, "w_out": h ** -0.5}) for n, d, h in sizes]
    return cases


def mlp_baselines(gated: bool):
    def baselines(device: str) -> dict:
        import torch.nn.functional as F

        def eager(x, w_in, w_out):
            a = F.linear(x, w_in)
            if gated:
                g, u = a.chunk(2, dim=-1)
                return F.linear(F.silu(g) * u, w_out)
            return F.linear(F.gelu(a), w_out)
        return {"torch-eager": eager}
    return baselines


def mlp_cost(shapes, params, mode: str) -> dict:
    import math
    n = math.prod(shapes["x"][:-1])
    fwd = 2.0 * n * (math.prod(shapes["w_in"]) + math.prod(shapes["w_out"]))
    return {"flops": fwd if mode == "fwd" else 3 * fwd}


def _act(backend: str, gated: bool):
    if backend == "triton":
        from ...kernels.triton import activations
    else:
        from ...kernels.numba import activations
    return activations.swiglu if gated else activations.gelu


def _make(backend: str, gated: bool):
    ref = swiglu_reference if gated else gelu_reference

    def fn(x, w_in, w_out):
        return ref(x, w_in, w_out, act=_act(backend, gated))
    fn.__name__ = f"{'swiglu' if gated else 'gelu'}_{backend}"
    return fn


def mlp_module(cid: str, gated: bool):
    def factory(ctx, params):
        from .module import MLP
        return MLP(ctx, cid, params, gated)
    return factory


SPECS = {"mlp.swiglu": (SwiGLUParams, swiglu_reference, True, "SwiGLU: w_out(silu(x W_g) * (x W_u)) (Shazeer 2020)"),
         "mlp.gelu": (GELUParams, gelu_reference, False, "GELU MLP: w_out(gelu(x W_in)) (Hendrycks & Gimpel 2016)")}


@hookimpl
def blockzoo_register_components(registry) -> None:
    for cid, (params, _, gated, doc) in SPECS.items():
        registry.add_component(Component(
            id=cid, slot="mlp", params=params, describe=describe_mlp, module=mlp_module(cid, gated),
            cases=mlp_cases(gated), op_params=(), bench_cases=mlp_bench_cases(gated),
            baselines=mlp_baselines(gated), cost=mlp_cost, doc=doc, source=doc.split("(")[-1].rstrip(")")))


@hookimpl
def blockzoo_register_backends(registry) -> None:
    all_floats = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    for cid, (_, reference, gated, _) in SPECS.items():
        registry.add_backend(Backend(cid, "reference", reference, Capabilities(dtypes=all_floats),
                                     doc="torch matmuls + fp32 activation"))
        registry.add_backend(Backend(
            cid, "triton", _make("triton", gated),
            Capabilities(devices=("cuda",), dtypes=(torch.float16, torch.bfloat16, torch.float32),
                         requires=("triton>=3.6",), interpreted_on_cpu=True),
            priority=30, doc="torch matmuls + fused Triton activation (forward and backward)"))
        registry.add_backend(Backend(
            cid, "numba", _make("numba", gated),
            Capabilities(devices=("cpu",), dtypes=(torch.float32, torch.float64), requires=("numba>=0.60",)),
            priority=20, doc="torch matmuls + fused Numba activation (forward and backward)"))
