"""Registers context.moc (Mixture of Contexts) and its backends through the public hooks."""

from __future__ import annotations

import torch

from ...registry import Backend, Capabilities, Case, Component, Inputs, hookimpl

# attention-shaped: same [B, T, H, D] description, dtype sets and GQA rule as attention.dense
from ..attention.plugin import CPU_FLOATS, GPU_DTYPES, _gqa_rule, attention_baselines
from ..attention.plugin import describe_attention as describe_moc
from .params import MoCParams
from .reference import chunk_bounds, moc_flops, moc_reference


def moc_cases() -> list[Case]:
    def c(id, b, tq, tk, hq, hk, d, **params):
        return Case(id, {"q": (b, tq, hq, d), "k": (b, tk, hk, d), "v": (b, tk, hk, d)}, params, head_dim=d)
    return [
        c("T63-c16-k2-D40", 2, 63, 63, 2, 2, 40, chunk_size=16, top_k=2),
        c("gqa4:2-T100-c16-k3-prefix5", 1, 100, 100, 4, 2, 32, chunk_size=16, top_k=3, prefix=5),
        c("bounds-T70-k2", 1, 70, 70, 2, 1, 16, boundaries=(0, 5, 20, 21, 40, 64), top_k=2),
        c("bounds-noZero-prefix3-T45", 2, 45, 45, 2, 2, 24, boundaries=(7, 30, 31), top_k=1, prefix=3),
        c("T10-lt-chunk32", 1, 10, 10, 2, 2, 16, chunk_size=32, top_k=2),
        c("topk0-own-only-T40-c8", 1, 40, 40, 2, 2, 16, chunk_size=8, top_k=0),
        c("topk-all-T33-c8", 1, 33, 33, 2, 1, 16, chunk_size=8, top_k=99),
        c("noncausal-T50-c8-k2", 1, 50, 50, 2, 2, 16, causal=False, chunk_size=8, top_k=2),
        c("Tq17-Tk50-c8-k2", 1, 17, 50, 2, 2, 16, chunk_size=8, top_k=2),
        c("Tq50-Tk17-c4-k1", 1, 50, 17, 2, 1, 16, chunk_size=4, top_k=1),
        c("gqa4:1-T65-c32-k1-D64", 1, 65, 65, 4, 1, 64, chunk_size=32, top_k=1),
        c("drop-T64-c8-k3", 1, 64, 64, 2, 2, 16, chunk_size=8, top_k=3, drop_off=0.3, drop_in=0.2, seed=3),
        c("T1", 1, 1, 1, 2, 1, 16, chunk_size=4, top_k=2),
        c("scale-T20-c5", 1, 20, 20, 2, 2, 16, chunk_size=5, top_k=1, scale=0.3),
    ]


def moc_bench_cases(device: str) -> list[Case]:
    def c(b, t, h, hk, d, chunk, k):
        return Case(f"B{b}-T{t}-H{h}-D{d}-chunk{chunk}-top{k}",
                    {"q": (b, t, h, d), "k": (b, t, hk, d), "v": (b, t, hk, d)},
                    {"chunk_size": chunk, "top_k": k}, head_dim=d)
    if device == "cuda":
        return [c(1, t, 16, 16, 128, 512, 8) for t in (8192, 16384, 32768)]
    return [c(1, 4096, 4, 4, 64, 128, 4), c(1, 2048, 4, 4, 64, 64, 4)]


def _flops(inputs: Inputs, params: MoCParams) -> float:
    """Expected forward FLOPs (see reference.expected_pairs) including the router."""
    b, tq, hq, d = inputs.shape["q"]
    tk, hk = inputs.shape["k"][1], inputs.shape["k"][2]
    return moc_flops(b, tq, tk, hq, hk, d, params.causal, params.chunk_size, params.top_k, params.prefix,
                     params.boundaries, params.drop_off, params.drop_in)


def moc_cost(shapes, params, mode: str) -> dict:
    b, tq, hq, d = shapes["q"]
    tk, hk = shapes["k"][1], shapes["k"][2]
    fwd = moc_flops(b, tq, tk, hq, hk, d, params.causal, params.chunk_size, params.top_k, params.prefix,
                    params.boundaries, params.drop_off, params.drop_in)
    return {"flops": fwd if mode == "fwd" else 3.5 * fwd}


def moc_kv_bytes(ctx, params: MoCParams, seq: int) -> float:
    """MoC keeps the whole KV cache (any past chunk may be routed to) plus one descriptor (mean
    key) per chunk and kv head."""
    elt = torch.empty((), dtype=ctx.dtype).element_size()
    n_chunks = len(chunk_bounds(seq, params.chunk_size, params.boundaries)) - 1
    return (2.0 * seq + n_chunks) * ctx.n_kv_heads * ctx.head_dim * elt




def _numba(q, k, v, **params):
    from ...kernels.numba.moc import moc_attention
    return moc_attention(q, k, v, **params)


def _triton(q, k, v, **params):
    from ...kernels.triton.moc import moc_attention
    return moc_attention(q, k, v, **params)


def moc_module(ctx, params):
    from .module import MoCMixer
    return MoCMixer(ctx, params)


@hookimpl
def blockzoo_register_components(registry) -> None:
    registry.add_component(Component(
        id="context.moc", slot="mixer", params=MoCParams,
        describe=describe_moc, module=moc_module, cases=moc_cases, flops=_flops,
        bench_cases=moc_bench_cases, baselines=attention_baselines, cost=moc_cost, kv_bytes=moc_kv_bytes,
        doc="Mixture of Contexts: per-query top-k chunk routing on mean-key descriptors, own chunk "
            "(causal) and prefix always kept, one softmax over the union; q/k/v [B, T, H, D], GQA.",
        source="Mixture of Contexts for Long Video Generation, arXiv 2508.21058 (ByteDance Seed + Stanford)"))


@hookimpl
def blockzoo_register_backends(registry) -> None:
    registry.add_backend(Backend(
        "context.moc", "reference", moc_reference,
        Capabilities(dtypes=GPU_DTYPES + (torch.float64,), rules=(_gqa_rule,)), priority=0,
        doc="shared router + dense fp32 scores with the routing mask (the oracle)"))
    registry.add_backend(Backend(
        "context.moc", "numba", _numba,
        Capabilities(devices=("cpu",), dtypes=CPU_FLOATS, requires=("numba>=0.60",), rules=(_gqa_rule,)),
        priority=20, doc="shared router + Numba online softmax over the selected chunks only, forward and backward"))
    registry.add_backend(Backend(
        "context.moc", "triton", _triton,
        Capabilities(devices=("cuda",), dtypes=GPU_DTYPES, head_dims=range(16, 257), requires=("triton>=3.6",),
                     min_compute_capability=(8, 0), interpreted_on_cpu=True, rules=(_gqa_rule,)),
        priority=30, doc="router (torch ops) + block-sparse Triton flash attention over selected chunks, "
                         "forward and backward"))
