"""Registers precision.int8 (SageAttention-style) and precision.qaas and their backends."""

from __future__ import annotations

import contextlib

import torch

from ...registry import Backend, Capabilities, Case, Component, Inputs, hookimpl
from ...testing.tolerances import BASE, Tolerance
from ..attention.plugin import GPU_DTYPES, _gqa_rule, attention_baselines, attention_cost
from ..attention.plugin import describe_attention as describe_int8
from .params import Int8AttentionParams, QaasParams
from .reference import int8_reference, qaas_reference


def describe_qaas(q, k, v, tau=None, gamma=None, params=None) -> Inputs:
    return Inputs.from_tensors({"q": q, "k": k, "v": v, "tau": tau, "gamma": gamma}, head_dim=q.shape[-1])


def _c(id, b, tq, tk, hq, hk, d, qaas=False, **params):
    shapes = {"q": (b, tq, hq, d), "k": (b, tk, hk, d), "v": (b, tk, hk, d)}
    if not qaas:
        return Case(id, shapes, params, head_dim=d)
    shapes.update(tau=(hq,), gamma=(hq,))
    return Case(id, shapes, params, head_dim=d, offset={"tau": 0.5, "gamma": 1.0},
                scale={"tau": 0.1, "gamma": 0.1})


def int8_cases() -> list[Case]:
    return [
        _c("causal-T63-D40-b32", 2, 63, 63, 2, 2, 40, q_block=32, k_block=32),
        _c("noncausal-T63-D40-pv16", 1, 63, 63, 2, 2, 40, causal=False, pv="fp16", q_block=32, k_block=32),
        _c("gqa4:2-T100-D64", 1, 100, 100, 4, 2, 64, q_block=64, k_block=32),
        _c("Tq17-Tk50", 1, 17, 50, 2, 2, 32, q_block=32, k_block=32),
        _c("Tq50-Tk17-gqa2:1", 1, 50, 17, 2, 1, 32, q_block=32, k_block=32),
        _c("T1-D16", 1, 1, 1, 2, 1, 16, q_block=32, k_block=32),
        _c("nosmooth-scale-T40", 1, 40, 40, 2, 2, 16, smooth_k=False, scale=0.3, q_block=32, k_block=32),
        _c("default-blocks-T130-D128", 1, 130, 130, 1, 1, 128),
    ]


def qaas_cases() -> list[Case]:
    return [
        _c("causal-T63-D40-b32", 2, 63, 63, 2, 2, 40, True, q_block=32, k_block=32),
        _c("noncausal-T63-D40-fp8P", 1, 63, 63, 2, 2, 40, True, causal=False, binary=False,
           q_block=32, k_block=32),
        _c("gqa4:2-T100-D64", 1, 100, 100, 4, 2, 64, True, q_block=64, k_block=32),
        _c("Tq50-Tk17-gqa2:1", 1, 50, 17, 2, 1, 32, True, q_block=32, k_block=32),
        _c("T1-D16", 1, 1, 1, 2, 1, 16, True, q_block=32, k_block=32),
        _c("scale-temp-T40", 1, 40, 40, 2, 2, 16, True, scale=0.3, temperature=0.5, q_block=32, k_block=32),
        _c("default-blocks-T130-D128", 1, 130, 130, 1, 1, 128, True),
    ]


def bench_cases(qaas: bool):
    def cases(device: str) -> list[Case]:
        if device == "cuda":
            shapes = [(b, t, 32 if t < 16384 else 16) for (b, t) in ((4, 4096), (2, 8192), (1, 16384))]
            return [_c(f"B{b}-T{t}-H{h}-D128-{'causal' if causal else 'full'}", b, t, t, h, h, 128, qaas,
                       causal=causal) for (b, t, h) in shapes for causal in (False, True)]
        return [_c("B1-T1024-H8-D64-causal", 1, 1024, 1024, 8, 8, 64, qaas, causal=True)]
    return cases


def _flops(inputs: Inputs, params) -> float:
    from ..attention.reference import attention_flops
    b, tq, hq, d = inputs.shape["q"]
    return attention_flops(b, tq, inputs.shape["k"][1], hq, d, params.causal)


def quantised_tolerance(dtype: torch.dtype, kind: str, backend: str, device: str) -> Tolerance | None:
    """Forward tolerance against the QUANTISED reference (the reference emulates the rounding).

    Quantisation is a step function: where a kernel's fp32 value before a rounding differs from
    the reference's in the last bits (an exp2 approximation, another summation order), one code
    moves by one step: an FP8 P entry by 2^-3 of itself, an INT8 Q/K code by 1/127 of its block
    max. Over a row such flips are few; we allow one flipped FP8 P entry's worth at the worst
    element (max_rel 2^-4) and an rms of 2^-7 (plus the dtype's own output rounding).
    Gradients use the dtype's normal table (they are straight-through, unrounded), except that
    for float64 inputs they get the float32 one: qaas's gamma gradient is made of the quantised
    forward, which every backend computes in fp32 whatever the input dtype."""
    if kind != "fwd":
        return BASE[(torch.float32, "grad")] if dtype == torch.float64 else None
    base = BASE[(dtype, "fwd")]
    return Tolerance(max(2.0**-4, base.max_rel), max(2.0**-7, base.rms_rel))


class TritonDecisions:
    """Conformance oracle of ``precision.qaas``'s Triton backend (``Component.oracle``).

    Binary P is a step function of the scores. The compiled kernel's QK^T is an FP8 tensor-core
    dot whose accumulator keeps fewer bits than the reference's exact fp32 sum, so where a score
    lies within that rounding of its threshold the kernel may keep a key the reference drops (or
    the reverse); one such key moves a row by up to ~1/(kept keys) of its value range, far beyond
    any rounding tolerance. So the check records the kernel's own keep decisions from the very
    launch being checked (``record_decisions``) and evaluates the reference with them; the
    output must then match at the normal quantised tolerance. That the decisions differ from
    the exact ones only within the dot's rounding of the threshold is tested separately
    (``reference.decision_report``, tests/test_kernel_precision.py, bench/gpu_precision.py)."""

    def __init__(self) -> None:
        self.records: list[dict] | None = None

    @contextlib.contextmanager
    def capture(self):
        from ...kernels.triton.precision import record_decisions
        with record_decisions() as rec:
            yield
        self.records = rec

    def reference(self, q, k, v, tau, gamma, **kw):
        if self.records is None or len(self.records) != 1:
            n = None if self.records is None else len(self.records)
            raise AssertionError(f"precision.qaas oracle: expected one recorded Triton qaas launch, got {n}")
        keep = self.records[0]["keep"] if kw.get("binary", True) else None
        return qaas_reference(q, k, v, tau, gamma, keep=keep, **kw)


def qaas_oracle(backend: str, device: str):
    """The Triton backend is checked with its own keep decisions (:class:`TritonDecisions`),
    compiled and interpreted alike; the CPU backends against the plain reference."""
    return TritonDecisions() if backend == "triton" else None


def quantised_kv_bytes(ctx, params, seq: int) -> float:
    """Bytes of the quantised K and V the kernels read for one sequence of ``seq`` tokens: 1-byte
    codes (INT8 / FP8 K, FP8 V; fp16 V for int8 with ``pv="fp16"``), an fp32 scale per key block
    and kv head, an fp32 per-channel V scale, and (int8 with ``smooth_k``) the fp32 key mean.
    Analytic: what a cache in this format would hold (the modules do not keep a decode cache)."""
    hk, d = ctx.n_kv_heads, ctx.head_dim
    nbk = -(-seq // params.k_block)
    v_bytes = 2.0 if getattr(params, "pv", "fp8") == "fp16" else 1.0
    total = seq * hk * d * (1.0 + v_bytes) + 4.0 * nbk * hk + 4.0 * hk * d
    if getattr(params, "smooth_k", False):
        total += 4.0 * hk * d
    return total


def _int8_numba(q, k, v, **params):
    from ...kernels.numba.precision import int8_attention
    return int8_attention(q, k, v, **params)


def _int8_triton(q, k, v, **params):
    from ...kernels.triton.precision import int8_attention
    return int8_attention(q, k, v, **params)


def _qaas_numba(q, k, v, tau, gamma, **params):
    from ...kernels.numba.precision import qaas_attention
    return qaas_attention(q, k, v, tau, gamma, **params)


def _qaas_triton(q, k, v, tau, gamma, **params):
    from ...kernels.triton.precision import qaas_attention
    return qaas_attention(q, k, v, tau, gamma, **params)


def _fp8_rule(inputs: Inputs) -> list[str]:
    """FP8 (E4M3) tensor-core dots need compute capability 8.9+ (Ada / Hopper)."""
    if inputs.device == "cuda" and torch.cuda.is_available():
        cc = torch.cuda.get_device_capability()
        if cc < (8, 9):
            return [f"FP8 E4M3 tensor-core dots need compute capability >= 8.9 (Ada/Hopper); this GPU is {cc}"]
    return []


def _triton_caps():
    return Capabilities(devices=("cuda",), dtypes=GPU_DTYPES, head_dims=range(1, 257), requires=("triton>=3.6",),
                        min_compute_capability=(8, 0), interpreted_on_cpu=True, rules=(_gqa_rule, _fp8_rule))


def _int8_module(ctx, params):
    from .module import int8_module
    return int8_module(ctx, params)


def _qaas_module(ctx, params):
    from .module import qaas_module
    return qaas_module(ctx, params)


@hookimpl
def blockzoo_register_components(registry) -> None:
    registry.add_component(Component(
        id="precision.int8", slot="mixer", params=Int8AttentionParams,
        describe=describe_int8, module=_int8_module, cases=int8_cases, flops=_flops,
        bench_cases=bench_cases(False), baselines=attention_baselines, cost=attention_cost,
        tolerance=quantised_tolerance, accuracy=accuracy_report, kv_bytes=quantised_kv_bytes,
        doc="SageAttention-style quantised attention: key smoothing, per-block INT8 Q/K (softmax scale "
            "in Q), fp32 online softmax, FP8 P and per-channel FP8 V (or fp16 PV); straight-through "
            "backward = dense attention gradient; q/k/v [B, T, H, D], GQA.",
        source="SageAttention (Zhang et al., ICLR 2025, arXiv 2410.02367) and SageAttention2 (arXiv 2411.10958)"))
    registry.add_component(Component(
        id="precision.qaas", slot="mixer", params=QaasParams,
        describe=describe_qaas, module=_qaas_module, cases=qaas_cases, flops=_flops,
        op_params=("causal", "scale", "q_block", "k_block", "binary", "temperature"),
        bench_cases=bench_cases(True), baselines=attention_baselines, cost=attention_cost,
        tolerance=quantised_tolerance, oracle=qaas_oracle, accuracy=accuracy_report, kv_bytes=quantised_kv_bytes,
        doc="Quantized Attention with Adaptive Scaling (our definition): per-tile FP8 Q/K, fp32 online "
            "softmax, binarised P (learned threshold fraction tau per head) with mass-preserving tile "
            "scales and a learned per-head output scale gamma; straight-through gradients. Lossy.",
        source="press description only (no paper found); the exact definition is ours, see docs/components/qaas.md"))


@hookimpl
def blockzoo_register_backends(registry) -> None:
    ref_caps = Capabilities(dtypes=GPU_DTYPES + (torch.float64,), rules=(_gqa_rule,))
    # the Numba emulations quantise and accumulate in fp32 whatever the input dtype, so they do not
    # offer float64 (a float64 call goes to the reference): a float64 check of them would compare
    # fp32 results against fp64, e.g. qaas's gamma gradient, a cancelling sum over every output.
    numba_caps = Capabilities(devices=("cpu",), dtypes=(torch.float32,), requires=("numba>=0.60",),
                              rules=(_gqa_rule,))
    registry.add_backend(Backend(
        "precision.int8", "reference", int8_reference, ref_caps, priority=0,
        doc="torch emulation of the kernels' exact quantisation; backward: fp32 dense attention gradient"))
    registry.add_backend(Backend(
        "precision.int8", "numba", _int8_numba, numba_caps, priority=20,
        doc="Numba emulation of the same quantisation (forward); backward: the Numba dense attention kernel"))
    registry.add_backend(Backend(
        "precision.int8", "triton", _int8_triton, _triton_caps(), priority=30,
        doc="Triton pre-pass (INT8 Q/K, FP8 V) + INT8 QK^T / FP8 PV tensor-core dots (interpreted: exact "
            "fp32 dots on the codes); backward: the dense Triton attention core"))
    registry.add_backend(Backend(
        "precision.qaas", "reference", qaas_reference, ref_caps, priority=0,
        doc="torch emulation of the kernels' exact quantisation; backward: straight-through surrogate"))
    registry.add_backend(Backend(
        "precision.qaas", "numba", _qaas_numba, numba_caps, priority=20,
        doc="Numba emulation of the same quantisation (forward); backward: the reference's torch surrogate"))
    registry.add_backend(Backend(
        "precision.qaas", "triton", _qaas_triton, _triton_caps(), priority=30,
        doc="Triton pre-pass (FP8 Q/K/V) + FP8 tensor-core dots, binary P; backward: the reference's torch "
            "surrogate"))


def accuracy_report(fn, tensors: dict, kwargs: dict, max_tokens: int = 2048) -> dict[str, float]:
    """``blockzoo bench``'s accuracy columns: cosine similarity, relative L1 and RMSE of ``fn``'s
    forward vs fp32 attention, on the bench's random inputs and on outlier-channel inputs of the
    same shape (``reference.outlier_inputs``); cut to batch 1 and ``max_tokens`` tokens (a smaller
    problem of the same kind) so the fp32 yardstick fits in memory."""
    from .reference import accuracy, dense_fp32, outlier_inputs
    q, k, v = (tensors[n][:1, :max_tokens].detach() for n in ("q", "k", "v"))
    extra = {n: tensors[n].detach() for n in ("tau", "gamma") if tensors.get(n) is not None}
    causal, scale = kwargs.get("causal", True), kwargs.get("scale")
    out = {}
    for tag, (a, b, c) in (("", (q, k, v)),
                           ("_outliers", outlier_inputs(1, q.shape[1], q.shape[2], k.shape[2], q.shape[3],
                                                        q.dtype, q.device, seed=0))):
        m = accuracy(fn(a, b, c, **extra, **kwargs), dense_fp32(a, b, c, causal, scale))
        out.update({f"{name}{tag}": val for name, val in m.items()})
    return out
