"""Hugging Face ``transformers`` adapter: a blockzoo attention component as the attention of a
model you already have, and KV caches through the transformers cache API.

Any registered mixer whose functional op is attention-shaped -- tensors ``(q, k, v)`` in the
``[B, T, H, D]`` layout with ``Hq % Hk == 0`` (GQA), causal masks bottom-right aligned, plus the
component's own params -- plugs in by id: ``attention.dense``, ``context.moc``, and any plugin's
attention-shaped component the same way::

    from blockzoo.compat.hf import use_blockzoo_attention
    model = LlamaForCausalLM(config)
    use_blockzoo_attention(model, "context.moc", chunk_size=64, top_k=4)
    model.generate(input_ids, max_new_tokens=32)          # DynamicCache, as usual

How it hooks in (public transformers API, >= 4.56): the call registers a function under a name
with ``AttentionInterface.register`` and, under the same name, ``flash_attention_mask`` with
``AttentionMaskInterface.register`` (the mask builder that returns ``None`` for a plain causal
batch and the 2-D padding mask otherwise), then selects it with ``model.set_attn_implementation``.
The model passes q ``[B, Hq, Tq, D]`` and the cache-updated k, v ``[B, Hk, Tk, D]``; the adapter
hands the op transposed views, ``causal`` from the module (``is_causal``) and ``scale`` from its
``scaling``.

Not supported, with a clear error instead of a silent approximation: padded batches (blockzoo
attention ops take no padding mask), attention dropout during training, sliding-window layers,
and caches whose keys are longer than the visible sequence (``StaticCache``).

KV-cache policies (``token.streaming`` / ``token.h2o`` / ``token.snapkv``) through the transformers
cache API: ``make_cache(policy, model, **params)`` (``compat/hf_cache.py``).
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import torch

MIN_TRANSFORMERS = "4.56"
DENSE_CACHE_POLICIES = ("dense", None)


def _transformers():
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError("the Hugging Face adapter needs transformers: pip install 'blockzoo[hf]'") from exc
    from packaging.version import Version
    if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
        raise ImportError(f"the Hugging Face adapter needs transformers>={MIN_TRANSFORMERS} "
                          f"(AttentionInterface / AttentionMaskInterface); found {transformers.__version__}")
    return transformers


class BlockzooAttention:
    """An attention-interface function (``module, query, key, value, attention_mask, scaling,
    dropout, **kwargs -> (out, None)``) that runs a blockzoo component's op."""

    def __init__(self, component_id: str, backend: str = "auto", **params: Any) -> None:
        from ..core.ops import Op, _tensor_names
        from ..registry import get_registry
        reg = get_registry()
        comp = reg.component(component_id)  # unknown ids: RegistryError with the nearest name
        tensors = _tensor_names(comp)
        if comp.slot != "mixer" or tensors != ("q", "k", "v"):
            raise ValueError(
                f"{component_id!r} is not attention-shaped (slot {comp.slot!r}, tensors {tensors}); the Hugging Face "
                "adapter needs a mixer whose op takes (q, k, v) in [B, T, H, D] layout")
        fields = comp.params.model_fields
        for reserved in ("causal", "scale"):
            if reserved in params:
                raise ValueError(f"{component_id}: {reserved!r} is set by the transformers model "
                                 f"({'module.is_causal' if reserved == 'causal' else 'module.scaling'}); "
                                 "do not pass it to the adapter")
        comp.params(**params)  # validate now: a typo fails here, naming the nearest valid param
        self.component_id = component_id
        self.backend = backend
        self.params = dict(params)
        self.op = Op(component_id, backend)
        self.has_causal = "causal" in fields
        self.has_scale = "scale" in fields

    def __call__(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                 **kwargs: Any) -> tuple[torch.Tensor, None]:
        if dropout and module.training:
            raise ValueError(f"{self.component_id}: attention dropout ({dropout}) is not supported; "
                             "set config.attention_dropout = 0.0")
        if kwargs.get("sliding_window") is not None:
            raise NotImplementedError(f"{self.component_id}: sliding-window layers are not supported by the "
                                      f"blockzoo adapter (sliding_window={kwargs['sliding_window']})")
        causal = kwargs.get("is_causal")
        causal = getattr(module, "is_causal", True) if causal is None else bool(causal)
        if attention_mask is not None and not _plain_mask(attention_mask, query.shape[2], key.shape[2], causal):
            raise ValueError(
                f"{self.component_id}: got an attention mask of shape {tuple(attention_mask.shape)} that masks "
                "more than the causal pattern (padding, or a cache longer than the sequence such as "
                "StaticCache); blockzoo attention ops take no padding mask: run unpadded batches of equal "
                "length with DynamicCache")
        call = dict(self.params)
        if self.has_causal:
            call["causal"] = causal
        elif causal:
            raise ValueError(f"{self.component_id} has no 'causal' param but the model's attention is causal")
        if self.has_scale:
            call["scale"] = None if scaling is None else float(scaling)
        elif scaling is not None and not math.isclose(scaling, query.shape[-1] ** -0.5, rel_tol=1e-6):
            raise ValueError(f"{self.component_id} has no 'scale' param and the model's scaling {scaling} is not "
                             f"1/sqrt(head_dim={query.shape[-1]})")
        out = self.op(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), **call)
        return out, None

    def __repr__(self) -> str:
        return f"BlockzooAttention({self.component_id!r}, backend={self.backend!r}, params={self.params})"


def _plain_mask(mask: torch.Tensor, tq: int, tk: int, causal: bool) -> bool:
    """True when ``mask`` allows exactly what the op does without one: everything (non-causal) or
    the bottom-right aligned causal pattern. 2-D masks are transformers' padding masks
    ``[B, Tk]`` (from ``flash_attention_mask``); 4-D masks are ``[B, 1 or H, Tq, Tk]``, boolean
    (True = attend) or additive float (0 = attend)."""
    if mask.dim() == 2:
        return mask.shape[-1] == tk and bool(mask.all())
    if mask.dim() != 4 or mask.shape[-2:] != (tq, tk):
        return False
    allowed = mask if mask.dtype == torch.bool else mask == 0
    if not causal:
        return bool(allowed.all())
    i = torch.arange(tq, device=mask.device)[:, None]
    j = torch.arange(tk, device=mask.device)[None, :]
    return bool((allowed == (j <= i + (tk - tq))).all())


def attention_name(component_id: str, backend: str = "auto", **params: Any) -> str:
    """The interface name a configuration registers under (stable for equal arguments)."""
    tag = f"blockzoo-{component_id}-{backend}"
    if params:
        digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:10]
        tag += f"-{digest}"
    return tag


def register_attention(component_id: str = "attention.dense", backend: str = "auto", name: str | None = None,
                       **params: Any) -> str:
    """Register a component as a transformers attention implementation; returns its name, usable as
    ``from_pretrained(..., attn_implementation=name)`` or ``model.set_attn_implementation(name)``."""
    _transformers()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
    fn = BlockzooAttention(component_id, backend, **params)
    name = name or attention_name(component_id, backend, **params)
    if "/" in name or "|" in name:
        raise ValueError(f"attention name {name!r}: '/' and '|' are reserved by transformers (hub kernels, paged)")
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, flash_attention_mask)
    return name


def use_blockzoo_attention(model: torch.nn.Module, component_id: str = "attention.dense", backend: str = "auto",
                           **params: Any) -> str:
    """Register ``component_id`` (with ``params``) and make ``model`` use it; returns the name."""
    name = register_attention(component_id, backend, **params)
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise RuntimeError(f"{type(model).__name__} did not accept attn_implementation={name!r} "
                           f"(it uses {model.config._attn_implementation!r}); it must follow the "
                           "AttentionInterface convention")
    return name


def make_cache(policy: Any = None, model: Any = None, backend: str | None = None, **params: Any):
    """A transformers ``Cache`` for ``model.generate(..., past_key_values=cache)``.

    ``policy``: ``"dense"`` or None keeps every key and value (a ``DynamicCache``; ``model``
    may be the model, its config, or None). A blockzoo KV-cache policy -- a component id
    (``"token.streaming"``, ``"token.h2o"``, ``"token.snapkv"``) with its params as keyword
    arguments (``budget``, ``budget_tokens``, ``sinks``, ``recent``, SnapKV's ``window`` /
    ``pool``), or a spec's ``kv:`` ComponentRef (or its dict) -- gives a
    :class:`~blockzoo.compat.hf_cache.PolicyCache` that keeps the tokens the policy selects under
    its budget; it needs the model itself and makes the model's attention report to the cache
    (``hf_cache.install``). Policies that score from attention probabilities (H2O, SnapKV) need
    a model whose attention returns them (``attn_implementation="eager"``); otherwise, or for
    any other unsupported combination, this raises with the reason. See docs/huggingface.md.
    """
    _transformers()
    if policy in DENSE_CACHE_POLICIES:
        from transformers import DynamicCache
        if params or backend:
            raise ValueError(f"the dense cache takes no params or backend, got {sorted(params) or backend}")
        config = getattr(model, "config", model)
        return DynamicCache(config=config) if config is not None else DynamicCache()
    from .hf_cache import make_policy_cache
    return make_policy_cache(policy, model, backend, **params)
