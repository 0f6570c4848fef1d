#!/usr/bin/env python3
"""token.mixeddim's per-step rewrite (``plugins/token/mixeddim.repack``) on one GPU: after a decode
step the new token sits in the full-width tail and the cache is over its budget, so the policy
re-allocates every token's width and moves the pools (torch gathers over the whole cache). Timed
at the decode benchmark's shape (B=16, Hk=8, T=32768, D=128, bf16, 25% budget, 4 levels) against
the pooled decode kernel alone, both as wall time per call (the rewrite syncs with the host).

    python3 bench/kv_mixeddim_rewrite.py [--out DIR]          (JSON to DIR/kv_mixeddim_rewrite.json)
    TRITON_INTERPRET=1 python3 bench/kv_mixeddim_rewrite.py --smoke
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _bootstrap import ensure_blockzoo  # noqa: E402

ensure_blockzoo()

import torch  # noqa: E402
from kv_mixeddim_gpu import CUDA, DEV, make  # noqa: E402

from blockzoo.kernels.triton import kv_mixeddim as km  # noqa: E402
from blockzoo.plugins.token.mixeddim import permute_queries, repack  # noqa: E402


def wall_ms(fn, reps):
    fn()
    if CUDA:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if CUDA:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / reps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args()
    B, Hq, Hk, T, D = (2, 4, 2, 256, 32) if a.smoke else (16, 32, 8, 32768, 128)
    keep = T // 4
    st, q, k, v = make(B, Hk, Hq, T, D, 4, keep, torch.bfloat16)
    tk, tv = k[:, :, -1:].contiguous(), v[:, :, -1:].contiguous()
    tpos = torch.full((B, Hk, 1), T - 1, device=DEV)
    tacc = torch.zeros(B, Hk, 1, device=DEV)
    qp = permute_queries(q, st.k_order, Hk)
    reps = 2 if a.smoke else 20
    res = {"device": torch.cuda.get_device_name() if CUDA else "cpu", "shape": [B, Hq, Hk, T, D],
           "rewrite_ms": wall_ms(lambda: repack(st, tk, tv, tpos, tacc, T, keep, 4, 64), reps),
           "decode_scores_ms": wall_ms(lambda: km.pooled_decode(q, qp, st.kbuf, st.vbuf, st.tok_off, st.elem_base,
                                                                st.step, tk, tv, layout=st.host), reps)}
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv_mixeddim_rewrite.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
