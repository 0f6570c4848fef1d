"""Parameters of the flow.* components (pydantic, ``extra="forbid"``).

For the op-level components (coupling, actnorm, inv1x1) the params that the functional op takes
are listed in each component's ``op_params``; the rest configure the module only (conditioner
width, init).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class CouplingParams(BaseModel):
    """``flow.coupling``: affine coupling (RealNVP) with a soft-clamped log-scale."""

    model_config = ConfigDict(extra="forbid")

    mask: Literal["alternate", "half"] = Field(
        "alternate", description="which dims condition (pass through): 'alternate' = columns with "
                                 "index % 2 == parity; 'half' = the first half (parity 0) or the second (parity 1)")
    parity: int | None = Field(None, ge=0, le=1,
                               description="0 or 1; None = alternate with each coupling layer of the stack")
    clamp: float = Field(2.0, gt=0, description="log-scale soft clamp: log_s = clamp * tanh(s / clamp)")
    inverse: bool = Field(False, description="op only: run the inverse transform")
    hidden: int = Field(128, ge=1, description="module: conditioner hidden width")
    depth: int = Field(2, ge=1, description="module: conditioner hidden layers")
    activation: Literal["relu", "gelu", "silu", "tanh"] = Field("relu", description="module: conditioner activation")


class ActNormParams(BaseModel):
    """``flow.actnorm``: per-dim affine y = (x + loc) * exp(log_scale), data-dependent init."""

    model_config = ConfigDict(extra="forbid")

    inverse: bool = Field(False, description="op only: run the inverse transform")
    data_init: bool = Field(True, description="module: initialise loc/log_scale from the first training "
                                              "batch so the output has zero mean, unit variance per dim")
    eps: float = Field(1e-6, gt=0, description="module: added to the std in the data-dependent init")


class Inv1x1Params(BaseModel):
    """``flow.inv1x1``: invertible linear map W = P L (U + diag(sign * exp(log_s))) (Glow, LU form)."""

    model_config = ConfigDict(extra="forbid")

    inverse: bool = Field(False, description="op only: run the inverse transform")
    seed: int = Field(0, description="module: seed of the random rotation W is initialised from")


class AIFParams(BaseModel):
    """``flow.aif``: free-form encoder f / decoder g trained with reconstruction + the
    Hutchinson-style log-det surrogate (our definition; see docs/components/aif.md)."""

    model_config = ConfigDict(extra="forbid")

    hidden: int = Field(256, ge=1, description="width of the encoder and decoder residual MLPs")
    blocks: int = Field(2, ge=1, description="residual blocks in each of encoder and decoder")
    activation: Literal["relu", "gelu", "silu", "tanh"] = Field("silu")
    beta: float = Field(10.0, gt=0, description="weight of the reconstruction term ||x - g(f(x))||^2 (per sample)")
    hutchinson_samples: int = Field(1, ge=1, description="probe vectors v per sample in the surrogate")
    exact_max_dim: int = Field(128, ge=0, description="compute the exact log-likelihood (decoder Jacobian "
                                                      "log-det) only when dim <= this")
