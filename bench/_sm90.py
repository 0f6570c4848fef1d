"""Compile one Triton kernel for sm_90 (H100) on any machine, no GPU needed: the shared helper of
the ``bench/*_sm90.py`` scripts. The interpreter (``TRITON_INTERPRET=1``, CI) runs kernels as
Python and does not check what the compiler checks (loop-carried types, scalar / pointer mixes,
dtype legality of dots and casts); ``triton.compile`` with a ``GPUTarget`` runs the whole
TTIR -> TTGIR -> LLIR -> PTX -> cubin pipeline, ptxas included."""

from __future__ import annotations

import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)


def signature(fn, const: dict, ptrs: dict, floats=frozenset()) -> dict:
    """Triton signature of ``fn``: constexprs from ``const``, pointer types from ``ptrs`` (name ->
    "*bf16" ...), fp32 scalars named in ``floats``, every other argument an i32 scalar."""
    sig = {}
    for n in fn.arg_names:
        if n in const:
            sig[n] = "constexpr"
        elif n in ptrs:
            sig[n] = ptrs[n]
        elif n in floats:
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    return sig


def compile_sm90(fn, const: dict, ptrs: dict, warps: int, stages: int, floats=frozenset()) -> tuple[int, float]:
    """(cubin bytes, seconds) of ``fn`` compiled for sm_90; raises what the compiler raises."""
    t0 = time.time()
    ck = triton.compile(ASTSource(fn, signature(fn, const, ptrs, floats), constexprs=const), target=TARGET,
                        options={"num_warps": warps, "num_stages": stages})
    return len(ck.asm["cubin"]), time.time() - t0
