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


@dataclass
class DepthStream:
    """MoDA's depth KV stream (``Context.state["depth_kv"]``), fresh for every forward pass.

    Writers append one K,V pair per token, each [B, T, Hk, D]: every attention layer (if
    ``attention_writers``) after its own attention, and the block's MLP writer (if
    ``mlp_writers``) from light projections of the MLP input. A ``depth.moda`` layer reads all
    slots written so far as token-major [B, T*S, Hk, D] (slot order = write order).
    """

    attention_writers: bool = True
    mlp_writers: bool = False
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)

    @property
    def slots(self) -> int:
        return len(self.keys)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.keys.append(k)
        self.values.append(v)

    def read(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(depth_k, depth_v) [B, T*S, Hk, D]; S = 0 gives empty tensors shaped after ``like``
        (a [B, T, Hk, D] key tensor)."""
        b, t, hk, d = like.shape
        if not self.keys:
            e = like.new_empty((b, 0, hk, d))
            return e, e
        dk = torch.stack(self.keys, dim=2).reshape(b, t * len(self.keys), hk, d)
        dv = torch.stack(self.values, dim=2).reshape(b, t * len(self.values), hk, d)
        return dk, dv
