#!/usr/bin/env python3
"""Compile every Triton kernel of kernels/triton/kv_decode.py for sm_90 (H100) on any machine, no
GPU needed, at the constexprs bench/kv_decode_gpu.py launches (B=16, T=32768 / 8193, D=128, bf16,
Tq=1 specialised as Triton does for an integer 1, and Tq as a runtime int). The interpreter does
not type-check loop-carried values or scalar/pointer mixes; this does (it runs the whole
TTIR -> TTGIR -> LLIR -> PTX -> cubin pipeline, ptxas included).

    .venv/bin/python bench/kv_decode_sm90.py          # exits 1 if any kernel fails to compile
"""
from __future__ import annotations

import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
os.environ.pop("TRITON_INTERPRET", None)
from _bootstrap import ensure_blockzoo  # noqa: E402

ensure_blockzoo()

from _sm90 import compile_sm90  # noqa: E402

from blockzoo.kernels.triton import kv_decode as kd  # noqa: E402

# pointer arguments of every kernel (the rest are i32 scalars, qk_scale fp32)
PTR = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "OP": "*fp32", "LP": "*fp32", "LG": "*fp32", "Out": "*bf16",
       "LSE": "*fp32", "SC": "*fp32", "IDX": "*i64", "X": "*bf16", "Y": "*bf16", "POS": "*i64", "ACC": "*fp32",
       "CS": "*fp32", "CP": "*i64", "CI": "*i32", "CNT": "*i32"}
FLOAT = {"qk_scale"}


def compile_one(fn, const, warps, stages=3, ptr=None):
    return compile_sm90(fn, const, {**PTR, **(ptr or {})}, warps, stages, FLOAT)


def cases():
    """(name, kernel, constexprs, warps, stages, pointer overrides)."""
    out = []
    for tq in ({"Tq": 1}, {}):
        tqs = "Tq=1" if tq else "Tq=i32"
        for logits, hints in ((False, False), (True, False), (True, True)):
            for bn, w, st in ((128, 4, 3), (64, 4, 3)):
                out.append((f"split LOGITS={logits} L2_HINTS={hints} BLOCK_N={bn} {tqs}", kd._decode_split_kernel,
                            dict(D=128, BLOCK_D=128, BLOCK_M=16, BLOCK_N=bn, NEG_SCALE=False, LOGITS=logits,
                                 L2_HINTS=hints, **tq), w, st, None))
        out.append((f"combine {tqs}", kd._decode_combine_kernel, dict(D=128, BLOCK_D=128, BLOCK_S=8, **tq), 4, 3,
                    None))
        out.append((f"token_scores {tqs}", kd._token_scores_kernel,
                    dict(D=128, BLOCK_D=128, BLOCK_M=16, BLOCK_N=64, **tq), 4, 3, None))
        for bt, w in ((256, 4), (1024, 4), (2048, 8), (4096, 8), (8192, 8)):
            for unroll in (1, 4, 8):
                for evict in (False, True):
                    if (bt, unroll) != (2048, 4) and bt != 1024:
                        continue
                    out.append((f"h2o_accum BT={bt} w={w} UNROLL={unroll} EVICT={evict} {tqs}",
                                kd._h2o_accum_kernel, dict(UNROLL=unroll, BLOCK_T=bt, EVICT=evict, **tq), w, 3, None))
                for evict in (False, True):
                    out.append((f"h2o_combine BT={bt} w={w} UNROLL={unroll} EVICT={evict} {tqs}",
                                kd._h2o_combine_kernel,
                                dict(D=128, BLOCK_D=128, BLOCK_S=8, UNROLL=unroll, BLOCK_T=bt, EVICT=evict,
                                     BLOCK_C=64, **tq), w, 3, None))
    out.append(("h2o_evict", kd._h2o_evict_kernel, dict(D=128, BLOCK_C=64, BLOCK_D=128), 4, 3, None))
    for acc in (False, True):
        out.append((f"evict_one HAS_ACC={acc}", kd._evict_one_kernel,
                    dict(D=128, BLOCK=1024, BLOCK_D=128, HAS_ACC=acc), 4, 3, {"SC": "*fp32"}))
    out.append(("gather_rows", kd._gather_rows_kernel, dict(D=128, BLOCK_D=128, BLOCK_R=32), 4, 3, None))
    return out


def main():
    only = sys.argv[1] if len(sys.argv) > 1 else ""
    bad = 0
    todo = [c for c in cases() if only in c[0]]
    t0 = time.time()
    for name, fn, const, warps, stages, ptr in todo:
        try:
            nbytes, dt = compile_one(fn, const, warps, stages, ptr)
            print(f"ok   {name}: cubin {nbytes} B ({dt:.1f} s)", flush=True)
        except Exception as e:  # noqa: BLE001  (report every failure, then exit 1)
            bad += 1
            msg = str(e).strip().splitlines()
            print(f"FAIL {name}: {type(e).__name__}: {' | '.join(msg[-6:])[:600]}", flush=True)
    print(f"{len(todo) - bad}/{len(todo)} kernels compiled for sm_90 in {time.time() - t0:.0f} s")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
