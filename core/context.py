"""What factories receive when the composer builds a module, and the runtime context object
that carries cross-layer state through the blocks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class BuildContext:
    """Model-level facts a component's module factory needs."""

    d_model: int
    n_heads: int
    n_kv_heads: int
    max_seq: int
    layer: int
    n_layers: int
    backend: str = "auto"
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    training: bool = True
    rope: bool = True
    rope_base: float = 10000.0
    #: where a normres module sits: "mixer" (before the sequence mixer), "mlp" (before the
    #: MLP) or "final" (before the head); "" for other slots
    role: str = ""

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclass
class Context:
    """Cross-layer state threaded through the blocks in one forward pass.

    ``state`` is a free-form dict keyed by the owning feature (e.g. "depth_kv" for MoDA's depth
    stream, "kv_cache" for decoding, "memory" for memory banks); ``positions`` the absolute token
    positions of this call; ``aux_losses`` terms components add to the training loss.
    """

    positions: torch.Tensor | None = None
    state: dict[str, Any] = field(default_factory=dict)
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    layer: int = 0
