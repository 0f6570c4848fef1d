"""Pieces shared by the Triton kernels: interpreter detection and the store cast."""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Under TRITON_INTERPRET=1, Triton 3.6 converts fp32 -> bf16 by truncation (its "rtne" path drops
# the carry into the exponent), while GPUs round to nearest even. Kernels store through _cast, which
# rounds the bits to nearest even first when interpreted, so CI checks the numbers the GPU makes.
# Compiled kernels get a plain .to(dtype) (the branch is a compile-time constant).
_INTERP_RNE = tl.constexpr(INTERPRET)


@triton.jit
def _cast(x, dtype: tl.constexpr):
    if _INTERP_RNE:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)
