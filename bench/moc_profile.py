#!/usr/bin/env python3
"""Where context.moc time goes on one GPU, and the tiles of each query-major kernel.

For each T and input kind (random / coherent, as ``moc_gpu.py``), chunk 512, top_k 8, 16
heads, head dim 128, bf16, causal:

1. per-kernel tile sweeps of the query-major path on a fixed routing (``do_bench`` medians):
   the forward (``_fwd_impl``) per ``BLOCKS["cuda_fwd"]`` candidate, the backward
   (``_bwd_impl``: lists, dK/dV and dQ) per ``cuda_dq`` candidate (dK/dV at its default) and
   per ``cuda_dkdv`` candidate (dQ at its default);
2. end to end (routing included) forward and forward+backward at the defaults (and with
   ``FLAT_CHUNKS = False``: one loop per listed chunk; with ``ROW_MASKS = False``: dK/dV takes
   the per-pair mask on every listed query block) and at the best tiles of the sweep, the key-major path, the blockzoo dense core and SDPA flash (FA2), all in
   this run;
3. a ``torch.profiler`` trace of one forward+backward at the best tiles (GPU time per kernel,
   kernels per call, kernel time against wall time) and of the dense core's on the same inputs
   (its forward / dQ / dK/dV kernels are what MoC's are measured against), and whether the call
   makes a host sync
   (``torch.cuda.set_sync_debug_mode("error")``).

    python3 bench/moc_profile.py [--T 8192,32768] [--fwd 64/64/4/2,...] [--dq ...] [--dkdv ...]
                                 [--km-dkdv ...] [--kinds random,coherent] [--out DIR]

Tiles are BLOCK_M/BLOCK_N/warps/stages; for dK/dV BLOCK_M is the query step, BLOCK_N the keys.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _bootstrap import ensure_blockzoo  # noqa: E402

ensure_blockzoo()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from moc_gpu import inputs  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from blockzoo.kernels.triton import moc as tmoc  # noqa: E402
from blockzoo.kernels.triton.attention import attention as dense_attention  # noqa: E402

FWD = "64/64/4/2,64/64/4/3,64/64/4/4,128/64/8/2,128/64/8/3,64/128/4/2,128/128/8/2"
DQ = "64/64/4/2,64/64/4/3,128/64/8/2,128/64/8/3"
DKDV = "64/64/4/2,64/64/4/3,64/128/8/2,64/128/8/3,32/128/8/2,32/128/4/2"


def fb_fn(fn, q, k, v):
    qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, k, v))
    do = torch.randn_like(q)

    def run():
        out = fn(qg, kg, vg)
        torch.autograd.grad(out, (qg, kg, vg), do)
    return run


def profile(run, n=5):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprof
    run()
    torch.cuda.synchronize()
    with tprof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            run()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3 / n
    per: dict = {}
    count = 0
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.name] = per.get(e.name, 0.0) + e.device_time_total / 1e3 / n
            count += 1
    top = sorted(per.items(), key=lambda kv: -kv[1])
    return {"wall_ms": wall, "gpu_ms": sum(per.values()), "kernels_per_call": count / n,
            "top": [(name[:70], ms) for name, ms in top[:12]]}


def syncs(run) -> str:
    run()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
        return "none"
    except RuntimeError as e:
        return "sync: " + str(e).splitlines()[0][:120]
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


def cfg_of(s: str) -> tuple:
    return tuple(int(x) for x in s.split("/"))


def sweep(kind, cands, call, table=None):
    table = tmoc.BLOCKS if table is None else table
    out = {}
    for c in cands:
        table[f"cuda_{kind}"] = cfg_of(c)
        try:
            out[c] = triton.testing.do_bench(call, return_mode="median")
        except Exception as e:  # noqa: BLE001 (out of resources: record and go on)
            out[c] = repr(e)[:160]
    table.pop(f"cuda_{kind}", None)
    return out


def best(res: dict) -> str | None:
    ok = {c: t for c, t in res.items() if isinstance(t, float)}
    return min(ok, key=ok.get) if ok else None


def measure(kind, T, H, D, params, fwd, dq, dkdv, km_dkdv=()):
    bench = functools.partial(triton.testing.do_bench, return_mode="median")
    q, k, v = inputs(kind, T, H, D, seed=T)
    qs, ks, vs = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    row: dict = {"inputs": kind, "T": T}

    def flash(q_, k_, v_):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q_, k_, v_, is_causal=True)
    row["fa2_fwd"] = bench(lambda: flash(qs, ks, vs))
    row["fa2_fb"] = bench(fb_fn(flash, qs, ks, vs))
    row["dense_fwd"] = bench(lambda: dense_attention(q, k, v, causal=True))
    row["dense_fb"] = bench(fb_fn(lambda a_, b_, c_: dense_attention(a_, b_, c_, causal=True), q, k, v))
    row["route"] = bench(lambda: tmoc.moc_route(q, k, **params))
    sel, bounds, lim, _ = tmoc.moc_route(q, k, **params)
    sc = 1.0 / math.sqrt(D)
    seg = tmoc._flat_seg_len(T, params["chunk_size"], None, 0)   # the flattened chunk loop
    o, lse = tmoc._fwd_impl(q, k, v, sel, bounds, lim, 0, sc, True, seg)
    do = torch.randn_like(q)
    row["sweep_fwd"] = sweep("fwd", fwd, lambda: tmoc._fwd_impl(q, k, v, sel, bounds, lim, 0, sc, True, seg))
    bwd = lambda: tmoc._bwd_impl(do, q, k, v, o, lse, sel, bounds, lim, 0, sc, True, seg)  # noqa: E731
    row["sweep_dq"] = sweep("dq", dq, bwd)
    row["sweep_dkdv"] = sweep("dkdv", dkdv, bwd)
    if km_dkdv:   # the key-major dK/dV kernel's tiles (its backward forced, same routing)
        os.environ["BLOCKZOO_MOC_PATH"] = "key"
        row["sweep_km_dkdv"] = sweep("dkdv", km_dkdv, bwd, tmoc.KM_BLOCKS)
        os.environ.pop("BLOCKZOO_MOC_PATH")
    moc = lambda a_, b_, c_: tmoc.moc_attention(a_, b_, c_, **params)  # noqa: E731
    row["default_fwd"] = bench(lambda: moc(q, k, v))
    row["default_fb"] = bench(fb_fn(moc, q, k, v))
    tmoc.FLAT_CHUNKS = False   # A/B: one pipelined loop per listed chunk
    row["perchunk_fwd"] = bench(lambda: moc(q, k, v))
    row["perchunk_fb"] = bench(fb_fn(moc, q, k, v))
    tmoc.FLAT_CHUNKS = True
    tmoc.ROW_MASKS = False     # A/B: dK/dV takes the per-pair mask on every listed query block
    row["pairmask_fwd"] = bench(lambda: moc(q, k, v))
    row["pairmask_fb"] = bench(fb_fn(moc, q, k, v))
    row["profile_pairmask_fb"] = profile(fb_fn(moc, q, k, v))
    tmoc.ROW_MASKS = True
    chosen = {kd: best(row[f"sweep_{kd}"]) for kd in ("fwd", "dq", "dkdv")}
    row["best_cfg"] = chosen
    for kd, c in chosen.items():
        if c:
            tmoc.BLOCKS[f"cuda_{kd}"] = cfg_of(c)
    row["best_fwd"] = bench(lambda: moc(q, k, v))
    row["best_fb"] = bench(fb_fn(moc, q, k, v))
    row["profile_best_fb"] = profile(fb_fn(moc, q, k, v))
    # the dense core's kernels on the same inputs: what each MoC kernel is measured against
    row["profile_dense_fb"] = profile(fb_fn(lambda a_, b_, c_: dense_attention(a_, b_, c_, causal=True), q, k, v))
    row["host_syncs_fb"] = syncs(fb_fn(moc, q, k, v))
    os.environ["BLOCKZOO_MOC_PATH"] = "key"
    km_best = best(row.get("sweep_km_dkdv", {}))
    if km_best:
        tmoc.KM_BLOCKS["cuda_dkdv"] = cfg_of(km_best)
    row["key_fwd"] = bench(lambda: moc(q, k, v))
    row["key_fb"] = bench(fb_fn(moc, q, k, v))
    os.environ.pop("BLOCKZOO_MOC_PATH")
    tmoc.KM_BLOCKS.pop("cuda_dkdv", None)
    for kd in ("fwd", "dq", "dkdv"):
        tmoc.BLOCKS.pop(f"cuda_{kd}", None)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", default="8192,32768")
    ap.add_argument("--fwd", default=FWD)
    ap.add_argument("--dq", default=DQ)
    ap.add_argument("--dkdv", default=DKDV)
    ap.add_argument("--km-dkdv", default="", help="key-major dK/dV tiles to sweep (rows/keys/warps/stages)")
    ap.add_argument("--kinds", default="random,coherent")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    H, D = 16, 128
    params = dict(causal=True, chunk_size=512, top_k=8)
    res = {"env": dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                       date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), H=H, D=D, **params), "rows": []}
    for T in (int(t) for t in a.T.split(",")):
        for kind in a.kinds.split(","):
            row = measure(kind, T, H, D, params, a.fwd.split(","), a.dq.split(","), a.dkdv.split(","),
                          [c for c in a.km_dkdv.split(",") if c])
            res["rows"].append(row)
            pathlib.Path(a.out, "moc_profile.json").write_text(json.dumps(res, indent=1))
            torch.cuda.empty_cache()
    print(res["env"])
    for r in res["rows"]:
        print(f"--- T={r['T']} {r['inputs']}: FA2 fwd {r['fa2_fwd']:.3f} f+b {r['fa2_fb']:.3f} | dense {r['dense_fwd']:.3f}"
              f" / {r['dense_fb']:.3f} | route {r['route']:.3f} | host syncs in f+b: {r['host_syncs_fb']}")
        for kd in ("fwd", "dq", "dkdv", "km_dkdv"):
            if f"sweep_{kd}" in r:
                print(f"  {kd:>7}: " + "  ".join(f"{c} {t:.3f}" if isinstance(t, float) else f"{c} ERR"
                                                  for c, t in r[f"sweep_{kd}"].items()))
        for name in ("default", "perchunk", "pairmask", "best", "key"):
            print(f"  {name:>8}: fwd {r[name + '_fwd']:.3f} ({r['fa2_fwd'] / r[name + '_fwd']:.2f}x)  "
                  f"f+b {r[name + '_fb']:.3f} ({r['fa2_fb'] / r[name + '_fb']:.2f}x)")
        p = r["profile_best_fb"]
        print(f"  best f+b: wall {p['wall_ms']:.3f} ms, kernels {p['gpu_ms']:.3f} ms, {p['kernels_per_call']:.0f} kernels")
        for n, ms in p["top"][:6]:
            print(f"     {ms:7.3f}  {n}")
        p = r["profile_pairmask_fb"]
        print("  pairmask f+b kernels: " + ", ".join(f"{n[:24]} {ms:.3f}" for n, ms in p["top"][:3]))
        p = r["profile_dense_fb"]
        print(f"  dense core f+b: kernels {p['gpu_ms']:.3f} ms: " + ", ".join(f"{n[:28]} {ms:.3f}" for n, ms in p["top"][:4]))


if __name__ == "__main__":
    main()
