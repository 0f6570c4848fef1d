"""A test plugin for the Ray executor tests: a mixer that aborts its process, hangs, raises, kills
the Ray worker that runs its trial, or (mode gate) waits until the file named by
$BLOCKZOO_RAY_TEST_GATE exists (creating GATE.waiting first), so that the test can kill a node while that trial runs there.
With the variable unset, or the file there, ``gate`` is a plain linear mixer."""

import os
import signal
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict
from torch import nn

from blockzoo.registry import Backend, Component, Inputs, hookimpl


class RayCrashParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["abort", "hang", "raise", "kill_ray_worker", "gate", "fine"] = "fine"


class RayCrashMixer(nn.Module):
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
        if self.mode == "kill_ray_worker":  # the trial process's parent is the Ray worker: a lost worker
            os.kill(os.getppid(), signal.SIGKILL)
            os._exit(1)
        if self.mode == "gate":
            gate = os.environ.get("BLOCKZOO_RAY_TEST_GATE")
            if gate and not os.path.exists(gate):
                open(f"{gate}.waiting", "w").close()  # tells the test that this trial is held here
                while not os.path.exists(gate):
                    time.sleep(0.05)
        return self.proj(x)


def describe(x, params=None):
    return Inputs.from_tensors({"x": x})


@hookimpl
def blockzoo_register_components(registry):
    registry.add_component(Component(id="test.raycrash", slot="mixer", params=RayCrashParams, describe=describe,
                                     module=RayCrashMixer))


@hookimpl
def blockzoo_register_backends(registry):
    registry.add_backend(Backend("test.raycrash", "reference", lambda x: x))
