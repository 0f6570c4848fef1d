"""A test plugin whose mixer crashes the process, hangs, or raises (params.mode)."""

import os
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict
from torch import nn

from blockzoo.registry import Backend, Component, Inputs, hookimpl


class CrashParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["abort", "hang", "raise", "fine"] = "fine"


class CrashMixer(nn.Module):
    def __init__(self, ctx, params):
        super().__init__()
        self.mode = params.mode
        self.proj = nn.Linear(ctx.d_model, ctx.d_model)
        self.backend_name = "reference"

    def forward(self, x, context=None):
        if self.mode == "abort":
            os.abort()
        if self.mode == "hang":
            time.sleep(3600)
        if self.mode == "raise":
            raise RuntimeError("this kernel raises on purpose")
        return self.proj(x)


def describe(x, params=None):
    return Inputs.from_tensors({"x": x})


@hookimpl
def blockzoo_register_components(registry):
    registry.add_component(Component(id="test.crash", slot="mixer", params=CrashParams, describe=describe,
                                     module=CrashMixer))


@hookimpl
def blockzoo_register_backends(registry):
    registry.add_backend(Backend("test.crash", "reference", lambda x: x))
