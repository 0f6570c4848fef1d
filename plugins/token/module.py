"""Policy objects the KV cache (``core/cache.py``) calls: when to score, where scores come from.

Eviction schedule: ``token.streaming`` and ``token.h2o`` evict after prefill and after every
decoding step whenever the cache holds more than its budget (so it never exceeds it);
``token.snapkv`` compresses the prompt once, after prefill, and then appends decoded tokens
without eviction (as in the SnapKV paper).
"""

from __future__ import annotations

from typing import Any

import torch

from .reference import per_kv_head


class KVPolicy:
    """Base: a scorer op (the registered backend's function) plus the budget params.

    needs_attention: the scores need attention probabilities (the decode attention must
    materialise them). evicts_on_step: evict during decoding too, not only after prefill.
    accumulates: the layer cache keeps a running score (H2O) instead of rescoring."""

    needs_attention = False
    evicts_on_step = True
    accumulates = False

    def __init__(self, component_id: str, params: Any, scorer) -> None:
        self.component_id = component_id
        self.params = params
        self.scorer = scorer
        self.op_kwargs = params.model_dump()

    def keep(self, seen: int) -> int:
        return self.params.keep(seen)

    def prefill_scores(self, q, k, v, positions) -> torch.Tensor:
        """[B, Hk, T] scores of the prompt's tokens (q, k, v as the mixer has them, [B, T, H, D])."""
        return self.scorer(q, k, v, **self.op_kwargs)

    def step_scores(self, layer, probs: torch.Tensor | None) -> torch.Tensor:
        """[B, Hk, T] scores of the cached tokens after a decoding step (``layer`` a LayerCache;
        ``probs`` [B, Hq, Tq, T] the step's attention over the cache)."""
        raise NotImplementedError


class StreamingPolicy(KVPolicy):
    def prefill_scores(self, q, k, v, positions):
        return self.scorer(q, k, v, positions=positions, **self.op_kwargs)

    def step_scores(self, layer, probs):
        return layer.pos.to(torch.float32)


class H2OPolicy(KVPolicy):
    needs_attention = True
    accumulates = True

    def step_scores(self, layer, probs):
        layer.acc = layer.acc + per_kv_head(probs, layer.k.shape[1]).to(layer.acc.dtype)
        return layer.acc


class SnapKVPolicy(KVPolicy):
    needs_attention = True
    evicts_on_step = False

    def step_scores(self, layer, probs):  # never called: no eviction while decoding
        raise RuntimeError("token.snapkv compresses at prefill only")


POLICY_CLASSES = {"token.streaming": StreamingPolicy, "token.h2o": H2OPolicy, "token.snapkv": SnapKVPolicy}


def make_policy(ref, backend: str | None = None) -> KVPolicy:
    """A spec's ``kv:`` ComponentRef (or a component id) -> the policy object."""
    from ...registry import get_registry
    reg = get_registry()
    cid = ref if isinstance(ref, str) else ref.type
    params = {} if isinstance(ref, str) else ref.params
    name = backend or (None if isinstance(ref, str) else ref.backend) or "reference"
    comp = reg.component(cid)
    if name == "auto":
        name = reg.backends_for(cid)[0].name
    if comp.slot != "kv" or comp.module is None:
        raise ValueError(f"{cid!r} is not a KV-cache policy (slot {comp.slot!r})")
    return comp.module(comp.params(**params), reg.backend(cid, name).fn, cid)
