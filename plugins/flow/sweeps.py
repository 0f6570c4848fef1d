"""Spec generator for examples/sweeps/flows.yaml (``generator: blockzoo.plugins.flow.sweeps:digits_specs``):
exact flows vs flow.aif on digits, with short labels for the report."""

from __future__ import annotations

import copy


def _coupling(**extra) -> dict:
    return {"type": "flow.coupling", "params": {"hidden": 128, "depth": 2}, **extra}


VARIANTS = {
    # exact, Glow-style: (actnorm, LU 1x1, affine coupling) x 4; kernels picked by backend: auto
    "glow-x4": {"repeat": 4, "layers": [{"type": "flow.actnorm"}, {"type": "flow.inv1x1"}, _coupling()]},
    # the same on the reference backend everywhere (what the kernels change in training time)
    "glow-x4-reference": {"repeat": 4, "layers": [{"type": "flow.actnorm", "backend": "reference"},
                                                  {"type": "flow.inv1x1"}, _coupling(backend="reference")]},
    # exact, RealNVP-style: affine couplings with alternating masks x 8
    "realnvp-x8": {"repeat": 8, "layers": [_coupling()]},
    # approximately invertible free-form flow: encoder + decoder, surrogate log-det
    "aif": {"repeat": 1, "layers": [{"type": "flow.aif", "params": {"hidden": 256, "blocks": 2, "beta": 10.0}}]},
}


def digits_specs(base: dict):
    for label, flow in VARIANTS.items():
        spec = copy.deepcopy(base)
        spec["name"] = f"digits-{label}"
        spec.setdefault("flow", {}).update(copy.deepcopy(flow))
        yield label, spec
