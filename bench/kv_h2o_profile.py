#!/usr/bin/env python3
"""Where the time of an H2O decode step goes (issue 7's policy overhead at Hq:Hk = 32:8): per-kernel
device times from the CUDA profiler (torch.profiler, CUPTI) for the kept decode alone, the same
decode writing its logits, and the whole fused H2O step (``kv_decode.decode_h2o``), at B=16,
D=128, bf16, a kept cache of 8193 tokens (25% of 32768, one leaves per step). Kernel times only
(no launch gaps). About 30 s on an H100.

    python3 bench/kv_h2o_profile.py [--heads 32:8] [--out DIR]     (JSON to DIR/kv_h2o_profile.json)
    TRITON_INTERPRET=1 python3 bench/kv_h2o_profile.py --smoke     (CPU: runs the steps, no profile)
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _bootstrap import ensure_blockzoo  # noqa: E402

ensure_blockzoo()

import torch  # noqa: E402

from blockzoo.kernels.triton import kv_decode as kd  # noqa: E402

CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"


def profile(fn, iters=30):
    """Mean device time per call of each kernel (us) over ``iters`` calls, after a warm-up."""
    for _ in range(3):
        fn()
    if not CUDA:
        return {}
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    tot = collections.defaultdict(float)
    for ev in p.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            tot[ev.name[:60]] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
    return {k: v / iters for k, v in sorted(tot.items(), key=lambda kv: -kv[1])}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", default="32:8")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args()
    hq, hk = (int(x) for x in a.heads.split(":"))
    dev = "cuda" if CUDA else "cpu"
    B, T, D = (2, 64, 32) if a.smoke else (16, 32768, 128)
    keep = math.ceil(T * 0.25)
    t1, seen = keep + 1, T + 1
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(B, 1, hq, D, generator=g, device=dev).to(torch.bfloat16)
    k = torch.randn(B, hk, t1, D, generator=g, device=dev).to(torch.bfloat16)
    v = torch.randn(B, hk, t1, D, generator=g, device=dev).to(torch.bfloat16)
    pos = torch.arange(t1, device=dev).expand(B, hk, t1).contiguous()
    pos[..., -1] = seen - 1
    acc = torch.rand(B, hk, t1, generator=g, device=dev)
    res = {"device": torch.cuda.get_device_name() if CUDA else "cpu", "shape": [B, hq, hk, t1, D], "us": {}}
    res["us"]["decode"] = profile(lambda: kd.decode_attention(q, k, v))
    res["us"]["decode+logits"] = profile(lambda: kd.decode_attention(q, k, v, return_logits=True))
    res["us"]["h2o_step"] = profile(lambda: kd.decode_h2o(q, k, v, pos, acc, seen, keep, 4, min(64, keep // 2)))
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv_h2o_profile.json").write_text(json.dumps(res, indent=1))
    print(f"{res['device']}: B={B} Hq:Hk={hq}:{hk} cache {t1} D={D} bf16; mean device us per call")
    for what, ks in res["us"].items():
        print(f"{what}: total {sum(ks.values()):.1f} us")
        for name, us in ks.items():
            print(f"    {us:8.1f}  {name}")


if __name__ == "__main__":
    main()
