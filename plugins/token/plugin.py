"""Registers the KV-cache policies ``token.streaming``, ``token.h2o``, ``token.snapkv``,
``token.evict`` and ``token.mixeddim`` (slot "kv") through the public hooks. Each component's functional op is its scorer
(``q [B, Tq, H, D]``, ``k, v [B, Tk, Hk, D]`` -> scores ``[B, Hk, Tk]``).

Slot "kv" is not a block slot: the composer never builds these through ``_make``. Their
``Component.module`` is ``(params, scorer, component_id) -> KVPolicy`` (``module.make_policy``
calls it; ``core/cache.py`` uses the policy). A backend sets ``materialises_attention`` (False
for a flash-style decode kernel); the spec rejects policies that need attention on such a one."""

from __future__ import annotations

import torch

from ...registry import Backend, Capabilities, Case, Component, Inputs, hookimpl
from ..attention.plugin import _gqa_rule
from ..attention.plugin import describe_attention as describe_scorer
from .module import EvictPolicy, H2OPolicy, MixedDimPolicy, SnapKVPolicy, StreamingPolicy
from .params import EvictParams, H2OParams, MixedDimParams, SnapKVParams, StreamingParams
from .reference import (
    evict_scores,
    gate_feature_dim,
    h2o_scores,
    mixeddim_scores,
    snapkv_scores,
    streaming_scores,
)

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _cases(**extra):
    def cases() -> list[Case]:
        def c(id, b, tq, tk, hq, hk, d, **params):
            return Case(id, {"q": (b, tq, hq, d), "k": (b, tk, hk, d), "v": (b, tk, hk, d)},
                        {**extra, **params}, head_dim=d)
        return [
            c("prefill-T63-D40", 2, 63, 63, 2, 2, 40),
            c("gqa4:2-T50", 1, 50, 50, 4, 2, 16),
            c("decode-Tq1-Tk37", 2, 1, 37, 4, 1, 32),
            c("window-Tq8-Tk40", 1, 8, 40, 2, 2, 16),
            c("T1", 1, 1, 1, 2, 1, 16),
        ]
    return cases


def describe_evict(q, k, v, w1, b1, w2, b2, params=None) -> Inputs:
    """token.evict's op: the attention tensors plus one layer's gate weights."""
    return Inputs.from_tensors({"q": q, "k": k, "v": v, "w1": w1, "b1": b1, "w2": w2, "b2": b2},
                               head_dim=q.shape[-1])


def _evict_cases() -> list[Case]:
    def c(id, b, tq, tk, hq, hk, d, e=8):
        f = gate_feature_dim(d)
        return Case(id, {"q": (b, tq, hq, d), "k": (b, tk, hk, d), "v": (b, tk, hk, d), "w1": (hk, f, e),
                         "b1": (hk, e), "w2": (hk, e), "b2": (hk,)}, {}, head_dim=d,
                    scale={"w1": f ** -0.5})
    return [
        c("prefill-T63-D40", 2, 63, 63, 2, 2, 40),
        c("gqa4:2-T50-odd-D15", 1, 50, 50, 4, 2, 15),
        c("decode-Tq1-Tk37", 2, 1, 37, 4, 1, 32, e=5),
        c("T1", 1, 1, 1, 2, 1, 16),
    ]


def _module(cls):
    def make(params, scorer, cid):
        return cls(cid, params, scorer)
    make.policy_class = cls  # the spec rule reads cls.needs_attention
    return make


def _kv_bytes(ctx, params, seq: int) -> float:
    """Bytes the policy keeps for one sequence of ``seq`` tokens at the end of prefill."""
    elt = torch.empty((), dtype=ctx.dtype).element_size()
    return 2.0 * params.keep(seq) * ctx.n_kv_heads * ctx.head_dim * elt


POLICIES = (
    ("token.streaming", StreamingParams, StreamingPolicy, streaming_scores, False,
     "StreamingLLM cache: attention-sink tokens + the most recent window; score = position",
     "Efficient Streaming Language Models with Attention Sinks (Xiao et al., ICLR 2024), arXiv 2309.17453"),
    ("token.h2o", H2OParams, H2OPolicy, h2o_scores, True,
     "Heavy-Hitter Oracle: keep the tokens with the largest accumulated attention + a recent window",
     "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs (Zhang et al., NeurIPS 2023), "
     "arXiv 2306.14048"),
    ("token.snapkv", SnapKVParams, SnapKVPolicy, snapkv_scores, True,
     "SnapKV: prompt compression at prefill by observation-window attention, max-pooled, per kv head",
     "SnapKV: LLM Knows What You are Looking for Before Generation (Li et al., 2024), arXiv 2404.14469"),
    ("token.evict", EvictParams, EvictPolicy, evict_scores, False,
     "learned retention gate per token (beta from k/v features, score = age * log beta, TRIM-KV style), "
     "distilled against the dense model with a budget penalty; top scores under the budget",
     "press description 'Beyond Token Eviction' (learned scorer, dynamic threshold); our definition follows "
     "TRIM-KV, Cache What Lasts: Token Retention for Memory-Bounded KV Cache in LLMs (Bui et al., 2025), "
     "arXiv 2512.03324; see docs/components/evict.md for which parts are ours"),
    ("token.mixeddim", MixedDimParams, MixedDimPolicy, mixeddim_scores, True,
     "mixed-dimension cache: each token keeps a number of K/V channels (0 = evicted), allocated greedily by "
     "attention-weighted energy loss under an exact element budget",
     "Beyond Token Eviction: Mixed-Dimension Budget Allocation for Efficient KV Cache Compression "
     "(MixedDimKV; Miao et al., 2026), arXiv 2603.20616; allocation rule, channel order, width levels and "
     "the packed pool layout are ours"),
)


@hookimpl
def blockzoo_register_components(registry) -> None:
    for cid, params, cls, _fn, _att, doc, source in POLICIES:
        extra = {"window": 4, "pool": 3} if cid == "token.snapkv" else {}
        evict = cid == "token.evict"
        registry.add_component(Component(
            id=cid, slot="kv", params=params, describe=describe_evict if evict else describe_scorer,
            module=_module(cls), cases=_evict_cases if evict else _cases(**extra), kv_bytes=_kv_bytes, doc=doc,
            source=source,
            op_params=tuple(f for f in params.model_fields if f in ("window", "pool"))))


@hookimpl
def blockzoo_register_backends(registry) -> None:
    for cid, _params, _cls, fn, needs_att, _doc, _source in POLICIES:
        grad = needs_att or cid == "token.evict"  # evict's scores are differentiable in k, v and the gate
        b = Backend(cid, "reference", fn, Capabilities(dtypes=DTYPES, grad=grad, rules=(_gqa_rule,)),
                    priority=0, doc="explicit fp32 attention probabilities (materialises them)")
        b.materialises_attention = True  # read by the spec rule for policies that need attention
        registry.add_backend(b)
