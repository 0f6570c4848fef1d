from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class TemfParams(BaseModel):
    """Parameters of ``token.temf``. ``chunk`` and ``scale`` are the op's keyword arguments; the
    rest configure the module's learned compressor."""

    model_config = ConfigDict(extra="forbid")

    chunk: int = Field(256, ge=1, description="chunk length C: a query attends causally to its own chunk and to "
                                              "the summaries of every earlier (closed) chunk")
    summaries: int = Field(4, ge=1, description="summary key/value vectors S per closed chunk and kv head "
                                                "(module only: the op reads S from the summaries' shape)")
    hidden: int = Field(16, ge=0, description="hidden width of the compressor's MLP branch over the chunk axis "
                                              "(0: linear pooling only)")
    scale: float | None = Field(None, gt=0, description="softmax scale; None = 1/sqrt(head_dim)")
