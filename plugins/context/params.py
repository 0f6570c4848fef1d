from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class MoCParams(BaseModel):
    """Parameters of ``context.moc`` (also its op's keyword arguments)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    causal: bool = Field(True, description="causal routing and masking (bottom-right aligned when Tk > Tq)")
    chunk_size: int = Field(64, ge=1, alias="chunk",
                            description="fixed chunk length in keys (ignored when boundaries are given)")
    top_k: int = Field(4, ge=0, description="past chunks kept per query and head (the own chunk is extra)")
    prefix: int = Field(0, ge=0, description="always-visible leading keys (text / sink tokens)")
    boundaries: tuple[int, ...] | None = Field(
        None, description="chunk START offsets, strictly increasing; 0 is implied; offsets >= Tk are "
                          "ignored (variable-length chunks: frames, shots, documents)")
    drop_off: float = Field(0.0, ge=0.0, lt=1.0,
                            description="training: drop each selected past chunk with this probability")
    drop_in: float = Field(0.0, ge=0.0, le=1.0,
                           description="training: add each unselected past chunk with this probability")
    seed: int = Field(0, description="seed of the drop-off / drop-in draws")
    scale: float | None = Field(None, gt=0, description="softmax scale; None = 1/sqrt(head_dim)")

    @field_validator("boundaries", mode="before")
    @classmethod
    def _tensor_to_tuple(cls, v):
        if v is not None and hasattr(v, "tolist"):  # a 1-D (Long)Tensor or numpy array
            v = v.tolist()
        return v

    @field_validator("boundaries")
    @classmethod
    def _increasing(cls, v):
        if v is None:
            return v
        if any(b < 0 for b in v):
            raise ValueError("boundaries must be >= 0")
        if any(b1 <= b0 for b0, b1 in zip(v, v[1:], strict=False)):
            raise ValueError("boundaries must be strictly increasing chunk start offsets")
        return tuple(int(b) for b in v)
