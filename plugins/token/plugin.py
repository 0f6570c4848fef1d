"""Registers the KV-cache policies ``token.streaming``, ``token.h2o``, ``token.snapkv`` (slot
"kv") through the public hooks. Each component's functional op is its scorer
(``q [B, Tq, H, D]``, ``k, v [B, Tk, Hk, D]`` -> scores ``[B, Hk, Tk]``).

Slot "kv" is not a block slot: the composer never builds these through ``_make``. Their
``Component.module`` is ``(params, scorer, component_id) -> KVPolicy`` (``module.make_policy``
calls it; ``core/cache.py`` uses the policy). A backend sets ``materialises_attention`` (False
for a flash-style decode kernel); the spec rejects policies that need attention on such a one."""

from __future__ import annotations

import torch

from ...registry import Backend, Capabilities, Case, Component, hookimpl
from ..attention.plugin import _gqa_rule
from ..attention.plugin import describe_attention as describe_scorer
from .module import H2OPolicy, SnapKVPolicy, StreamingPolicy
from .params import H2OParams, SnapKVParams, StreamingParams
from .reference import h2o_scores, snapkv_scores, streaming_scores

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
)


@hookimpl
def blockzoo_register_components(registry) -> None:
    for cid, params, cls, _fn, _att, doc, source in POLICIES:
        extra = {"window": 4, "pool": 3} if cid == "token.snapkv" else {}
        registry.add_component(Component(
            id=cid, slot="kv", params=params, describe=describe_scorer, module=_module(cls),
            cases=_cases(**extra), kv_bytes=_kv_bytes, doc=doc, source=source,
            op_params=tuple(f for f in params.model_fields if f in ("window", "pool"))))


@hookimpl
def blockzoo_register_backends(registry) -> None:
    for cid, _params, _cls, fn, needs_att, _doc, _source in POLICIES:
        b = Backend(cid, "reference", fn, Capabilities(dtypes=DTYPES, grad=needs_att, rules=(_gqa_rule,)),
                    priority=0, doc="explicit fp32 attention probabilities (materialises them)")
        b.materialises_attention = True  # read by the spec rule for policies that need attention
        registry.add_backend(b)
