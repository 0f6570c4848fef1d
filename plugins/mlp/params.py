from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class SwiGLUParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mult: float = Field(8 / 3, gt=0, description="hidden width = round_up(mult * d_model, multiple_of)")
    multiple_of: int = Field(16, ge=1)


class GELUParams(SwiGLUParams):
    mult: float = Field(4.0, gt=0, description="hidden width = round_up(mult * d_model, multiple_of)")
