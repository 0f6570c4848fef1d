"""GPU check and benchmark of depth.moda / depth.mod (device tool), in ONE process:

1. compiled correctness: Triton MoDA, BOTH depth paths ("rowwise": CUDA-core row-wise dots;
   "mma": batched tensor-core dots), forward and all five gradients vs the fp32 reference on odd
   shapes (GQA 1/2/3/4/8, S = 1, S > T, D = 40/64/128, bf16 and fp32), and the MoD gather/scatter;
2. forward and forward+backward, all timed in this run with ``triton.testing.do_bench`` (median):
   MoDA rowwise path, MoDA mma path, our dense Triton kernel (attention.dense) and SDPA flash
   (FlashAttention-2) on the SEQUENCE part alone (same q/k/v, the depth slots ignored); bf16;
3. a short table printed last; JSON written to ``--out`` (default ``$OUT/gpu_depth.json``).

Default shapes (``--preset issue6``): T=4096 B=8 D=64/128 S=32/64 GQA 8:1 (16:2 heads, the
overhead table), T=16384 B=1 D=64/128 S=64 GQA 8:1, and the path-rule shapes T=4096 B=1 D=64 S=32
with 16 query heads and GQA 1, 2, 4 (16, 8, 4 kv heads). ``--t/--d/--s/--b`` replace the preset by
a grid at GQA 8:1.

Usage on the GPU machine, from the repository root::

    python3 bench/gpu_depth.py [--budget SECONDS] [--out FILE]

Dry run on a CPU (interpreter, tiny shapes, wall-clock timing, SDPA math instead of flash)::

    TRITON_INTERPRET=1 python3 bench/gpu_depth.py --dry-run --out /tmp/gpu_depth.json

Shapes that do not fit the time budget (or memory) are skipped and listed as such.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bootstrap import ensure_blockzoo  # noqa: E402

ensure_blockzoo()

import torch  # noqa: E402
import triton  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from blockzoo.kernels._alloc import poisoned  # noqa: E402
from blockzoo.kernels.triton import moda as moda_mod  # noqa: E402
from blockzoo.kernels.triton.attention import attention as dense_attention  # noqa: E402
from blockzoo.kernels.triton.mod import mod_gather, mod_scatter  # noqa: E402
from blockzoo.kernels.triton.moda import MCfg, moda_attention  # noqa: E402
from blockzoo.plugins.depth.reference import (  # noqa: E402
    mod_gather_reference,
    mod_k,
    mod_reference,
    moda_flops,
    moda_reference,
)


def rel_err(a, b):
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


def check_moda(b, t, hq, hk, d, s, dtype, causal=True, path="mma", dev="cuda"):
    g = torch.Generator(device=dev).manual_seed(t * 131 + s)
    mk = lambda *shape: torch.randn(shape, device=dev, generator=g).to(dtype).requires_grad_()  # noqa: E731
    q, k, v = mk(b, t, hq, d), mk(b, t, hk, d), mk(b, t, hk, d)
    dk, dv = mk(b, t * s, hk, d), mk(b, t * s, hk, d)
    with poisoned():
        o = moda_attention(q, k, v, dk, dv, causal, path=path)
        ins = [x.detach().float().requires_grad_() for x in (q, k, v, dk, dv)]
        r = moda_reference(*ins, causal=causal)
        do = torch.randn(r.shape, device=dev, generator=g)
        got = torch.autograd.grad(o, (q, k, v, dk, dv), do.to(dtype))
    want = torch.autograd.grad(r, ins, do)
    errs = [rel_err(o, r)] + [rel_err(a, w) if w.numel() else 0.0 for a, w in zip(got, want, strict=True)]
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    return {"what": f"moda[{path}] B{b} T{t} H{hq}:{hk} D{d} S{s} {str(dtype)[6:]} causal={causal}",
            "max_rel_err": max(errs), "errs": errs, "ok": max(errs) < tol}


def check_mod(b, t, c, cap, dtype, gate="sigmoid"):
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(t + c)
    kk = mod_k(t, cap)
    x = torch.randn(b, t, c, device=dev, generator=g).to(dtype).requires_grad_()
    r = torch.randn(b, t, device=dev, generator=g).to(dtype).requires_grad_()
    y = torch.randn(b, kk, c, device=dev, generator=g).to(dtype).requires_grad_()
    out = mod_scatter(x, r, y, capacity=cap, gate=gate)
    ins = [z.detach().float().requires_grad_() for z in (x, r, y)]
    ref = mod_reference(*ins, capacity=cap, gate=gate)
    cot = torch.randn(ref.shape, device=dev, generator=g)
    got = torch.autograd.grad(out, (x, r, y), cot.to(dtype))
    want = torch.autograd.grad(ref, ins, cot)
    idx = torch.sort(torch.randperm(t, device=dev)[:kk])[0].expand(b, -1).contiguous()
    gat = mod_gather(x, idx)
    errs = [rel_err(out, ref)] + [rel_err(a, w) for a, w in zip(got, want, strict=True)] + \
        [rel_err(gat, mod_gather_reference(x.detach(), idx))]
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    return {"what": f"mod B{b} T{t} C{c} cap{cap} {gate} {str(dtype)[6:]}", "max_rel_err": max(errs),
            "errs": errs, "ok": max(errs) < tol}


def _timer(dry: bool):
    if not dry:
        return lambda f: do_bench(f, warmup=25, rep=100, return_mode="median")

    def wall(f):  # CPU dry run: one warm call, then the mean of 2
        f()
        t0 = time.perf_counter()
        for _ in range(2):
            f()
        return (time.perf_counter() - t0) / 2 * 1e3
    return wall


def bench_shape(t, d, s, hq=16, hk=2, b=1, with_s0=False, dev="cuda", dry=False):
    dt = torch.bfloat16
    q = torch.randn(b, t, hq, d, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(b, t, hk, d, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(b, t, hk, d, device=dev, dtype=dt, requires_grad=True)
    dk = torch.randn(b, t * s, hk, d, device=dev, dtype=dt, requires_grad=True)
    dv = torch.randn(b, t * s, hk, d, device=dev, dtype=dt, requires_grad=True)
    e0 = k.new_empty((b, 0, hk, d)).requires_grad_()
    qs, ks, vs = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    do = torch.randn(b, t, hq, d, device=dev, dtype=dt)
    dos = do.transpose(1, 2).contiguous()

    def sdpa():
        if dry:  # no flash kernel on the CPU: the math backend stands in
            return torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True,
                                                                    enable_gqa=ks.shape[1] != qs.shape[1])
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True,
                                                                    enable_gqa=ks.shape[1] != qs.shape[1])
    try:
        sdpa()
    except RuntimeError:  # no GQA in this flash build: give it expanded k/v (outside the timing)
        ks, vs = (x.detach().repeat_interleave(hq // hk, dim=1).requires_grad_() for x in (ks, vs))

    impls = {"moda_rowwise": lambda: moda_attention(q, k, v, dk, dv, True, path="rowwise"),
             "moda_mma": lambda: moda_attention(q, k, v, dk, dv, True, path="mma"),
             # our dense Triton kernel (attention.dense) on the sequence part: the issue's
             # "overhead over our own dense kernel" baseline
             "ours_dense": lambda: dense_attention(q, k, v, True),
             "sdpa_flash_seq": sdpa}
    if with_s0:
        impls["ours_S0"] = lambda: moda_attention(q, k, v, e0, e0, True, path="mma")
    full = (q, k, v, dk, dv)
    leaves = {"moda_rowwise": full, "moda_mma": full, "sdpa_flash_seq": (qs, ks, vs), "ours_S0": (q, k, v),
              "ours_dense": (q, k, v)}
    cot = {"sdpa_flash_seq": dos}
    bench = _timer(dry)
    res = {}
    for name, fn in impls.items():
        fwd = bench(lambda fn=fn: fn())

        def fb(fn=fn, name=name):
            o = fn()
            torch.autograd.grad(o, leaves[name], cot.get(name, do))
        res[name] = {"fwd": fwd, "fwd+bwd": bench(fb)}
    seq_fl = moda_flops(b, t, t, hq, d, 0, True)
    all_fl = moda_flops(b, t, t, hq, d, s, True)
    return {"T": t, "D": d, "S": s, "Hq": hq, "Hk": hk, "B": b, "ms": res,
            "depth_flop_share": (all_fl - seq_fl) / all_fl, "flops_fwd": all_fl,
            "depth_kv_bytes": 2 * dk.numel() * dk.element_size()}


FWD_CANDS = [MCfg(128, 64, 4, 2, p) for p in (0, 1)] + [MCfg(128, 128, 8, 2, p) for p in (0, 1)] + \
    [MCfg(64, 64, 4, 2, p) for p in (0, 1)]
DQ_CANDS = [MCfg(64, 64, 4, 2, p) for p in (0, 1)] + [MCfg(128, 64, 8, 2, p) for p in (0, 1)] + \
    [MCfg(64, 32, 4, 2, p) for p in (0, 1)]


FWD_MMA_CANDS = [MCfg(128, 64, 8, 2), MCfg(128, 128, 8, 2), MCfg(128, 64, 4, 2), MCfg(64, 64, 4, 2),
                 MCfg(128, 128, 8, 3), MCfg(64, 128, 4, 2)]
DQ_MMA_CANDS = [MCfg(64, 64, 4, 2), MCfg(128, 64, 8, 2), MCfg(64, 32, 4, 2), MCfg(64, 64, 4, 3),
                MCfg(128, 128, 8, 2)]


def tune(d, t=16384, s=64, hq=16, hk=2, b=1, path="rowwise"):
    """Pick the fwd and dq tile configs of one depth path for head dim d (bf16) on one shape;
    sets moda.CFGS (kinds "fwd"/"dq" for the rowwise path, "fwd_mma"/"dq_mma" for mma)."""
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(b, t, hq, d, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(b, t, hk, d, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(b, t, hk, d, device=dev, dtype=dt, requires_grad=True)
    dk = torch.randn(b, t * s, hk, d, device=dev, dtype=dt, requires_grad=True)
    dv = torch.randn(b, t * s, hk, d, device=dev, dtype=dt, requires_grad=True)
    do = torch.randn_like(q)
    bd = max(16, triton.next_power_of_2(d))
    kf, kq = ("fwd", "dq") if path == "rowwise" else ("fwd_mma", "dq_mma")
    fc, qc = (FWD_CANDS, DQ_CANDS) if path == "rowwise" else (FWD_MMA_CANDS, DQ_MMA_CANDS)
    log = {"fwd": {}, "dq": {}}
    for c in fc:
        moda_mod.CFGS[(kf, bd, 2)] = c
        try:
            log["fwd"][str(tuple(c))] = do_bench(lambda: moda_attention(q, k, v, dk, dv, True, path=path),
                                                 warmup=10, rep=40, return_mode="median")
        except Exception as exc:  # noqa: BLE001 (a config that does not compile or fit)
            log["fwd"][str(tuple(c))] = f"{type(exc).__name__}"
    best = min((c for c in fc if isinstance(log["fwd"][str(tuple(c))], float)),
               key=lambda c: log["fwd"][str(tuple(c))])
    moda_mod.CFGS[(kf, bd, 2)] = best
    o = moda_attention(q, k, v, dk, dv, True, path=path)
    for c in qc:
        moda_mod.CFGS[(kq, bd, 2)] = c
        try:
            log["dq"][str(tuple(c))] = do_bench(
                lambda: torch.autograd.grad(o, (q, k, v, dk, dv), do, retain_graph=True), warmup=10, rep=40,
                return_mode="median")
        except Exception as exc:  # noqa: BLE001
            log["dq"][str(tuple(c))] = f"{type(exc).__name__}"
    best_dq = min((c for c in qc if isinstance(log["dq"][str(tuple(c))], float)),
                  key=lambda c: log["dq"][str(tuple(c))])
    moda_mod.CFGS[(kq, bd, 2)] = best_dq
    print(f"tuned {path} D{d} T{t} B{b} S{s}: fwd {tuple(best)} dq {tuple(best_dq)}  {log}", flush=True)
    return {"path": path, "D": d, "T": t, "B": b, "S": s, "fwd": tuple(best), "dq": tuple(best_dq), "log": log}


PRESET_ISSUE6 = ([(4096, d, s, 16, 2, 8) for d in (64, 128) for s in (32, 64)]
                 + [(16384, d, 64, 16, 2, 1) for d in (64, 128)]
                 + [(4096, 64, 32, 16, hk, 1) for hk in (16, 8, 4)])   # GQA 1, 2, 4: the path rule
PRESET_DRY = [(40, 16, 3, 8, 1, 1), (33, 32, 2, 4, 2, 2), (24, 16, 2, 2, 2, 1)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=240.0, help="seconds for the whole script")
    ap.add_argument("--b", type=int, default=None, help="batch size of a --t/--d/--s grid (default 1)")
    ap.add_argument("--t", default=None, help="T list: time a grid at GQA 8:1 instead of the preset")
    ap.add_argument("--d", default="64,128")
    ap.add_argument("--s", default="32,64")
    ap.add_argument("--s0", action="store_true", help="also time our kernel with S = 0")
    ap.add_argument("--tune", action="store_true", help="tune the rowwise path's tiles per head dim first")
    ap.add_argument("--tune-mma", action="store_true",
                    help="tune the mma path's tiles per head dim first (T=16384 B=1 S=64), then re-run the "
                         "correctness checks of the mma path with the chosen tiles")
    ap.add_argument("--add", default="",
                    help="extra shapes after the preset/grid, 'T,D,S,B;T,D,S,B' at GQA 16:2")
    ap.add_argument("--bw", type=float, default=3.0e12,
                    help="device copy rate in bytes/s for the depth-traffic floor column (H100: 3.0e12)")
    ap.add_argument("--out", default=None, help="JSON file (default $OUT/gpu_depth.json)")
    ap.add_argument("--dry-run", action="store_true", help="CPU + TRITON_INTERPRET=1: tiny shapes, wall clock")
    ap.add_argument("--skip-check", action="store_true",
                    help="skip the compiled correctness checks (when an earlier run in the same session did them)")
    args = ap.parse_args()
    t_start = time.time()
    dry = args.dry_run
    if dry and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("--dry-run needs TRITON_INTERPRET=1")
    dev = "cpu" if dry else "cuda"
    out = args.out or os.path.join(os.environ.get("OUT", "bench-out"), "gpu_depth.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    info = {"device": "cpu (interpreter dry run)" if dry else torch.cuda.get_device_name(),
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "auto_rule": {f"GQA{g}": moda_mod.depth_path(g) for g in (1, 2, 4, 8)}}
    print(json.dumps(info), flush=True)
    result = {"info": info, "checks": [], "bench": [], "skipped": []}

    def dump():
        with open(out, "w") as f:
            json.dump(result, f, indent=1)

    print("== compiled correctness vs reference (both depth paths) ==", flush=True)
    bf, f32 = torch.bfloat16, torch.float32
    if dry:
        moda_shapes = [(1, 21, 8, 2, 40, 3, f32, True), (1, 13, 4, 2, 48, 19, bf, True)]
    else:
        moda_shapes = [(2, 300, 16, 2, 64, 4, bf, True), (1, 257, 8, 1, 128, 3, bf, True),
                       (1, 200, 6, 2, 40, 5, f32, True), (1, 130, 4, 4, 64, 2, bf, False),
                       (1, 77, 16, 16, 64, 1, bf, True), (1, 61, 4, 2, 48, 70, bf, True),
                       (1, 150, 16, 4, 128, 33, bf, True), (1, 99, 8, 2, 128, 9, f32, True)]
    checks = [lambda sh=sh, p=p: check_moda(*sh, path=p, dev=dev) for sh in moda_shapes for p in ("rowwise", "mma")]
    if not dry:
        checks += [lambda: check_mod(2, 1000, 256, 0.125, torch.bfloat16),
                   lambda: check_mod(1, 333, 100, 0.3, torch.float32, "raw")]
    if args.skip_check:
        checks = []
        print("skipped (--skip-check)", flush=True)
    for c in checks:
        try:
            r = c()
        except Exception as exc:  # noqa: BLE001
            r = {"what": "check", "ok": False, "error": traceback.format_exc(limit=3)}
            print(exc, flush=True)
        result["checks"].append(r)
        print(("PASS " if r["ok"] else "FAIL ") + r.get("what", "") + f"  max rel err {r.get('max_rel_err')}",
              flush=True)
    dump()

    result["tuned"] = []
    if args.tune and not dry:
        print("== rowwise tile configs (T=16384, S=64) ==", flush=True)
        for d in map(int, args.d.split(",")):
            try:
                result["tuned"].append(tune(d))
            except Exception:  # noqa: BLE001
                print(traceback.format_exc(limit=3), flush=True)
            torch.cuda.empty_cache()
        dump()
    if args.tune_mma and not dry:
        print("== mma tile configs (T=16384, B=1, S=64) ==", flush=True)
        for d in map(int, args.d.split(",")):
            try:
                result["tuned"].append(tune(d, path="mma"))
            except Exception:  # noqa: BLE001
                print(traceback.format_exc(limit=3), flush=True)
            torch.cuda.empty_cache()
        for sh in moda_shapes:  # the tuned tiles must be as correct as the defaults
            if sh[4] in map(int, args.d.split(",")) and sh[6] == torch.bfloat16:
                r = check_moda(*sh, path="mma", dev=dev)
                r["what"] += " (tuned tiles)"
                result["checks"].append(r)
                print(("PASS " if r["ok"] else "FAIL ") + r["what"] + f"  max rel err {r['max_rel_err']}", flush=True)
        dump()

    print("== MoDA (rowwise / mma) vs our dense kernel and SDPA flash (sequence part alone), bf16 ==",
          flush=True)
    if dry:
        shapes = PRESET_DRY
    elif args.t:
        shapes = [(t, d, s, 16, 2, args.b or 1) for t in map(int, args.t.split(","))
                  for d in map(int, args.d.split(",")) for s in map(int, args.s.split(","))]
    else:
        shapes = PRESET_ISSUE6
    if args.add and not dry:
        shapes = list(shapes) + [(t, d, s, 16, 2, b) for t, d, s, b in
                                 (map(int, x.split(",")) for x in args.add.split(";") if x)]
    per_unit = None  # seconds per (B * T^2 / 16384^2) of work, measured
    for t, d, s, hq, hk, b in shapes:
        elapsed = time.time() - t_start
        work = b * (t / 16384) ** 2
        est = 8.0 if per_unit is None else max(2.0, per_unit * work)
        if elapsed + est > args.budget:
            result["skipped"].append({"T": t, "D": d, "S": s, "Hq": hq, "Hk": hk, "B": b,
                                      "why": f"time budget ({elapsed:.0f}s used, ~{est:.0f}s needed)"})
            print(f"skip B{b} T{t} D{d} S{s} {hq}:{hk}: time budget", flush=True)
            continue
        t0 = time.time()
        try:
            r = bench_shape(t, d, s, hq=hq, hk=hk, b=b, with_s0=args.s0, dev=dev, dry=dry)
        except Exception as exc:  # noqa: BLE001 (out of memory included)
            result["skipped"].append({"T": t, "D": d, "S": s, "Hq": hq, "Hk": hk, "B": b,
                                      "why": traceback.format_exc(limit=3)})
            print(f"B{b} T{t} D{d} S{s}: {type(exc).__name__}: {exc}", flush=True)
            if not dry:
                torch.cuda.empty_cache()
            continue
        if not dry:
            torch.cuda.empty_cache()
        dt_shape = time.time() - t0
        per_unit = dt_shape / work if per_unit is None else min(per_unit, dt_shape / work)
        result["bench"].append(r)
        ms = r["ms"]
        print(f"B{b} T{t} {hq}:{hk} D{d} S{s}: "
              + ", ".join(f"{n} {m['fwd']:.3f}/{m['fwd+bwd']:.3f} ms" for n, m in ms.items())
              + f"  ({dt_shape:.0f}s)", flush=True)
        dump()
    result["wall_s"] = time.time() - t_start
    dump()

    print("\n| B | T | heads | D | S | mode | rowwise ms | mma ms | ours dense ms | FA2 seq ms | "
          "rowwise / dense | **mma / dense** | mma / FA2 | mma speedup | depth FLOP share | depth-traffic floor |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in result["bench"]:
        for mode in ("fwd", "fwd+bwd"):
            m = {n: x[mode] for n, x in r["ms"].items()}
            row, mma, od, fa = m["moda_rowwise"], m["moda_mma"], m["ours_dense"], m["sdpa_flash_seq"]
            # the least a depth segment can add to the dense kernel if its memory traffic is not
            # hidden under the sequence part's compute: the depth K/V read once in the forward,
            # read again and their gradients written in the backward
            floor = (1 if mode == "fwd" else 3) * r["depth_kv_bytes"] / args.bw * 1e3 / od
            print(f"| {r['B']} | {r['T']} | {r['Hq']}:{r['Hk']} | {r['D']} | {r['S']} | {mode} | {row:.3f} | "
                  f"{mma:.3f} | {od:.3f} | {fa:.3f} | {row / od:.2f} | **{mma / od:.2f}** | {mma / fa:.2f} | "
                  f"{row / mma:.2f}x | {100 * r['depth_flop_share']:.1f}% | +{100 * floor:.0f}% |")
    for sk in result["skipped"]:
        print(f"skipped B{sk['B']} T{sk['T']} D{sk['D']} S{sk['S']} {sk['Hq']}:{sk['Hk']}: "
              f"{sk['why'].splitlines()[0]}")
    print(f"wall {result['wall_s']:.0f}s; JSON {out}")
    checks = result["checks"]
    print("checks:", "none run (--skip-check)" if not checks else
          f"all {len(checks)} pass" if all(c["ok"] for c in checks) else "FAILURES", flush=True)


if __name__ == "__main__":
    main()
