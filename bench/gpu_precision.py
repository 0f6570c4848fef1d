# ruff: noqa: B023  (the lambdas are called inside the iteration that defines them)
"""Quantised attention on the GPU (device tool): compiled correctness, accuracy, then speed.

1. Compiled Triton ``precision.int8`` / ``precision.qaas`` vs the quantised torch reference
   (same inputs, same quantisation) on small odd shapes, and their accuracy (cosine, relative
   L1, RMSE) vs fp32 attention on random and outlier-channel inputs.
2. Forward throughput at head dim 128, T in 4096 / 8192 / 16384 (B*H fills the GPU), bf16
   inputs (the quantisation pre-pass is included in the time), against SDPA flash (FA2) and
   cuDNN bf16 in the same run (SDPA fed [B, H, T, D] contiguous, prepared outside the timing).

Usage from the repo root on the GPU machine (after ``bash bench/gpu_check.sh``-style setup):
``python3 bench/gpu_precision.py [--tune] [--quick]``; JSON goes to ``$OUT/precision.json``.
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
    unless the attention kernel quantises Q itself, ``CFG["fuse_q"]``)."""
    scale = 1.0 / q.shape[-1] ** 0.5
    if not P.CFG["fuse_q"]:
        P.quantise(q, qb, "int8", mult=scale * 1.4426950408889634)
    P.quantise(k, kb, "int8", mean=R.key_mean(k))
    P._quant_v(v, "fp8")


def _unfused(fn):
    """Run ``fn`` with int8's separate Q pre-pass (``CFG["fuse_q"] = False``): the old path."""
    old = P.CFG["fuse_q"]
    P.CFG["fuse_q"] = False
    try:
        return fn()
    finally:
        P.CFG["fuse_q"] = old


def bench(dev: str, tune: str, quick: bool, variants: str = "") -> list[dict]:
    rows = []
    shapes = [(8, 4096, 16), (4, 8192, 16), (2, 16384, 16)]
    if quick:
        shapes = shapes[:2]
    cfgs = [(64, 128, 4, 3), (128, 64, 8, 3)]  # int8's default blocks, qaas's default blocks
    if tune:
        cfgs = [tuple(int(x) for x in c.split("/")) for c in tune.split(",")]
    for (b, t, h) in shapes:
        for causal in (False, True):
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(b, t, h, 128, generator=g).to(dev, torch.bfloat16) for _ in range(3))
            tau = torch.full((h,), 0.25, device=dev)
            gam = torch.ones(h, device=dev)
            flops = 4.0 * b * h * t * t * 128 * (0.5 if causal else 1.0)
            qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
            res = {}
            for name, backend in (("sdpa-flash", "FLASH_ATTENTION"), ("sdpa-cudnn", "CUDNN_ATTENTION")):
                try:
                    res[name] = do_bench(lambda backend=backend: sdpa(qt, kt, vt, causal, backend, True),
                                         warmup=25, rep=100, return_mode="median")
                except Exception as e:  # noqa: BLE001
                    print(f"{name} failed: {e}", flush=True)
            for (qb, kb, w, s) in cfgs:
                P.CFG.update(warps=w, stages=s)
                tag = f"{qb}/{kb}/w{w}/s{s}"
                for name, fn in (("int8-prepass", lambda: _prepass_int8(q, k, v, qb, kb)),
                                 ("int8", lambda: P.int8_attention(q, k, v, causal=causal, q_block=qb, k_block=kb)),
                                 ("int8-unfusedQ", lambda: _unfused(lambda: P.int8_attention(q, k, v, causal=causal,
                                                                                            q_block=qb, k_block=kb))),
                                 ("int8-pv16", lambda: P.int8_attention(q, k, v, causal=causal, q_block=qb,
                                                                        k_block=kb, pv="fp16")),
                                 ("qaas", lambda: P.qaas_forward(q, k, v, tau, gam, causal=causal, q_block=qb,
                                                                 k_block=kb)),
                                 ("qaas-fp8P", lambda: P.qaas_forward(q, k, v, tau, gam, causal=causal, q_block=qb,
                                                                      k_block=kb, binary=False))):
                    if variants and name not in variants.split(","):
                        continue
                    if name == "int8-prepass" and causal:
                        continue  # the same work as non-causal
                    try:
                        res[f"{name}@{tag}"] = do_bench(fn, warmup=25, rep=100, return_mode="median")
                    except Exception as e:  # noqa: BLE001
                        print(f"{name}@{tag} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            P.CFG.update(warps=None, stages=3)
            fa = res.get("sdpa-flash")
            cu = res.get("sdpa-cudnn")
            for name, ms in res.items():
                row = {"B": b, "T": t, "H": h, "D": 128, "causal": causal, "impl": name, "ms": ms,
                       "tflops": flops / ms * 1e-9, "x_fa2": fa / ms if fa else None, "x_cudnn": cu / ms if cu else None}
                rows.append(row)
                print(f"B{b} T{t} H{h} {'causal' if causal else 'full  '} {name:28s} {ms:8.3f} ms "
                      f"{row['tflops']:7.1f} TFLOP/s  x FA2 {row['x_fa2'] or 0:5.2f}  x cuDNN {row['x_cudnn'] or 0:5.2f}",
                      flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tune", default="", help="comma list of q_block/k_block/warps/stages configs to time "
                                                 "(default: 64/128/4/3 and 128/64/8/3, the params' default blocks)")
    ap.add_argument("--quick", action="store_true", help="T=4096 and 8192 only")
    ap.add_argument("--variants", default="", help="comma list of impls to time (default: all of int8-prepass, "
                                                   "int8, int8-unfusedQ, int8-pv16, qaas, qaas-fp8P)")
    ap.add_argument("--skip-check", action="store_true")
    args = ap.parse_args()
    dev = "cuda"
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "command": " ".join(["python3", "bench/gpu_precision.py", *sys.argv[1:]])}
    print(env, flush=True)
    out = {"env": env}
    dest = pathlib.Path(os.environ.get("OUT", "bench-out"))
    dest.mkdir(parents=True, exist_ok=True)

    def dump():  # after every phase, so a run cut short still leaves its results
        (dest / "precision.json").write_text(json.dumps(out, indent=1))
    t0 = time.time()
    if not args.skip_check:
        out["correctness"] = correctness(dev)
        dump()
        print(f"[{time.time() - t0:.0f}s] correctness done", flush=True)
        out["accuracy"] = accuracy(dev)
        dump()
        print(f"[{time.time() - t0:.0f}s] accuracy done", flush=True)
    out["bench"] = bench(dev, args.tune, args.quick, args.variants)
    dump()
    print(f"[{time.time() - t0:.0f}s] bench done", flush=True)
    print("\n| T | mask | impl | ms | TFLOP/s | x FA2 | x cuDNN |\n|---|---|---|---|---|---|---|")
    for r in out["bench"]:
        print(f"| {r['T']} | {'causal' if r['causal'] else 'full'} | {r['impl']} | {r['ms']:.3f} | {r['tflops']:.0f} | "
              f"{r['x_fa2'] or 0:.2f} | {r['x_cudnn'] or 0:.2f} |")
    bad = [r for r in out.get("correctness", []) if not r["ok"]]
    print(f"\ncorrectness: {len(bad)} failures of {len(out.get('correctness', []))}")


if __name__ == "__main__":
    main()
