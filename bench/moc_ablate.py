#!/usr/bin/env python3
"""Ablations of context.moc's query-major forward and dQ (timing only, GPU): where a tile's cost
over the dense core's goes. Each variant is a copy of ``kernels/triton/moc.py`` with one text
substitution, written next to it as ``_moc_ablate_<name>.py`` (removed afterwards) and timed on
the same routing as the unchanged module. Variants compute WRONG outputs on purpose (they drop
the routing's indirection or its selection; ``latefirst`` only reorders); only their times mean
anything.

* ``affine``: a listed chunk's id and segment are arithmetic (list entry ``t`` is chunk ``t``,
  ``[t * chunk, (t + 1) * chunk)``) instead of loads (QList -> Bounds -> K address);
* ``nosel``: every row keeps every listed chunk (no per-row selection gather);
* ``latefirst``: forward and dQ programs take the latest query blocks (the heaviest under causal
  masking) first, as the dense core does;
* the dense core at the moc forward's tile shape (``BLOCKZOO_ATTN_FWD_CFG``), and at its own.

    python3 bench/moc_ablate.py [--T 8192] [--kinds random,coherent] [--variants affine,nosel,latefirst]
                                [--out DIR]

T = 8192, chunk 512, top_k 8, 16 heads, head dim 128, bf16, causal, ``do_bench`` medians (ms).
"""
from __future__ import annotations

import argparse
import functools
import importlib
import json
import math
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _bootstrap import ensure_blockzoo  # noqa: E402

ensure_blockzoo()

import torch  # noqa: E402
import triton  # noqa: E402
from moc_gpu import inputs  # noqa: E402

from blockzoo.kernels.triton import attention as tattn  # noqa: E402
from blockzoo.kernels.triton import moc as tmoc  # noqa: E402

SRC = pathlib.Path(tmoc.__file__)
CHUNK = 512
VARIANTS = {
    "affine": [("    c = tl.load(QList + lst + t)\n    ja = tl.maximum(tl.load(Bounds + c), PREFIX)\n"
                "    jb = tl.load(Bounds + c + 1)\n",
                f"    c = t\n    ja = t * {CHUNK}\n    jb = ja + {CHUNK}\n")],
    "nosel": [("    return ja, jb, tl.load(Sel + sel_row + offs_m.to(tl.int64) * C + c, mask=rmask, other=0) != 0\n",
               "    return ja, jb, offs_m >= 0\n")],
    "latefirst": [("    pid_m = tl.program_id(0)", "    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)")],
}


def variant(name: str):
    text = SRC.read_text()
    for old, new in VARIANTS[name]:
        if old not in text:
            raise SystemExit(f"variant {name}: pattern not found in {SRC}")
        text = text.replace(old, new)
    path = SRC.with_name(f"_moc_ablate_{name}.py")
    path.write_text(text)
    return importlib.import_module(f"blockzoo.kernels.triton._moc_ablate_{name}"), path


def measure(kind, T, H, D, params, mods, bench) -> dict:
    sc = 1.0 / math.sqrt(D)
    q, k, v = inputs(kind, T, H, D, seed=T)
    sel, bounds, lim, _ = tmoc.moc_route(q, k, **params)
    seg = tmoc._flat_seg_len(T, CHUNK, None, 0)
    o, lse = tmoc._fwd_impl(q, k, v, sel, bounds, lim, 0, sc, True, seg)
    do = torch.randn_like(q)
    row = {"inputs": kind, "T": T}
    for name, m in mods.items():
        for rm in (True, False):
            m.ROW_MASKS = rm
            tag = f"{name}{'' if rm else '/pair'}"
            row[f"fwd {tag}"] = bench(lambda m=m: m._fwd_impl(q, k, v, sel, bounds, lim, 0, sc, True, seg))
            row[f"bwd {tag}"] = bench(lambda m=m: m._bwd_impl(do, q, k, v, o, lse, sel, bounds, lim, 0, sc, True, seg))
        m.ROW_MASKS = True
    row["dense fwd"] = bench(lambda: tattn.attention(q, k, v, causal=True))
    for cfg in ("64,64,4,3", "128,64,8,3"):
        os.environ["BLOCKZOO_ATTN_FWD_CFG"] = cfg
        row[f"dense fwd {cfg}"] = bench(lambda: tattn.attention(q, k, v, causal=True))
    os.environ.pop("BLOCKZOO_ATTN_FWD_CFG")
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=8192)
    ap.add_argument("--kinds", default="random,coherent")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    bench = functools.partial(triton.testing.do_bench, return_mode="median")
    H, D, T = 16, 128, a.T
    params = dict(causal=True, chunk_size=CHUNK, top_k=8)
    mods = {"base": tmoc}
    paths = []
    for name in a.variants.split(","):
        m, p = variant(name)
        mods[name] = m
        paths.append(p)
    rows = []
    try:
        for kind in a.kinds.split(","):
            rows.append(measure(kind, T, H, D, params, mods, bench))
    finally:
        for p in paths:
            p.unlink(missing_ok=True)
    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    pathlib.Path(a.out, "moc_ablate.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    print(env)
    for r in rows:
        print(f"--- T={r['T']} {r['inputs']}")
        for key, ms in r.items():
            if isinstance(ms, float):
                print(f"  {key:>24}: {ms:.3f}")


if __name__ == "__main__":
    main()
