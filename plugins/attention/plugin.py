"""Registers attention.dense and its backends through the public hooks."""

from __future__ import annotations

import torch

from ...registry import Backend, Capabilities, Case, Component, Inputs, hookimpl
from .params import DenseAttentionParams
from .reference import attention_reference

CPU_FLOATS = (torch.float32, torch.float64)
GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def describe_attention(q, k, v, params=None) -> Inputs:
    return Inputs.from_tensors({"q": q, "k": k, "v": v}, head_dim=q.shape[-1])


def attention_cases() -> list[Case]:
    def c(id, b, tq, tk, hq, hk, d, **params):
        return Case(id, {"q": (b, tq, hq, d), "k": (b, tk, hk, d), "v": (b, tk, hk, d)}, params, head_dim=d)
    return [
        c("causal-T63-D40", 2, 63, 63, 2, 2, 40, causal=True),
        c("noncausal-T63-D40", 1, 63, 63, 2, 2, 40, causal=False),
        c("gqa4:2-T100-D64", 1, 100, 100, 4, 2, 64, causal=True),
        c("gqa4:1-noncausal-T33", 2, 33, 33, 4, 1, 32, causal=False),
        c("T1", 1, 1, 1, 2, 1, 16, causal=True),
        c("Tq17-Tk50-causal", 1, 17, 50, 2, 2, 16, causal=True),
        c("Tq50-Tk17-causal", 1, 50, 17, 2, 1, 16, causal=True),
        c("scale", 1, 20, 20, 2, 2, 16, causal=True, scale=0.3),
    ]


def attention_bench_cases(device: str) -> list[Case]:
    def c(b, t, h, d, causal):
        return Case(f"B{b}-T{t}-H{h}-D{d}-{'causal' if causal else 'full'}",
                    {"q": (b, t, h, d), "k": (b, t, h, d), "v": (b, t, h, d)}, {"causal": causal}, head_dim=d)
    if device == "cuda":
        return [c(b, t, 16, 128, causal) for (b, t) in ((4, 4096), (2, 8192), (1, 16384))
                for causal in (False, True)] + [c(4, 4096, 32, 64, True)]
    return [c(1, 1024, 8, 64, True), c(1, 1024, 8, 64, False), c(2, 512, 8, 64, True)]


def _sdpa(backend_name: str | None):
    """SDPA as a benchmark baseline, fed in its native [B, H, T, D] contiguous layout: ``prepare``
    converts the inputs once, outside the timed region, so the baseline pays no transposes.
    Attention-shaped components (moc, precision, depth) use it as their dense baseline: ``prepare``
    keeps only q, k, v and ``fn`` ignores their other parameters (chunk_size, tau, depth_k, ...)."""
    def fn(q, k, v, causal=True, scale=None, **_other):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        gqa = q.shape[1] != k.shape[1]
        if backend_name is None:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                                                    enable_gqa=gqa)
        with sdpa_kernel(getattr(SDPBackend, backend_name)):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                                                    enable_gqa=gqa)

    def prepare(tensors):
        return {n: t.detach().transpose(1, 2).contiguous().requires_grad_(t.requires_grad)
                for n, t in tensors.items() if n in ("q", "k", "v")}
    fn.prepare = prepare
    return fn


def attention_baselines(device: str) -> dict:
    if device == "cuda":
        return {"sdpa-flash": _sdpa("FLASH_ATTENTION"), "sdpa-cudnn": _sdpa("CUDNN_ATTENTION"),
                "sdpa-efficient": _sdpa("EFFICIENT_ATTENTION")}
    return {"sdpa-cpu": _sdpa(None)}


def attention_cost(shapes, params, mode: str) -> dict:
    from .reference import attention_flops
    b, tq, hq, d = shapes["q"]
    fwd = attention_flops(b, tq, shapes["k"][1], hq, d, params.causal)
    return {"flops": fwd if mode == "fwd" else 3.5 * fwd}


def attention_flops_of(inputs: Inputs, params: DenseAttentionParams) -> float:
    from .reference import attention_flops
    b, tq, hq, d = inputs.shape["q"]
    tk = inputs.shape["k"][1]
    return attention_flops(b, tq, tk, hq, d, params.causal)


def _triton(q, k, v, causal=True, scale=None):
    from ...kernels.triton.attention import attention
    return attention(q, k, v, causal=causal, scale=scale)


def _numba(q, k, v, causal=True, scale=None):
    from ...kernels.numba.attention import attention
    return attention(q, k, v, causal=causal, scale=scale)


def _gqa_rule(inputs: Inputs) -> list[str]:
    shapes = inputs.shape
    if "q" not in shapes or "k" not in shapes:
        return []
    hq, hk = shapes["q"][2], shapes["k"][2]
    return [] if hq % hk == 0 else [f"query heads {hq} not a multiple of kv heads {hk}"]


def attention_module(ctx, params):
    from .module import AttentionMixer
    return AttentionMixer(ctx, "attention.dense", params)


@hookimpl
def blockzoo_register_components(registry) -> None:
    registry.add_component(Component(
        id="attention.dense", slot="mixer", params=DenseAttentionParams,
        describe=describe_attention, module=attention_module, cases=attention_cases,
        flops=attention_flops_of, bench_cases=attention_bench_cases, baselines=attention_baselines,
        cost=attention_cost,
        doc="Causal (bottom-right aligned) or full softmax attention with GQA; q/k/v [B, T, H, D].",
        source="Vaswani et al. 2017; FlashAttention-2 (Dao 2023) for the online-softmax kernels"))


@hookimpl
def blockzoo_register_backends(registry) -> None:
    registry.add_backend(Backend(
        "attention.dense", "reference", attention_reference,
        Capabilities(dtypes=GPU_DTYPES + (torch.float64,), rules=(_gqa_rule,)), priority=0,
        doc="explicit fp32 einsum/softmax math (the oracle)"))
    registry.add_backend(Backend(
        "attention.dense", "triton", _triton,
        Capabilities(devices=("cuda",), dtypes=GPU_DTYPES, head_dims=range(16, 257), requires=("triton>=3.6",),
                     min_compute_capability=(8, 0), interpreted_on_cpu=True, rules=(_gqa_rule,)),
        priority=30, doc="online-softmax Triton core, forward and backward (torch.library custom op)"))
    registry.add_backend(Backend(
        "attention.dense", "numba", _numba,
        Capabilities(devices=("cpu",), dtypes=CPU_FLOATS, requires=("numba>=0.60",), rules=(_gqa_rule,)),
        priority=20, doc="blocked online-softmax Numba kernel, forward and backward"))
