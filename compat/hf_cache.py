"""blockzoo KV-cache policies (``token.streaming`` / ``token.h2o`` / ``token.snapkv``) as a
transformers ``Cache``, for ``model.generate(..., past_key_values=cache)``.

Two pieces work together (both public transformers API, >= 4.56, written against 5.x):

* :class:`PolicyCache`, a ``transformers.Cache`` whose layers (:class:`PolicyLayer`, a
  ``DynamicLayer``) append the new keys / values and, once the layer's attention has run, let
  the policy score the cached tokens and keep the budget with blockzoo's shared selector and
  compaction (``plugins/token/reference.py`` ``select`` / ``compact``) -- the same schedule as
  blockzoo's own decoding (``core/cache.py``): prefill attends the whole prompt and then scores
  it with the policy's scorer op (``q, k, v -> [B, Hk, T]``); each decoding step attends the kept
  tokens plus the new one and then, for policies that evict on steps, rescores (StreamingLLM:
  position; H2O: the step's attention probabilities added to the running score) and evicts
  down to the budget. After every forward a layer holds exactly ``policy.keep(seen)`` tokens
  (SnapKV: after prefill; it appends afterwards, as in the paper).
* an observing attention function, registered with ``AttentionInterface`` as
  ``blockzoo-kv-<inner>`` and selected on the model by :func:`install`: it runs the model's own
  attention (``<inner>``: eager, sdpa, a blockzoo attention, ...) unchanged and then hands the
  layer the query states (the scorers need them) and the attention probabilities if the inner
  implementation returned them. With any other cache (or none) it only runs the inner function.

Positions: ``get_seq_length`` is the number of tokens *seen* (the model derives RoPE positions
from it), not the number kept; ``get_mask_sizes`` gives ``kv_length = kept + new`` with
``kv_offset = seen - kept``, so the mask's causal comparison over the new tokens is exact and
every kept (older) token is visible.

Refused, with the reason (mirroring the spec rules of ``core/spec.py``): a policy that needs
attention probabilities (``needs_attention``: H2O, SnapKV) on a scorer backend that never
materialises them, or on a model whose attention implementation never returns them (only
``eager`` does; sdpa / flash / flex / blockzoo ops return none); any policy over a blockzoo
attention component other than ``attention.dense`` (decoding over the kept subset is dense
attention); sliding-window / chunked / linear layers; padded batches; ``crop`` (assisted
decoding) once tokens were evicted.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import torch

PREFIX = "blockzoo-kv-"
MATERIALISING_IMPLEMENTATIONS = ("eager",)  # transformers implementations that return probabilities

_active = threading.local()  # .entry = (layer, keys): the layer whose attention runs next


TESTED_TRANSFORMERS = "5.23"


def _transformers_cache():
    """(Cache, DynamicLayer), after checking for the cache API this module is written against
    (transformers 5.x: mask sizes from the query length, query offsets from the cache)."""
    import inspect

    import transformers
    from transformers.cache_utils import Cache, DynamicLayer
    params = list(inspect.signature(DynamicLayer.get_mask_sizes).parameters)
    if not hasattr(Cache, "get_query_offset") or params[1:2] != ["query_length"]:
        raise ImportError(f"the blockzoo KV-cache policy caches need the transformers 5.x cache API (tested with "
                          f"{TESTED_TRANSFORMERS}); found transformers {transformers.__version__}. The dense cache "
                          "and the attention adapter work from 4.56")
    return Cache, DynamicLayer


# ---------------------------------------------------------------------------------------------
# policy resolution (the same objects core/cache.py uses)
def resolve_policy(policy: Any, backend: str | None = None, **params: Any):
    """(KVPolicy, scorer Backend) from a component id, a ``kv:`` ComponentRef (or its dict), or
    a KVPolicy. ``params`` (budget, sinks, ...) are merged over the ref's own params."""
    from ..core.spec import ComponentRef
    from ..plugins.token.module import KVPolicy, make_policy
    from ..registry import get_registry
    reg = get_registry()
    if isinstance(policy, KVPolicy):
        if params or backend:
            raise ValueError("a KVPolicy object already carries its params and backend; pass the component id "
                             "or ComponentRef to set them")
        name = getattr(policy, "backend_name", "reference")
        return policy, reg.backend(policy.component_id, name)
    if isinstance(policy, str):
        ref = ComponentRef(type=policy, params=params, backend=backend)
    elif isinstance(policy, dict):
        ref = ComponentRef.model_validate(policy)
    elif isinstance(policy, ComponentRef):
        ref = policy
    else:
        raise TypeError(f"policy must be a component id, a ComponentRef (a spec's kv: section), its dict, or a "
                        f"KVPolicy; got {type(policy).__name__}")
    if not isinstance(policy, str) and (params or backend):
        ref = ref.model_copy(update={"params": {**ref.params, **params}, "backend": backend or ref.backend})
    comp = reg.component(ref.type)  # unknown ids: RegistryError naming the nearest
    if comp.slot != "kv":
        raise ValueError(f"{ref.type!r} is not a KV-cache policy (slot {comp.slot!r}); KV-cache policies: "
                         f"{', '.join(sorted(c for c, v in reg.components.items() if v.slot == 'kv'))}")
    name = ref.backend or "reference"
    if name == "auto":
        name = reg.backends_for(ref.type)[0].name
    scorer_backend = reg.backend(ref.type, name)  # unknown backend: RegistryError
    pol = make_policy(ref, name)
    pol.backend_name = name
    return pol, scorer_backend


def check_policy(policy, scorer_backend, inner: str) -> None:
    """Raise with the reason when ``policy`` cannot run over the model attention ``inner``."""
    from transformers import AttentionInterface
    cid = policy.component_id
    fn = AttentionInterface._global_mapping.get(inner)
    component = getattr(fn, "component_id", None)  # a blockzoo attention registered by compat.hf
    if component is not None and component != "attention.dense":
        raise ValueError(f"KV-cache policy {cid} needs dense attention over the kept tokens, but the model's "
                         f"attention is the blockzoo component {component} ({inner!r}); use attention.dense or "
                         "a transformers implementation, or decode that component with the full cache "
                         "(make_cache('dense'))")
    from ..plugins.token.module import KVPolicy
    if hasattr(policy, "rewrite"):
        raise ValueError(f"KV-cache policy {cid} rewrites the cached tokens themselves (not keep-or-drop); the "
                         "Hugging Face cache supports the keep-or-drop policies (token.streaming, token.h2o, "
                         "token.snapkv) only")
    base_bind = getattr(KVPolicy, "bind", None)
    if base_bind is not None and getattr(type(policy), "bind", base_bind) is not base_bind:
        raise ValueError(f"KV-cache policy {cid} binds parts learned for a blockzoo model (policy.bind); the "
                         "Hugging Face cache supports the keep-or-drop policies without learned parts "
                         "(token.streaming, token.h2o, token.snapkv) only")
    if not policy.needs_attention:
        return
    if not getattr(scorer_backend, "materialises_attention", False):
        raise ValueError(f"{cid} scores tokens from attention probabilities, but its backend "
                         f"{scorer_backend.name!r} never materialises them; use a backend that does (reference)")
    if inner not in MATERIALISING_IMPLEMENTATIONS:
        raise ValueError(f"{cid} scores tokens from attention probabilities, but the model's attention "
                         f"implementation {inner!r} never materialises them; load the model with "
                         "attn_implementation='eager' (or call model.set_attn_implementation('eager') before "
                         "make_cache), or use token.streaming, which needs none")


def _check_layer_types(config) -> int:
    """The number of layers; every one must be full attention."""
    from transformers.cache_utils import get_layer_types_and_kwargs
    text = config.get_text_config(decoder=True)
    types, _ = get_layer_types_and_kwargs(text)
    bad = sorted({t for t in types if t != "full_attention"})
    if bad:
        raise ValueError(f"KV-cache policies support full-attention layers only; this model has {bad} layers "
                         "(their caches are windowed or recurrent already)")
    return len(types)


# ---------------------------------------------------------------------------------------------
# the observing attention function
def _inner_function(inner: str, module):
    from transformers import AttentionInterface
    if inner == "eager":  # not in the interface: each modeling file has its own eager function
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is None:
            raise RuntimeError(f"{type(module).__name__}: no eager_attention_forward in {type(module).__module__}; "
                               "the blockzoo KV-cache policies need a model that follows transformers' "
                               "attention-interface convention")
        return fn
    return AttentionInterface._global_mapping[inner]


class ObservingAttention:
    """Attention-interface function: the model's own attention ``inner``, then the report of
    (query, probabilities) to the :class:`PolicyLayer` whose ``update`` ran just before."""

    def __init__(self, inner: str) -> None:
        self.inner = inner

    def __call__(self, module, query, key, value, attention_mask, *args, **kwargs):
        entry = getattr(_active, "entry", None)
        layer = None
        if entry is not None and entry[1] is key:
            _active.entry = None
            layer = entry[0]
            if attention_mask is not None:
                from .hf import _plain_mask
                if not _plain_mask(attention_mask, query.shape[2], key.shape[2], True):
                    raise ValueError(
                        f"{layer.policy.component_id}: got an attention mask of shape "
                        f"{tuple(attention_mask.shape)} that masks more than the causal pattern (a padded batch); "
                        "KV-cache policies evict per sequence and support unpadded batches of equal length only")
        out, weights = _inner_function(self.inner, module)(module, query, key, value, attention_mask, *args, **kwargs)
        if layer is not None:
            layer.observe(query, weights)
        return out, weights

    def __repr__(self) -> str:
        return f"ObservingAttention({self.inner!r})"


def install(model, policy=None, scorer_backend=None) -> str:
    """Make ``model`` run its attention through the observing wrapper (idempotent); returns the
    implementation name. With a policy, first check that it can run over this attention."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    impl = model.config._attn_implementation
    if impl is None:
        raise ValueError("the model has no attention implementation set (config._attn_implementation is None)")
    inner = impl[len(PREFIX):] if impl.startswith(PREFIX) else impl
    if policy is not None:
        check_policy(policy, scorer_backend, inner)
    name = PREFIX + inner
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, ObservingAttention(inner))
        mask_fn = AttentionMaskInterface._global_mapping.get(inner)
        if mask_fn is not None:
            AttentionMaskInterface.register(name, mask_fn)
    if impl != name:
        model.set_attn_implementation(name)
        if model.config._attn_implementation != name:
            raise RuntimeError(f"{type(model).__name__} did not accept attn_implementation={name!r}")
    return name


# ---------------------------------------------------------------------------------------------
# the cache
def _make_classes():
    Cache, DynamicLayer = _transformers_cache()

    class PolicyLayer(DynamicLayer):
        """One layer's kept keys / values ``[B, Hk, T_kept, D]`` with their absolute positions
        ``pos`` ``[B, Hk, T_kept]`` and, for H2O, the running scores ``acc``. ``seen`` counts the
        tokens written so far. Exposes ``k`` / ``pos`` / ``acc`` as ``core.cache.LayerCache`` does,
        which the policies' ``step_scores`` read."""

        def __init__(self, policy, layer_idx: int, group: object = None) -> None:
            super().__init__()
            self.policy = policy
            self.layer_idx = layer_idx
            self.group = group  # shared by the layers of one cache
            self.pos: torch.Tensor | None = None
            self.acc: torch.Tensor | None = None
            self.seen = 0
            self._pending: tuple[int, bool] | None = None  # (new tokens, was it the prefill)

        @property
        def k(self) -> torch.Tensor:
            return self.keys

        @property
        def size(self) -> int:
            return 0 if self.keys is None or self.keys.dim() != 4 else self.keys.shape[2]

        def update(self, key_states, value_states, *args, **kwargs):
            entry = getattr(_active, "entry", None)
            stale = entry is not None and entry[0].group is self.group
            if self._pending is not None or stale:
                which = entry[0].layer_idx if stale else self.layer_idx
                raise RuntimeError(
                    f"layer {which}: its attention never reported to the blockzoo KV cache"
                    " (the model's attention implementation was changed after make_cache, or the model "
                    "alters the cached keys before attention, or an earlier forward failed); build a new cache "
                    "with make_cache(policy, model)")
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            b, hk, t, _ = key_states.shape
            pos = torch.arange(self.seen, self.seen + t, device=key_states.device).view(1, 1, t).expand(b, hk, t)
            first = self.size == 0
            if first:
                self.keys, self.values, self.pos = key_states, value_states, pos
            else:
                self.keys = torch.cat([self.keys, key_states], dim=-2)
                self.values = torch.cat([self.values, value_states], dim=-2)
                self.pos = torch.cat([self.pos, pos], dim=-1)
                if self.acc is not None:
                    self.acc = torch.cat([self.acc, self.acc.new_zeros(b, hk, t)], dim=-1)
            self.seen += t
            self._pending = (t, first)
            _active.entry = (self, self.keys)
            return self.keys, self.values

        def observe(self, query: torch.Tensor, probs: torch.Tensor | None) -> None:
            """After this layer's attention: score and evict (query [B, Hq, t, D]; probs
            [B, Hq, t, T_kept] or None)."""
            _, first = self._pending
            self._pending = None
            pol = self.policy
            if first:  # prefill: the scorer op over the whole prompt (layout [B, T, H, D])
                scores = pol.prefill_scores(query.transpose(1, 2), self.keys.transpose(1, 2),
                                            self.values.transpose(1, 2), self.pos).float()
                if pol.accumulates:
                    self.acc = scores
                self._evict(scores)
                return
            if not pol.evicts_on_step:
                return
            if pol.needs_attention and probs is None:
                raise ValueError(f"{pol.component_id} scores tokens from attention probabilities, but this layer's "
                                 "attention returned none (the model's attention implementation changed to one "
                                 "that never materialises them); use attn_implementation='eager'")
            self._evict(pol.step_scores(self, probs).float())

        def _evict(self, scores: torch.Tensor) -> None:
            from ..plugins.token.reference import compact, select
            keep = self.policy.keep(self.seen)
            if self.size <= keep:
                return
            p = self.policy.params
            select = getattr(self.policy.scorer, "select", select)  # a kernel backend's exact fast path,
            compact = getattr(self.policy.scorer, "compact", compact)  # as core/cache.py uses it
            idx = select(scores, self.pos, self.seen, keep, p.sinks, p.recent)
            extra = (self.acc,) if self.acc is not None else ()
            out = compact(idx, self.keys, self.values, self.pos, *extra)
            self.keys, self.values, self.pos = out[:3]
            if extra:
                self.acc = out[3]

        # -- transformers' bookkeeping -------------------------------------------------------
        def get_seq_length(self) -> int:
            return self.seen

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.size + query_length, self.seen - self.size

        def kept(self) -> int:
            return self.size

        def reset(self) -> None:
            super().reset()
            self.pos = self.acc = None
            self.seen = 0
            self._pending = None

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove == 0 or not self.is_initialized:
                return
            raise NotImplementedError(f"{self.policy.component_id}: a policy cache cannot be cropped (assisted "
                                      "decoding / speculative rollback); evicted tokens cannot be restored")

        def _batch(self, fn) -> None:
            if self.size:
                self.keys, self.values, self.pos = fn(self.keys), fn(self.values), fn(self.pos)
                if self.acc is not None:
                    self.acc = fn(self.acc)

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            self._batch(lambda x: x.index_select(0, beam_idx.to(x.device)))

        def batch_repeat_interleave(self, repeats: int) -> None:
            self._batch(lambda x: x.repeat_interleave(repeats, dim=0))

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            self._batch(lambda x: x[indices, ...])

    class PolicyCache(Cache):
        """A transformers ``Cache`` that keeps, per layer and kv head, the tokens a blockzoo KV
        policy selects (see the module docstring). Build it with ``compat.hf.make_cache``."""

        def __init__(self, policy, num_layers: int) -> None:
            group = object()
            super().__init__(layers=[PolicyLayer(policy, i, group) for i in range(num_layers)])
            self.policy = policy

        def kept_tokens(self) -> int:
            """Tokens held, summed over layers (per kv head: every head keeps the same count)."""
            return sum(layer.size for layer in self.layers)

        def full_tokens(self) -> int:
            return sum(layer.seen for layer in self.layers)

        def __repr__(self) -> str:
            return (f"PolicyCache({self.policy.component_id}, {self.policy.params.model_dump()}, "
                    f"kept {self.kept_tokens()} of {self.full_tokens()})")

    return PolicyLayer, PolicyCache


_CLASSES: tuple | None = None


def classes():
    """(PolicyLayer, PolicyCache), defined on first use (transformers is an optional extra)."""
    global _CLASSES
    if _CLASSES is None:
        _CLASSES = _make_classes()
    return _CLASSES


def make_policy_cache(policy: Any, model, backend: str | None = None, **params: Any):
    """The :class:`PolicyCache` for ``model`` (installs the observing attention on it)."""
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise ValueError(f"KV-cache policy {policy!r} needs the model itself (make_cache(policy, model)), not "
                         f"{type(model).__name__}: the cache hooks into the model's attention to see the queries "
                         "its scorer needs")
    _, PolicyCache = classes()
    pol, scorer_backend = resolve_policy(policy, backend, **params)
    n_layers = _check_layer_types(model.config)
    install(model, pol, scorer_backend)
    return PolicyCache(pol, n_layers)
