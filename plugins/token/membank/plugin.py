"""Registers token.membank (sliding window + learned memory bank) and its backends through the
public hooks."""

from __future__ import annotations

import torch

from ....registry import Backend, Capabilities, Case, Component, Inputs, hookimpl
from ...attention.plugin import CPU_FLOATS, GPU_DTYPES, _gqa_rule, _sdpa
from .params import MemBankParams
from .reference import membank_flops, membank_reference, n_chunks


def describe_membank(q, k, v, bank_k, bank_v, params=None) -> Inputs:
    return Inputs.from_tensors({"q": q, "k": k, "v": v, "bank_k": bank_k, "bank_v": bank_v},
                               head_dim=q.shape[-1])


def _bank_rule(inputs: Inputs) -> list[str]:
    s = inputs.shape
    if "bank_k" not in s or "q" not in s or "k" not in s:
        return []
    (b, tq, _, d), (_, tk, hk, _), bk = s["q"], s["k"], s["bank_k"]
    if tq > tk:
        return [f"Tq={tq} > Tk={tk} (queries must be the last Tq key positions)"]
    if len(bk) != 4 or bk[0] != b or bk[2] != hk or bk[3] != d:
        return [f"bank_k {bk} must be [B, N*M, Hk, D] with B={b}, Hk={hk}, D={d}"]
    return []


def _case_shapes(b, tq, tk, hq, hk, d, w, m):
    n = n_chunks(tk, w)
    return {"q": (b, tq, hq, d), "k": (b, tk, hk, d), "v": (b, tk, hk, d),
            "bank_k": (b, n * m, hk, d), "bank_v": (b, n * m, hk, d)}


def membank_cases() -> list[Case]:
    def c(id, b, tq, tk, hq, hk, d, w, m, **params):
        return Case(id, _case_shapes(b, tq, tk, hq, hk, d, w, m), {"window": w, **params}, head_dim=d)
    return [
        c("T63-D40-W16-M3", 2, 63, 63, 2, 2, 40, 16, 3),
        c("gqa4:1-T50-W8-M4-D32", 1, 50, 50, 4, 1, 32, 8, 4),
        c("gqa3:1-T37-W5-M2", 1, 37, 37, 3, 1, 16, 5, 2),
        c("W1-T20-M2", 1, 20, 20, 2, 1, 16, 1, 2),
        c("W>T-T19-M5", 1, 19, 19, 2, 1, 16, 32, 5),
        c("Tq1-Tk12-W12-M6", 2, 1, 12, 4, 2, 16, 12, 6),
        c("Tq9-Tk40-W7-M3", 1, 9, 40, 2, 2, 16, 7, 3),
        c("M1-T33-W11-D64", 1, 33, 33, 2, 1, 64, 11, 1),
        c("scale-T24-W6-M2", 1, 24, 24, 2, 2, 16, 6, 2, scale=0.3),
    ]


def membank_bench_cases(device: str) -> list[Case]:
    def c(t, d, w, m, hq=16, hk=2, b=1):
        return Case(f"B{b}-T{t}-H{hq}:{hk}-D{d}-W{w}-M{m}", _case_shapes(b, t, t, hq, hk, d, w, m),
                    {"window": w}, head_dim=d)
    if device == "cuda":
        return [c(t, 128, 1024, 64) for t in (8192, 32768)]
    return [c(1024, 64, 128, 16, hq=8, hk=1)]


def membank_baselines(device: str) -> dict:
    """Dense causal SDPA over the whole sequence (what the window + bank replaces)."""
    if device == "cuda":
        return {"sdpa-flash-causal": _sdpa("FLASH_ATTENTION")}
    return {"sdpa-cpu-causal": _sdpa(None)}


def membank_cost(shapes, params, mode: str) -> dict:
    b, tq, hq, d = shapes["q"]
    tk = shapes["k"][1]
    n = n_chunks(tk, params.window)
    m = shapes["bank_k"][1] // n if n and "bank_k" in shapes else params.slots
    fwd = membank_flops(b, tq, tk, hq, d, params.window, m)
    return {"flops": fwd if mode == "fwd" else 3.5 * fwd}


def membank_flops_of(inputs: Inputs, params: MemBankParams) -> float:
    """Forward FLOPs of the op; without bank tensors in the inputs (the sweep's cost model passes
    q/k/v only) M is ``params.slots``."""
    s = inputs.shape
    b, tq, hq, d = s["q"]
    tk = s["k"][1]
    n = n_chunks(tk, params.window)
    m = s["bank_k"][1] // n if n and "bank_k" in s else params.slots
    return membank_flops(b, tq, tk, hq, d, params.window, m)


def membank_kv_bytes(ctx, params: MemBankParams, seq: int) -> float:
    """The decode cache never exceeds M bank slots + W window tokens per kv head (keys and values);
    below W tokens it is M + seq."""
    elt = torch.empty((), dtype=ctx.dtype).element_size()
    return 2.0 * (params.slots + min(seq, params.window)) * ctx.n_kv_heads * ctx.head_dim * elt


def _membank_numba(q, k, v, bank_k, bank_v, window=64, scale=None):
    from ....kernels.numba.membank import membank_attention
    return membank_attention(q, k, v, bank_k, bank_v, window=window, scale=scale)


def _membank_triton(q, k, v, bank_k, bank_v, window=64, scale=None):
    from ....kernels.triton.membank import membank_attention
    return membank_attention(q, k, v, bank_k, bank_v, window=window, scale=scale)


def membank_module(ctx, params):
    from .module import MemBankMixer
    return MemBankMixer(ctx, params)


@hookimpl
def blockzoo_register_components(registry) -> None:
    registry.add_component(Component(
        id="token.membank", slot="mixer", params=MemBankParams,
        describe=describe_membank, module=membank_module, cases=membank_cases, flops=membank_flops_of,
        bench_cases=membank_bench_cases, baselines=membank_baselines, cost=membank_cost,
        kv_bytes=membank_kv_bytes, op_params=("window", "scale"),
        doc="Sliding-window attention plus a learned fixed-size memory bank: a query at position p attends, "
            "under one softmax, to the keys p-W+1..p and to the M bank slots of its chunk p // W; the bank "
            "is updated every W tokens by a learned compressor (attention pooling + gated EMA) from the "
            "chunk that leaves the window. q/k/v [B, T, H, D], bank_k/bank_v [B, N*M, Hk, D] chunk-major.",
        source="press description attached to 'GenieDrive' (not an attention paper); the definition is "
               "ours (docs/components/membank.md)"))


@hookimpl
def blockzoo_register_backends(registry) -> None:
    rules = (_gqa_rule, _bank_rule)
    registry.add_backend(Backend(
        "token.membank", "reference", membank_reference,
        Capabilities(dtypes=GPU_DTYPES + (torch.float64,), rules=rules), priority=0,
        doc="explicit fp32 scores over [bank slots of the query's chunk | sliding window], one softmax "
            "(the oracle)"))
    registry.add_backend(Backend(
        "token.membank", "numba", _membank_numba,
        Capabilities(devices=("cpu",), dtypes=CPU_FLOATS, requires=("numba>=0.60",), grad=False, rules=rules),
        priority=20, doc="Numba forward only (one pass per (batch, position) over bank + window); no backward"))
    registry.add_backend(Backend(
        "token.membank", "triton", _membank_triton,
        Capabilities(devices=("cuda",), dtypes=GPU_DTYPES, head_dims=range(16, 257), requires=("triton>=3.6",),
                     min_compute_capability=(8, 0), interpreted_on_cpu=True, rules=rules),
        priority=30, doc="shared online-softmax core over [bank of the tile's chunk(s) | window key blocks] "
                         "(interior window blocks unmasked, boundary blocks with both window bounds); "
                         "backward: window dK/dV kernel, bank dK/dV kernel (core inner per chunk), dQ kernel"))
