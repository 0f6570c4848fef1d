"""Registers depth.moda (Mixture-of-Depths Attention) and depth.mod (Mixture-of-Depths token
routing) and their backends through the public hooks."""

from __future__ import annotations

import torch

from ...registry import Backend, Capabilities, Case, Component, Inputs, hookimpl
from ..attention.plugin import CPU_FLOATS, GPU_DTYPES, _gqa_rule, _sdpa
from .params import MoDAParams, MoDParams
from .reference import mod_flops, mod_k, mod_reference, moda_flops, moda_reference

# ---------------------------------------------------------------------------------------------
# depth.moda
# ---------------------------------------------------------------------------------------------


def describe_moda(q, k, v, depth_k, depth_v, params=None) -> Inputs:
    return Inputs.from_tensors({"q": q, "k": k, "v": v, "depth_k": depth_k, "depth_v": depth_v},
                               head_dim=q.shape[-1])


def _depth_rule(inputs: Inputs) -> list[str]:
    s = inputs.shape
    if "depth_k" not in s or "q" not in s or "k" not in s:
        return []
    (b, tq, _, d), dk = s["q"], s["depth_k"]
    if len(dk) != 4 or dk[0] != b or dk[2] != s["k"][2] or dk[3] != d:
        return [f"depth_k {dk} must be [B, Tq*S, Hk, D] with B={b}, Hk={s['k'][2]}, D={d}"]
    if (tq == 0 and dk[1]) or (tq and dk[1] % tq):
        return [f"depth_k rows {dk[1]} not a multiple of Tq={tq}"]
    return []


def _slots(shapes) -> int:
    tq = shapes["q"][1]
    dk = shapes.get("depth_k")
    return dk[1] // tq if dk and tq else 0


def moda_cases() -> list[Case]:
    def c(id, b, tq, tk, hq, hk, d, s, **params):
        return Case(id, {"q": (b, tq, hq, d), "k": (b, tk, hk, d), "v": (b, tk, hk, d),
                         "depth_k": (b, tq * s, hk, d), "depth_v": (b, tq * s, hk, d)}, params, head_dim=d)
    return [
        c("T63-D40-S3", 2, 63, 63, 2, 2, 40, 3),
        c("gqa4:1-T33-S2-D32", 1, 33, 33, 4, 1, 32, 2),
        c("gqa3:1-T20-S4", 1, 20, 20, 3, 1, 16, 4),
        c("gqa8:1-T40-S8-D64", 1, 40, 40, 8, 1, 64, 8),
        c("noncausal-T30-S2", 1, 30, 30, 2, 1, 16, 2, causal=False),
        c("Tq17-Tk40-S2", 1, 17, 40, 2, 2, 16, 2),
        c("Tq30-Tk12-S1", 1, 30, 12, 2, 1, 16, 1),
        c("S0-T19", 1, 19, 19, 2, 1, 16, 0),
        c("T1-S5", 1, 1, 1, 2, 1, 16, 5),
        c("scale-T20-S3", 1, 20, 20, 2, 2, 16, 3, scale=0.3),
    ]


def moda_bench_cases(device: str) -> list[Case]:
    def c(t, d, s, hq=16, hk=2, b=1):
        return Case(f"B{b}-T{t}-H{hq}:{hk}-D{d}-S{s}",
                    {"q": (b, t, hq, d), "k": (b, t, hk, d), "v": (b, t, hk, d),
                     "depth_k": (b, t * s, hk, d), "depth_v": (b, t * s, hk, d)}, {"causal": True}, head_dim=d)
    if device == "cuda":
        return [c(t, d, s) for t in (16384,) for d in (64, 128) for s in (32, 64)]
    return [c(512, 64, 8, hq=8, hk=1), c(1024, 64, 16, hq=8, hk=1)]


def moda_baselines(device: str) -> dict:
    """SDPA on the SEQUENCE part alone (the depth slots ignored), native layout."""
    if device == "cuda":
        return {"sdpa-flash-seq": _sdpa("FLASH_ATTENTION")}
    return {"sdpa-cpu-seq": _sdpa(None)}


def moda_cost(shapes, params, mode: str) -> dict:
    b, tq, hq, d = shapes["q"]
    fwd = moda_flops(b, tq, shapes["k"][1], hq, d, _slots(shapes), params.causal)
    return {"flops": fwd if mode == "fwd" else 3.5 * fwd}


def moda_flops_of(inputs: Inputs, params: MoDAParams) -> float:
    """Forward FLOPs. Without depth_k in the inputs (the sweep's cost model passes q/k/v only)
    the slot count comes from ``inputs.extra['depth_slots']`` (0 if absent)."""
    s = inputs.shape
    b, tq, hq, d = s["q"]
    slots = _slots(s) if "depth_k" in s else int(inputs.extra.get("depth_slots", 0))
    return moda_flops(b, tq, s["k"][1], hq, d, slots, params.causal)


def _moda_numba(q, k, v, depth_k, depth_v, causal=True, scale=None):
    from ...kernels.numba.moda import moda_attention
    return moda_attention(q, k, v, depth_k, depth_v, causal=causal, scale=scale)


def _moda_triton(q, k, v, depth_k, depth_v, causal=True, scale=None):
    from ...kernels.triton.moda import moda_attention
    return moda_attention(q, k, v, depth_k, depth_v, causal=causal, scale=scale)


def moda_module(ctx, params):
    from .module import MoDAMixer
    return MoDAMixer(ctx, params)


# ---------------------------------------------------------------------------------------------
# depth.mod
# ---------------------------------------------------------------------------------------------


def describe_mod(x, router, y, index=None, params=None) -> Inputs:
    return Inputs.from_tensors({"x": x, "router": router, "y": y})


def mod_cases() -> list[Case]:
    def c(id, b, t, ch, **params):
        k = mod_k(t, params.get("capacity", 0.125))
        return Case(id, {"x": (b, t, ch), "router": (b, t), "y": (b, k, ch), "index": None}, params)
    return [
        c("T63-C40", 2, 63, 40),
        c("T64-C32-c0.5-raw", 1, 64, 32, capacity=0.5, gate="raw"),
        c("T10-C16-c1", 1, 10, 16, capacity=1.0),
        c("T1-C8", 2, 1, 8),
        c("B3-T37-C24-c0.3", 3, 37, 24, capacity=0.3),
        c("T100-C300-c0.05", 1, 100, 300, capacity=0.05),
    ]


def mod_bench_cases(device: str) -> list[Case]:
    def c(b, t, ch, cap):
        k = mod_k(t, cap)
        return Case(f"B{b}-T{t}-C{ch}-c{cap}", {"x": (b, t, ch), "router": (b, t), "y": (b, k, ch)},
                    {"capacity": cap})
    if device == "cuda":
        return [c(8, 8192, 2048, 0.125)]
    return [c(4, 2048, 256, 0.125)]


def mod_cost(shapes, params, mode: str) -> dict:
    b, t, ch = shapes["x"]
    k = mod_k(t, params.capacity)
    rows = b * (t + 2 * k) * ch  # copy of x, read y and routed x rows
    return {"bytes": rows if mode == "fwd" else 3 * rows}


def mod_flops_of(inputs: Inputs, params: MoDParams) -> float:
    """Attention FLOPs of the routed block (sweep cost model): the inner causal attention over the
    k = ceil(capacity * T) routed tokens; with an ``x`` shape, the routed update itself."""
    s = inputs.shape
    if "x" in s:
        b, t, ch = s["x"]
        return mod_flops(b, t, ch, params.capacity, params.gate)
    from ..attention.reference import attention_flops
    b, t, hq, d = s["q"]
    k = mod_k(t, params.capacity)
    return attention_flops(b, k, k, hq, d, True)


def _mod_numba(x, router, y, index=None, capacity=0.125, gate="sigmoid"):
    from ...kernels.numba.mod import mod_scatter
    return mod_scatter(x, router, y, index, capacity, gate)


def _mod_triton(x, router, y, index=None, capacity=0.125, gate="sigmoid"):
    from ...kernels.triton.mod import mod_scatter
    return mod_scatter(x, router, y, index, capacity, gate)


def mod_module(ctx, params):
    from .module import MoDMixer
    return MoDMixer(ctx, params)


def mod_kv_bytes(ctx, params: MoDParams, seq: int) -> float:
    """Only routed tokens enter the block, so only they are cached (k = ceil(capacity * seq))."""
    elt = torch.empty((), dtype=ctx.dtype).element_size()
    return 2.0 * mod_k(seq, params.capacity) * ctx.n_kv_heads * ctx.head_dim * elt


@hookimpl
def blockzoo_register_components(registry) -> None:
    registry.add_component(Component(
        id="depth.moda", slot="mixer", params=MoDAParams,
        describe=describe_moda, module=moda_module, cases=moda_cases, flops=moda_flops_of,
        bench_cases=moda_bench_cases, baselines=moda_baselines, cost=moda_cost,
        doc="Mixture-of-Depths Attention: one softmax over the causal sequence keys and the S depth "
            "slots (K/V written by earlier layers) of the query's own position; q/k/v [B, T, H, D], "
            "depth_k/depth_v [B, T*S, Hk, D] token-major, GQA.",
        source="Mixture-of-Depths Attention, arXiv 2603.15619 (HUST + ByteDance Seed)"))
    registry.add_component(Component(
        id="depth.mod", slot="mixer", params=MoDParams,
        describe=describe_mod, module=mod_module, cases=mod_cases, flops=mod_flops_of,
        bench_cases=mod_bench_cases, cost=mod_cost, kv_bytes=mod_kv_bytes, op_params=("capacity", "gate"),
        doc="Mixture-of-Depths token routing: the top capacity fraction of tokens (router logits) goes "
            "through the block, scaled by the router weight; the rest skip it. Op: out = x + "
            "gate(router[idx]) * y scattered to the routed positions; x [B, T, C], router [B, T], y [B, k, C].",
        source="Raposo et al. 2024, Mixture-of-Depths: Dynamically allocating compute in transformer-based "
               "language models, arXiv 2404.02258"))


@hookimpl
def blockzoo_register_backends(registry) -> None:
    rules = (_gqa_rule, _depth_rule)
    registry.add_backend(Backend(
        "depth.moda", "reference", moda_reference,
        Capabilities(dtypes=GPU_DTYPES + (torch.float64,), rules=rules), priority=0,
        doc="explicit fp32 scores over [sequence | depth slots], one softmax (the oracle)"))
    registry.add_backend(Backend(
        "depth.moda", "numba", _moda_numba,
        Capabilities(devices=("cpu",), dtypes=CPU_FLOATS, requires=("numba>=0.60",), rules=rules),
        priority=20, doc="Numba attention core for the sequence segment + a depth-segment pass merged by "
                         "log-sum-exp, forward and backward"))
    registry.add_backend(Backend(
        "depth.moda", "triton", _moda_triton,
        Capabilities(devices=("cuda",), dtypes=GPU_DTYPES, head_dims=range(16, 257), requires=("triton>=3.6",),
                     min_compute_capability=(8, 0), interpreted_on_cpu=True, rules=rules),
        priority=30, doc="one fused kernel (packed GQA): shared online-softmax core over the sequence blocks "
                         "and the causal boundary, then the depth slots in the same state; fused backward"))
    registry.add_backend(Backend(
        "depth.mod", "reference", mod_reference,
        Capabilities(dtypes=GPU_DTYPES + (torch.float64,)), priority=0,
        doc="torch gather / scatter_add in fp32 (the oracle)"))
    registry.add_backend(Backend(
        "depth.mod", "numba", _mod_numba,
        Capabilities(devices=("cpu",), dtypes=CPU_FLOATS, requires=("numba>=0.60",)),
        priority=20, doc="Numba routed gather / scatter, forward and backward"))
    registry.add_backend(Backend(
        "depth.mod", "triton", _mod_triton,
        Capabilities(devices=("cuda",), dtypes=GPU_DTYPES, requires=("triton>=3.6",),
                     min_compute_capability=(8, 0), interpreted_on_cpu=True),
        priority=30, doc="Triton routed gather / scatter, forward and backward"))
