#!/usr/bin/env python3
"""Compile every Triton kernel of kernels/triton/kv_mixeddim.py for sm_90 (H100) on any machine, no
GPU needed, at the constexprs bench/kv_mixeddim_gpu.py launches (D=128, 4 levels of step 32,
bf16, G * Tq = 4 rows -> BLOCK_M=16, Tq=1 specialised as Triton does for an integer 1, and Tq as
a runtime int; each split config the benchmark times; its small checks' D=40, 4 levels of step
10, Tq=2) plus BLOCK_M=64 (G * Tq = 64, the most a program holds). The interpreter does not type-check loop-carried values or scalar/pointer
mixes; this does (TTIR -> TTGIR -> LLIR -> PTX -> cubin, ptxas included).

    .venv/bin/python bench/kv_mixeddim_sm90.py          # exits 1 if any kernel fails to compile
"""
from __future__ import annotations

import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
os.environ.pop("TRITON_INTERPRET", None)
from _bootstrap import ensure_blockzoo  # noqa: E402

ensure_blockzoo()

import triton  # noqa: E402
from _sm90 import compile_sm90  # noqa: E402

from blockzoo.kernels.triton import kv_mixeddim as km  # noqa: E402

PTR = {"Q": "*bf16", "QP": "*bf16", "KB": "*bf16", "VB": "*bf16", "TOK": "*i64", "EB": "*i64", "TK": "*bf16",
       "TV": "*bf16", "OR": "*fp32", "ON": "*fp32", "LSE2": "*fp32", "SP": "*fp32", "ST_OUT": "*fp32",
       "PR": "*fp32", "PN": "*fp32", "PL": "*fp32", "LGP": "*fp32", "LGT": "*fp32"}
FLOAT = {"qk_scale"}
#: (BLOCK_N, num_warps, num_stages, narrow): the configs bench/kv_mixeddim_gpu.py times
BENCH_CFGS = [(64, 4, 3, True), (32, 4, 3, True), (128, 4, 3, True), (64, 8, 3, True), (32, 8, 3, True),
              (64, 4, 3, False)]


def compile_one(fn, const, warps, stages=3):
    return compile_sm90(fn, const, PTR, warps, stages, FLOAT)


def cases():
    """(name, kernel, constexprs, warps, stages)."""
    out = []
    for tq in ({"Tq": 1}, {}):
        tqs = "Tq=1" if tq else "Tq=i32"
        shapes = [(4, 32, 128, 16, BENCH_CFGS if tq else BENCH_CFGS[:1]),
                  (4, 10, 40, 16, [(64, 4, 3, True), (64, 4, 3, False)]),
                  (4, 32, 128, 64, [(64, 4, 3, True)])]
        for L, step, d, bm, cfgs in shapes:
            bd = max(16, triton.next_power_of_2(d))
            for bn, w, st, narrow in cfgs:
                c = dict(L=L, STEP=step, D=d, BLOCK_D=bd, BLOCK_M=bm, BLOCK_N=bn, NARROW=narrow,
                         EB_ALIGN=km._eb_align(step), **tq)
                tag = f"L={L} step={step} D={d} BM={bm} BN={bn} w={w} st={st} narrow={narrow} {tqs}"
                for lg in (True, False):
                    out.append((f"split {tag} logits={lg}", km._pooled_split_kernel, {**c, "LOGITS": lg}, w, st))
                    out.append((f"scores {tag} from_logits={lg}", km._pooled_scores_kernel,
                                {**c, "FROM_LOGITS": lg}, w, st))
            for bs in (2, 8, 16):
                out.append((f"combine D={d} BM={bm} BLOCK_S={bs} {tqs}", km._pooled_combine_kernel,
                            dict(D=d, BLOCK_D=bd, BLOCK_M=bm, BLOCK_S=bs, **tq), 4, 3))
    return out


def main():
    only = sys.argv[1] if len(sys.argv) > 1 else ""
    bad = 0
    for name, fn, const, warps, stages in cases():
        if only and only not in name:
            continue
        try:
            n, dt = compile_one(fn, const, warps, stages)
            print(f"ok    {name}: cubin {n} bytes, {dt:.1f} s", flush=True)
        except Exception as e:  # noqa: BLE001 - report every failure, then exit 1
            bad += 1
            print(f"FAIL  {name}: {type(e).__name__}: {str(e)[:2000]}", flush=True)
    print("all compiled" if not bad else f"{bad} failed")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
