#!/usr/bin/env python3
"""Check, tune and time the Triton fused add+norm and activation kernels on one GPU.

Loads kernels/triton/norm.py and activations.py by file path (needs only torch and triton, so it
runs where blockzoo's other dependencies are missing). Steps, each printed as it goes:

1. correctness, compiled on the GPU, against float64 torch math (NaN-poisoned outputs);
2. device-to-device copy bandwidth of the same dtype and size (bytes read + written);
3. (--tune) a small sweep of launch configs per width, reporting the best against the default;
4. the table: add+norm forward / backward (GB/s, % of copy, ratio to torch eager and, with
   --compile, to torch.compile of the same eager code), then SwiGLU and GELU.

Times are triton.testing.do_bench medians. JSON goes to --out (default $OUT or .). The short
table is printed last. Example (device machine):

    python3 bench/triton_norm_tune.py --tune --sweep-widths 8192,16384 --sweep-what bwd \
        --compile 1024,4096,16384 --budget 200
    TRITON_INTERPRET=1 python bench/triton_norm_tune.py --smoke     # CPU: logic only, no timing
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import pathlib
import platform
import sys
import time
import traceback
from functools import partial

import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]


sys.path.insert(0, str(ROOT / "bench"))
from _bootstrap import ensure_blockzoo  # noqa: E402

ensure_blockzoo()
from blockzoo.kernels import _alloc  # noqa: E402
from blockzoo.kernels.triton import activations as act  # noqa: E402
from blockzoo.kernels.triton import norm  # noqa: E402

T0 = time.time()
ELEMS = 1 << 26          # elements per timed tensor (64M); --smoke makes it tiny
LOG: list[str] = []


def say(*a):
    s = " ".join(str(x) for x in a)
    LOG.append(s)
    print(s, flush=True)


def elapsed() -> float:
    return time.time() - T0


# ======================================================================================
# timing
# ======================================================================================
def bench_ms(fn, dev) -> float:
    if dev.type == "cuda":
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=5, rep=25, return_mode="median"))
    fn()
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def gbs(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


# ======================================================================================
# references
# ======================================================================================
def ref_add_norm(x, d, w, b, eps, kind, h_dtype=None):
    """float64; the residual rounded to the input dtype (straight-through), as it is stored."""
    h = x if d is None else x + d
    if d is not None and h_dtype is not None:
        h = h + (h.detach().to(h_dtype).to(h.dtype) - h.detach())
    if kind == "layernorm":
        mean = h.mean(-1, keepdim=True)
        y = (h - mean) / torch.sqrt(((h - mean) ** 2).mean(-1, keepdim=True) + eps)
    else:
        y = h / torch.sqrt((h * h).mean(-1, keepdim=True) + eps)
    if w is not None:
        y = y * w
    if b is not None:
        y = y + b
    return y, h


def eager_add_norm(x, d, w, b, eps, kind):
    """The torch baseline: eager add + F.layer_norm / F.rms_norm (+ bias)."""
    h = x if d is None else x + d
    N = x.shape[-1]
    if kind == "layernorm":
        y = F.layer_norm(h, (N,), w, b, eps)
    else:
        y = F.rms_norm(h, (N,), w, eps)
        if b is not None:
            y = y + b
    return y, h


def _ours_add_norm(x, d, w, b, eps, kind):
    return norm.add_norm(x, d, w, b, eps, kind)


def _eager_swiglu(gu):
    hd = gu.shape[-1] // 2
    return F.silu(gu[..., :hd]) * gu[..., hd:]


def maxnorm_err(a, e) -> float:
    a = a.detach().double()
    e = e.detach().double()
    if bool(torch.isnan(a).any()):
        return float("nan")
    s = float(e.abs().max()) if e.numel() else 0.0
    d = float((a - e).abs().max()) if e.numel() else 0.0
    return d / s if s > 0 else d


TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_add_norm(dev, M, N, dtype, kind, has_d, has_w, has_b, cfg_f=None, cfg_b=None):
    """Returns the worst max-normalised error over y, h, dx, ddelta, dw, db (fresh inputs)."""
    g = torch.Generator(device=dev)
    g.manual_seed(int.from_bytes(os.urandom(6), "little"))

    def rn(*shape, scale=1.0, off=0.0):
        return (torch.randn(*shape, generator=g, device=dev) * scale + off).to(dtype)

    x = rn(M, N)
    d = rn(M, N) if has_d else None
    w = rn(N, scale=0.5, off=1.0) if has_w else None
    b = rn(N, scale=0.5) if has_b else None
    dy, dh = rn(M, N), rn(M, N)
    r = [t.double().requires_grad_(True) if t is not None else None for t in (x, d, w, b)]
    yr, hr = ref_add_norm(*r, 1e-5, kind, h_dtype=dtype)
    outs = [yr] + ([hr] if has_d else [])
    gouts = [dy.double()] + ([dh.double()] if has_d else [])
    wrt = [t for t in r if t is not None]
    gr = torch.autograd.grad(outs, wrt, gouts)
    y, h, mean, rstd = norm._fwd(x, d, w, b, 1e-5, kind, cfg=cfg_f)
    hs = h if has_d else x
    dx, dw, db = norm._bwd(dy, dh if has_d else None, hs, w, mean, rstd, kind,
                           has_w, has_b, cfg=cfg_b)
    errs = {"y": maxnorm_err(y, yr)}
    if has_d:
        errs["h"] = maxnorm_err(h, hr)
    got = [dx] + ([dx] if has_d else []) + ([dw] if has_w else []) + ([db] if has_b else [])
    names = ["dx"] + (["ddelta"] if has_d else []) + (["dw"] if has_w else []) + \
        (["db"] if has_b else [])
    for n, a, e in zip(names, got, gr, strict=True):
        errs[n] = maxnorm_err(a, e)
    return errs


def correctness(dev, big: bool, small: bool = False) -> list[dict]:
    _alloc._state.on = True
    rows = []
    cases = []
    widths = {"fp32": (63, 1000, 16384, 20000), "bf16": (1, 257, 4096, 65536)}
    if small:
        widths = {"fp32": (63, 1000), "bf16": (1, 257)}
    for kind in ("layernorm", "rmsnorm"):
        for dt in ("fp32", "bf16"):
            for N in widths[dt]:
                M = 37 if N <= 20000 else 5
                cases.append((M, N, dt, kind, True, True, kind == "layernorm"))
            cases.append((64, 257, dt, kind, False, True, False))
    cases.append((33, 768, "fp16", "layernorm", True, True, True))
    if big:
        for N in (256, 1024, 4096, 8192, 16384):
            cases.append(((1 << 26) // N, N, "bf16", "layernorm", True, True, True))
    for M, N, dt, kind, hd, hw, hb in cases:
        errs = check_add_norm(dev, M, N, DT[dt], kind, hd, hw, hb)
        worst = max(errs.values(), key=lambda v: (math.isnan(v), v))
        ok = not math.isnan(worst) and worst <= TOL[DT[dt]]
        rows.append(dict(op="add_norm", M=M, N=N, dtype=dt, kind=kind, delta=hd, weight=hw,
                         bias=hb, worst=worst, ok=ok, errs=errs))
        if not ok:
            say(f"  MISMATCH add_norm M={M} N={N} {dt} {kind} d={hd} w={hw} b={hb}: {errs}")
    # activations
    for dt in ("fp32", "bf16"):
        for shape in ((37, 2 * 63), (5, 2 * 4096), (3, 2 * 11008)):
            gu = torch.randn(shape, device=dev, dtype=DT[dt]) * 2
            r = gu.double().requires_grad_(True)
            hd = shape[-1] // 2
            outr = F.silu(r[..., :hd]) * r[..., hd:]
            do = torch.randn(outr.shape, device=dev, dtype=DT[dt])
            (gr,) = torch.autograd.grad(outr, r, do.double())
            out = act._swiglu_fwd(gu)
            dg = act._swiglu_bwd(do, gu)
            errs = {"out": maxnorm_err(out, outr), "dgu": maxnorm_err(dg, gr)}
            worst = max(errs.values(), key=lambda v: (math.isnan(v), v))
            ok = not math.isnan(worst) and worst <= TOL[DT[dt]]
            rows.append(dict(op="swiglu", shape=list(shape), dtype=dt, worst=worst, ok=ok))
            x = torch.randn(shape, device=dev, dtype=DT[dt]) * 3
            r = x.double().requires_grad_(True)
            outr = 0.5 * r * torch.special.erfc(-r / math.sqrt(2))
            do = torch.randn(shape, device=dev, dtype=DT[dt])
            (gr,) = torch.autograd.grad(outr, r, do.double())
            errs = {"out": maxnorm_err(act._gelu_fwd(x), outr),
                    "dx": maxnorm_err(act._gelu_bwd(do, x), gr)}
            worst = max(errs.values(), key=lambda v: (math.isnan(v), v))
            ok = not math.isnan(worst) and worst <= TOL[DT[dt]]
            rows.append(dict(op="gelu", shape=list(shape), dtype=dt, worst=worst, ok=ok))
            if not ok:
                say(f"  MISMATCH activations {shape} {dt}: {errs}")
    _alloc._state.on = False
    return rows


# ======================================================================================
# add_norm timing
# ======================================================================================
POOL: torch.Tensor | None = None   # random numbers drawn once, before any graph capture


def pool_randn(shape, dtype, k: int, scale=1.0, off=0.0) -> torch.Tensor:
    """Random-valued tensor cut from POOL at a k-dependent offset (no RNG call: a failed CUDA
    graph capture can leave the CUDA generator unusable)."""
    n = math.prod(shape)
    start = (k * 7919 * 1031 + 12345) % (POOL.numel() - n + 1)
    return (POOL[start:start + n].view(shape) * scale + off).to(dtype)


def make_inputs(dev, M, N, dtype, has_d, has_w, has_b, grad=True):
    x = pool_randn((M, N), dtype, 1)
    d = pool_randn((M, N), dtype, 2) if has_d else None
    w = pool_randn((N,), dtype, 3, scale=0.1, off=1.0) if has_w else None
    b = pool_randn((N,), dtype, 4, scale=0.1) if has_b else None
    if grad:
        for t in (x, d, w, b):
            if t is not None:
                t.requires_grad_(True)
    return x, d, w, b, pool_randn((M, N), dtype, 5), pool_randn((M, N), dtype, 6)


def graph_ms(fn) -> float:
    from triton.testing import do_bench_cudagraph
    return float(do_bench_cudagraph(fn, rep=10, return_mode="median"))


def _fwd_call(fn, x, d, w, b):
    fn(x, d, w, b)


def _fb_call(fn, x, d, w, b, dy, dh):
    y, h = fn(x, d, w, b)
    ins = [t for t in (x, d, w, b) if t is not None]
    outs, gouts = ([y, h], [dy, dh]) if d is not None else ([y], [dy])
    torch.autograd.grad(outs, ins, gouts)


GRAPHS_OK = True


def time_train(dev, fn, x, d, w, b, dy, dh):
    """(forward ms, backward ms, method). Forward in training mode and forward+backward through
    autograd, each replayed from a CUDA graph (GPU time without Python/launch overhead);
    backward = difference. Falls back to do_bench on eager launches if capture fails (and stops
    trying graphs for the rest of the run)."""
    global GRAPHS_OK
    # fresh leaves sharing storage: no autograd node made outside the capture stream stays alive
    x, d, w, b = (t.detach().requires_grad_(True) if t is not None else None for t in (x, d, w, b))
    gc.collect()
    if dev.type == "cuda" and GRAPHS_OK:
        try:
            t_f = graph_ms(partial(_fwd_call, fn, x, d, w, b))
            t_fb = graph_ms(partial(_fb_call, fn, x, d, w, b, dy, dh))
            return t_f, t_fb - t_f, "graph"
        except Exception as e:
            GRAPHS_OK = False
            say("  CUDA graph capture failed; eager-launch timing from here on:", repr(e)[:300])
            torch.cuda.synchronize()
    ins = [t for t in (x, d, w, b) if t is not None]
    t_f = bench_ms(partial(fn, x, d, w, b), dev)
    y, h = fn(x, d, w, b)
    outs, gouts = ([y, h], [dy, dh]) if d is not None else ([y], [dy])
    t_b = bench_ms(partial(torch.autograd.grad, outs, ins, gouts, retain_graph=True), dev)
    return t_f, t_b, "launch"


def kernel_ms(dev, kind, x, d, w, b, dy, dh):
    """Our launchers alone (no autograd), do_bench with L2 flush: (fwd ms, bwd ms)."""
    xd, dd, wd, bd = (t.detach() if t is not None else None for t in (x, d, w, b))
    y, h, mean, rstd = norm._fwd(xd, dd, wd, bd, 1e-5, kind)
    hs = h if dd is not None else xd
    kf = bench_ms(partial(norm._fwd, xd, dd, wd, bd, 1e-5, kind), dev)
    kb = bench_ms(partial(norm._bwd, dy, dh if dd is not None else None, hs, wd, mean, rstd, kind,
                          wd is not None, bd is not None), dev)
    return kf, kb


def sweep(dev, widths, copy_bw, budget, what=("fwd", "bwd")) -> list[dict]:
    """Launch-config sweep for bf16 layernorm with delta, weight and bias (raw launchers)."""
    out = []
    dtype = torch.bfloat16
    for N in widths:
        if elapsed() > budget:
            say(f"  sweep: time budget reached before N={N}")
            break
        M = ELEMS // N
        x, d, w, b, dy, dh = make_inputs(dev, M, N, dtype, True, True, True, grad=False)
        nb_f = 4 * M * N * 2
        nb_b = 4 * M * N * 2
        fdef = norm.fwd_config(M, N, 2)
        bdef = norm.bwd_config(M, N, 2)
        bn = triton_next_pow2(N)
        fcands = [dict(fdef)] if "fwd" in what else []
        warps = (4, 8, 16, 32) if bn >= 8192 else (4, 8, 16)
        for bm in sorted({fdef["BLOCK_M"], fdef["BLOCK_M"] * 2}) if "fwd" in what else []:
            for nw in warps:
                per = bm * bn // (32 * nw)  # elements per thread
                if bn <= 16384 and 8 <= per <= 64:
                    fcands.append(dict(BLOCK_M=bm, BLOCK_N=bn, LOOPED=False, num_warps=nw))
        if N >= 16384 and "fwd" in what:
            fcands += [dict(BLOCK_M=1, BLOCK_N=4096, LOOPED=True, num_warps=8),
                       dict(BLOCK_M=1, BLOCK_N=8192, LOOPED=True, num_warps=16)]
        bcands = [dict(bdef)] if "bwd" in what else []
        if "bwd" in what and bn <= 16384:
            bm0 = max(1, 4096 // bn)
            for bm in sorted({max(1, bm0 // 2), bm0}):
                for nw in warps:
                    per = bm * bn // (32 * nw)
                    if 8 <= per <= 32:
                        for c in (1, 2, 4):
                            bcands.append(dict(BLOCK_M=bm, BLOCK_N=bn, SPLIT=False, num_warps=nw,
                                               ctas_per_sm=c))
        if "bwd" in what and N >= 8192:
            for bm, sbn, nw in ((4, 1024, 8), (2, 2048, 8), (8, 512, 8), (4, 1024, 4)):
                for c in (2, 4):
                    bcands.append(dict(BLOCK_M=bm, BLOCK_N=sbn, SPLIT=True, num_warps=nw,
                                       ctas_per_sm=c, STATS_BLOCK_N=min(4096, bn),
                                       stats_warps=8))
            bcands.append(dict(BLOCK_M=4, BLOCK_N=1024, SPLIT=True, num_warps=8, ctas_per_sm=2,
                               STATS_BLOCK_N=min(8192, bn), stats_warps=16))
        seen = set()
        res_f, res_b = [], []
        y0, h0, mean0, rstd0 = norm._fwd(x, d, w, b, 1e-5, "layernorm")
        dx0, dw0, db0 = norm._bwd(dy, dh, h0, w, mean0, rstd0, "layernorm", True, True)
        for cf in fcands:
            key = ("f",) + tuple(sorted(cf.items()))
            if key in seen or elapsed() > budget:
                continue
            seen.add(key)
            try:
                y, h, _, _ = norm._fwd(x, d, w, b, 1e-5, "layernorm", cfg=cf)
                err = max(maxnorm_err(y, y0), maxnorm_err(h, h0))
                ms = bench_ms(partial(norm._fwd, x, d, w, b, 1e-5, "layernorm", cfg=cf), dev)
                res_f.append(dict(cfg=cf, ms=ms, GBs=gbs(nb_f, ms), err=err))
            except Exception as e:  # a config the compiler rejects is skipped, not fatal
                res_f.append(dict(cfg=cf, error=repr(e)[:200]))
        for cb in bcands:
            key = ("b",) + tuple(sorted(cb.items()))
            if key in seen or elapsed() > budget:
                continue
            seen.add(key)
            try:
                dx, dw, db = norm._bwd(dy, dh, h0, w, mean0, rstd0, "layernorm", True, True, cfg=cb)
                err = max(maxnorm_err(dx, dx0), maxnorm_err(dw, dw0), maxnorm_err(db, db0))
                ms = bench_ms(partial(norm._bwd, dy, dh, h0, w, mean0, rstd0, "layernorm", True,
                                      True, cfg=cb), dev)
                res_b.append(dict(cfg=cb, ms=ms, GBs=gbs(nb_b, ms), err=err))
            except Exception as e:
                res_b.append(dict(cfg=cb, error=repr(e)[:200]))
        for tag, res in (("fwd", res_f), ("bwd", res_b)):
            ok = [r for r in res if "ms" in r and r["err"] < 2e-2]
            if not ok:
                continue
            best = min(ok, key=lambda r: r["ms"])
            dflt = ok[0] if res and "ms" in res[0] else None
            say(f"  sweep {tag} N={N:5d}: default {dflt['GBs']:.0f} GB/s {dflt['cfg']}" if dflt
                else f"  sweep {tag} N={N}: default failed")
            say(f"  sweep {tag} N={N:5d}: best    {best['GBs']:.0f} GB/s "
                f"({best['GBs'] / copy_bw * 100:.0f}% copy) {best['cfg']}")
            bad = [r for r in res if "ms" in r and r["err"] >= 2e-2]
            for r in bad:
                say(f"  sweep {tag} N={N}: WRONG err={r['err']:.2e} {r['cfg']}")
        out.append(dict(N=N, M=M, fwd=res_f, bwd=res_b))
    return out


def triton_next_pow2(n: int) -> int:
    return 1 << (max(1, n) - 1).bit_length()


def _table_row(dev, kind, hd, hw, hb, dt, N, copy_bw, with_compile):
    dtype = DT[dt]
    M = ELEMS // N
    es = torch.tensor([], dtype=dtype).element_size()
    x, d, w, b, dy, dh = make_inputs(dev, M, N, dtype, hd, hw, hb)
    nb_f = (4 if hd else 2) * M * N * es      # x, delta read; y, h written (no delta: x, y)
    nb_b = (4 if hd else 3) * M * N * es      # dy, dh, h read; dx written (no delta: dy, x, dx)
    ours = partial(_ours_add_norm, eps=1e-5, kind=kind)
    eager = partial(eager_add_norm, eps=1e-5, kind=kind)
    tf, tb, how = time_train(dev, ours, x, d, w, b, dy, dh)
    ef, eb, how_e = time_train(dev, eager, x, d, w, b, dy, dh)
    kf, kb = kernel_ms(dev, kind, x, d, w, b, dy, dh)
    row = dict(kind=kind, delta=hd, weight=hw, bias=hb, dtype=dt, M=M, N=N,
               timing=how, eager_timing=how_e,
               fwd_ms=tf, bwd_ms=tb, eager_fwd_ms=ef, eager_bwd_ms=eb,
               kernel_fwd_ms=kf, kernel_bwd_ms=kb,
               kernel_fwd_GBs=gbs(nb_f, kf), kernel_bwd_GBs=gbs(nb_b, kb),
               fwd_GBs=gbs(nb_f, tf), bwd_GBs=gbs(nb_b, tb),
               fwd_pct_copy=gbs(nb_f, tf) / copy_bw[dt] * 100,
               bwd_pct_copy=gbs(nb_b, tb) / copy_bw[dt] * 100,
               fwd_vs_eager=ef / tf, bwd_vs_eager=eb / tb)
    if with_compile:
        try:
            t = time.time()
            cfn = torch.compile(eager, dynamic=False)
            _fb_call(cfn, x, d, w, b, dy, dh)     # compile forward and backward
            _fb_call(cfn, x, d, w, b, dy, dh)
            row["compile_s"] = time.time() - t
            cf, cb, _ = time_train(dev, cfn, x, d, w, b, dy, dh)
            row.update(compiled_fwd_ms=cf, compiled_bwd_ms=cb, fwd_vs_compiled=cf / tf,
                       bwd_vs_compiled=cb / tb)
        except Exception as e:
            row["compile_error"] = repr(e)[:300]
    say(f"  {kind:9s} d={int(hd)} {dt} {M:6d}x{N:<5d} [{how}] "
        f"fwd {row['fwd_GBs']:5.0f} GB/s "
        f"{row['fwd_pct_copy']:3.0f}% x{row['fwd_vs_eager']:.2f} eager | bwd "
        f"{row['bwd_GBs']:5.0f} GB/s {row['bwd_pct_copy']:3.0f}% "
        f"x{row['bwd_vs_eager']:.2f} eager | kernels {row['kernel_fwd_GBs']:.0f} / "
        f"{row['kernel_bwd_GBs']:.0f} GB/s"
        + (f" | vs compiled fwd x{row['fwd_vs_compiled']:.2f} bwd "
           f"x{row['bwd_vs_compiled']:.2f}" if "fwd_vs_compiled" in row else ""))
    return row


def table_add_norm(dev, widths, dtypes, copy_bw, compile_widths, budget, compile_budget):
    rows = []
    configs = [("layernorm", True, True, True), ("rmsnorm", True, True, False),
               ("layernorm", False, True, True)]
    for kind, hd, hw, hb in configs:
        for dt in dtypes:
            if not hd and dt != "bf16":
                continue
            for N in widths:
                if elapsed() > budget:
                    say(f"  table: time budget reached, skipping {kind} d={hd} {dt} N={N}")
                    continue
                with_compile = (N in compile_widths and dt == "bf16" and hd
                                and elapsed() < compile_budget)
                try:
                    rows.append(_table_row(dev, kind, hd, hw, hb, dt, N, copy_bw, with_compile))
                except Exception as e:  # one failing case must not lose the rest of the table
                    say(f"  {kind} d={int(hd)} {dt} N={N}: FAILED {e!r}"[:400])
    return rows


def table_act(dev, copy_bw, budget):
    rows = []
    dt = "bf16"
    dtype = DT[dt]
    for hd in (4096, 11008):
        if elapsed() > budget:
            break
        M = ELEMS // hd
        gu = pool_randn((M, 2 * hd), dtype, 7)
        do = pool_randn((M, hd), dtype, 8)
        n = M * hd
        tf = bench_ms(partial(act._swiglu_fwd, gu), dev)
        tb = bench_ms(partial(act._swiglu_bwd, do, gu), dev)
        ef = bench_ms(partial(_eager_swiglu, gu), dev)
        gr = gu.detach().requires_grad_(True)
        o = F.silu(gr[:, :hd]) * gr[:, hd:]
        eb = bench_ms(partial(torch.autograd.grad, o, gr, do, retain_graph=True), dev)
        rows.append(dict(op="swiglu", dtype=dt, M=M, h=hd, fwd_GBs=gbs(3 * n * 2, tf),
                         bwd_GBs=gbs(5 * n * 2, tb), fwd_pct_copy=gbs(3 * n * 2, tf) / copy_bw[dt] * 100,
                         bwd_pct_copy=gbs(5 * n * 2, tb) / copy_bw[dt] * 100,
                         fwd_vs_eager=ef / tf, bwd_vs_eager=eb / tb))
    if elapsed() < budget:
        n = ELEMS
        x = pool_randn((n,), dtype, 9)
        dy = pool_randn((n,), dtype, 10)
        tf = bench_ms(partial(act._gelu_fwd, x), dev)
        tb = bench_ms(partial(act._gelu_bwd, dy, x), dev)
        ef = bench_ms(partial(F.gelu, x), dev)
        xr = x.detach().requires_grad_(True)
        o = F.gelu(xr)
        eb = bench_ms(partial(torch.autograd.grad, o, xr, dy, retain_graph=True), dev)
        rows.append(dict(op="gelu", dtype=dt, M=n, h=1, fwd_GBs=gbs(2 * n * 2, tf),
                         bwd_GBs=gbs(3 * n * 2, tb), fwd_pct_copy=gbs(2 * n * 2, tf) / copy_bw[dt] * 100,
                         bwd_pct_copy=gbs(3 * n * 2, tb) / copy_bw[dt] * 100,
                         fwd_vs_eager=ef / tf, bwd_vs_eager=eb / tb))
    for r in rows:
        say(f"  {r['op']:6s} {r['dtype']} {r['M']}x{r['h']}: fwd {r['fwd_GBs']:.0f} GB/s "
            f"{r['fwd_pct_copy']:.0f}% x{r['fwd_vs_eager']:.2f} eager | bwd {r['bwd_GBs']:.0f} GB/s "
            f"{r['bwd_pct_copy']:.0f}% x{r['bwd_vs_eager']:.2f} eager")
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--compile", default="", help="widths to also time torch.compile at (bf16)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, logic only (CPU ok)")
    ap.add_argument("--budget", type=float, default=170.0, help="seconds before optional parts stop")
    ap.add_argument("--sweep-until", type=float, default=None,
                    help="elapsed seconds after which the sweep stops (default 0.6 * budget)")
    ap.add_argument("--sweep-widths", default="", help="widths to sweep (default: --widths)")
    ap.add_argument("--sweep-what", default="fwd,bwd")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--widths", default="256,1024,4096,8192,16384")
    ap.add_argument("--dtypes", default="bf16,fp32")
    args = ap.parse_args()

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    import triton
    info = dict(date=time.strftime("%Y-%m-%d"), torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(),
                device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (interpreter)")
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(sms=p.multi_processor_count, mem_GiB=round(p.total_memory / 2**30, 1))
    say("info", json.dumps(info))
    result = dict(info=info)
    widths = [int(w) for w in args.widths.split(",")]
    dtypes = args.dtypes.split(",")
    if args.smoke:
        widths = [63, 300]

    def save():
        pathlib.Path(args.out).mkdir(parents=True, exist_ok=True)
        with open(pathlib.Path(args.out) / "triton_norm_bench.json", "w") as f:
            json.dump(result, f, indent=1, default=str)

    # 1. correctness
    t = time.time()
    rows = correctness(dev, big=not args.smoke and dev.type == "cuda", small=args.smoke)
    bad = [r for r in rows if not r["ok"]]
    worst = {dt: max(r["worst"] for r in rows if r["op"] == "add_norm" and r["dtype"] == dt)
             for dt in ("fp32", "bf16")}
    say(f"correctness: {len(rows) - len(bad)}/{len(rows)} cases ok ({time.time() - t:.0f}s); "
        f"worst add_norm fp32 {worst['fp32']:.2e}, bf16 {worst['bf16']:.2e}")
    result["correctness"] = rows
    save()

    if args.smoke:  # logic only: tiny sizes, CPU timings are meaningless
        global ELEMS
        ELEMS = 4096
        for N in widths:
            errs = check_add_norm(dev, 7, N, torch.float32, "layernorm", True, True, True,
                                  cfg_f=dict(BLOCK_M=1, BLOCK_N=32, LOOPED=True, num_warps=4),
                                  cfg_b=dict(BLOCK_M=1, BLOCK_N=32, LOOPED=True, num_warps=4,
                                             ctas_per_sm=2))
            say("smoke looped", N, errs)

    # random inputs for all timings, drawn once before any CUDA graph capture
    global POOL
    POOL = torch.randn(2 * ELEMS + (1 << 20), device=dev)

    # 2. copy bandwidth
    copy_bw = {}
    for dt in ("bf16", "fp32"):
        n = ELEMS
        src = pool_randn((n,), DT[dt], 11)
        dst = torch.empty_like(src)
        ms = bench_ms(partial(dst.copy_, src), dev)
        copy_bw[dt] = gbs(2 * n * src.element_size(), ms)
    say("copy GB/s (64M elements, read+write):", {k: round(v) for k, v in copy_bw.items()})
    result["copy_GBs"] = copy_bw
    save()

    # 3. sweep
    if args.tune:
        sw = [int(w) for w in args.sweep_widths.split(",")] if args.sweep_widths else widths
        result["sweep"] = sweep(dev, sw, copy_bw["bf16"], budget=args.sweep_until or args.budget * 0.6,
                                what=args.sweep_what.split(","))
        save()

    # 4. tables
    cw = [int(w) for w in args.compile.split(",") if w]
    result["add_norm"] = table_add_norm(dev, widths, dtypes, copy_bw, cw,
                                        budget=args.budget * 0.9,
                                        compile_budget=args.budget * 0.75)
    save()
    result["activations"] = table_act(dev, copy_bw, budget=args.budget)
    save()

    # short table last
    say("")
    say(f"{info['device']}  torch {info['torch']}  triton {info['triton']}  {info['date']}  "
        f"copy bf16 {copy_bw['bf16']:.0f} GB/s, fp32 {copy_bw['fp32']:.0f} GB/s")
    say("GB/s count bytes read + written once; times: CUDA-graph replay of the autograd API "
        "(bwd = fwd+bwd - fwd); 'kernels': our launchers alone, do_bench with L2 flush")
    say("| op | dtype | M x N | fwd GB/s | fwd %copy | fwd x eager | bwd GB/s | bwd %copy | "
        "bwd x eager | fwd/bwd x compile | kernels fwd/bwd GB/s |")
    for r in result["add_norm"]:
        name = f"{'LN' if r['kind'] == 'layernorm' else 'RMS'}{'+add' if r['delta'] else ''}"
        comp = (f"{r['fwd_vs_compiled']:.2f} / {r['bwd_vs_compiled']:.2f}"
                if "fwd_vs_compiled" in r else "-")
        say(f"| {name} | {r['dtype']} | {r['M']}x{r['N']} | {r['fwd_GBs']:.0f} | "
            f"{r['fwd_pct_copy']:.0f} | {r['fwd_vs_eager']:.2f} | {r['bwd_GBs']:.0f} | "
            f"{r['bwd_pct_copy']:.0f} | {r['bwd_vs_eager']:.2f} | {comp} | "
            f"{r['kernel_fwd_GBs']:.0f} / {r['kernel_bwd_GBs']:.0f} |")
    for r in result["activations"]:
        say(f"| {r['op']} | {r['dtype']} | {r['M']}x{r['h']} | {r['fwd_GBs']:.0f} | "
            f"{r['fwd_pct_copy']:.0f} | {r['fwd_vs_eager']:.2f} | {r['bwd_GBs']:.0f} | "
            f"{r['bwd_pct_copy']:.0f} | {r['bwd_vs_eager']:.2f} | - | - |")
    say(f"total {elapsed():.0f}s")
    result["log"] = LOG
    save()


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        sys.exit(1)
