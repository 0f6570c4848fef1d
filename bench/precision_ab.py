#!/usr/bin/env python3
# ruff: noqa: B023  (the lambdas are called inside the iteration that defines them)
"""A/B of ``kernels/triton/precision.CFG`` switches of the quantised attention kernel, one GPU.

Each named configuration sets some ``CFG`` keys (the others at their defaults); for every shape
the script times ``precision.int8`` and ``precision.qaas`` (binary P and FP8 P) forward at each
configuration, with the quantisation pre-pass inside the timed region, and SDPA flash (FA2) at the
start and at the end of the shape (its two medians show the drift). The configurations run in
``--rounds`` interleaved rounds; the table gives each one's best median. Every configuration's
outputs are compared with the first configuration's, bit for bit (the switches must not change
the numbers).

    python3 bench/precision_ab.py --configs "base:;magic:i2f_magic=1" [--shapes 8x4096c,8x4096f]
    TRITON_INTERPRET=1 python3 bench/precision_ab.py --dry-run      (CPU: tiny, no timings)

JSON goes to ``$OUT/precision_ab.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _bootstrap import ensure_blockzoo, warm_up  # noqa: E402

ensure_blockzoo()

import torch  # noqa: E402
from gpu_precision import sdpa  # noqa: E402

from blockzoo.kernels.triton import precision as P  # noqa: E402

CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"


def timer(fn):
    if CUDA:
        from triton.testing import do_bench
        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def parse_configs(text: str) -> list[tuple[str, dict]]:
    out = []
    for item in filter(None, (x.strip() for x in text.split(";"))):
        name, _, body = item.partition(":")
        cfg = {}
        for kv in filter(None, (x.strip() for x in body.split(","))):
            key, _, val = kv.partition("=")
            if key not in P.CFG:
                raise SystemExit(f"precision_ab: unknown CFG key {key!r}; known: {sorted(P.CFG)}")
            cfg[key] = type(P.CFG[key])(int(val)) if isinstance(P.CFG[key], bool) else (
                None if val == "None" else int(val))
        out.append((name, cfg))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="base:;stages2:stages=2;stages4:stages=4")
    ap.add_argument("--shapes", default="8x4096c,8x4096f,4x8192c,2x16384c")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", default="int8,qaas,qaas-fp8P")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args()
    configs = parse_configs(a.configs)
    dev = "cuda" if CUDA else "cpu"
    H, D = (2, 64) if a.dry_run else (16, 128)
    shapes = [(1, 256, True), (1, 200, False)] if a.dry_run else [
        (int(s.split("x")[0]), int(s.split("x")[1][:-1]), s.endswith("c")) for s in a.shapes.split(",")]
    default = dict(P.CFG)
    variants = a.variants.split(",")
    res = {"device": torch.cuda.get_device_name() if CUDA else "cpu (interpreter)", "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "configs": configs, "rows": []}
    try:
        import triton
        res["triton"] = triton.__version__
    except ImportError:
        pass
    if CUDA:
        warm_up()
    for (B, T, causal) in shapes:
        g = torch.Generator().manual_seed(T)
        q, k, v = (torch.randn(B, T, H, D, generator=g).to(dev, torch.bfloat16) for _ in range(3))
        tau = torch.full((H,), 0.3, device=dev)
        gam = torch.ones(H, device=dev)
        qs, ks, vs = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        fns = {"int8": lambda: P.int8_attention(q, k, v, causal=causal),
               "qaas": lambda: P.qaas_forward(q, k, v, tau, gam, causal=causal),
               "qaas-fp8P": lambda: P.qaas_forward(q, k, v, tau, gam, causal=causal, binary=False)}
        fa2_ms = [timer(lambda: sdpa(qs, ks, vs, causal, "FLASH_ATTENTION", prepared=True))]
        best: dict[tuple[str, str], float] = {}
        first: dict[str, torch.Tensor] = {}
        same: dict[tuple[str, str], bool] = {}
        for _ in range(a.rounds):
            for name, cfg in configs:
                P.CFG.clear()
                P.CFG.update(default, **cfg)
                for var in variants:
                    out = fns[var]()
                    first.setdefault(var, out)
                    same[(name, var)] = bool(torch.equal(out, first[var]))
                    ms = timer(fns[var])
                    best[(name, var)] = min(ms, best.get((name, var), float("inf")))
        P.CFG.clear()
        P.CFG.update(default)
        fa2_ms.append(timer(lambda: sdpa(qs, ks, vs, causal, "FLASH_ATTENTION", prepared=True)))
        fa2_best = min(fa2_ms)
        for name, _cfg in configs:
            for var in variants:
                row = {"B": B, "T": T, "causal": causal, "config": name, "variant": var,
                       "ms": best[(name, var)], "fa2_ms": fa2_ms, "x_fa2": fa2_best / best[(name, var)],
                       "bit_equal_to_first": same[(name, var)]}
                res["rows"].append(row)
        print(f"B{B} T{T} {'causal' if causal else 'full'}: FA2 {fa2_ms[0]:.3f} / {fa2_ms[1]:.3f} ms", flush=True)
        for var in variants:
            cells = "  ".join(f"{n} {best[(n, var)]:.3f} ({fa2_best / best[(n, var)]:.2f}x)"
                              f"{'' if same[(n, var)] else ' DIFFERS'}" for n, _ in configs)
            print(f"  {var:10s} {cells}", flush=True)
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "precision_ab.json").write_text(json.dumps(res, indent=1))
    bad = [r for r in res["rows"] if not r["bit_equal_to_first"]]
    if bad:
        print(f"{len(bad)} rows differ from the first configuration's outputs", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
