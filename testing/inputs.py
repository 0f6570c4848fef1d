"""Input factories: fresh random tensors for a component's test case."""

from __future__ import annotations

import os
import secrets

import torch

from ..registry.registry import Case


def make_inputs(case: Case, dtype: torch.dtype, device: str | torch.device, seed: int,
                requires_grad: bool = True) -> dict[str, torch.Tensor | None]:
    """Draw every tensor of ``case`` from N(offset, scale^2), rounded to ``dtype``.

    Tensors named in ``case.grad`` (default: all) get ``requires_grad``. The generator runs on
    the CPU so the same seed gives the same values on every device.
    """
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor | None] = {}
    for name, shape in case.shapes.items():
        if shape is None:
            out[name] = None
            continue
        t = torch.randn(shape, generator=gen, dtype=torch.float64)
        t = t * case.scale.get(name, 1.0) + case.offset.get(name, 0.0)
        t = t.to(dtype=dtype).to(device)
        grad_names = case.grad if case.grad is not None else tuple(case.shapes)
        if requires_grad and name in grad_names and t.is_floating_point():
            t.requires_grad_(True)
        out[name] = t
    return out


def fresh_seed() -> int:
    """A new seed for every check, printed in failure reports so a failure can be replayed
    (``BLOCKZOO_TEST_SEED=<seed>`` pins it)."""
    pinned = os.environ.get("BLOCKZOO_TEST_SEED")
    return int(pinned) if pinned else secrets.randbelow(2**31 - 1)
