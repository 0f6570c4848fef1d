from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class MoDAParams(BaseModel):
    """Parameters of ``depth.moda`` (also its op's keyword arguments)."""

    model_config = ConfigDict(extra="forbid")

    causal: bool = Field(True, description="causal sequence part (bottom-right aligned when Tk > Tq); the "
                                           "depth slots of a query's own position are always visible")
    scale: float | None = Field(None, gt=0, description="softmax scale; None = 1/sqrt(head_dim)")


class MoDParams(BaseModel):
    """Parameters of ``depth.mod``. ``capacity`` and ``gate`` are the op's keyword arguments; the
    rest configure the module (router, causal predictor, routed attention)."""

    model_config = ConfigDict(extra="forbid")

    capacity: float = Field(0.125, gt=0.0, le=1.0,
                            description="fraction of the tokens of a sequence routed through the block "
                                        "(k = ceil(capacity * T), at least 1)")
    gate: Literal["sigmoid", "raw"] = Field(
        "sigmoid", description="weight of a routed token's output: sigmoid(router logit) or the raw logit "
                               "(as in the paper)")
    predictor: bool = Field(True, description="train a causal per-token predictor of the top-k choice "
                                              "(BCE auxiliary loss, inputs detached)")
    aux_weight: float = Field(0.01, ge=0.0, description="weight of the predictor's BCE loss")
    eval_routing: Literal["predictor", "topk"] = Field(
        "predictor", description="routing in eval mode: the causal predictor (decoding never looks ahead) "
                                 "or the training top-k over the whole sequence")
