#!/usr/bin/env python3
"""Tile sizes of the Triton context.moc kernels on one GPU: forward and forward+backward time per
(BLOCK_M, BLOCK_N, num_warps, num_stages), coherent inputs (see moc_gpu.py), chunk 512, top_k 8,
16 heads, head dim 128, bf16; SDPA flash timed in the same run.

    python3 bench/moc_tune.py [--T 16384,32768]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _bootstrap import ensure_blockzoo  # noqa: E402

ensure_blockzoo()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from moc_gpu import inputs  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from blockzoo.kernels.triton import moc as tmoc  # noqa: E402

CONFIGS = [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3), (64, 128, 8, 2),
           (128, 128, 8, 2), (32, 64, 4, 2)]


def run(T: int, kind: str) -> list[dict]:
    bench = functools.partial(triton.testing.do_bench, return_mode="median")
    q, k, v = inputs(kind, T, 16, 128, seed=T)
    params = dict(causal=True, chunk_size=512, top_k=8)
    qs, ks, vs = (x.transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, k, v))
    do = torch.randn_like(q)
    dos = do.transpose(1, 2).contiguous()

    def flash():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)

    def flash_fb():
        torch.autograd.grad(flash(), (qs, ks, vs), dos)

    def moc():
        return tmoc.moc_attention(qg, kg, vg, **params)

    def moc_fb():
        torch.autograd.grad(moc(), (qg, kg, vg), do)
    with torch.no_grad():
        t_flash = bench(flash)
    t_flash_fb = bench(flash_fb)
    rows = []
    for cfg in CONFIGS:
        tmoc.BLOCKS["cuda"] = cfg
        try:
            with torch.no_grad():
                t_f = bench(moc)
            t_fb = bench(moc_fb)
        except Exception as exc:  # noqa: BLE001 - a config that does not fit is reported, not fatal
            print("config", cfg, "failed:", type(exc).__name__, str(exc)[:120], flush=True)
            continue
        r = dict(T=T, inputs=kind, cfg=cfg, fwd_ms=t_f, fb_ms=t_fb, flash_fwd_ms=t_flash,
                 flash_fb_ms=t_flash_fb, fwd_x=t_flash / t_f, fb_x=t_flash_fb / t_fb)
        print(json.dumps(r), flush=True)
        rows.append(r)
    tmoc.BLOCKS.pop("cuda", None)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", default="16384,32768")
    ap.add_argument("--inputs", default="coherent,random")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    rows = []
    for T in (int(t) for t in a.T.split(",")):
        for kind in a.inputs.split(","):
            rows += run(T, kind)
            torch.cuda.empty_cache()
    pathlib.Path(a.out, "moc_tune.json").write_text(json.dumps(rows, indent=1))
    print(f"{'T':>6} {'inputs':>8} {'cfg':>18} {'fwd ms':>7} {'fwd x':>6} {'fb ms':>7} {'fb x':>6}")
    for r in rows:
        print(f"{r['T']:>6} {r['inputs']:>8} {str(tuple(r['cfg'])):>18} {r['fwd_ms']:7.2f} {r['fwd_x']:6.2f} "
              f"{r['fb_ms']:7.2f} {r['fb_x']:6.2f}")


if __name__ == "__main__":
    main()
