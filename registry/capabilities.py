"""Capabilities a backend declares, and the description of the inputs it is asked to run on.

Dispatch works on reasons, not booleans: a backend answers :meth:`Capabilities.reasons` with a
list of human-readable strings, empty when it can run.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Inputs:
    """What dispatch needs to know about a call, without holding the tensors.

    ``head_dim`` is None for components that have none (norms, MLPs).
    """

    device: str
    dtype: torch.dtype
    requires_grad: bool = False
    head_dim: int | None = None
    shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    extras: tuple[tuple[str, Any], ...] = ()

    @property
    def shape(self) -> dict[str, tuple[int, ...]]:
        return dict(self.shapes)

    @property
    def extra(self) -> dict[str, Any]:
        return dict(self.extras)

    @classmethod
    def from_tensors(cls, named: dict[str, torch.Tensor | None], head_dim: int | None = None,
                     **extras: Any) -> Inputs:
        tensors = {k: t for k, t in named.items() if isinstance(t, torch.Tensor)}
        first = next(iter(tensors.values()))
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors.values())
        return cls(
            device=first.device.type,
            dtype=first.dtype,
            requires_grad=grad,
            head_dim=head_dim,
            shapes=tuple((k, tuple(t.shape)) for k, t in tensors.items()),
            extras=tuple(sorted(extras.items())),
        )


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


@functools.cache
def package_reason(requirement: str) -> str | None:
    """``"triton>=3.6"`` -> None when satisfied, else the reason."""
    name, _, minimum = requirement.partition(">=")
    name = name.strip()
    try:
        have = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return f"package {name!r} is not installed (pip install '{requirement}')"
    if minimum and _version_tuple(have) < _version_tuple(minimum.strip()):
        return f"{name} {have} is installed, {requirement} is needed"
    return None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class Capabilities:
    """Declared capabilities of one backend.

    devices: device types ("cpu", "cuda"). dtypes: accepted input dtypes. head_dims: accepted
    head dims (None = any / not applicable). grad: whether backward is implemented.
    requires: package requirements. min_compute_capability: for CUDA devices.
    interpreted_on_cpu: a Triton backend that may run on CPU tensors under TRITON_INTERPRET=1.
    rules: extra shape rules, each ``Inputs -> list[str]``.
    """

    devices: tuple[str, ...] = ("cpu", "cuda")
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
    head_dims: Sequence[int] | None = None
    grad: bool = True
    deterministic: bool = True
    requires: tuple[str, ...] = ()
    min_compute_capability: tuple[int, int] | None = None
    interpreted_on_cpu: bool = False
    rules: tuple[Callable[[Inputs], list[str]], ...] = field(default=())

    def environment_reasons(self) -> list[str]:
        """Reasons that do not depend on the inputs (packages, hardware)."""
        reasons = [r for r in (package_reason(req) for req in self.requires) if r]
        if reasons:
            return reasons
        if self.interpreted_on_cpu:
            if not triton_interpret() and not torch.cuda.is_available():
                reasons.append(
                    "no CUDA device; to run the Triton kernels on the CPU (slowly, for testing), "
                    "set TRITON_INTERPRET=1 before starting Python")
        elif self.devices == ("cuda",) and not torch.cuda.is_available():
            reasons.append("no CUDA device")
        return reasons

    def reasons(self, inputs: Inputs) -> list[str]:
        reasons = self.environment_reasons()
        if reasons:
            return reasons
        devices = self.devices
        if self.interpreted_on_cpu and triton_interpret():
            devices = tuple(sorted(set(devices) | {"cpu"}))
        elif self.interpreted_on_cpu and "cpu" in devices and not triton_interpret():
            devices = tuple(d for d in devices if d != "cpu")
        if inputs.device not in devices:
            hint = ""
            if self.interpreted_on_cpu and inputs.device == "cpu":
                hint = " (set TRITON_INTERPRET=1 to run it interpreted on the CPU)"
            reasons.append(f"device {inputs.device!r} not in {list(devices)}{hint}")
        if inputs.dtype not in self.dtypes:
            names = [str(d).removeprefix("torch.") for d in self.dtypes]
            reasons.append(f"dtype {str(inputs.dtype).removeprefix('torch.')} not in {names}")
        if self.head_dims is not None and inputs.head_dim is not None and inputs.head_dim not in self.head_dims:
            reasons.append(f"head dim {inputs.head_dim} not supported ({_describe(self.head_dims)})")
        if inputs.requires_grad and not self.grad:
            reasons.append("backward not implemented (inputs require grad)")
        if (self.min_compute_capability and inputs.device == "cuda" and torch.cuda.is_available()):
            cc = torch.cuda.get_device_capability()
            if cc < self.min_compute_capability:
                reasons.append(f"compute capability {cc} < {self.min_compute_capability}")
        for rule in self.rules:
            reasons.extend(rule(inputs))
        return reasons


def _describe(values: Sequence[int]) -> str:
    if isinstance(values, range):
        step = f" step {values.step}" if values.step != 1 else ""
        return f"{values.start}..{values.stop - 1}{step}"
    return "supported: " + ", ".join(str(v) for v in values)
