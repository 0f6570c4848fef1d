"""Tolerance tables: errors allowed against the fp32 (fp64 for fp64 inputs) reference.

Two measures, both must pass: ``max_rel`` = max|a - e| / max|e| (max-normalised) and
``rms_rel`` = ||a - e||_2 / ||e||_2. Values are set by the precision of the inputs and outputs
(a bf16 output alone carries a relative rounding of 2^-9), not by what a kernel happens to reach.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    max_rel: float
    rms_rel: float


# (dtype, kind) -> tolerance; kind is "fwd" or "grad". For the low-precision dtypes the values are
# multiples of the unit roundoff u (bf16 2^-8, fp16 2^-11): an op's result passes through up to
# four roundings to the dtype (e.g. an MLP: matmul output, activation, matmul output, cast), each
# up to u/2, so forward rms <= 4u and max <= 8u; gradients go through about twice as many.
_U = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
BASE: dict[tuple[torch.dtype, str], Tolerance] = {
    (torch.float64, "fwd"): Tolerance(1e-10, 1e-11),
    (torch.float64, "grad"): Tolerance(1e-9, 1e-10),
    (torch.float32, "fwd"): Tolerance(1e-5, 2e-6),
    (torch.float32, "grad"): Tolerance(5e-5, 1e-5),
    **{(dt, "fwd"): Tolerance(8 * u, 4 * u) for dt, u in _U.items()},
    **{(dt, "grad"): Tolerance(16 * u, 6 * u) for dt, u in _U.items()},
}

# backend/device specific: Triton's fp32 dot uses TF32 tensor cores on a GPU (10-bit mantissa)
OVERRIDES: dict[tuple[str, str, torch.dtype, str], Tolerance] = {
    ("triton", "cuda", torch.float32, "fwd"): Tolerance(5e-3, 1e-3),
    ("triton", "cuda", torch.float32, "grad"): Tolerance(1e-2, 3e-3),
}


def tolerance(dtype: torch.dtype, kind: str = "fwd", backend: str = "reference", device: str = "cpu") -> Tolerance:
    return OVERRIDES.get((backend, device, dtype, kind), BASE[(dtype, kind)])
