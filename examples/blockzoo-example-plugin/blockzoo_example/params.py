"""The component's params: a strict pydantic model (a typo in a spec is an error, never ignored)."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ShortConvParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kernel_size: int = Field(4, ge=1, le=64, description="taps of the causal convolution (current token included)")
    activation: Literal["none", "silu"] = Field("silu", description="applied to the convolution output")
