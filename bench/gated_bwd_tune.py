#!/usr/bin/env python3
"""Tune and time the Triton normres.dyt / normres.agu backward on one GPU.

For each dtype and shape (64M elements, widths 256..16384) it times, with
triton.testing.do_bench (median), in one run:

* copy (x.clone(): read + write, the bandwidth yardstick);
* the backward kernel alone (``normres_gated._bwd``: kernel + the [GR, N] partial sums) for a
  grid of (BWD_TILE, BWD_PROGRAMS_PER_SM, BWD_STAGES) configs; GB/s counts the bytes it must move
  (reads dy, dh, h or x+delta, writes dx [+ ddelta]);
* forward+backward through autograd (what training pays) for blockzoo and for torch eager
  (the same math in the input dtype), to see host overhead and the ratio to eager.

    python3 bench/gated_bwd_tune.py [--variants add,scale_dyt] [--out DIR]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _bootstrap import ensure_blockzoo  # noqa: E402

ensure_blockzoo()

import torch  # noqa: E402
import triton  # noqa: E402

from blockzoo.kernels.triton import normres_gated as ng  # noqa: E402
from blockzoo.plugins.normres.gated_plugin import _eager  # noqa: E402

SHAPES = ((262144, 256), (65536, 1024), (16384, 4096), (8192, 8192), (4096, 16384))
GRID = list(itertools.product((2048, 4096, 8192), (2, 4, 8), (1, 2)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="add,scale_dyt")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    rows = []
    defaults = (ng.BWD_TILE, ng.BWD_PROGRAMS_PER_SM, ng.BWD_STAGES)
    for dtn, variant, (M, N) in itertools.product(a.dtypes.split(","), a.variants.split(","), SHAPES):
        rows.append(measure(dtn, variant, M, N, defaults))
        torch.cuda.empty_cache()
    pathlib.Path(a.out, "gated_bwd_tune.json").write_text(json.dumps(rows, indent=1))
    print(f"{'dtype':>8} {'variant':>9} {'N':>6} {'def%':>5} {'best%':>5} {'best cfg':>14} {'fb ms':>7} {'eager':>7} {'x':>5}")
    for r in rows:
        b = r["best"]
        print(f"{r['dtype']:>8} {r['variant']:>9} {r['N']:>6} {r['bwd_default_pct_copy']:5.0f} {r['bwd_best_pct_copy']:5.0f} "
              f"{b['tile']:>6}/{b['ppsm']}/{b['stages']:<3} {r['fb_ms']:7.3f} {r['fb_eager_ms']:7.3f} {r['fb_vs_eager']:5.2f}")


def measure(dtn, variant, M, N, defaults):
    bench = triton.testing.do_bench
    dt = getattr(torch, dtn)
    g = torch.Generator(device="cuda").manual_seed(0)

    def r(*s):
        return torch.randn(*s, device="cuda", generator=g).to(dt)
    x, d, dy, dh = r(M, N), r(M, N), r(M, N), r(M, N)
    w, b = r(N) + 1, r(N)
    alpha = torch.full((1,), 0.7, device="cuda")
    gate = r(N) if variant != "add" else None
    mode = ng.MODES[variant]
    esz = x.element_size()
    keep_h = mode == 0 and dt == torch.float32
    hx = (x + d) if keep_h else x
    dlt = None if keep_h else d
    n_io = 2 + (1 if keep_h else 2) + (1 if mode == 0 else 2)        # dy, dh, h|x+d, dx (+dd)
    need = [True, True, True, mode != 0, False]
    t_copy = bench(lambda: x.clone())
    copy_gbs = 2 * M * N * esz / t_copy / 1e6
    res = []
    for tile, ppsm, st in GRID:
        ng.BWD_TILE, ng.BWD_PROGRAMS_PER_SM, ng.BWD_STAGES = tile, ppsm, st
        try:
            ms = bench(lambda: ng._bwd(dy, dh, hx, dlt, w, alpha, gate, None, mode, need))
        except Exception as exc:  # noqa: BLE001
            print("config failed", tile, ppsm, st, type(exc).__name__, str(exc)[:100])
            continue
        res.append((ms, tile, ppsm, st))
    res.sort()
    ng.BWD_TILE, ng.BWD_PROGRAMS_PER_SM, ng.BWD_STAGES = defaults
    t_default = bench(lambda: ng._bwd(dy, dh, hx, dlt, w, alpha, gate, None, mode, need))
    ms, tile, ppsm, st = res[0]
    ng.BWD_TILE, ng.BWD_PROGRAMS_PER_SM, ng.BWD_STAGES = tile, ppsm, st
    leaves = [t.detach().clone().requires_grad_() for t in (x, d, w, b)]
    al = alpha.clone().requires_grad_()
    gl = gate.clone().requires_grad_() if gate is not None else None

    def fb_bz():
        y, h = ng.gated_dyt(leaves[0], leaves[1], leaves[2], leaves[3], al, gl, None, variant)
        torch.autograd.grad((y, h), leaves + [al], (dy, dh))

    def fb_eager():
        y, h = _eager(leaves[0], leaves[1], leaves[2], leaves[3], al.to(dt), gl, None, variant)
        torch.autograd.grad((y, h), leaves + [al], (dy, dh))
    t_fb = bench(fb_bz)
    t_fb_eager = bench(fb_eager)
    ng.BWD_TILE, ng.BWD_PROGRAMS_PER_SM, ng.BWD_STAGES = defaults
    row = dict(dtype=dtn, variant=variant, M=M, N=N, copy_ms=t_copy, copy_gbs=copy_gbs,
               bwd_default_ms=t_default, bwd_best_ms=ms, best=dict(tile=tile, ppsm=ppsm, stages=st),
               bwd_best_pct_copy=100 * n_io * M * N * esz / ms / 1e6 / copy_gbs,
               bwd_default_pct_copy=100 * n_io * M * N * esz / t_default / 1e6 / copy_gbs,
               fb_ms=t_fb, fb_eager_ms=t_fb_eager, fb_vs_eager=t_fb_eager / t_fb,
               top5=[dict(ms=m, tile=t, ppsm=p, stages=s) for m, t, p, s in res[:5]])
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    main()
