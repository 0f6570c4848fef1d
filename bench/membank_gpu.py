"""GPU check and benchmark of token.membank (device tool), in ONE process:

1. compiled correctness: the Triton op (forward and all five gradients) vs the fp32 reference on
   odd shapes (bf16 and fp32), including tiles that reach the unmasked interior window blocks and
   a decode-shaped call (Tq = 1);
2. training: forward and forward+backward of the op (and op + compressor/scan, what a layer pays)
   vs SDPA flash causal on the same q/k/v, T = 8192 and 32768, bf16, B=1, 16 query heads, 2 kv
   heads, D=128, W=1024, M=64, timed in this run with ``triton.testing.do_bench`` (median);
3. decoding: a 2-layer bf16 model (token.membank mixer, triton backend) prefilled with T random
   tokens, then one-token steps timed (median of CUDA-synchronised steps) with
   ``torch.cuda.max_memory_allocated`` over the steps and the cache size, for T = 4k .. 64k; the
   op-level step (the kernel alone on [bank | window]) too; dense attention (full KV cache,
   triton backend) at the same T for contrast;
4. a short table printed last; JSON written under ``$OUT`` (default ``bench-out``).

Usage on the GPU machine, from the repository root::

    python3 bench/membank_gpu.py [--budget SECONDS] [--quick]

``--quick`` runs tiny shapes only (a smoke test; also works on the CPU with TRITON_INTERPRET=1).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bootstrap import ensure_blockzoo  # noqa: E402

ensure_blockzoo()

import torch  # noqa: E402
import triton  # noqa: E402

from blockzoo.core.cache import make_cache, prefill, step  # noqa: E402
from blockzoo.core.composer import build  # noqa: E402
from blockzoo.kernels.triton.membank import membank_attention  # noqa: E402
from blockzoo.plugins.token.membank.reference import (  # noqa: E402
    bank_scan,
    bank_scan_loop,
    chunk_major,
    compress_blocks,
    membank_flops,
    membank_reference,
    n_chunks,
)

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cpu" if INTERP else "cuda"


def rel_err(a, b):
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def bench(fn, quick):
    if INTERP or quick:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    from triton.testing import do_bench
    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def _mk(shape, dtype, g):
    return torch.randn(shape, device=DEV, generator=g).to(dtype).requires_grad_()


def check(b, tq, tk, hq, hk, d, w, m, dtype):
    g = torch.Generator(device=DEV).manual_seed(tq * 7 + w)
    n = n_chunks(tk, w)
    ins = [_mk(s, dtype, g) for s in ((b, tq, hq, d), (b, tk, hk, d), (b, tk, hk, d), (b, n * m, hk, d),
                                      (b, n * m, hk, d))]
    o = membank_attention(*ins, window=w)
    ref_in = [x.detach().float().requires_grad_() for x in ins]
    r = membank_reference(*ref_in, window=w)
    do = torch.randn(o.shape, device=DEV, generator=g).to(dtype)
    got = torch.autograd.grad(o, ins, do)
    want = torch.autograd.grad(r, ref_in, do.float())
    errs = {"out": rel_err(o, r)}
    for name, a, e in zip(("dq", "dk", "dv", "dbank_k", "dbank_v"), got, want, strict=True):
        errs[name] = rel_err(a, e)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    return {"shape": [b, tq, tk, hq, hk, d, w, m], "dtype": str(dtype).removeprefix("torch."),
            "max_rel_err": errs, "ok": max(errs.values()) <= tol, "tol": tol}


def train_bench(t, quick, w=1024, m=64, hq=16, hk=2, d=128, b=1):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    dtype = torch.bfloat16
    g = torch.Generator(device=DEV).manual_seed(t)
    n = n_chunks(t, w)
    q, k, v = _mk((b, t, hq, d), dtype, g), _mk((b, t, hk, d), dtype, g), _mk((b, t, hk, d), dtype, g)
    bk, bv = _mk((b, n * m, hk, d), dtype, g), _mk((b, n * m, hk, d), dtype, g)
    pool = _mk((hk, m, d), dtype, g)
    decay = torch.rand(hk, m, device=DEV, generator=g)
    init = torch.zeros(b, hk, m, d, device=DEV, dtype=dtype)
    do = torch.randn(b, t, hq, d, device=DEV, generator=g).to(dtype)
    row = {"T": t, "B": b, "Hq": hq, "Hk": hk, "D": d, "W": w, "M": m, "dtype": "bfloat16"}

    def op_fwd():
        with torch.no_grad():
            membank_attention(q, k, v, bk, bv, window=w)

    def op_fb():
        o = membank_attention(q, k, v, bk, bv, window=w)
        torch.autograd.grad(o, (q, k, v, bk, bv), do)

    def layer_fb():  # compressor + scan + op (what a MemBankMixer layer adds to its projections)
        u_k, u_v = compress_blocks(k, v, pool, w)
        s_k, s_v = bank_scan(init, init, u_k, u_v, decay, n)
        o = membank_attention(q, k, v, chunk_major(s_k), chunk_major(s_v), window=w)
        torch.autograd.grad(o, (q, k, v, pool), do)

    row["membank_fwd_ms"] = bench(op_fwd, quick)
    row["membank_fwd_bwd_ms"] = bench(op_fb, quick)
    def layer_loop_fb():  # the same with the sequential scan (one small op chain per chunk)
        u_k, u_v = compress_blocks(k, v, pool, w)
        s_k, s_v = bank_scan_loop(init, init, u_k, u_v, decay, n)
        o = membank_attention(q, k, v, chunk_major(s_k), chunk_major(s_v), window=w)
        torch.autograd.grad(o, (q, k, v, pool), do)

    row["membank_layer_fwd_bwd_ms"] = bench(layer_fb, quick)
    row["membank_layer_loopscan_fwd_bwd_ms"] = bench(layer_loop_fb, quick)
    if DEV == "cuda":
        qs = q.detach().transpose(1, 2).contiguous().requires_grad_()
        ks = k.detach().repeat_interleave(hq // hk, 2).transpose(1, 2).contiguous().requires_grad_()
        vs = v.detach().repeat_interleave(hq // hk, 2).transpose(1, 2).contiguous().requires_grad_()
        dos = do.transpose(1, 2).contiguous()

        def sd_fwd():
            with torch.no_grad(), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True)

        def sd_fb():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
            torch.autograd.grad(o, (qs, ks, vs), dos)

        row["sdpa_flash_causal_fwd_ms"] = bench(sd_fwd, quick)
        row["sdpa_flash_causal_fwd_bwd_ms"] = bench(sd_fb, quick)
    fl = membank_flops(b, t, t, hq, d, w, m)
    row["membank_fwd_tflops"] = fl / row["membank_fwd_ms"] / 1e9
    return row


def _model(mixer, seq, d_model, n_heads, n_kv, layers):
    spec = {"model": {"vocab": 256, "d_model": d_model, "n_heads": n_heads, "n_kv_heads": n_kv,
                      "n_layers": layers, "max_seq": seq + 1024, "dtype": "bfloat16" if DEV == "cuda" else "float32",
                      "backend": "triton"},
            "block": {"mixer": mixer}}
    torch.manual_seed(0)
    return build(spec, training=False, device=DEV).eval()


def _cache_bytes(cache):
    return sum(t.numel() * t.element_size() for lc in cache.layers for t in (lc.k, lc.v) if t is not None)


@torch.no_grad()
def decode_bench(mixer, t, steps, quick, d_model=1024, n_heads=8, n_kv=2, layers=2):
    m = _model(mixer, t, d_model, n_heads, n_kv, layers)
    g = torch.Generator(device=DEV).manual_seed(t)
    tokens = torch.randint(0, 256, (1, t + steps), device=DEV, generator=g)
    cache = make_cache(m, None)
    prefill(m, tokens[:, :t], cache)
    sync()
    if DEV == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        step(m, tokens[:, t + i:t + i + 1], cache)
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    warm = times[min(5, len(times) - 1):]
    row = {"T": t, "mixer": mixer["type"], "step_ms_median": statistics.median(warm),
           "step_ms_min": min(warm), "cache_bytes": _cache_bytes(cache), "cache_tokens_per_layer_head":
           cache.layers[0].size}
    if DEV == "cuda":
        row["max_memory_allocated"] = torch.cuda.max_memory_allocated()
        row["memory_allocated_after_prefill"] = base
    del m, cache
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return row


@torch.no_grad()
def op_step_bench(t, quick, w=1024, m=64, hq=16, hk=2, d=128):
    """The kernel alone on a decode step: one query over [bank (M) | window (W keys)]; T only
    sets the position (the op never sees more than W keys)."""
    dtype = torch.bfloat16 if DEV == "cuda" else torch.float32
    g = torch.Generator(device=DEV).manual_seed(t)
    q = torch.randn(1, 1, hq, d, device=DEV, generator=g).to(dtype)
    kw = torch.randn(1, w, hk, d, device=DEV, generator=g).to(dtype)
    bk = torch.randn(1, m, hk, d, device=DEV, generator=g).to(dtype)
    return {"T": t, "op_step_ms": bench(lambda: membank_attention(q, kw, kw, bk, bk, window=w), quick)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=330.0, help="seconds; later sections are skipped past it")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    t_start = time.time()
    out_dir = os.environ.get("OUT", "bench-out")
    os.makedirs(out_dir, exist_ok=True)
    res = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (TRITON_INTERPRET=1)",
           "torch": torch.__version__, "triton": triton.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "checks": [], "train": [],
           "decode": [], "op_step": [], "skipped": []}

    def left():
        return args.budget - (time.time() - t_start)

    def save():
        with open(os.path.join(out_dir, "membank_gpu.json"), "w") as f:
            json.dump(res, f, indent=1)

    # 1. correctness (first candidate tile per kernel: no autotuning, to keep compile time down)
    from blockzoo.kernels.triton import attention as core
    core.AUTOTUNE = False
    if args.quick:
        shapes = [(1, 40, 40, 2, 1, 16, 16, 3, torch.float32), (1, 1, 12, 2, 1, 16, 12, 4, torch.float32)]
    else:
        shapes = [(2, 1000, 1000, 8, 2, 64, 100, 7, torch.bfloat16), (2, 1000, 1000, 8, 2, 64, 100, 7, torch.float32),
                  (1, 777, 777, 4, 1, 128, 256, 16, torch.bfloat16), (1, 3000, 3000, 4, 2, 128, 512, 64, torch.bfloat16),
                  (1, 2049, 2049, 6, 2, 40, 300, 5, torch.float32), (1, 1, 1024, 16, 2, 128, 1024, 64, torch.bfloat16),
                  (1, 700, 1500, 2, 2, 64, 128, 3, torch.bfloat16)]
        shapes = [s for s in shapes if s[1] != 777]
    for s in shapes:
        try:
            res["checks"].append(check(*s))
        except Exception:
            res["checks"].append({"shape": list(s[:-1]), "error": traceback.format_exc()})
        print("check", res["checks"][-1], flush=True)
    save()

    # 2. training (autotuned: forget the untuned choices made by the checks)
    core.AUTOTUNE = True
    for key in [k for k in core._TUNED if str(k[0]).startswith("membank")]:
        del core._TUNED[key]
    for t in ((256,) if args.quick else (8192, 32768)):
        if left() < 60:
            res["skipped"].append(f"train T={t} (budget)")
            continue
        try:
            kw = dict(w=64, m=8, hq=2, hk=1, d=16) if args.quick else {}
            res["train"].append(train_bench(t, args.quick, **kw))
        except Exception:
            res["train"].append({"T": t, "error": traceback.format_exc()})
        print("train", res["train"][-1], flush=True)
        save()

    # 3. decoding
    if args.quick:
        mb = {"type": "token.membank", "params": {"window": 16, "slots": 4}}
        dims = dict(d_model=64, n_heads=4, n_kv=2, layers=1)
        ts, steps, dense_ts = (40, 80), 3, (40,)
    else:
        mb = {"type": "token.membank", "params": {"window": 1024, "slots": 64}}
        dims = {}
        ts, steps, dense_ts = (4096, 8192, 16384, 32768, 65536), 40, (4096, 16384, 65536)
    for t in ts:
        if left() < 25:
            res["skipped"].append(f"decode membank T={t} (budget)")
            continue
        try:
            res["op_step"].append(op_step_bench(t, args.quick, **({"w": 16, "m": 4, "hq": 2, "hk": 1, "d": 16}
                                                                   if args.quick else {})))
            res["decode"].append(decode_bench(mb, t, steps, args.quick, **dims))
        except Exception:
            res["decode"].append({"T": t, "mixer": "token.membank", "error": traceback.format_exc()})
        print("decode", res["decode"][-1], flush=True)
        save()
    for t in dense_ts:
        if left() < 25:
            res["skipped"].append(f"decode dense T={t} (budget)")
            continue
        try:
            res["decode"].append(decode_bench({"type": "attention.dense"}, t, steps, args.quick, **dims))
        except Exception:
            res["decode"].append({"T": t, "mixer": "attention.dense", "error": traceback.format_exc()})
        print("decode", res["decode"][-1], flush=True)
        save()

    # 4. table
    print(f"\n## token.membank on {res['device']} (torch {res['torch']}, triton {res['triton']}, {res['date']})")
    print("\ncorrectness (max-normalised rel err vs fp32 reference, out and all 5 grads):")
    for c in res["checks"]:
        if "error" in c:
            print(f"  {c['shape']}: ERROR {c['error'].splitlines()[-1]}")
        else:
            print(f"  {c['shape']} {c['dtype']}: worst {max(c['max_rel_err'].values()):.2e} "
                  f"{'ok' if c['ok'] else 'FAIL'} (tol {c['tol']})")
    print("\n| T | membank fwd ms | membank f+b ms | layer f+b ms (with compressor) | same, sequential scan "
          "| flash causal fwd ms | flash causal f+b ms |")
    print("|---|---|---|---|---|---|---|")
    for r in res["train"]:
        if "error" in r:
            print(f"| {r['T']} | ERROR {r['error'].splitlines()[-1]} |")
            continue
        print(f"| {r['T']} | {r['membank_fwd_ms']:.3f} | {r['membank_fwd_bwd_ms']:.3f} | "
              f"{r['membank_layer_fwd_bwd_ms']:.3f} | {r['membank_layer_loopscan_fwd_bwd_ms']:.3f} | "
              f"{r.get('sdpa_flash_causal_fwd_ms', float('nan')):.3f} | "
              f"{r.get('sdpa_flash_causal_fwd_bwd_ms', float('nan')):.3f} |")
    print("\n| mixer | T | step ms (median) | op step ms | max_memory_allocated MiB | cache MiB | cache tokens/layer/head |")
    print("|---|---|---|---|---|---|---|")
    ops = {r["T"]: r["op_step_ms"] for r in res["op_step"]}
    for r in res["decode"]:
        if "error" in r:
            print(f"| {r['mixer']} | {r['T']} | ERROR {r['error'].splitlines()[-1]} |")
            continue
        op_ms = f"{ops[r['T']]:.4f}" if r["mixer"] == "token.membank" and r["T"] in ops else "-"
        mem = r.get("max_memory_allocated", float("nan")) / 2**20
        print(f"| {r['mixer']} | {r['T']} | {r['step_ms_median']:.3f} | {op_ms} | {mem:.1f} | "
              f"{r['cache_bytes'] / 2**20:.2f} | {r['cache_tokens_per_layer_head']} |")
    if res["skipped"]:
        print("skipped:", ", ".join(res["skipped"]))
    save()


if __name__ == "__main__":
    main()
