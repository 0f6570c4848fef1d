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


class _PerPositionAlpha(BaseModel):
    """alpha's initial value per position in the block (the DyT paper tunes the norm before
    attention apart from the others in LLMs); unset ones use ``alpha_init``."""
    alpha_init_mixer: float | None = Field(
        None, gt=0, description="alpha_init of the norm before the sequence mixer (attention)")
    alpha_init_mlp: float | None = Field(None, gt=0, description="alpha_init of the norm before the MLP")
    alpha_init_final: float | None = Field(None, gt=0, description="alpha_init of the final norm")

    def alpha_for(self, role: str) -> float:
        """Initial alpha of a module at ``role`` ("mixer", "mlp", "final"; anything else: alpha_init)."""
        value = getattr(self, f"alpha_init_{role}", None) if role else None
        return float(self.alpha_init if value is None else value)


class DyTParams(_PerPositionAlpha):
    """normres.dyt (Zhu et al., CVPR 2025): y = w * tanh(alpha * h) + b, h = x + delta."""
    model_config = ConfigDict(extra="forbid")
    alpha_init: float = Field(0.5, gt=0, description="initial value of the learned scalar alpha "
                              "(also the constant used when the op gets no alpha tensor)")
    position: Literal["pre", "post"] = Field(
        "pre", description="pre-norm (x + F(dyt(x))) or post-norm (dyt(x + F(x)))")


class AGUParams(_PerPositionAlpha):
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
