from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class DenseAttentionParams(BaseModel):
    """Parameters of ``attention.dense`` (also its op's keyword arguments)."""

    model_config = ConfigDict(extra="forbid")

    causal: bool = Field(True, description="causal mask, bottom-right aligned when Tk > Tq")
    scale: float | None = Field(None, gt=0, description="softmax scale; None = 1/sqrt(head_dim)")
