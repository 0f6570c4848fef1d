"""Registers ``token.temf`` (chunked attention with learned chunk summaries; our definition of the
press description "Temporal Memory Fusion") and its backends through the public hooks.

The functional op is the attention over [summaries of earlier chunks | own chunk, causal]:
``q [B, T, Hq, D]``, ``k, v [B, T, Hk, D]``, ``sk, sv [B, (T-1)//chunk, S, Hk, D]`` -> o like q.
The learned compressor that makes sk/sv from k/v is ordinary torch in the module
(:class:`.module.ChunkCompressor`); its gradient flows through the op's dsk/dsv."""

from __future__ import annotations

import torch

from ....registry import Backend, Capabilities, Case, Component, Inputs, hookimpl
from ...attention.plugin import CPU_FLOATS, GPU_DTYPES, _gqa_rule, _sdpa
from .params import TemfParams
from .reference import (
    compressor_flops,
    decode_cache_tokens,
    n_summary_chunks,
    temf_flops,
    temf_reference,
)


def describe_temf(q, k, v, sk, sv, params=None) -> Inputs:
    return Inputs.from_tensors({"q": q, "k": k, "v": v, "sk": sk, "sv": sv}, head_dim=q.shape[-1])


def _summary_rule(inputs: Inputs) -> list[str]:
    s = inputs.shape
    if "sk" not in s or "q" not in s or "k" not in s:
        return []
    (b, _, _, d), sk = s["q"], s["sk"]
    if len(sk) != 5 or sk[0] != b or sk[3] != s["k"][2] or sk[4] != d:
        return [f"sk {sk} must be [B, N, S, Hk, D] with B={b}, Hk={s['k'][2]}, D={d}"]
    return []


def _case(id, b, t, hq, hk, d, chunk, s, **params):
    n = n_summary_chunks(t, chunk)
    return Case(id, {"q": (b, t, hq, d), "k": (b, t, hk, d), "v": (b, t, hk, d),
                     "sk": (b, n, s, hk, d), "sv": (b, n, s, hk, d)},
                {"chunk": chunk, "summaries": s, **params}, head_dim=d)


def temf_cases() -> list[Case]:
    return [
        _case("T63-D40-C8-S3", 2, 63, 2, 2, 40, 8, 3),
        _case("gqa4:1-T33-C5-S2-D32", 1, 33, 4, 1, 32, 5, 2),
        _case("gqa2:1-T64-C16-S4", 1, 64, 4, 2, 16, 16, 4),
        _case("T50-C20-S5-D64", 1, 50, 2, 2, 64, 20, 5),
        _case("C1-T12-S2", 1, 12, 2, 1, 16, 1, 2),
        _case("CgtT-T20-C32", 1, 20, 2, 1, 16, 32, 1),
        _case("T1-C4", 1, 1, 2, 1, 16, 4, 2),
        _case("scale-T30-C7-S2", 1, 30, 2, 2, 16, 7, 2, scale=0.3),
    ]


def temf_bench_cases(device: str) -> list[Case]:
    def c(t, chunk, s, hq=16, hk=16, d=128, b=1):
        case = _case(f"B{b}-T{t}-H{hq}:{hk}-D{d}-C{chunk}-S{s}", b, t, hq, hk, d, chunk, s)
        return case
    if device == "cuda":
        return [c(32768, 256, 4), c(8192, 256, 4), c(32768, 128, 4, hk=2)]
    return [c(1024, 64, 4, hq=8, hk=1, d=64), c(2048, 128, 4, hq=8, hk=1, d=64)]


def temf_baselines(device: str) -> dict:
    """SDPA dense causal attention over the whole sequence (the summaries ignored)."""
    if device == "cuda":
        return {"sdpa-flash-dense": _sdpa("FLASH_ATTENTION")}
    return {"sdpa-cpu-dense": _sdpa(None)}


def temf_cost(shapes, params: TemfParams, mode: str) -> dict:
    b, t, hq, d = shapes["q"]
    fwd = temf_flops(b, t, hq, d, params.chunk, shapes["sk"][2])
    return {"flops": fwd if mode == "fwd" else 3.5 * fwd}


def temf_flops_of(inputs: Inputs, params: TemfParams) -> float:
    """Forward FLOPs of the op plus the compressor (S from sk if given, else params.summaries)."""
    s = inputs.shape
    b, t, hq, d = s["q"]
    n_s = s["sk"][2] if "sk" in s else params.summaries
    hk = s["k"][2]
    return temf_flops(b, t, hq, d, params.chunk, n_s) + \
        compressor_flops(b, t, hk, d, params.chunk, n_s, params.hidden)


def temf_kv_bytes(ctx, params: TemfParams, seq: int) -> float:
    """Decode cache after ``seq`` tokens: (seq // C) * S summaries + seq % C open keys, K and V."""
    elt = torch.empty((), dtype=ctx.dtype).element_size()
    return 2.0 * decode_cache_tokens(seq, params.chunk, params.summaries) * ctx.n_kv_heads * ctx.head_dim * elt


def _temf_numba(q, k, v, sk, sv, chunk=256, scale=None):
    from ....kernels.numba.temf import temf_attention
    return temf_attention(q, k, v, sk, sv, chunk=chunk, scale=scale)


def _temf_triton(q, k, v, sk, sv, chunk=256, scale=None):
    from ....kernels.triton.temf import temf_attention
    return temf_attention(q, k, v, sk, sv, chunk=chunk, scale=scale)


def temf_module(ctx, params):
    from .module import TemfMixer
    return TemfMixer(ctx, params)


@hookimpl
def blockzoo_register_components(registry) -> None:
    registry.add_component(Component(
        id="token.temf", slot="mixer", params=TemfParams,
        describe=describe_temf, module=temf_module, cases=temf_cases, flops=temf_flops_of,
        bench_cases=temf_bench_cases, baselines=temf_baselines, cost=temf_cost, kv_bytes=temf_kv_bytes,
        op_params=("chunk", "scale"),
        doc="Chunked attention with learned chunk summaries: a query attends causally to its own chunk "
            "and to S learned summary K/V per earlier chunk, one softmax; q/k/v [B, T, H, D], sk/sv "
            "[B, (T-1)//chunk, S, Hk, D]. Decode cache (T//C)*S + T%C per kv head.",
        source="press description 'Temporal Memory Fusion' (no paper found); definition and compressor "
               "are ours, see docs/components/temf.md"))


@hookimpl
def blockzoo_register_backends(registry) -> None:
    rules = (_gqa_rule, _summary_rule)
    registry.add_backend(Backend(
        "token.temf", "reference", temf_reference,
        Capabilities(dtypes=GPU_DTYPES + (torch.float64,), rules=rules), priority=0,
        doc="explicit fp32 scores over [summaries | sequence] with the chunk masks, one softmax (the oracle)"))
    registry.add_backend(Backend(
        "token.temf", "numba", _temf_numba,
        Capabilities(devices=("cpu",), dtypes=CPU_FLOATS, grad=False, requires=("numba>=0.60",), rules=rules),
        priority=20, doc="forward only: Numba attention core over the chunks as a batch + a summary pass "
                         "merged by log-sum-exp"))
    registry.add_backend(Backend(
        "token.temf", "triton", _temf_triton,
        Capabilities(devices=("cuda",), dtypes=GPU_DTYPES, head_dims=range(16, 257), requires=("triton>=3.6",),
                     min_compute_capability=(8, 0), interpreted_on_cpu=True, rules=rules),
        priority=30, doc="chunk-local tiles on the shared online-softmax core: summary segment + own chunk in "
                         "one state; backward dQ, chunk-local dK/dV and summary dK/dV kernels on the core's "
                         "inner loops"))
