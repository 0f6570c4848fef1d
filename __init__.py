"""blockzoo: efficiency components for transformers, with reference, Triton and Numba backends.

Five-minute tour::

    import blockzoo, torch
    attn = blockzoo.op("attention.dense")                 # backend="auto"
    o = attn(q, k, v, causal=True)                        # q/k/v [B, T, H, D]
    model = blockzoo.build("examples/specs/tiny.yaml")    # nn.Module from a YAML spec
    blockzoo.components()                                 # what is registered

Nothing heavy is imported here: plugins load on first registry access.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "build", "components", "backends", "op", "load_spec", "get_registry"]


def get_registry():
    """The loaded registry (components, backends, tasks)."""
    from .registry import get_registry as _get
    return _get()


def components() -> list[str]:
    return sorted(get_registry().components)


def backends(component_id: str) -> list[str]:
    return [b.name for b in get_registry().backends_for(component_id)]


def op(component_id: str, backend: str = "auto"):
    """The functional op of a component: ``op("attention.dense")(q, k, v, causal=True)``."""
    from .core.ops import op as _op
    return _op(component_id, backend)


def load_spec(source: Any):
    """Validate a spec (path, YAML text, dict or ModelSpec) and return the ModelSpec."""
    from .core.spec import load_spec as _load
    return _load(source)


def build(spec: Any, **overrides: Any):
    """Build an ``nn.Module`` from a spec (path, YAML text, dict or ModelSpec)."""
    from .core.composer import build as _build
    return _build(spec, **overrides)
