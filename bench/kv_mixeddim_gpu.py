#!/usr/bin/env python3
"""token.mixeddim on one GPU (about 60-90 s, mostly ~20 Triton compiles): decode attention over the packed
per-width pools against our split-K decode over the full cache and over a token-evicted cache of
the same bytes (the removed first version, one program per row, is in docs/performance.md).

1. correctness first (the run stops if it fails): the Triton pooled decode (o and per-token
   scores) against the fp32 reference (zero-padded unpack + dense decode) on small odd shapes
   (T=37, D=40, GQA 3, Tq=2, bf16 and fp32; default splits, forced 3 splits (fp32: narrow tiles,
   bf16: full-width tiles), the one-program version) and on the big shape below (default and 16 splits);
2. at B=16, T=32768, Hq=32, Hk=8, D=128, bf16, Tq=1, budget 25% (sinks 4, recent 64; token
   importance = random skewed scores, so the allocator spreads tokens over the levels):
   - ``full``: ``kv_decode.decode_attention`` over the full cache [B, Hk, T, D];
   - ``evict``: the same kernel over budget * T tokens (a token policy at the same bytes);
   - ``zeroed``: the same kernel over the tokens mixeddim keeps, at full width (the zeroed layout);
   - ``pooled`` / ``pooled+scores`` (scores from the split pass's logits, the default) /
     ``pooled+scores(keys)`` (scores recomputed from K): ``kv_mixeddim.pooled_decode`` (one level per program) at its
     defaults with the store's host layout (no device -> host copy), ``pooled_hostcopy`` the same
     without it (one copy per call, as a caller without ``PackedKV.host`` pays), plus the torch
     glue around it (query permutation, output unpermutation) as ``pooled_step``;
   - a sweep of forced splits per level (1 .. 8, against the byte-balanced default) and of the
     tile config ``(BLOCK_N, warps, stages, narrow)`` (o only), then ``+scores`` at the best;
   - bytes: the pools' real storage vs the full cache; the level histogram.

    python3 bench/kv_mixeddim_gpu.py --out DIR                  (GPU; JSON to DIR/kv_mixeddim_gpu.json)
    TRITON_INTERPRET=1 python3 bench/kv_mixeddim_gpu.py --smoke  (CPU, tiny shapes)
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

from blockzoo.kernels.triton import kv_decode as kd  # noqa: E402
from blockzoo.kernels.triton import kv_mixeddim as km  # noqa: E402
from blockzoo.plugins.token.mixeddim import (  # noqa: E402
    PackedKV,
    decode_kernel,
    decode_reference,
    permute_queries,
    repack,
    unpermute_output,
)

CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
DEV = "cuda" if CUDA else "cpu"


def bench(fn, rep=40):
    if CUDA:
        return triton.testing.do_bench(fn, warmup=5, rep=rep, return_mode="median")
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def wall_ms(fn, reps):
    """Wall time per call of ``fn`` over ``reps`` calls (after one), the GPU synchronised at both
    ends (for code that copies to the host, where event timing would hide the host's part)."""
    fn()
    if CUDA:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if CUDA:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / reps


def make_inputs(B, Hk, Hq, T, D, dtype, seed=0, tq=1):
    """A cache's raw contents: k, v [B, Hk, T, D], positions, running scores, key and value channel
    ranks, and the step's queries [B, tq, Hq, D]."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    k = torch.randn(B, Hk, T, D, generator=g, device=DEV).to(dtype)
    v = torch.randn(B, Hk, T, D, generator=g, device=DEV).to(dtype)
    pos = torch.arange(T, device=DEV).expand(B, Hk, T).contiguous()
    acc = torch.rand(B, Hk, T, generator=g, device=DEV) ** 4
    kr = torch.argsort(torch.rand(B, Hk, D, generator=g, device=DEV), -1)
    vr = torch.argsort(torch.rand(B, Hk, D, generator=g, device=DEV), -1)
    q = torch.randn(B, tq, Hq, D, generator=g, device=DEV).to(dtype)
    return k, v, pos, acc, kr, vr, q


def make(B, Hk, Hq, T, D, levels, keep, dtype, seed=0, sinks=4, recent=64, tq=1):
    k, v, pos, acc, kr, vr, q = make_inputs(B, Hk, Hq, T, D, dtype, seed, tq)
    st = PackedKV.empty(B, Hk, D, levels, kr, vr, dtype, DEV)
    st = repack(st, k[:, :, :T - tq], v[:, :, :T - tq], pos[:, :, :T - tq], acc[:, :, :T - tq], T,
                keep, min(sinks, keep // 4), min(recent, keep // 4))
    return st, q, k, v


def rel_err(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6))


def check(st, q, k, v, tq, tol, fn=None, **kw):
    """Relative errors of the Triton pooled decode (``fn``: the split one through decode_kernel by
    default, else ``fn(q, qp, ...)`` with ``kw``) against the fp32 reference."""
    tk, tv = k[:, :, -tq:].contiguous(), v[:, :, -tq:].contiguous()
    if fn is None:
        o, sp, stl = decode_kernel("triton", q, st, tk, tv)
    else:
        qp = permute_queries(q, st.k_order, st.hk)
        o_n, o_r, sp, stl = fn(q, qp, st.kbuf, st.vbuf, st.tok_off, st.count, st.elem_base, st.step, tk, tv, **kw)
        o = o_n + unpermute_output(o_r, st.v_order, st.hk)
    ref = PackedKV(**{**st.__dict__, "kbuf": st.kbuf.float(), "vbuf": st.vbuf.float()})
    o0, sp0, st0 = decode_reference(q.float(), ref, tk.float(), tv.float())
    errs = {"o": rel_err(o, o0), "s_pool": rel_err(sp, sp0), "s_tail": rel_err(stl, st0)}
    ok = all(e < tol for e in errs.values())
    return errs, ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--levels", type=int, default=4)
    a = ap.parse_args()
    res = {"device": torch.cuda.get_device_name() if CUDA else "cpu (TRITON_INTERPRET)", "torch": torch.__version__,
           "triton": triton.__version__, "checks": {}}
    # 1. correctness
    small = [("T37-D40-gqa3-tq2", 2, 2, 6, 37, 40, 4, 12, 2, torch.float32, 1e-4),
             ("T37-D40-gqa3-tq2-bf16", 2, 2, 6, 37, 40, 4, 12, 2, torch.bfloat16, 2e-2)]
    # forced splits at the default tile config (no extra compile; fp32) and with full-width tiles
    # (bf16); few variants: every one is a Triton compile
    cfg_small = km.default_cfg(40, 6)
    variants = {torch.float32: [("-split3", km.pooled_decode, {"num_splits": 3})],
                torch.bfloat16: [("-split3-wide", km.pooled_decode, {"num_splits": 3, "cfg": (*cfg_small[:3], False)})]}
    for name, B, Hk, Hq, T, D, lv, keep, tq, dt, tol in small:
        st, q, k, v = make(B, Hk, Hq, T, D, lv, keep, dt, tq=tq, sinks=2, recent=3)
        for suffix, fn, kw in [("", None, {}), *variants[dt]]:
            errs, ok = check(st, q, k, v, tq, tol, fn, **kw)
            res["checks"][name + suffix] = {**errs, "ok": ok}
            if not ok:
                raise SystemExit(f"correctness failed: {name + suffix} {errs}")
    B, Hq, Hk, T, D = (2, 4, 2, 256, 32) if a.smoke else (16, 32, 8, 32768, 128)
    dt = torch.bfloat16
    keep = int(T * a.budget)
    st, q, k, v = make(B, Hk, Hq, T, D, a.levels, keep, dt)
    for name, fn, kw in (("big", None, {}), ("big-split16", km.pooled_decode, {"num_splits": 16}),
                         ("big-scores-from-keys", km.pooled_decode, {"scores_from": "keys"})):
        errs, ok = check(st, q, k, v, 1, 2e-2, fn, **kw)
        res["checks"][name] = {**errs, "ok": ok}
        if not ok:
            raise SystemExit(f"correctness failed at the big shape ({name}): {errs}")
    # the two scores paths at the big shape
    qp_ = permute_queries(q, st.k_order, Hk)
    tk_, tv_ = k[:, :, -1:].contiguous(), v[:, :, -1:].contiguous()
    outs = [km.pooled_decode(q, qp_, st.kbuf, st.vbuf, st.tok_off, st.count, st.elem_base, st.step, tk_, tv_,
                             scores_from=sf) for sf in ("keys", "logits")]
    # (informational: compiled, the two kernels' dots may round the last bits differently; each
    # path is checked against the fp32 reference above)
    res["scores_paths"] = {"bitwise_equal": all(torch.equal(x, y) for x, y in zip(*outs, strict=True)),
                           "max_rel_diff": max(rel_err(x, y) for x, y in zip(*outs, strict=True))}
    # 2. timings
    tk, tv = k[:, :, -1:].contiguous(), v[:, :, -1:].contiguous()
    lev_tok = st.count.sum(1).tolist()  # tokens held per level (the store has no slack: = its slots)
    n_kept = sum(lev_tok) // (B * Hk) + 1
    kept_k, kept_v = k[:, :, :keep].contiguous(), v[:, :, :keep].contiguous()
    zk, zv = k[:, :, :n_kept].contiguous(), v[:, :, :n_kept].contiguous()
    qp = permute_queries(q, st.k_order, Hk)

    def pooled(scores=False, layout=st.host, **kw):
        return lambda: km.pooled_decode(q, qp, st.kbuf, st.vbuf, st.tok_off, st.count, st.elem_base, st.step, tk,
                                        tv, None, scores, layout=layout, **kw)

    t = {
        "full": bench(lambda: kd.decode_attention(q, k, v)),
        "evict": bench(lambda: kd.decode_attention(q, kept_k, kept_v)),
        "zeroed": bench(lambda: kd.decode_attention(q, zk, zv)),
        "pooled": bench(pooled()),
        "pooled+scores": bench(pooled(True)),
        "pooled+scores(keys)": bench(pooled(True, scores_from="keys")),
        "pooled_hostcopy": bench(pooled(layout=None)),
        "pooled_step": bench(lambda: decode_kernel("triton", q, st, tk, tv, None, True)),
    }
    # sweep: forced splits per level at the default tile config, then tile configs (o only)
    R = B * Hk
    cfg0 = km.default_cfg(D, Hq // Hk)
    tgt = km.default_target(st.host[0], st.step, R, 1, D, cfg0[0], q.device)
    s0 = km.level_splits(st.host[0], st.step, R, tgt)
    sweep, conf = {}, {}
    for S in (None, 1, 2, 4, 8):
        key = f"S={S or 'default'} cfg={cfg0}"
        conf[key] = (S, cfg0)
        sweep[key] = bench(pooled(num_splits=S, cfg=cfg0))
    cfgs = [(32, 4, 3, True), (128, 4, 3, True), (64, 8, 3, True), (32, 8, 3, True), (64, 4, 3, False),
            (64, 4, 4, True), (128, 8, 3, True)]
    if not CUDA:
        cfgs = [(16, 1, 1, False)]
    for c in cfgs:
        conf[f"S=default cfg={c}"] = (None, c)
        try:
            sweep[f"S=default cfg={c}"] = bench(pooled(cfg=c))
        except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: record and go on
            sweep[f"S=default cfg={c}"] = float("nan")
            res.setdefault("sweep_errors", {})[str(c)] = f"{type(e).__name__}: {str(e)[:300]}"
    best = min((k_ for k_ in sweep if sweep[k_] == sweep[k_]), key=sweep.get)
    best_s, best_cfg = conf[best]
    t["best"] = sweep[best]
    t["best+scores"] = bench(pooled(True, num_splits=best_s, cfg=best_cfg))
    full_bytes = 2 * k.numel() * k.element_size()
    pool_bytes = st.kv_nbytes()
    res.update({
        "shape": {"B": B, "Hq": Hq, "Hk": Hk, "T": T, "D": D, "dtype": str(dt), "budget": a.budget,
                  "levels": a.levels},
        "ms": t,
        "sweep_ms": sweep,
        "default_level_splits": s0, "default_target": tgt, "default_cfg": cfg0, "best": best,
        "ratio_full_over_pooled": t["full"] / t["pooled"],
        "ratio_full_over_best": t["full"] / t["best"],
        "ratio_evict_over_pooled": t["evict"] / t["pooled"],
        "tokens_per_level": lev_tok,
        "tokens_kept_per_row": n_kept,
        "pool_bytes": pool_bytes, "full_bytes": full_bytes, "pool_over_full": pool_bytes / full_bytes,
        "pooled_GBps": pool_bytes / (t["pooled"] * 1e-3) / 1e9,
        "full_GBps": full_bytes / (t["full"] * 1e-3) / 1e9,
    })
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv_mixeddim_gpu.json").write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps({k_: v_ for k_, v_ in res.items() if k_ not in ("ms", "sweep_ms")}, default=str))
    # the short table, last
    print(f"\n{res['device']}, torch {res['torch']}, triton {res['triton']}; B={B} Hq={Hq} Hk={Hk} T={T} D={D} "
          f"bf16 budget={a.budget} levels={a.levels}; pools {pool_bytes / 1e6:.1f} MB = "
          f"{pool_bytes / full_bytes:.3f} of the full cache; default level splits {s0} cfg={cfg0}")
    print(f"{'kernel':<44} {'ms':>8} {'GB/s':>8} {'full/x':>7}")
    byts = {"full": full_bytes, "evict": 2 * kept_k.numel() * kept_k.element_size(),
            "zeroed": 2 * zk.numel() * zk.element_size()}
    rows = list(t.items()) + [(f"sweep {k_}", v_) for k_, v_ in sweep.items()]
    for name, ms in rows:
        nb = byts.get(name, pool_bytes)
        gbs = nb / (ms * 1e-3) / 1e9 if ms == ms else float("nan")
        print(f"{name:<44} {ms:8.4f} {gbs:8.0f} {t['full'] / ms:7.2f}")


if __name__ == "__main__":
    main()
