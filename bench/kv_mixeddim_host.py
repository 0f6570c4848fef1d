#!/usr/bin/env python3
"""Host time per call of token.mixeddim's incremental step (``mixeddim_step.step_rewrite``) and of
its pooled decode (``mixeddim.decode_kernel``), at the decode benchmark's shape (B=16, Hq=32,
Hk=8, T=32768, D=128, bf16, 25% budget, 4 levels, 64 spare slots): ``n`` calls without
synchronisation (the time for the calls to return), then the time until the GPU is done. When the
first is close to the second, the calls are host-bound. ``--cprofile`` adds Python's profile of
the calls (where the host time goes). CUDA only.

    python3 bench/kv_mixeddim_host.py [--n 6] [--cprofile]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pathlib
import pstats
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _bootstrap import ensure_blockzoo  # noqa: E402

ensure_blockzoo()

import torch  # noqa: E402
from kv_mixeddim_gpu import CUDA, make_inputs  # noqa: E402

from blockzoo.plugins.token.mixeddim import PackedKV, decode_kernel, repack  # noqa: E402
from blockzoo.plugins.token.mixeddim_step import step_rewrite, step_state  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--cprofile", action="store_true")
    a = ap.parse_args()
    if not CUDA:
        raise SystemExit("kv_mixeddim_host.py times CUDA launches: it needs a GPU")
    B, Hq, Hk, T, D, L = 16, 32, 8, 32768, 128, 4
    keep = T // 4
    k, v, pos, acc, kr, vr, q = make_inputs(B, Hk, Hq, T, D, torch.bfloat16)
    empty = PackedKV.empty(B, Hk, D, L, kr, vr, torch.bfloat16, "cuda")
    inc = repack(empty, k, v, pos, acc, T, keep, 4, 64, slack=64)
    state = step_state(inc)

    def step(i):  # a new token at position T + i (the room is not read: the timing is the same)
        tk, tv = k[:, :, i:i + 1].contiguous(), v[:, :, i:i + 1].contiguous()
        tpos = torch.full((B, Hk, 1), T + i, device="cuda", dtype=torch.int64)
        return step_rewrite(inc, state, tk, tv, tpos, acc[:, :, i:i + 1].contiguous(), T + i + 1, keep, 4, 64, drop=L)

    tk, tv = k[:, :, :1].contiguous(), v[:, :, :1].contiguous()
    for i in range(3):  # compile and warm up
        step(i)
        decode_kernel("triton", q, inc, tk, tv)
    torch.cuda.synchronize()
    for name, fn in (("step", step), ("decode", lambda i: decode_kernel("triton", q, inc, tk, tv))):
        t0 = time.perf_counter()
        for i in range(a.n):
            fn(10 + i)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        print(f"{name}: host {1e3 * (t1 - t0) / a.n:.3f} ms/call, to sync {1e3 * (t2 - t0) / a.n:.3f}", flush=True)
        if a.cprofile:
            pr = cProfile.Profile()
            pr.enable()
            for i in range(a.n):
                fn(20 + i)
            pr.disable()
            torch.cuda.synchronize()
            s = io.StringIO()
            pstats.Stats(pr, stream=s).sort_stats("cumtime").print_stats(25)
            print(s.getvalue())


if __name__ == "__main__":
    main()
