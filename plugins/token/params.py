"""Parameters of the ``token.*`` KV-cache policies (also the keyword arguments of their
scoring ops; ``budget``/``budget_tokens``/``sinks``/``recent`` are read by the shared selector)."""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, model_validator


class KVPolicyParams(BaseModel):
    """Budget and protected tokens, shared by every policy."""

    model_config = ConfigDict(extra="forbid")

    budget: float = Field(0.5, gt=0.0, le=1.0,
                          description="tokens kept per (layer, kv head), as a fraction of the full cache "
                                      "(ceil(budget * tokens seen)); ignored when budget_tokens is set")
    budget_tokens: int | None = Field(None, ge=1, description="tokens kept per (layer, kv head), as a count")
    sinks: int = Field(4, ge=0, description="protected: the first `sinks` positions are never evicted")
    recent: int = Field(8, ge=0, description="protected: the most recent `recent` tokens are never evicted")

    def keep(self, seen: int) -> int:
        """Tokens kept after ``seen`` tokens: the budget, raised to the protected count, at most
        ``seen``."""
        want = self.budget_tokens if self.budget_tokens is not None else math.ceil(round(seen * self.budget, 9))
        return min(seen, max(want, self.sinks + self.recent))


class StreamingParams(KVPolicyParams):
    """``token.streaming``: sinks + the most recent tokens (StreamingLLM)."""


class H2OParams(KVPolicyParams):
    """``token.h2o``: heavy hitters by accumulated attention + a recent window."""


class SnapKVParams(KVPolicyParams):
    """``token.snapkv``: observation-window attention, pooled, at prefill."""

    window: int = Field(8, ge=1, description="observation window: the last `window` prompt queries")
    pool: int = Field(5, ge=1, description="max-pool kernel along the key axis (odd)")

    @model_validator(mode="after")
    def _odd_pool(self) -> SnapKVParams:
        if self.pool % 2 == 0:
            raise ValueError(f"pool must be odd (a centred max-pool), got {self.pool}")
        return self
