"""The plugin module named by the entry point: hook implementations only, cheap to import.

blockzoo calls the hooks once, when its registry first loads: components first, then every
plugin's backends, then tasks. Backend functions import their kernels on first call.
"""

import torch

from blockzoo.registry import Backend, Capabilities, Case, Component, Inputs, Task, hookimpl

from .params import ShortConvParams
from .reference import shortconv_reference
from .task import LagConfig, run_lag


def describe(x, weight, params=None) -> Inputs:
    # the tensor arguments, in order, are the names of describe's parameters before `params`
    return Inputs.from_tensors({"x": x, "weight": weight})


def cases() -> list[Case]:
    """Shapes the conformance kit runs every backend on (forward and every gradient)."""
    def c(id, b, t, ch, k, **params):
        return Case(id, {"x": (b, t, ch), "weight": (ch, k)}, {"kernel_size": k, **params})
    return [
        c("T63-C40-K4", 2, 63, 40, 4),
        c("T1-K4", 1, 1, 8, 4),                      # fewer tokens than taps
        c("T5-K7-none", 2, 5, 3, 7, activation="none"),
        c("T33-C17-K1", 1, 33, 17, 1),
        c("T100-C24-K3", 3, 100, 24, 3),
    ]


def _numba(x, weight, kernel_size=4, activation="silu"):
    from .numba_kernel import shortconv_numba  # numba is imported here, on first use
    return shortconv_numba(x, weight, kernel_size=kernel_size, activation=activation)


def _module(ctx, params):
    from .module import shortconv_module
    return shortconv_module(ctx, params)


def _flops(inputs: Inputs, params: ShortConvParams) -> float:
    b, t, c = inputs.shape["x"]
    return 2.0 * b * t * c * params.kernel_size


@hookimpl
def blockzoo_register_components(registry) -> None:
    registry.add_component(Component(
        id="example.shortconv", slot="mixer", params=ShortConvParams, describe=describe,
        module=_module, cases=cases, flops=_flops,
        doc="causal depthwise short convolution token mixer (x [B, T, C], weight [C, K]) with optional SiLU",
        source="blockzoo-example-plugin (a teaching example; short convolutions as in H3 / Hyena)"))


@hookimpl
def blockzoo_register_backends(registry) -> None:
    registry.add_backend(Backend(
        "example.shortconv", "reference", shortconv_reference,
        Capabilities(dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16)), priority=0,
        doc="PyTorch shifts and multiply-adds in fp32 (the oracle)"))
    registry.add_backend(Backend(
        "example.shortconv", "numba", _numba,
        Capabilities(devices=("cpu",), dtypes=(torch.float32, torch.float64), requires=("numba>=0.60",)),
        priority=20, doc="Numba kernels parallel over channels, forward and backward"))


@hookimpl
def blockzoo_register_tasks(registry) -> None:
    registry.add_task(Task(name="example_lag", run=run_lag, params=LagConfig,
                           doc="recall the token `lag` positions back (accuracy, higher is better)"))
