from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class LayerNormParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    eps: float = Field(1e-5, gt=0, description="added to the variance")
    position: Literal["pre", "post"] = Field(
        "pre", description="pre-norm (x + F(norm(x))) or post-norm (norm(x + F(x)))")


class RMSNormParams(LayerNormParams):
    eps: float = Field(1e-6, gt=0, description="added to the mean square")
