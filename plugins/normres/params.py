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


class DyTParams(BaseModel):
    """normres.dyt (Zhu et al., CVPR 2025): y = w * tanh(alpha * h) + b, h = x + delta."""
    model_config = ConfigDict(extra="forbid")
    alpha_init: float = Field(0.5, gt=0, description="initial value of the learned scalar alpha "
                              "(also the constant used when the op gets no alpha tensor)")
    position: Literal["pre", "post"] = Field(
        "pre", description="pre-norm (x + F(dyt(x))) or post-norm (dyt(x + F(x)))")


class AGUParams(BaseModel):
    """normres.agu (our definition, see docs/components/agu.md): a learned per-channel sigmoid
    gate replaces the residual add, a DyT squash replaces the norm; one elementwise pass."""
    model_config = ConfigDict(extra="forbid")
    variant: Literal["gate_dyt", "scale_dyt"] = Field(
        "scale_dyt", description="gate_dyt: h' = g*h + (1-g)*delta (convex, highway-style); "
        "scale_dyt: h' = h + g*delta (the gate scales the update only); both then y = w*tanh(alpha*h') + b")
    gate: Literal["static", "input"] = Field(
        "static", description="static: g = sigmoid(gate); input: g = sigmoid(gate + gate_w * h)")
    alpha_init: float = Field(0.5, gt=0, description="initial value of the learned scalar alpha "
                              "(also the constant used when the op gets no alpha tensor)")
    gate_init: float = Field(0.0, description="initial gate logit (0: g = 0.5 at init; scale_dyt "
                             "then adds half of each update, gate_dyt averages h and delta)")
