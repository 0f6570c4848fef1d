"""Parameters of the ``token.*`` KV-cache policies (also the keyword arguments of their
scoring ops; ``budget``/``budget_tokens``/``sinks``/``recent`` are read by the shared selector)."""

from __future__ import annotations

import math
from typing import Literal

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


class EvictParams(KVPolicyParams):
    """``token.evict``: learned retention gate, score = age * log(beta), top scores under the budget."""

    gate_path: str | None = Field(None, description="gate file from `blockzoo kv distill` (or EvictGates.save); "
                                                     "default: distil gates for the model on first use")
    hidden: int = Field(16, ge=1, description="hidden width of each (layer, kv head) gate MLP")
    distill_steps: int = Field(100, ge=0, description="distillation steps when there is no gate_path "
                                                       "(on the model's training inputs, else bytes_lm)")
    distill_batch: int = Field(8, ge=1, description="sequences per distillation step (the first rows of each "
                                                     "training batch)")
    distill_lr: float = Field(1e-2, gt=0, description="Adam learning rate of the distillation")
    distill_penalty: float = Field(0.1, ge=0, description="weight of the budget penalty (soft retention "
                                                           "above the budget) against the KL to the dense model")
    distill_seed: int = Field(0, description="seed of the gate init and the distillation batches")


class MixedDimParams(KVPolicyParams):
    """``token.mixeddim``: per-token number of kept K/V dims; ``budget`` is a fraction of the full
    cache's K/V elements (the same memory as a token policy at that budget)."""

    levels: int = Field(4, ge=1, description="a token keeps 0, D/levels, 2 D/levels, ..., or D channels "
                                             "(levels must divide the head dim; levels = D: any count)")
    layout: Literal["packed", "zeroed"] = Field(
        "packed", description="packed: one buffer per width, tokens of each level stored at that width (real "
                              "memory savings); zeroed: full-width cache with the dropped channels zeroed "
                              "(the same decisions; memory only accounted)")
    slack: int | None = Field(None, ge=0, description="packed layout: spare slots per (level, batch, kv head) "
                                                      "after a whole-cache rewrite, so that the following decode "
                                                      "steps rewrite incrementally (only the tokens whose width "
                                                      "changes move; the same decisions) until a level runs out "
                                                      "of room (a step needs 2 x levels + 1 spare); 0: every step "
                                                      "rewrites the whole cache. Default: 64 from a budget of "
                                                      "2048 tokens per row (2% of the pools at 8192), else 0 "
                                                      "(small caches rewrite whole, cheaply). The buffers hold the "
                                                      "spare slots too")
