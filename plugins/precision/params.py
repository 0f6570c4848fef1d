from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


def _pow2(name: str, v: int) -> int:
    if v < 16 or v > 256 or v & (v - 1):
        raise ValueError(f"{name} must be a power of two in [16, 256] (it is also the kernel tile); got {v}")
    return v


class Int8AttentionParams(BaseModel):
    """Parameters of ``precision.int8`` (also its op's keyword arguments)."""

    model_config = ConfigDict(extra="forbid")

    causal: bool = Field(True, description="causal mask, bottom-right aligned when Tk > Tq")
    scale: float | None = Field(None, gt=0, description="softmax scale; None = 1/sqrt(head_dim)")
    q_block: int = Field(64, description="query rows per INT8 scale (and the kernel's query tile)")
    k_block: int = Field(128, description="key rows per INT8 scale (and the kernel's key tile, the P tile)")
    pv: Literal["fp8", "fp16"] = Field("fp8", description="precision of P and V in the PV product")
    smooth_k: bool = Field(True, description="subtract the per-head key mean over tokens before quantising")

    @field_validator("q_block", "k_block")
    @classmethod
    def _blocks(cls, v, info):
        return _pow2(info.field_name, v)


class QaasParams(BaseModel):
    """Parameters of ``precision.qaas``. The op also takes two tensors: ``tau`` [Hq] (threshold
    fraction in (0, 1]) and ``gamma`` [Hq] (output scale); the module learns them."""

    model_config = ConfigDict(extra="forbid")

    causal: bool = Field(True, description="causal mask, bottom-right aligned when Tk > Tq")
    scale: float | None = Field(None, gt=0, description="softmax scale; None = 1/sqrt(head_dim)")
    q_block: int = Field(128, description="query rows per FP8 scale (and the kernel's query tile)")
    k_block: int | None = Field(None, description="key rows per FP8 scale (and the kernel's key tile, the P "
                                                   "tile); None: 64 with binary P, 128 with FP8 P")
    binary: bool = Field(True, description="binarise P (True) or keep P in FP8 (False)")
    threshold: float = Field(0.25, gt=0.0, le=1.0,
                             description="module only: initial threshold fraction tau of the tile row max")
    temperature: float = Field(1.0, gt=0.0,
                               description="width (log2 units) of the sigmoid surrogate of the step in backward")

    @field_validator("q_block", "k_block")
    @classmethod
    def _blocks(cls, v, info):
        return v if v is None else _pow2(info.field_name, v)

    @model_validator(mode="after")
    def _default_k_block(self) -> QaasParams:
        """``k_block`` None -> the default for ``binary`` (``reference.QAAS_K_BLOCK``), so the
        params (and every record of them) carry the tile actually used."""
        if self.k_block is None:
            from .reference import qaas_k_block
            self.k_block = qaas_k_block(None, self.binary)
        return self
