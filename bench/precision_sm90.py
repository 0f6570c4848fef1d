"""Compile the precision Triton kernels for sm_90 on any machine (no GPU needed).

The interpreter (TRITON_INTERPRET=1, CI) runs kernels as Python and does not check what the
compiler checks (loop-carried types, constexpr branches, dtype legality of dots and casts), so
this script lowers every constexpr variant that ``kernels/triton/precision.py`` launches for the
H100 (bf16 inputs, head dim 128 and 40, the default blocks) to a cubin with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``. Exit status 1 if any fails.

    python bench/precision_sm90.py [--quick]     (without TRITON_INTERPRET)
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _bootstrap import ensure_blockzoo  # noqa: E402

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("precision_sm90.py compiles the real kernels: run it without TRITON_INTERPRET=1")
ensure_blockzoo()

import triton  # noqa: E402
from _sm90 import compile_sm90  # noqa: E402

from blockzoo.kernels.triton import precision as P  # noqa: E402

FLOATS = {"mult", "q_mult", "t_f"}


def _compile(name: str, fn, const: dict, ptrs: dict, warps: int, stages: int = 1) -> bool:
    try:
        n, dt = compile_sm90(fn, const, ptrs, warps, stages, FLOATS)
        print(f"ok   {name:60s} cubin {n:7d} B  {dt:5.1f} s", flush=True)
        return True
    except Exception as e:  # noqa: BLE001
        print(f"FAIL {name}: {type(e).__name__}: {str(e)[:2000]}", flush=True)
        return False


def kv_variants(dtype: str, D: int, k_block: int) -> list[tuple[str, dict, dict]]:
    """(int8 smooth, pv fp8), (int8 smooth, pv fp16), (int8 unsmoothed, fp8), (qaas: fp8 K, fp8 V)."""
    bd = max(32, triton.next_power_of_2(D))
    out = []
    for kind, smooth, pv in (("int8", True, "fp8"), ("int8", True, "fp16"), ("int8", False, "fp8"),
                             ("fp8", False, "fp8")):
        kc = "*i8" if kind == "int8" else "*fp8e4nv"
        vt = "*fp16" if pv == "fp16" else "*fp8e4nv"
        ptrs = {"K": f"*{dtype}", "V": f"*{dtype}", "KC": kc, "SK": "*fp32", "VT": vt, "VS": "*fp32",
                "KSUM": "*fp32", "VMAX": "*fp32"}
        base = dict(D=D, BLOCK_D=bd, BLOCK=k_block, NCH=8, FP8_NATIVE=True)
        tag = f"{kind} smooth={smooth} pv={pv} {dtype} D{D} kb{k_block}"
        stats = dict(base, K_SUM=smooth, K_CODES=not smooth, KIND=0 if kind == "int8" else 1,
                     QMAX=127.0 if kind == "int8" else 448.0, V_AMAX=pv == "fp8", V_F16=pv == "fp16")
        out.append((f"_kv_stats_kernel {tag}", P._kv_stats_kernel, stats, ptrs))
        if smooth or pv == "fp8":
            codes = dict(base, K_CODES=smooth, V_CODES=pv == "fp8")
            out.append((f"_kv_codes_kernel {tag}", P._kv_codes_kernel, codes, ptrs))
    return out


def attn_variants(dtype: str, D: int) -> list[tuple[str, dict, dict, int, int]]:
    """int8 (fused Q, fp8 / fp16 PV) at 64/128, qaas binary and fp8 P at 128/64 (default blocks)."""
    bd = max(32, triton.next_power_of_2(D))
    out = []
    for name, qb, kb, qk_int, pmode, q_raw, vt in (("int8 fp8-PV", 64, 128, True, 0, True, "*fp8e4nv"),
                                                   ("int8 fp16-PV", 64, 128, True, 1, True, "*fp16"),
                                                   ("qaas binary", 128, 64, False, 2, False, "*fp8e4nv"),
                                                   ("qaas fp8-P", 128, 64, False, 0, False, "*fp8e4nv")):
        for causal in (False, True):
            qc = f"*{dtype}" if q_raw else ("*i8" if qk_int else "*fp8e4nv")
            ptrs = {"QC": qc, "KC": "*i8" if qk_int else "*fp8e4nv", "VT": vt, "SQ": "*fp32", "SK": "*fp32",
                    "VS": "*fp32", "LT": "*fp32", "GAMMA": "*fp32", "Out": f"*{dtype}", "DBG_S": "*fp32",
                    "DBG_K": "*i8"}
            const = dict(D=D, BLOCK_D=bd, BLOCK_M=qb, BLOCK_N=kb, CAUSAL=causal, QK_INT=qk_int, PMODE=pmode,
                         HAS_GAMMA=not qk_int, FP8_NATIVE=True, DEBUG=False, Q_RAW=q_raw)
            warps = P.CFG["warps"] or (8 if qb >= 128 else 4)
            out.append((f"_qattn_fwd_kernel {name} causal={causal} {dtype} D{D}", P._qattn_fwd_kernel, const, ptrs,
                        warps, P.CFG["stages"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="the K/V pre-pass kernels only (bf16, D=128)")
    args = ap.parse_args()
    ok = True
    t0 = time.time()
    cases = [("bf16", 128, 128), ("bf16", 128, 64)] if args.quick else \
        [("bf16", 128, 128), ("bf16", 128, 64), ("bf16", 40, 32), ("fp32", 128, 128), ("fp16", 128, 256)]
    for dtype, D, kb in cases:
        for name, fn, const, ptrs in kv_variants(dtype, D, kb):
            warps = 8 if kb * max(32, triton.next_power_of_2(D)) >= 16384 else 4
            ok &= _compile(name, fn, const, ptrs, warps)
    if not args.quick:
        for name, fn, const, ptrs, warps, stages in attn_variants("bf16", 128):
            ok &= _compile(name, fn, const, ptrs, warps, stages)
    print(f"{'all compiled' if ok else 'FAILURES'} for sm_90 in {time.time() - t0:.0f} s", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
