#!/usr/bin/env python3
"""token.mixeddim's per-step rewrite (``plugins/token/mixeddim.repack``) on one GPU: after a decode
step the new token sits in the full-width tail and the cache is over its budget, so the policy
re-allocates every token's width and moves the pools (torch gathers over the whole cache). Timed
at the decode benchmark's shape (B=16, Hk=8, T=32768, D=128, bf16, 25% budget, 4 levels) against
the pooled decode kernel alone, both as wall time per call (the rewrite syncs with the host);
also the rewrite with the allocator as it was in session 12 (``torch.cummin`` instead of
``reference.running_min``; the same caches, checked), in the same run.

    python3 bench/kv_mixeddim_rewrite.py [--out DIR]          (JSON to DIR/kv_mixeddim_rewrite.json)
    TRITON_INTERPRET=1 python3 bench/kv_mixeddim_rewrite.py --smoke
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _bootstrap import ensure_blockzoo  # noqa: E402

ensure_blockzoo()

import torch  # noqa: E402
from kv_mixeddim_gpu import CUDA, DEV, make, wall_ms  # noqa: E402

from blockzoo.kernels.triton import kv_mixeddim as km  # noqa: E402
from blockzoo.plugins.token.mixeddim import permute_queries, repack  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--profile", action="store_true", help="also print torch.profiler's top ops of one rewrite")
    a = ap.parse_args()
    B, Hq, Hk, T, D = (2, 4, 2, 256, 32) if a.smoke else (16, 32, 8, 32768, 128)
    keep = T // 4
    st, q, k, v = make(B, Hk, Hq, T, D, 4, keep, torch.bfloat16)
    tk, tv = k[:, :, -1:].contiguous(), v[:, :, -1:].contiguous()
    tpos = torch.full((B, Hk, 1), T - 1, device=DEV)
    tacc = torch.zeros(B, Hk, 1, device=DEV)
    qp = permute_queries(q, st.k_order, Hk)
    reps = 2 if a.smoke else 20
    from blockzoo.plugins.token import reference as ref
    fast_min = ref.running_min
    stores = []

    def timed(running_min):
        ref.running_min = running_min
        try:
            new = repack(st, tk, tv, tpos, tacc, T, keep, 4, 64)
            stores.append(tuple(getattr(new, f) for f in ("kbuf", "vbuf", "pos", "acc", "tok_off", "count")))
            return wall_ms(lambda: repack(st, tk, tv, tpos, tacc, T, keep, 4, 64), reps)
        finally:
            ref.running_min = fast_min

    res = {"device": torch.cuda.get_device_name() if CUDA else "cpu", "shape": [B, Hq, Hk, T, D],
           # the allocator as of session 12 (torch.cummin), then the shipped one; the same caches
           "rewrite_torch_cummin_ms": timed(lambda x: torch.cummin(x, -1).values),
           "rewrite_ms": timed(fast_min),
           "decode_scores_ms": wall_ms(lambda: km.pooled_decode(q, qp, st.kbuf, st.vbuf, st.tok_off, st.count,
                                                                st.elem_base, st.step, tk, tv, layout=st.host), reps)}
    res["same_store"] = all(all(torch.equal(x, y) for x, y in zip(s, stores[0], strict=True)) for s in stores[1:])
    if not res["same_store"]:
        raise SystemExit(f"the allocator variants made different caches: {res}")
    if a.profile:
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
        with profile(activities=acts) as prof:
            repack(st, tk, tv, tpos, tacc, T, keep, 4, 64)
            if CUDA:
                torch.cuda.synchronize()
        for key in (("self_cuda_time_total",) if CUDA else ()) + ("cpu_time_total",):
            print(prof.key_averages().table(sort_by=key, row_limit=20), flush=True)
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv_mixeddim_rewrite.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
