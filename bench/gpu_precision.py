# ruff: noqa: B023  (the lambdas are called inside the iteration that defines them)
"""Quantised attention on the GPU (device tool): compiled correctness, accuracy, then speed.

1. Compiled Triton ``precision.int8`` / ``precision.qaas`` vs the quantised torch reference
   (same inputs, same quantisation) on small odd shapes, and their accuracy (cosine, relative
   L1, RMSE) vs fp32 attention on random and outlier-channel inputs.
   First of all the K/V pre-pass (``quant_kv``, two Triton launches) against the reference's
   quantisation primitives (:func:`prepass_check`).
2. Forward throughput at head dim 128, T in 4096 / 8192 / 16384 (B*H fills the GPU), bf16
   inputs (the quantisation pre-pass is included in the time), against SDPA flash (FA2) and
   cuDNN bf16 in the same run (SDPA fed [B, H, T, D] contiguous, prepared outside the timing):
   int8 at its default blocks and qaas (binary and FP8 P) at its, each end to end and its
   pre-pass alone, with the new K/V pre-pass and the old one (torch reductions, ``-old`` /
   ``-oldkv``); a summary table last.

Usage from the repo root on the GPU machine (after ``bash bench/gpu_check.sh``-style setup):
``python3 bench/gpu_precision.py [--skip-check] [--skip-accuracy] [--quick] [--variants a,b]
[--tune qb/kb/warps/stages,...]``; JSON goes to ``$OUT/precision.json``. On a CPU:
``TRITON_INTERPRET=1 python bench/gpu_precision.py --dry-run`` (tiny shapes, wall times).
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
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from blockzoo.kernels.triton import precision as P  # noqa: E402
from blockzoo.plugins.precision import reference as R  # noqa: E402
from blockzoo.testing.compare import compare  # noqa: E402
from blockzoo.testing.tolerances import Tolerance  # noqa: E402


def correctness(dev: str) -> list[dict]:
    rows = []
    tol = Tolerance(2.0**-4, 2.0**-7)
    shapes = [(2, 300, 4, 2, 128, 128, 64), (1, 257, 2, 1, 40, 64, 32)]
    for (b, t, h, hk, d, qb, kb) in shapes:
        g = torch.Generator().manual_seed(t)
        q, k, v = (torch.randn(b, t, hh, d, generator=g).to(dev, torch.bfloat16) for hh in (h, hk, hk))
        tau = (0.3 + 0.2 * torch.rand(h, generator=g)).to(dev)
        gam = (0.8 + 0.4 * torch.rand(h, generator=g)).to(dev)
        for causal in (True, False):
            kw = dict(causal=causal, q_block=qb, k_block=kb)
            for name, got, want in (
                ("int8/fp8", lambda: P.int8_attention(q, k, v, **kw), lambda: R.int8_forward(q, k, v, **kw)),
                ("int8/fp16", lambda: P.int8_attention(q, k, v, pv="fp16", **kw),
                 lambda: R.int8_forward(q, k, v, pv="fp16", **kw)),
                ("qaas/binary", lambda: P.qaas_forward(q, k, v, tau, gam, **kw),
                 lambda: R.qaas_forward(q, k, v, tau, gam, keep=rec[-1]["keep"], **kw)),
                ("qaas/fp8P", lambda: P.qaas_forward(q, k, v, tau, gam, binary=False, **kw),
                 lambda: R.qaas_forward(q, k, v, tau, gam, binary=False, **kw))):
                with P.record_decisions() as rec:  # qaas: its keep decisions feed the reference
                    out = got().float()
                rep = compare(out, want().to(torch.bfloat16).float(), tol, name)
                row = {"check": "vs-quantised-reference", "variant": name, "shape": [b, t, h, hk, d],
                       "blocks": [qb, kb], "causal": causal, "ok": rep.ok, "max_rel": rep.max_rel,
                       "rms_rel": rep.rms_rel}
                extra = ""
                if name.startswith("qaas"):
                    dec = R.decision_report(rec[-1], causal, qb, kb, binary=name == "qaas/binary")
                    dec_ok = (dec["score_err_ratio"] <= 1 and dec["masked_bad"] == 0 and dec["nonfinite_valid"] == 0
                              and dec.get("own_mismatch", 0) == 0 and dec.get("flips_outside", 0) == 0)
                    row.update(decisions=dec, ok=rep.ok and dec_ok)
                    extra = (f" score_err/bound={dec['score_err_ratio']:.3f} flips={dec.get('flips', '-')}/"
                             f"{dec['n_valid']} outside={dec.get('flips_outside', '-')}")
                rows.append(row)
                print(("ok  " if row["ok"] else "FAIL") + f" {name:12s} B{b} T{t} H{h}/{hk} D{d} blocks {qb}/{kb} "
                      f"causal={causal} max_rel={rep.max_rel:.2e} rms_rel={rep.rms_rel:.2e}{extra}", flush=True)
    return rows


def accuracy(dev: str) -> list[dict]:
    rows = []
    tau = torch.full((8,), 0.25, device=dev)
    gam = torch.ones(8, device=dev)
    for kind in ("random", "outliers"):
        for seed in range(2):
            if kind == "random":
                g = torch.Generator().manual_seed(seed)
                q, k, v = (torch.randn(2, 2048, 8, 128, generator=g).to(dev, torch.bfloat16) for _ in range(3))
            else:
                q, k, v = R.outlier_inputs(2, 2048, 8, 8, 128, torch.bfloat16, dev, seed=seed)
            ref = R.dense_fp32(q, k, v, causal=True)
            for name, fn in (("int8/fp8", lambda: P.int8_attention(q, k, v)),
                             ("int8/fp16", lambda: P.int8_attention(q, k, v, pv="fp16")),
                             ("int8/fp8-nosmooth", lambda: P.int8_attention(q, k, v, smooth_k=False)),
                             ("qaas/binary", lambda: P.qaas_forward(q, k, v, tau, gam)),
                             ("qaas/fp8P", lambda: P.qaas_forward(q, k, v, tau, gam, binary=False)),
                             ("sdpa-flash-bf16", lambda: sdpa(q, k, v, True, "FLASH_ATTENTION"))):
                m = R.accuracy(fn(), ref)
                rows.append({"inputs": kind, "seed": seed, "variant": name, **m})
    # mean over seeds
    out = []
    for kind in ("random", "outliers"):
        for name in dict.fromkeys(r["variant"] for r in rows):
            sel = [r for r in rows if r["inputs"] == kind and r["variant"] == name]
            agg = {m: sum(r[m] for r in sel) / len(sel) for m in ("cos", "rel_l1", "rmse")}
            agg["cos_min"] = min(r["cos"] for r in sel)
            out.append({"inputs": kind, "variant": name, **agg})
            print(f"accuracy {kind:8s} {name:18s} cos={agg['cos']:.6f} (min {agg['cos_min']:.6f}) "
                  f"relL1={agg['rel_l1']:.4f} rmse={agg['rmse']:.4g}", flush=True)
    return out


def sdpa(q, k, v, causal, backend, prepared=False):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if not prepared:
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    with sdpa_kernel(getattr(SDPBackend, backend)):
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return o if prepared else o.transpose(1, 2)


def _prepass_int8(q, k, v, qb, kb):
    """int8's quantisation pre-pass alone (inside every int8 time): K codes + V codes (+ Q codes
    unless the attention kernel quantises Q itself, ``CFG["fuse_q"]``), by the path that
    ``CFG["fused_kv"]`` selects (two Triton launches, or the older torch reductions + kernels)."""
    scale = 1.0 / q.shape[-1] ** 0.5
    if not P.CFG["fuse_q"]:
        P.quantise(q, qb, "int8", mult=scale * 1.4426950408889634)
    if P.CFG["fused_kv"]:
        P.quant_kv(k, v, kb, "int8", smooth=True, pv="fp8")
    else:
        P.quantise(k, kb, "int8", mean=R.key_mean(k))
        P._quant_v(v, "fp8")


def _prepass_qaas(q, k, v, qb, kb):
    """qaas's pre-pass alone: FP8 Q blocks, FP8 K blocks, per-channel FP8 V."""
    P.quantise(q, qb, "fp8")
    if P.CFG["fused_kv"]:
        P.quant_kv(k, v, kb, "fp8", smooth=False, pv="fp8")
    else:
        P.quantise(k, kb, "fp8")
        P._quant_v(v, "fp8")


def _with_cfg(fn, **cfg):
    """Run ``fn`` with ``P.CFG`` temporarily updated (e.g. ``fused_kv=False``: the old K/V pre-pass)."""
    old = {key: P.CFG[key] for key in cfg}
    P.CFG.update(cfg)
    try:
        return fn()
    finally:
        P.CFG.update(old)


def _unfused(fn):
    """Run ``fn`` with int8's separate Q pre-pass (``CFG["fuse_q"] = False``): the old path."""
    return _with_cfg(fn, fuse_q=False)


def prepass_check(dev: str, dry: bool = False) -> list[dict]:
    """The compiled two-launch K/V pre-pass (``quant_kv``) vs the reference's quantisation.

    Unsmoothed K (qaas, int8 smooth_k=False) and V involve no sum: codes and scales must be equal
    bit for bit. Smoothed K depends on the fp32 key mean, whose summation order differs between
    any two GPU reductions (the reference runs torch's ``mean`` on the same device): there a code
    may differ by 1 where ``k - mean`` lies on a rounding boundary; required: no code off by more
    than 1, at most 1e-4 of the codes off, scales within 1e-6 relative."""
    rows = []
    shapes = ((2, 300, 4, 128, 128, torch.bfloat16), (1, 257, 2, 40, 32, torch.bfloat16),
              (2, 1000, 3, 128, 64, torch.float32), (8, 4096, 16, 128, 128, torch.bfloat16))
    for (b, t, h, d, kb, dt) in (shapes[1:2] if dry else shapes):
        g = torch.Generator().manual_seed(t)
        k = torch.randn(b, t, h, d, generator=g) * (1 + 20 * torch.rand(1, 1, h, d, generator=g))
        k = (k + 3 * torch.randn(1, 1, h, d, generator=g)).to(dev, dt)  # outlier channels, nonzero means
        v = (torch.randn(b, t, h, d, generator=g) * (1 + 5 * torch.rand(1, 1, h, d, generator=g))).to(dev, dt)
        for kind, smooth in (("int8", True), ("int8", False), ("fp8", False)):
            kc, sk, vt, vs = P.quant_kv(k, v, kb, kind, smooth=smooth, pv="fp8")
            kf = k.float() - (R.key_mean(k) if smooth else 0.0)
            wkc, wsk = R.quant_blocks(kf, kb, kind)
            wv, wvs = R.quant_v_channels(v.float())
            dk = (kc.float() - wkc).abs()
            n_off = int((dk > 0).sum())
            sk_rel = float(((sk - wsk).abs() / wsk.abs().clamp_min(1e-30)).max())
            v_ok = torch.equal(vt.float().permute(0, 3, 1, 2), wv) and torch.equal(vs, wvs)
            if smooth:
                k_ok = float(dk.max()) <= 1 and n_off <= 1e-4 * dk.numel() and sk_rel <= 1e-6
            else:
                k_ok = n_off == 0 and sk_rel == 0.0
            row = {"check": "kv-prepass-vs-reference", "shape": [b, t, h, d], "k_block": kb, "dtype": str(dt),
                   "kind": kind, "smooth": smooth, "k_codes_off": n_off, "k_codes_max_off": float(dk.max()),
                   "sk_max_rel": sk_rel, "v_exact": v_ok, "ok": bool(k_ok and v_ok)}
            rows.append(row)
            print(("ok  " if row["ok"] else "FAIL") + f" kv-prepass {kind} smooth={smooth} B{b} T{t} H{h} D{d} "
                  f"kb{kb} {str(dt)[6:]}: K codes off {n_off} (max {float(dk.max()):.0f}), sk rel {sk_rel:.1e}, "
                  f"V exact {v_ok}", flush=True)
    return rows


def _timer(dev: str):
    if dev == "cuda":
        return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")

    def once(fn):  # CPU dry run (TRITON_INTERPRET=1): one call, wall time
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return once


INT8_CFG = (64, 128, 4, 3)   # precision.int8's default blocks (q_block/k_block) and CFG warps/stages
QAAS_CFG = (128, 64, 8, 3)   # precision.qaas's default blocks (binary P)
QAAS_FP8P_CFG = (128, R.QAAS_K_BLOCK[False], 8, 3)   # precision.qaas's default blocks with FP8 P
INT8_IMPLS = ("int8-prepass", "int8-prepass-old", "int8", "int8-oldkv", "int8-unfusedQ", "int8-pv16")
QAAS_IMPLS = ("qaas-prepass", "qaas-prepass-old", "qaas", "qaas-oldkv", "qaas-fp8P", "qaas-fp8P-oldkv")
DEFAULT_SKIP = ("int8-unfusedQ", "int8-pv16", "qaas-oldkv", "qaas-fp8P-oldkv")
PREPASS = ("-prepass", "-prepass-old")


def bench(dev: str, tune: str, quick: bool, variants: str = "", dry: bool = False) -> list[dict]:
    """Times per (B, T, mask): SDPA flash (FA2) and cuDNN, then each impl at its blocks. The
    pre-pass rows (``*-prepass``: the quantisation launches alone; ``-old``: torch reductions +
    separate kernels) do not depend on the mask and are timed once per shape (full rows)."""
    rows = []
    shapes = [(8, 4096, 16), (4, 8192, 16), (2, 16384, 16)]
    if quick:
        shapes = shapes[:2]
    if dry:
        shapes = [(1, 160, 2)]
    timer = _timer(dev)
    chosen = variants.split(",") if variants else [n for n in INT8_IMPLS + QAAS_IMPLS if n not in DEFAULT_SKIP]
    if tune:  # every chosen impl at every given config
        cfgs = [tuple(int(x) for x in c.split("/")) for c in tune.split(",")]
        plan = [(c, n) for c in cfgs for n in chosen]
    else:
        plan = [(INT8_CFG if n.startswith("int8") else QAAS_FP8P_CFG if "fp8P" in n else QAAS_CFG, n)
                for n in chosen]
    for (b, t, h) in shapes:
        prepass_ms: dict = {}
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(b, t, h, 128, generator=g).to(dev, torch.bfloat16) for _ in range(3))
        tau = torch.full((h,), 0.25, device=dev)
        gam = torch.ones(h, device=dev)
        qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        for causal in (False, True):
            flops = 4.0 * b * h * t * t * 128 * (0.5 if causal else 1.0)
            res = {}
            for name, backend in (("sdpa-flash", "FLASH_ATTENTION"), ("sdpa-cudnn", "CUDNN_ATTENTION")):
                try:
                    res[name] = timer(lambda backend=backend: sdpa(qt, kt, vt, causal, backend, True))
                except Exception as e:  # noqa: BLE001
                    print(f"{name} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
            for (qb, kb, w, s), name in plan:
                tag = f"{qb}/{kb}/w{w}/s{s}"
                key = f"{name}@{tag}"
                if name.endswith(PREPASS) and causal:
                    if key in prepass_ms:
                        res[key] = prepass_ms[key]
                    continue
                fns = {
                    "int8-prepass": lambda: _prepass_int8(q, k, v, qb, kb),
                    "int8-prepass-old": lambda: _with_cfg(lambda: _prepass_int8(q, k, v, qb, kb), fused_kv=False),
                    "int8": lambda: P.int8_attention(q, k, v, causal=causal, q_block=qb, k_block=kb),
                    "int8-oldkv": lambda: _with_cfg(lambda: P.int8_attention(q, k, v, causal=causal, q_block=qb,
                                                                             k_block=kb), fused_kv=False),
                    "int8-unfusedQ": lambda: _unfused(lambda: P.int8_attention(q, k, v, causal=causal, q_block=qb,
                                                                               k_block=kb)),
                    "int8-pv16": lambda: P.int8_attention(q, k, v, causal=causal, q_block=qb, k_block=kb, pv="fp16"),
                    "qaas-prepass": lambda: _prepass_qaas(q, k, v, qb, kb),
                    "qaas-prepass-old": lambda: _with_cfg(lambda: _prepass_qaas(q, k, v, qb, kb), fused_kv=False),
                    "qaas": lambda: P.qaas_forward(q, k, v, tau, gam, causal=causal, q_block=qb, k_block=kb),
                    "qaas-oldkv": lambda: _with_cfg(lambda: P.qaas_forward(q, k, v, tau, gam, causal=causal,
                                                                           q_block=qb, k_block=kb), fused_kv=False),
                    "qaas-fp8P": lambda: P.qaas_forward(q, k, v, tau, gam, causal=causal, q_block=qb, k_block=kb,
                                                        binary=False),
                    "qaas-fp8P-oldkv": lambda: _with_cfg(lambda: P.qaas_forward(q, k, v, tau, gam, causal=causal,
                                                                                q_block=qb, k_block=kb, binary=False),
                                                         fused_kv=False),
                }
                if name not in fns:
                    print(f"unknown impl {name!r}; known: {', '.join(fns)}", flush=True)
                    continue
                P.CFG.update(warps=w, stages=s)
                try:
                    res[key] = timer(fns[name])
                    if name.endswith(PREPASS):
                        prepass_ms[key] = res[key]
                except Exception as e:  # noqa: BLE001
                    print(f"{key} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                finally:
                    P.CFG.update(warps=None, stages=3)
            fa = res.get("sdpa-flash")
            cu = res.get("sdpa-cudnn")
            for name, ms in res.items():
                row = {"B": b, "T": t, "H": h, "D": 128, "causal": causal, "impl": name, "ms": ms,
                       "tflops": flops / ms * 1e-9, "x_fa2": fa / ms if fa else None, "x_cudnn": cu / ms if cu else None}
                rows.append(row)
                print(f"B{b} T{t} H{h} {'causal' if causal else 'full  '} {name:34s} {ms:8.3f} ms "
                      f"{row['tflops']:7.1f} TFLOP/s  x FA2 {row['x_fa2'] or 0:5.2f}  x cuDNN {row['x_cudnn'] or 0:5.2f}",
                      flush=True)
    return rows


def summary(rows: list[dict]) -> str:
    """One line per (B, T, mask): FA2 / cuDNN ms, then int8 end to end (x FA2) and its pre-pass
    alone (ms, share of the end-to-end time) with the K/V pre-pass of ``quant_kv`` (two launches)
    and with the old one (torch reductions); qaas binary / FP8 P and the qaas pre-pass (new / old)."""
    def get(sel, prefix):
        hit = [r for r in sel if r["impl"].split("@")[0] == prefix]
        return hit[0]["ms"] if hit else None

    def f(x):
        return f"{x:.3f}" if x is not None else "-"

    out = ["| B | T | mask | FA2 ms | cuDNN ms | int8 ms (x FA2) | int8 pre-pass ms (share) | int8 old-KV ms "
           "(x FA2) | old pre-pass ms | qaas binary ms (x FA2) | qaas fp8-P ms (x FA2) | qaas pre-pass ms "
           "(old) |", "|" + "---|" * 12]
    keys = dict.fromkeys((r["B"], r["T"], r["causal"]) for r in rows)
    for (b, t, causal) in keys:
        sel = [r for r in rows if (r["B"], r["T"], r["causal"]) == (b, t, causal)]
        fa, cu = get(sel, "sdpa-flash"), get(sel, "sdpa-cudnn")

        def x(ms):
            return f"{ms:.3f} ({fa / ms:.2f}x)" if ms and fa else f(ms)
        i8, pp = get(sel, "int8"), get(sel, "int8-prepass")
        share = f"{pp:.3f} ({100 * pp / i8:.0f}%)" if pp and i8 else f(pp)
        out.append(f"| {b} | {t} | {'causal' if causal else 'full'} | {f(fa)} | {f(cu)} | {x(i8)} | {share} | "
                   f"{x(get(sel, 'int8-oldkv'))} | {f(get(sel, 'int8-prepass-old'))} | {x(get(sel, 'qaas'))} | "
                   f"{x(get(sel, 'qaas-fp8P'))} | {f(get(sel, 'qaas-prepass'))} "
                   f"({f(get(sel, 'qaas-prepass-old'))}) |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tune", default="", help="comma list of q_block/k_block/warps/stages configs to time "
                                                 "(default: 64/128/4/3 and 128/64/8/3, the params' default blocks)")
    ap.add_argument("--quick", action="store_true", help="T=4096 and 8192 only")
    ap.add_argument("--variants", default="", help="comma list of impls to time; known: "
                    + ", ".join(INT8_IMPLS + QAAS_IMPLS) + " (default: all but " + ", ".join(DEFAULT_SKIP) + ")")
    ap.add_argument("--skip-check", action="store_true", help="no compiled correctness / accuracy checks")
    ap.add_argument("--skip-accuracy", action="store_true", help="the correctness checks but not the accuracy table")
    ap.add_argument("--dry-run", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny shapes: exercise the script")
    args = ap.parse_args()
    dev = "cpu" if args.dry_run else "cuda"
    if args.dry_run and os.environ.get("TRITON_INTERPRET", "0") != "1":
        sys.exit("--dry-run needs TRITON_INTERPRET=1")
    env = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu (dry run)", "torch": torch.__version__,
           "triton": triton.__version__,
           "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "command": " ".join(["python3", "bench/gpu_precision.py", *sys.argv[1:]])}
    print(env, flush=True)
    out = {"env": env}
    dest = pathlib.Path(os.environ.get("OUT", "bench-out"))
    dest.mkdir(parents=True, exist_ok=True)

    def dump():  # after every phase, so a run cut short still leaves its results
        (dest / "precision.json").write_text(json.dumps(out, indent=1))
    t0 = time.time()
    if args.dry_run:  # the interpreter is too slow for the end-to-end checks: the pre-pass one only
        out["correctness"] = prepass_check(dev, dry=True)
    elif not args.skip_check:
        out["correctness"] = prepass_check(dev) + correctness(dev)
        dump()
        print(f"[{time.time() - t0:.0f}s] correctness done", flush=True)
        if not args.skip_accuracy:
            out["accuracy"] = accuracy(dev)
            dump()
            print(f"[{time.time() - t0:.0f}s] accuracy done", flush=True)
    out["bench"] = bench(dev, args.tune, args.quick, args.variants, dry=args.dry_run)
    dump()
    print(f"[{time.time() - t0:.0f}s] bench done", flush=True)
    print("\n| T | mask | impl | ms | TFLOP/s | x FA2 | x cuDNN |\n|---|---|---|---|---|---|---|")
    for r in out["bench"]:
        print(f"| {r['T']} | {'causal' if r['causal'] else 'full'} | {r['impl']} | {r['ms']:.3f} | {r['tflops']:.0f} | "
              f"{r['x_fa2'] or 0:.2f} | {r['x_cudnn'] or 0:.2f} |")
    print("\n" + summary(out["bench"]))
    bad = [r for r in out.get("correctness", []) if not r["ok"]]
    print(f"\ncorrectness: {len(bad)} failures of {len(out.get('correctness', []))}")


if __name__ == "__main__":
    main()
