"""GPU check and benchmark of token.temf (device tool), in ONE process:

1. compiled correctness: the Triton op (forward and all five gradients) vs the fp32 reference on
   a few odd shapes (bf16 and fp32); a small model whose mixer runs on Triton: teacher-forced
   decoding (prefill + steps) gives the parallel forward's logits (fp32), and one training step's
   loss / gradients (compressor included) match the same model on the reference backend;
2. optional tile-config probe (``--tune``) for the four kernels at the headline shape;
3. forward and forward+backward at T = 32768 (chunk 256, 4 summaries, D = 128, bf16, B = 1,
   16 heads, MHA and GQA 16:2) vs SDPA flash causal on the same q/k/v, all timed in this run with
   ``triton.testing.do_bench`` (median): the op alone, and the op + the learned compressor (what
   the mixer adds to the projections);
4. the decode cache: a 2-layer model (head dim 128) prefilled with T tokens then stepped across a
   chunk boundary; bytes held by the cache vs the dense cache (2 * T * Hk * D per layer);
5. a short table printed last; JSON written under ``$OUT`` (default ``bench-out``).

Usage on the GPU machine, from the repository root::

    python3 bench/temf_gpu.py [--tune] [--t 32768] [--budget SECONDS]
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

from blockzoo.kernels.triton.temf import temf_attention  # noqa: E402
from blockzoo.plugins.token.temf.module import ChunkCompressor  # noqa: E402
from blockzoo.plugins.token.temf.reference import (  # noqa: E402
    decode_cache_tokens,
    n_summary_chunks,
    temf_flops,
    temf_reference,
)

#: "cpu" only for a dry run of this script under TRITON_INTERPRET=1 (tiny shapes, wall-clock timing)
DEV = os.environ.get("TEMF_BENCH_DEV", "cuda")


def rel_err(a, b):
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


def _mk(shape, g, dtype, dev=None):
    dev = dev or DEV
    return torch.randn(shape, device=dev, generator=g).to(dtype).requires_grad_()


def check_op(b, t, hq, hk, d, c, s, dtype):
    g = torch.Generator(device=DEV).manual_seed(t * 7 + c)
    n = n_summary_chunks(t, c)
    xs = [_mk((b, t, hq, d), g, dtype), _mk((b, t, hk, d), g, dtype), _mk((b, t, hk, d), g, dtype),
          _mk((b, n, s, hk, d), g, dtype), _mk((b, n, s, hk, d), g, dtype)]
    o = temf_attention(*xs, chunk=c)
    ins = [x.detach().float().requires_grad_() for x in xs]
    r = temf_reference(*ins, chunk=c)
    do = torch.randn(r.shape, device=DEV, generator=g)
    got = torch.autograd.grad(o, xs, do.to(dtype))
    want = torch.autograd.grad(r, ins, do)
    errs = [rel_err(o, r)] + [rel_err(a, w) if w.numel() else 0.0 for a, w in zip(got, want, strict=True)]
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    return {"what": f"op B{b} T{t} H{hq}:{hk} D{d} C{c} S{s} {str(dtype)[6:]}", "max_rel_err": max(errs),
            "errs": errs, "ok": max(errs) < tol}


def _spec(backend, c, s, d_model=256, n_heads=2, n_kv=2, layers=2, dtype="float32"):
    return {"model": {"d_model": d_model, "n_heads": n_heads, "n_kv_heads": n_kv, "n_layers": layers,
                      "max_seq": 1 << 16, "backend": "reference", "dtype": dtype, "device": DEV},
            "block": {"mixer": {"type": "token.temf", "backend": backend,
                                "params": {"chunk": c, "summaries": s, "hidden": 16}}}}


def check_model():
    from blockzoo.core.cache import decode_logits
    from blockzoo.core.composer import build
    out = []
    tok = torch.randint(0, 256, (2, 90), generator=torch.Generator().manual_seed(0)).to(DEV)
    torch.manual_seed(0)
    m = build(_spec("triton", 16, 3, d_model=128, n_heads=4, n_kv=2), training=False).to(DEV).eval()
    with torch.no_grad():
        for blk in m.blocks:
            blk.mixer.comp_k.w2.normal_(0, 0.3)
            blk.mixer.comp_v.w2.normal_(0, 0.3)
        full = m(tok)
    dec, rel = decode_logits(m, tok, 21, policy=None)
    e = rel_err(dec, full)
    out.append({"what": "decode (prefill 21 + 69 steps) vs parallel, triton mixer fp32", "max_rel_err": e,
                "ok": e < 1e-4, "kv_rel": rel})
    grads, losses = [], []
    for be in ("reference", "triton"):
        torch.manual_seed(1)
        mm = build(_spec(be, 16, 3, d_model=128, n_heads=4, n_kv=2), training=True).to(DEV)
        with torch.no_grad():
            for blk in mm.blocks:
                blk.mixer.comp_k.w2.normal_(0, 0.3)
                blk.mixer.comp_v.w2.normal_(0, 0.3)
        loss = mm.loss(tok)
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append({n: p.grad.float() for n, p in mm.named_parameters() if p.grad is not None})
    ge = max(float((grads[1][n] - w).norm() / w.norm().clamp_min(1e-30)) for n, w in grads[0].items())
    out.append({"what": "training step, triton mixer vs reference (loss, worst param-grad rel norm err)",
                "max_rel_err": ge, "loss_err": abs(losses[0] - losses[1]), "ok": ge < 1e-3})
    return out


def _timed(fn):
    if DEV == "cpu":  # dry run
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return do_bench(fn, warmup=5, rep=50, return_mode="median")


def bench_shape(b, t, hq, hk, d, c, s, results):
    dev, dt = DEV, torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    n = n_summary_chunks(t, c)
    q, k, v = _mk((b, t, hq, d), g, dt), _mk((b, t, hk, d), g, dt), _mk((b, t, hk, d), g, dt)
    sk, sv = _mk((b, n, s, hk, d), g, dt), _mk((b, n, s, hk, d), g, dt)
    do = torch.randn(b, t, hq, d, device=dev, generator=g).to(dt)
    comp_k = ChunkCompressor(c, s, 16).to(dev, dt)
    comp_v = ChunkCompressor(c, s, 16).to(dev, dt)
    name = f"B{b} T{t} H{hq}:{hk} D{d} C{c} S{s} bf16"
    row = {"shape": name, "flops_fwd": temf_flops(b, t, hq, d, c, s)}

    def op_f():
        return temf_attention(q, k, v, sk, sv, chunk=c)

    def op_fb():
        o = temf_attention(q, k, v, sk, sv, chunk=c)
        torch.autograd.grad(o, (q, k, v, sk, sv), do)

    def mixer_fb():  # compressor + op (the summaries made from k, v as in the module)
        ck = k[:, : n * c].reshape(b, n, c, hk, d)
        cv = v[:, : n * c].reshape(b, n, c, hk, d)
        o = temf_attention(q, k, v, comp_k(ck), comp_v(cv), chunk=c)
        torch.autograd.grad(o, (q, k, v, *comp_k.parameters(), *comp_v.parameters()), do)

    qs, ks, vs = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    dos = do.transpose(1, 2).contiguous()
    gqa = hq != hk

    def sdpa_f():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=gqa)

    def sdpa_fb():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=gqa)
        torch.autograd.grad(o, (qs, ks, vs), dos)

    for key, fn in (("temf_fwd_ms", op_f), ("temf_fb_ms", op_fb), ("temf_mixer_fb_ms", mixer_fb),
                    ("sdpa_flash_fwd_ms", sdpa_f), ("sdpa_flash_fb_ms", sdpa_fb)):
        try:
            row[key] = _timed(fn)
        except Exception as e:  # noqa: BLE001
            row[key] = None
            row[key + "_error"] = f"{type(e).__name__}: {e}"[:300]
    if row.get("temf_fb_ms") and row.get("sdpa_flash_fb_ms"):
        row["speedup_fb_vs_flash"] = row["sdpa_flash_fb_ms"] / row["temf_fb_ms"]
    if row.get("temf_mixer_fb_ms") and row.get("sdpa_flash_fb_ms"):
        row["speedup_mixer_fb_vs_flash"] = row["sdpa_flash_fb_ms"] / row["temf_mixer_fb_ms"]
    results.append(row)
    return row


def tune(t, results):
    """Time each kernel path under a few tile configs (env overrides) at the headline shape."""
    from blockzoo.kernels.triton import temf as tk
    b, hq, hk, d, c, s = (1, 16, 16, 128, 256, 4) if DEV == "cuda" else (1, 2, 1, 16, 64, 4)
    dev, dt = DEV, torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    n = n_summary_chunks(t, c)
    q, k, v = _mk((b, t, hq, d), g, dt), _mk((b, t, hk, d), g, dt), _mk((b, t, hk, d), g, dt)
    sk, sv = _mk((b, n, s, hk, d), g, dt), _mk((b, n, s, hk, d), g, dt)
    do = torch.randn(b, t, hq, d, device=dev, generator=g).to(dt)
    o, lse = tk.temf_fwd(q, k, v, sk, sv, chunk=c)
    cands = {"FWD": ["128,64,8,3", "128,128,8,3", "64,64,4,3", "128,32,4,3", "64,128,4,2"],
             "DQ": ["128,64,8,3", "64,64,4,3", "128,32,8,3", "64,32,4,3"],
             "DKDV": ["128,64,8,3", "64,64,4,3", "128,32,8,2", "64,32,4,3"],
             "DKDV_SUM": ["64,64,4,3", "128,64,8,3", "32,64,4,3", "64,32,4,3", "32,32,4,2"]}
    best = {}
    for kind, lst in cands.items():
        var = f"BLOCKZOO_TEMF_{kind}_CFG"
        rows = []
        for cfg in lst:
            os.environ[var] = cfg
            try:
                if kind == "FWD":
                    ms = _timed(lambda: tk.temf_fwd(q, k, v, sk, sv, chunk=c))
                else:
                    ms = _timed(lambda: tk.temf_bwd(do, q, k, v, sk, sv, o, lse, chunk=c))
                rows.append((cfg, ms))
            except Exception as e:  # noqa: BLE001
                rows.append((cfg, f"{type(e).__name__}: {str(e)[:120]}"))
        del os.environ[var]
        ok = [r for r in rows if isinstance(r[1], float)]
        best[kind] = min(ok, key=lambda r: r[1])[0] if ok else None
        results.append({"tune": kind, "rows": rows, "best": best[kind]})
    for kind, cfg in best.items():
        if cfg:
            os.environ[f"BLOCKZOO_TEMF_{kind}_CFG"] = cfg
    return best


def decode_cache(t, c, s):
    """Cache bytes after prefill(t) and after stepping across the next chunk boundary."""
    from blockzoo.core.cache import make_cache, prefill, step
    from blockzoo.core.composer import build
    torch.manual_seed(0)
    m = build(_spec("triton", c, s, d_model=256, n_heads=2, n_kv=2, dtype="bfloat16"), training=False)
    m = m.to(DEV).eval()
    tok = torch.randint(0, 256, (1, t + c + 3), device=DEV)
    cache = make_cache(m, None)
    rows = []
    with torch.no_grad():
        prefill(m, tok[:, :t], cache)
        marks = {t, t + c // 2, t + c + 3}
        for i in range(t, t + c + 3):
            if i in marks or i == t:
                rows.append(_cache_row(cache, i, c, s))
            step(m, tok[:, i:i + 1], cache)
        rows.append(_cache_row(cache, t + c + 3, c, s))
    return rows


def _cache_row(cache, seen, c, s):
    held = sum(lc.k.numel() * lc.k.element_size() + lc.v.numel() * lc.v.element_size() for lc in cache.layers)
    lc0 = cache.layers[0]
    dense = sum(2 * seen * lc.k.shape[1] * lc.k.shape[3] * lc.k.element_size() for lc in cache.layers)
    return {"tokens": seen, "entries_per_head": lc0.size, "expected": decode_cache_tokens(seen, c, s),
            "cache_bytes": held, "dense_bytes": dense, "ratio": held / dense}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--t", default="32768")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--budget", type=float, default=330.0)
    args = ap.parse_args()
    t0 = time.time()
    out_dir = os.environ.get("OUT", "bench-out")
    os.makedirs(out_dir, exist_ok=True)
    info = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (dry run)", "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(info, flush=True)
    checks, results, best, cache_rows = [], [], {}, []
    shapes = [(1, 1000, 4, 2, 64, 64, 4, torch.bfloat16), (1, 1000, 4, 2, 64, 64, 4, torch.float32),
              (2, 777, 8, 8, 128, 256, 4, torch.bfloat16), (1, 300, 4, 1, 40, 48, 3, torch.float32),
              (1, 513, 6, 2, 128, 100, 7, torch.bfloat16), (1, 5000, 2, 2, 128, 256, 4, torch.bfloat16)]
    heads = ((16, 16), (16, 2))
    if DEV == "cpu":  # dry run
        shapes, heads = [(1, 40, 4, 2, 16, 8, 3, torch.float32)], ((2, 2), (2, 1))
    for args_ in shapes:
        try:
            checks.append(check_op(*args_))
        except Exception:  # noqa: BLE001
            checks.append({"what": str(args_), "ok": False, "error": traceback.format_exc()[-1500:]})
        print(checks[-1], flush=True)
    try:
        checks.extend(check_model())
    except Exception:  # noqa: BLE001
        checks.append({"what": "model checks", "ok": False, "error": traceback.format_exc()[-1500:]})
    print(checks[-2:], flush=True)
    ts = [int(x) for x in args.t.split(",")]
    if args.tune:
        try:
            best = tune(ts[0], results)
        except Exception:  # noqa: BLE001
            results.append({"tune": "failed", "error": traceback.format_exc()[-1500:]})
        print("tuned:", best, flush=True)
    for t in ts:
        for (hq, hk) in heads:
            if time.time() - t0 > args.budget:
                results.append({"shape": f"T{t} H{hq}:{hk}", "skipped": "time budget"})
                continue
            try:
                d, c = (128, 256) if DEV == "cuda" else (16, 64)
                print(bench_shape(1, t, hq, hk, d, c, 4, results), flush=True)
            except Exception:  # noqa: BLE001
                results.append({"shape": f"T{t} H{hq}:{hk}", "error": traceback.format_exc()[-1500:]})
                print(results[-1], flush=True)
            torch.cuda.empty_cache()
    try:
        cache_rows = decode_cache(ts[0], 256, 4) if DEV == "cuda" else decode_cache(ts[0], 16, 4)
    except Exception:  # noqa: BLE001
        cache_rows = [{"error": traceback.format_exc()[-1500:]}]
    with open(os.path.join(out_dir, "temf_gpu.json"), "w") as f:
        json.dump({"info": info, "checks": checks, "results": results, "tuned": best, "decode_cache": cache_rows},
                  f, indent=1, default=str)
    print("\n== checks ==")
    for ch in checks:
        print(f"{'OK ' if ch.get('ok') else 'BAD'} {ch['what']}: max rel err {ch.get('max_rel_err', 'n/a')}")
    print("\n== f+b timing (ms, median) ==")
    print("| shape | temf fwd | temf f+b | temf+compressor f+b | flash fwd | flash f+b | f+b speedup |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if "temf_fb_ms" in r:
            f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
            print(f"| {r['shape']} | {f(r['temf_fwd_ms'])} | {f(r['temf_fb_ms'])} | {f(r['temf_mixer_fb_ms'])} | "
                  f"{f(r['sdpa_flash_fwd_ms'])} | {f(r['sdpa_flash_fb_ms'])} | "
                  f"{r.get('speedup_fb_vs_flash', 0):.1f}x |")
    print("\n== decode cache (2 layers, Hk=2, D=128, bf16) ==")
    for r in cache_rows:
        print(r)
    print(f"\ntotal {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
