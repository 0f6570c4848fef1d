"""Composer: a validated spec -> ``nn.Module``.

A decoder LM is byte embedding -> N blocks -> final norm -> head. Each block is::

    n, h = norm1(h, pending)   # fused: residual add of the previous sublayer + norm
    h_mix = mixer(n, ctx)
    n, h = norm2(h, h_mix)
    pending = mlp(n, ctx)      # added by the next block's norm1 (or the final norm)

Cross-layer state travels in one :class:`~blockzoo.core.context.Context` threaded through the
blocks (``ctx.state``: depth KV stream, caches, memory banks).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import get_registry
from .context import BuildContext, Context, DepthStream
from .spec import BlockSpec, ComponentRef, DepthSpec, ModelSpec, load_spec


def _make(ref: ComponentRef, ctx: BuildContext, slot: str, role: str = "") -> nn.Module:
    comp = get_registry().component(ref.type)
    if comp.module is None:
        raise TypeError(f"component {ref.type!r} has no module factory; it can only be used as an op")
    backend = ref.backend or ctx.backend
    local = BuildContext(**{**ctx.__dict__, "backend": backend, "role": role})
    module = comp.module(local, comp.params(**ref.params))
    module.component_id = ref.type
    return module


class Block(nn.Module):
    """Pre-norm (above) or, with ``post_norm``, ``h = norm1(h + mixer(h)); h = norm2(h + mlp(h))``.
    ``mlp_writer``: append a depth K,V from the MLP input to the depth stream (depth.moda)."""

    def __init__(self, ctx: BuildContext, spec: BlockSpec, post_norm: bool = False,
                 mlp_writer: bool = False) -> None:
        super().__init__()
        self.norm1 = _make(spec.normres, ctx, "normres", role="mixer")
        self.mixer = _make(spec.mixer, ctx, "mixer")
        self.norm2 = _make(spec.normres, ctx, "normres", role="mlp")
        self.mlp = _make(spec.mlp, ctx, "mlp")
        self.post_norm = post_norm
        self.depth_writer = None
        if mlp_writer:
            from ..plugins.depth.module import DepthWriter
            self.depth_writer = DepthWriter(ctx)

    def _write_depth(self, n: torch.Tensor, context: Context) -> None:
        if self.depth_writer is not None and "depth_kv" in context.state:
            self.depth_writer(n, context)

    def forward(self, h: torch.Tensor, pending: torch.Tensor | None, context: Context):
        if self.post_norm:
            h, _ = self.norm1(h, self.mixer(h, context))
            self._write_depth(h, context)
            h, _ = self.norm2(h, self.mlp(h, context))
            return h, None
        n, h = self.norm1(h, pending)
        a = self.mixer(n, context)
        n, h = self.norm2(h, a)
        self._write_depth(n, context)
        return h, self.mlp(n, context)


class DecoderLM(nn.Module):
    """Byte-level (or any vocab) decoder built from a :class:`ModelSpec`."""

    def __init__(self, spec: ModelSpec, device: str, dtype: torch.dtype, training: bool = True) -> None:
        super().__init__()
        m = spec.model
        self.spec = spec
        self.embed = nn.Embedding(m.vocab, m.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        blocks = []
        for i in range(m.n_layers):
            ctx = BuildContext(
                d_model=m.d_model, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads or m.n_heads,
                max_seq=m.max_seq, layer=i, n_layers=m.n_layers, backend=m.backend,
                device=torch.device(device).type, dtype=dtype, training=training, rope=m.rope,
                rope_base=m.rope_base)
            blocks.append(Block(ctx, spec.layer_block(i), post_norm=m.norm_position == "post",
                                mlp_writer=spec.depth is not None and spec.depth.mlp_writers))
        self.blocks = nn.ModuleList(blocks)
        # depth KV stream: when a mixer reads it (depth.moda) or the spec configures it
        reads = any(getattr(b.mixer, "reads_depth", False) for b in blocks)
        self.depth = spec.depth or (DepthSpec() if reads else None)
        self.final_norm = _make(spec.layer_block(m.n_layers - 1).normres, ctx, "normres", role="final")
        self.head = nn.Linear(m.d_model, m.vocab, bias=False)
        if m.tie_embeddings:
            self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor, context: Context | None = None) -> torch.Tensor:
        context = context or Context()
        if context.positions is None:
            context.positions = torch.arange(tokens.shape[1], device=tokens.device)
        if self.depth is not None:
            context.state["depth_kv"] = DepthStream(self.depth.attention_writers, self.depth.mlp_writers)
        h = self.embed(tokens)
        pending = None
        for i, block in enumerate(self.blocks):
            context.layer = i
            h, pending = block(h, pending, context)
        n, _ = self.final_norm(h, pending)
        return self.head(n)

    def loss(self, tokens: torch.Tensor, context: Context | None = None) -> torch.Tensor:
        """Next-token cross-entropy (nats per token), plus any auxiliary losses."""
        context = context or Context()
        logits = self(tokens[:, :-1], context)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        for aux in context.aux_losses.values():
            loss = loss + aux
        return loss

    # -- decoding with a KV cache (core/cache.py) ----------------------------------------------
    def make_cache(self, policy: Any = "spec"):
        """An empty KV cache; policy "spec" (the spec's ``kv:``), None (full cache) or a token.* id."""
        from .cache import make_cache
        return make_cache(self, policy)

    def prefill(self, tokens: torch.Tensor, cache) -> torch.Tensor:
        """Prompt [B, T] -> logits [B, T, V], filling ``cache``."""
        from .cache import prefill
        return prefill(self, tokens, cache)

    def step(self, tokens: torch.Tensor, cache) -> torch.Tensor:
        """New tokens [B, t] after the cached ones -> logits [B, t, V]."""
        from .cache import step
        return step(self, tokens, cache)

    def generate(self, tokens: torch.Tensor, max_new_tokens: int, policy: Any = "spec",
                 temperature: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """Prompt [B, T] -> [B, T + max_new_tokens] (greedy at temperature 0)."""
        from .cache import generate
        return generate(self, tokens, max_new_tokens, policy, temperature, generator)

    def backends(self) -> list[dict[str, str]]:
        """Per layer, the backend each component resolved to at build time."""
        rows = []
        for i, block in enumerate(self.blocks):
            for slot in ("norm1", "mixer", "norm2", "mlp"):
                mod = getattr(block, slot)
                rows.append({"layer": str(i), "slot": slot, "component": getattr(mod, "component_id", "?"),
                             "backend": getattr(mod, "backend_name", "?")})
        return rows


def build(spec: Any, *, device: str | None = None, dtype: str | torch.dtype | None = None,
          backend: str | None = None, training: bool = True) -> DecoderLM:
    """Spec (path, YAML text, dict, ModelSpec) -> module on the spec's (or the given) device/dtype."""
    spec = load_spec(spec)
    if backend is not None or device is not None or isinstance(dtype, str):
        update = {}
        if backend is not None:
            update["backend"] = backend
        if device is not None:
            update["device"] = device
        if isinstance(dtype, str):
            update["dtype"] = dtype
        spec = load_spec(spec.model_copy(update={"model": spec.model.model_copy(update=update)}))
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else spec.torch_dtype()
    dev = spec.model.device
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"spec {spec.name!r} asks for device {dev!r} but no CUDA device is available")
    if spec.model.kind == "flow":  # kind: flow -> core/flow_model.py (FlowModel or AIFModel)
        from .flow_model import build_flow
        return build_flow(spec, dev, torch_dtype, training).to(device=dev, dtype=torch_dtype)
    model = DecoderLM(spec, dev, torch_dtype, training)
    return model.to(device=dev, dtype=torch_dtype)
