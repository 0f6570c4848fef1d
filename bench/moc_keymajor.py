#!/usr/bin/env python3
"""context.moc on one GPU: the query-major and key-major Triton paths against SDPA flash (FA2).

1. ``--check``: the compiled kernels of both paths (forced) against the fp32 reference on small
   odd shapes (GQA, ragged last chunk, prefix, variable boundaries, non-causal), forward and
   every gradient, bf16 and fp32; fails loudly before any timing.
2. ``--tune``: key-major tiles (BLOCK_M, BLOCK_N, warps, stages) at T = 32768 on random inputs.
3. timings: for T in ``--T`` and inputs random / coherent (see moc_gpu.py), chunk 512, top_k 8,
   16 heads, head dim 128, bf16, causal: forward and forward+backward of each path (query, key,
   auto; routing included) and SDPA flash, with row density, the query-major tile density and the
   key-major tile ratio (what ``auto`` decides on).
4. ``--sweep``: density sweep at T = ``--sweep-T``, chunk 512, top_k in ``--sweep`` (both input kinds).

    python3 bench/moc_keymajor.py --check --tune [--T 8192,16384,32768] [--sweep 2,4,8,16] [--out DIR]

Prints a short table last and writes everything to ``$OUT/moc_keymajor.json``.
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
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from blockzoo.kernels.triton import moc as tmoc  # noqa: E402
from blockzoo.plugins.context.reference import moc_reference, moc_routing  # noqa: E402

PATHS = ("query", "key", "auto")
DEV = "cuda" if torch.cuda.is_available() else "cpu"   # cpu: a dry run under TRITON_INTERPRET=1


def inputs(kind: str, T: int, H: int, D: int, seed: int):
    """As moc_gpu.inputs: ``random`` iid normal, ``coherent`` a slow random walk plus noise."""
    g = torch.Generator(device=DEV).manual_seed(seed)

    def one():
        if kind == "random":
            return torch.randn(1, T, H, D, device=DEV, generator=g)
        steps = torch.randn(1, T // 64 + 2, H, D, device=DEV, generator=g).cumsum(1) / 4
        base = F.interpolate(steps.permute(0, 2, 3, 1).reshape(1, H * D, -1), size=T, mode="linear",
                             align_corners=False).reshape(1, H, D, T).permute(0, 3, 1, 2)
        return base + 0.5 * torch.randn(1, T, H, D, device=DEV, generator=g)
    dt = torch.bfloat16 if DEV == "cuda" else torch.float32
    return [one().to(dt).contiguous() for _ in range(3)]


def _bench(fn):
    if DEV == "cuda":
        return triton.testing.do_bench(fn, return_mode="median")
    fn()
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def _flash_ctx():
    return sdpa_kernel(SDPBackend.FLASH_ATTENTION if DEV == "cuda" else SDPBackend.MATH)


def check() -> list[dict]:
    """Both paths, compiled, against the fp32 reference (same routing)."""
    cases = [
        ((2, 300, 4, 2, 40, 300), dict(chunk_size=32, top_k=3, prefix=5)),
        ((1, 1000, 8, 1, 128, 1000), dict(boundaries=(0, 7, 130, 131, 400, 512, 777, 990), top_k=3)),
        ((1, 2000, 4, 4, 128, 2000), dict(chunk_size=128, top_k=4)),
        ((1, 333, 2, 2, 64, 333), dict(causal=False, chunk_size=50, top_k=2)),
        ((1, 200, 4, 2, 64, 500), dict(chunk_size=64, top_k=2, prefix=10)),
    ]
    if DEV == "cpu":   # dry run: one small case
        cases = [((1, 70, 4, 2, 40, 70), dict(chunk_size=16, top_k=2, prefix=3))]
    out = []
    g = torch.Generator(device=DEV).manual_seed(0)
    for (B, Tq, Hq, Hk, D, Tk), params in cases:
        for dtype in (torch.bfloat16, torch.float32):
            q = torch.randn(B, Tq, Hq, D, device=DEV, generator=g).to(dtype)
            k = torch.randn(B, Tk, Hk, D, device=DEV, generator=g).to(dtype)
            v = torch.randn(B, Tk, Hk, D, device=DEV, generator=g).to(dtype)
            do = torch.randn(B, Tq, Hq, D, device=DEV, generator=g).to(dtype)
            r = moc_routing(q, k, **params)
            qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
            ref = moc_reference(qf, kf, vf, routing=r, **params)
            want = torch.autograd.grad(ref, (qf, kf, vf), do.float())
            errs, failed = {}, []
            for path in ("query", "key", "key_atomic"):
                tmoc.PATH = "key" if path.startswith("key") else path
                tmoc.KM_BWD = "atomic" if path == "key_atomic" else "split"
                qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
                try:
                    o = tmoc.moc_attention(qg, kg, vg, **params)
                    grads = torch.autograd.grad(o, (qg, kg, vg), do)
                except Exception as exc:  # noqa: BLE001 - recorded, reported as a failure
                    failed.append(f"{path}: {type(exc).__name__}: {str(exc)[:200]}")
                    continue
                errs[path] = [(o.float() - ref).abs().max().item()] + [
                    (a.float() - b).abs().max().item() for a, b in zip(grads, want, strict=True)]
            tmoc.PATH, tmoc.KM_BWD = "auto", "split"
            tol = 2e-2 if dtype == torch.bfloat16 else 2e-4
            for path, e in errs.items():
                if not all(x == x and x < tol * 4 for x in e):
                    failed.append(f"{path}: error above {tol * 4}")
            # key-major must be no worse than the query-major path beyond rounding noise
            for kp in ("key", "key_atomic"):
                if kp in errs and "query" in errs and not all(
                        ek <= 2 * eq + tol for ek, eq in zip(errs[kp], errs["query"], strict=True)):
                    failed.append(f"{kp} error above the query-major one")
            row = dict(shape=[B, Tq, Hq, Hk, D, Tk], params=params, dtype=str(dtype), errs=errs, failed=failed)
            print(json.dumps(row), flush=True)
            out.append(row)
    bad = [r for r in out if r["failed"]]
    print(f"check: {len(out) - len(bad)}/{len(out)} cases ok" + ("" if not bad else " -- FAILED: "
          + "; ".join(f"{r['shape']} {r['dtype']} {r['failed']}" for r in bad)), flush=True)
    return out


def stats(q, k, params, bm_q, bm_k):
    r = moc_routing(q, k, **params)
    sel = r.sel.to(torch.uint8).contiguous()
    qlist, qcount = tmoc._query_block_lists(sel, bm_q)
    km, q_tiles = tmoc.key_major_lists(sel, bm_k, qcount)
    # causal dense tiles in the same unit (query block x chunk): chunks up to the block's last row
    T = q.shape[1]
    last = torch.clamp(torch.arange(triton.cdiv(T, bm_q), device=DEV) * bm_q + bm_q - 1, max=T - 1)
    own_last = torch.bucketize(last, r.bounds[1:], right=True)
    dense = int((own_last + 1).sum()) * sel.shape[0] * sel.shape[1]
    return dict(row_density=r.density(), qm_tile_density=q_tiles / dense,
                km_tile_ratio=km.tiles * bm_k / (q_tiles * bm_q), slots=km.ns)


def time_paths(q, k, v, params, paths=PATHS, fb=True):
    bench = _bench
    res = {}
    qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, k, v))
    do = torch.randn_like(q)
    for path in paths:
        tmoc.PATH = path
        with torch.no_grad():
            res[f"{path}_fwd_ms"] = bench(lambda: tmoc.moc_attention(q, k, v, **params))
        if fb:
            def f():
                torch.autograd.grad(tmoc.moc_attention(qg, kg, vg, **params), (qg, kg, vg), do)
            res[f"{path}_fb_ms"] = bench(f)
            if path == "key":   # the same with the atomic dQ backward
                tmoc.KM_BWD = "atomic"
                res["keyatomic_fb_ms"] = bench(f)
                tmoc.KM_BWD = "split"
    tmoc.PATH = "auto"
    return res


def time_flash(q, k, v):
    bench = _bench
    qs, ks, vs = (x.transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    dos = torch.randn_like(qs)

    def fl():
        with _flash_ctx():
            return F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
    with torch.no_grad():
        t_f = bench(fl)
    t_fb = bench(lambda: torch.autograd.grad(fl(), (qs, ks, vs), dos))
    return dict(flash_fwd_ms=t_f, flash_fb_ms=t_fb)


def tune(T: int, H: int, chunk: int) -> list[dict]:
    cfgs = [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 4, 2), (128, 128, 8, 2), (64, 128, 4, 2)]
    rows = []
    for kind in ("random", "coherent"):
        q, k, v = inputs(kind, T, H, 128, seed=T)
        params = dict(causal=True, chunk_size=chunk, top_k=8)
        for cfg in cfgs:
            tmoc.KM_BLOCKS["cuda"] = cfg
            try:
                r = time_paths(q, k, v, params, paths=("key",))
            except Exception as exc:  # noqa: BLE001 - a config that does not fit is reported
                print("config", cfg, "failed:", type(exc).__name__, str(exc)[:160], flush=True)
                continue
            row = dict(T=T, inputs=kind, cfg=cfg, **r)
            print(json.dumps(row), flush=True)
            rows.append(row)
        tmoc.KM_BLOCKS.pop("cuda", None)
        del q, k, v
        if DEV == "cuda":
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", default="8192,16384,32768")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--km-cfg", default="", help="BLOCK_M,BLOCK_N,warps,stages for the key-major kernels")
    ap.add_argument("--ratio", type=float, default=None, help="KM_RATIO for auto")
    ap.add_argument("--sweep", default="", help="top_k values of the density sweep, e.g. 2,4,8,16")
    ap.add_argument("--sweep-T", type=int, default=32768)
    ap.add_argument("--tune-T", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    env = dict(device=torch.cuda.get_device_name() if DEV == "cuda" else "cpu (dry run)",
               torch=torch.__version__, triton=triton.__version__,
               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    print(env, flush=True)
    out = dict(env=env, args=vars(a))
    outp = pathlib.Path(a.out, "moc_keymajor.json")
    if a.check:
        out["check"] = check()
    if a.tune:
        out["tune"] = tune(a.tune_T, a.heads, a.chunk)
        outp.write_text(json.dumps(out, indent=1))
        tot: dict = {}
        for r in out["tune"]:
            tot.setdefault(tuple(r["cfg"]), []).append(r["key_fwd_ms"] + r["key_fb_ms"])
        full = {c: sum(v) for c, v in tot.items() if len(v) == 2}
        if full:   # the timings below use the best key-major tiles of the sweep
            tmoc.KM_BLOCKS["cuda"] = min(full, key=full.get)
    if a.km_cfg:
        tmoc.KM_BLOCKS["cuda"] = tuple(int(x) for x in a.km_cfg.split(","))
    if a.ratio is not None:
        tmoc.KM_RATIO = a.ratio
    out["km_cfg"] = [tmoc._km_blocks(128, 2, "fwd"), tmoc._km_blocks(128, 2, "dq"), tmoc._km_blocks(128, 2, "dkdv")]
    out["km_ratio"] = tmoc.KM_RATIO
    bm_q, bm_k = tmoc._blocks(128)[0], tmoc._km_blocks(128, 2, "fwd")[0]
    rows = []
    H, D, chunk = a.heads, 128, a.chunk
    settings = [(int(t), 8) for t in a.T.split(",") if t] + [(a.sweep_T, int(kk)) for kk in a.sweep.split(",") if kk]
    for T, top_k in settings:
        for kind in ("random", "coherent"):
            q, k, v = inputs(kind, T, H, D, seed=T)
            params = dict(causal=True, chunk_size=chunk, top_k=top_k)
            row = dict(T=T, inputs=kind, H=H, D=D, chunk=chunk, top_k=top_k, **stats(q, k, params, bm_q, bm_k))
            row.update(time_flash(q, k, v))
            row.update(time_paths(q, k, v, params))
            row["target"] = 0.5 / row["row_density"]
            for p in PATHS:
                row[f"{p}_fwd_x"] = row["flash_fwd_ms"] / row[f"{p}_fwd_ms"]
                row[f"{p}_fb_x"] = row["flash_fb_ms"] / row[f"{p}_fb_ms"]
            row["keyatomic_fb_x"] = row["flash_fb_ms"] / row["keyatomic_fb_ms"]
            row["auto_path"] = "key" if row["km_tile_ratio"] * tmoc.KM_RATIO <= 1 else "query"
            print(json.dumps(row), flush=True)
            rows.append(row)
            out["rows"] = rows
            outp.write_text(json.dumps(out, indent=1))
            del q, k, v
            if DEV == "cuda":
                torch.cuda.empty_cache()
    if "tune" in out:
        print(f"{'inputs':>8} {'cfg':>18} {'km fwd ms':>9} {'km f+b ms':>9}")
        for r in out["tune"]:
            print(f"{r['inputs']:>8} {str(tuple(r['cfg'])):>18} {r['key_fwd_ms']:9.3f} {r['key_fb_ms']:9.3f}")
    print(f"km cfg {out['km_cfg']}, KM_RATIO {out['km_ratio']}")
    print(f"{'T':>6} {'k':>3} {'inputs':>8} {'rowd':>5} {'qtile':>5} {'kmrat':>5} {'FA2 f':>6} {'FA2 fb':>6} "
          f"{'q f':>6} {'k f':>6} {'a f':>6} {'q fb':>6} {'k fb':>6} {'a fb':>6} | {'q fx':>5} {'k fx':>5} "
          f"{'a fx':>5} {'q fbx':>5} {'k fbx':>5} {'a fbx':>5} {'tgt':>5} {'kA fb':>6} {'kA fbx':>6} {'auto':>5}")
    for r in rows:
        print(f"{r['T']:>6} {r['top_k']:>3} {r['inputs']:>8} {r['row_density']:5.3f} {r['qm_tile_density']:5.3f} "
              f"{r['km_tile_ratio']:5.2f} {r['flash_fwd_ms']:6.2f} {r['flash_fb_ms']:6.2f} "
              f"{r['query_fwd_ms']:6.2f} {r['key_fwd_ms']:6.2f} {r['auto_fwd_ms']:6.2f} "
              f"{r['query_fb_ms']:6.2f} {r['key_fb_ms']:6.2f} {r['auto_fb_ms']:6.2f} | "
              f"{r['query_fwd_x']:5.2f} {r['key_fwd_x']:5.2f} {r['auto_fwd_x']:5.2f} "
              f"{r['query_fb_x']:5.2f} {r['key_fb_x']:5.2f} {r['auto_fb_x']:5.2f} {r['target']:5.2f} "
              f"{r['keyatomic_fb_ms']:6.2f} {r['keyatomic_fb_x']:6.2f} {r['auto_path']:>5}")


if __name__ == "__main__":
    main()
