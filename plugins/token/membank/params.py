"""Parameters of ``token.membank``. ``window`` and ``scale`` are the op's keyword arguments; the
rest configure the module's compressor."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class MemBankParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    window: int = Field(64, ge=1, description="W: a query at position p sees the keys p-W+1..p exactly; the "
                                              "bank is updated every W tokens (chunk n = positions nW..nW+W-1)")
    slots: int = Field(16, ge=1, description="M: memory slots per kv head (module only; the op reads M "
                                             "from the bank's shape)")
    gate_init: tuple[float, float] = Field(
        (0.0, 4.0), description="module only: the per-slot decay logits start evenly spaced over this "
                                "range (decay sigmoid(logit): 0.5 .. 0.98 by default)")
    scale: float | None = Field(None, gt=0, description="softmax scale; None = 1/sqrt(head_dim)")
