#!/usr/bin/env python3
"""Where MoC routing time goes on the GPU: each step of moc_routing + moc_block_lists timed
separately (do_bench medians) at T = 32768, chunk 512, top_k 8, 16 heads, head dim 128, bf16.

    python3 bench/moc_route_profile.py [--T 32768]
"""
from __future__ import annotations

import argparse
import functools
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _bootstrap import ensure_blockzoo  # noqa: E402

ensure_blockzoo()

import torch  # noqa: E402
import triton  # noqa: E402

from blockzoo.kernels.triton import moc as tmoc  # noqa: E402
from blockzoo.plugins.attention.reference import expand_kv  # noqa: E402
from blockzoo.plugins.context.reference import chunk_bounds, chunk_descriptors, moc_routing  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=32768)
    a = ap.parse_args()
    T, H, D = a.T, 16, 128
    q = torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16)
    bench = functools.partial(triton.testing.do_bench, return_mode="median")
    bounds = torch.tensor(chunk_bounds(T, 512), device="cuda")
    desc = chunk_descriptors(k, bounds)
    steps = {
        "chunk_descriptors": lambda: chunk_descriptors(k, bounds),
        "q.float()": lambda: q.float(),
        "einsum scores": lambda: torch.einsum("bthd,bchd->bhtc", q.float(), expand_kv(desc, H)).contiguous(),
    }
    scores = torch.einsum("bthd,bchd->bhtc", q.float(), expand_kv(desc, H)).contiguous()
    steps["topk"] = lambda: torch.topk(scores, 8, dim=-1, sorted=False)
    steps["moc_routing total"] = lambda: moc_routing(q, k, True, 512, 8)
    r = moc_routing(q, k, True, 512, 8)
    sel8, b32, l32 = r.sel.to(torch.uint8), r.bounds.int(), r.lim.int()
    steps["sel->uint8 etc"] = lambda: (r.sel.to(torch.uint8), r.bounds.int(), r.lim.int())
    steps["moc_block_lists"] = lambda: tmoc.moc_block_lists(sel8, b32, l32, 0, 1, 64, 64)
    for name, fn in steps.items():
        print(f"{name:>22}: {bench(fn):8.3f} ms", flush=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            moc_routing(q, k, True, 512, 8)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))


if __name__ == "__main__":
    main()
