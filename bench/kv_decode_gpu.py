#!/usr/bin/env python3
"""KV-cache decode on one GPU: our split-K decode kernel on the full and on a 25% kept cache,
against SDPA and plain torch on the full cache, plus the H2O policy step (scores + selection +
compaction) as a share of a decode step; peak memory of each; achieved HBM bandwidth.

1. correctness of the compiled kernels against the fp32 reference (decode o / lse, token scores,
   top-k selection == the reference selector, Triton gather == torch gather), odd shapes;
2. at B=16, T=32768, D=128, bf16, one new query (Tq=1), for (Hq, Hk) = (32, 8) and (8, 8):
   - ours on the full cache (a sweep of split counts and tile configs, best kept) and on the kept
     cache of 25% (T=8192), ratio full / kept;
   - SDPA on the full cache (flash, efficient, cudnn, math: whichever runs; GQA via
     enable_gqa, else K/V expanded to Hq) and plain torch (bf16 matmul, fp32 softmax, matmul);
   - the H2O step at the 25% budget on a cache of 8193 tokens: token scores (our kernel),
     accumulate, select (top-k vs the reference's sort), compact k, v, pos, acc (Triton gather vs
     torch gather); total as % of our decode step on the kept cache;
   - the H2O policy step (issue 7), as a whole step ``kv_decode.decode_h2o`` (split pass, then one
     kernel that merges the splits, accumulates and picks) on a cache of keep + 1 = 8193 tokens
     (one leaves) minus the kept decode alone, both timed by CUDA graph (``do_bench_cudagraph``:
     no host launch overhead; each step streams 0.5 GB of K/V, so its policy data starts cold),
     at the chunk rule (``kv_decode.h2o_chunking``) and fixed (tokens per chunk, warps), with and
     without L2 hints; each variant is first checked on fresh copies: same o / acc / positions /
     K / V bits as ``decode_attention`` + ``h2o_step`` (the two-launch path), the torch selector's
     eviction on the accumulated scores, protected tokens kept, the cache's kept tokens distinct;
     evictions vs the fp32 reference (``plugins/token``);
   - torch.cuda.max_memory_allocated above the inputs for each, and GB/s of K+V read per second
     against a device copy measured in the same run.

3. unless SKIP_TESTS is set (and not --smoke): the compiled tests/test_kernel_kv_decode.py
   (``-k "triton or select"``, KTEST_TIMEOUT s, default 150); then the table.

    python3 bench/kv_decode_gpu.py --out DIR                 (GPU, everything)
    python3 bench/kv_decode_gpu.py --policy-only --out DIR   (GPU: H2O variants + compiled tests only)
    TRITON_INTERPRET=1 python3 bench/kv_decode_gpu.py --smoke [--policy-only]   (CPU, tiny shapes)
"""
from __future__ import annotations

import argparse
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

from blockzoo.kernels.triton import kv_decode as kd  # noqa: E402
from blockzoo.plugins.token.reference import compact as ref_compact  # noqa: E402
from blockzoo.plugins.token.reference import decode_attention as ref_decode  # noqa: E402
from blockzoo.plugins.token.reference import per_kv_head, select  # noqa: E402

CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
DEV = "cuda" if CUDA else "cpu"


#: do_bench_cudagraph's rep (ms of calls captured per graph; 10 replays are timed)
GRAPH_REP_MS = 20


def bench(fn, rep=60):
    if CUDA:
        return triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median")
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def peak(fn):
    """Peak bytes allocated above what was allocated before the call."""
    if not CUDA:
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------
def correctness(res, policy_only=False):
    """Compiled kernels vs the fp32 reference on small odd shapes (policy_only: the H2O step only;
    --policy-only skips this: the compiled tests/test_kernel_kv_decode.py covers it)."""
    out = []
    g = torch.Generator().manual_seed(0)
    shapes = [(2, 1, 8, 2, 1037, 128), (2, 3, 8, 2, 1037, 128), (1, 1, 4, 4, 63, 40), (3, 2, 4, 1, 4099, 64)]
    sel_shapes = ((8193, 8192), (4000, 1000))
    if not CUDA:  # interpreter smoke run
        shapes, sel_shapes = [(1, 3, 4, 1, 37, 40)], ((65, 64), (40, 15))
    for (b, tq, hq, hk, t, d) in ([] if policy_only else shapes):
        for dt in (torch.bfloat16, torch.float32):
            q = (torch.randn(b, tq, hq, d, generator=g) * 1.5).to(dt)
            k = (torch.randn(b, hk, t, d, generator=g) * 1.5).to(dt)
            v = torch.randn(b, hk, t, d, generator=g).to(dt)
            want_o, p = ref_decode(q.float(), k.float(), v.float())
            qd, kd_, vd = q.to(DEV), k.to(DEV), v.to(DEV)
            for s in (None, 3):
                o, lse = kd.decode_attention(qd, kd_, vd, num_splits=s)
                sc = kd.token_scores(qd, kd_, lse)
                e_o, e_s = rel(o.float(), want_o), rel(sc, per_kv_head(p, hk))
                tol = 2.0**-8 * 8 if dt == torch.bfloat16 else 5e-3
                ok = e_o < tol and e_s < 5e-3
                out.append({"shape": [b, tq, hq, hk, t, d], "dtype": str(dt), "splits": s, "err_o": e_o,
                            "err_scores": e_s, "ok": ok})
    # the fused H2O step: logits, accumulate, evict (vs the fp32 reference and the torch selection)
    from blockzoo.core.cache import LayerCache, fill_holes
    from blockzoo.kernels.select import drop_few
    for (b, tq, hq, hk, t, d) in shapes:
        for dt in (torch.bfloat16, torch.float32):
            q = (torch.randn(b, tq, hq, d, generator=g) * 1.5).to(dt)
            k = (torch.randn(b, hk, t, d, generator=g) * 1.5).to(dt)
            v = torch.randn(b, hk, t, d, generator=g).to(dt)
            seen = t + 100
            older = torch.stack([torch.randperm(seen - tq, generator=g)[:t - tq] for _ in range(b * hk)])
            pos = torch.cat([older.view(b, hk, t - tq), torch.arange(seen - tq, seen).expand(b, hk, tq)], -1)
            acc0 = torch.rand(b, hk, t, generator=g)
            acc0[..., -tq:] = 0
            _, p = ref_decode(q.float(), k.float(), v.float())
            want_acc = acc0 + per_kv_head(p, hk)
            qd, kd_, vd = q.to(DEV), k.to(DEV), v.to(DEV)
            o0, lse0 = kd.decode_attention(qd, kd_, vd, num_splits=3)
            o, lse, lg = kd.decode_attention(qd, kd_, vd, num_splits=3, return_logits=True)
            kf = k.float().repeat_interleave(hq // hk, 1)
            want_lg = torch.einsum("bqhd,bhkd->bhqk", q.float(), kf) * (d ** -0.5 / math.log(2))
            same = bool(torch.equal(o, o0)) and bool(torch.equal(lse, lse0))
            acc1 = acc0.to(DEV).clone()  # (.to is a no-op on the CPU: copies, the kernels write in place)
            kd.h2o_step(lg, lse, acc1, pos.to(DEV).clone(), kd_.clone(), vd.clone(), seen, 4, 8, False)
            kk, vv, pp, aa = kd_.clone(), vd.clone(), pos.to(DEV).clone(), acc0.to(DEV).clone()
            kd.h2o_step(lg, lse, aa, pp, kk, vv, seen, 4, 8, True)
            want = LayerCache(k=kd_.clone(), v=vd.clone(), pos=pos.to(DEV).clone(), acc=acc1.clone(), seen=seen)
            fill_holes(want, drop_few(want.acc, want.pos, seen, t - 1, 4, 8))
            # decode_h2o (merges the splits in the policy kernel): the same bits as decode + h2o_step
            k2_, v2_, p2_, a2_ = kd_.clone(), vd.clone(), pos.to(DEV).clone(), acc0.to(DEV).clone()
            o2, ev2 = kd.decode_h2o(qd, k2_, v2_, p2_, a2_, seen, t - 1, 4, 8, None, 3)
            fused_same = (bool(ev2) and bool(torch.equal(o2, o0)) and all(
                bool(torch.equal(x, y)) for x, y in ((p2_, pp), (a2_, aa), (k2_, kk), (v2_, vv))))
            counters_zero = not bool(kd._COUNTERS[kd_.device].any())
            evict_same = (bool(torch.equal(pp[..., :t - 1], want.pos)) and rel(aa[..., :t - 1], want.acc) < 1e-6
                          and bool(torch.equal(kk[:, :, :t - 1], want.k)) and bool(torch.equal(vv[:, :, :t - 1], want.v)))
            e_lg, e_acc = rel(lg, want_lg), rel(acc1, want_acc)
            out.append({"fused_h2o": [b, tq, hq, hk, t, d], "dtype": str(dt), "o_lse_unchanged": same,
                        "err_logits": e_lg, "err_acc": e_acc, "evict_equals_torch_path": evict_same,
                        "decode_h2o_equals_step": fused_same, "counters_zero": counters_zero,
                        "ok": same and e_lg < 1e-5 and e_acc < 1e-5 and evict_same and fused_same
                        and counters_zero})
    # selection and compaction
    for t, keep in (() if policy_only else sel_shapes):
        scores = torch.randint(-50, 50, (4, 8, t), generator=g).float().to(DEV)
        pos = torch.arange(t, device=DEV).expand(4, 8, t).contiguous()
        a = kd.select_topk(scores, pos, t, keep, 4, 8)
        bsel = select(scores, pos, t, keep, 4, 8)
        kk = torch.randn(4, 8, t, 128, generator=g).to(torch.bfloat16).to(DEV)
        same = bool(torch.equal(a, bsel)) and bool(torch.equal(kd.compact(bsel, kk)[0], ref_compact(bsel, kk)[0]))
        out.append({"select_compact_T": t, "keep": keep, "ok": same})
    res["correctness"] = out
    bad = [r for r in out if not r["ok"]]
    print(f"correctness: {len(out) - len(bad)}/{len(out)} ok")
    for r in bad:
        print("  FAIL", r)
    return not bad


# ---------------------------------------------------------------------------------------------
def sdpa_full(q, k, v, backend):
    """q [B, Hq, 1, D], k/v [B, Hk, T, D] (SDPA layout)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    be = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
          "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[backend]

    def gqa():
        with sdpa_kernel(be):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    def expanded():
        g = q.shape[1] // k.shape[1]
        with sdpa_kernel(be):
            return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1))
    return gqa, expanded


def torch_plain(q, k, v):
    """bf16 matmuls, fp32 softmax, GQA by reshaping q to [B, Hk, G, D]."""
    b, hq, _, d = q.shape
    hk = k.shape[1]
    qg = q.view(b, hk, hq // hk, d)
    s = torch.matmul(qg, k.transpose(-1, -2)).float() * (1.0 / math.sqrt(d))
    p = torch.softmax(s, -1).to(v.dtype)
    return torch.matmul(p, v).view(b, hq, 1, d)


def sweep_ours(q, k, v, cfgs, splits):
    best = None
    rows = []
    for cfg in cfgs:
        for s in splits:
            try:
                ms = bench(lambda cfg=cfg, s=s: kd.decode_attention(q, k, v, num_splits=s, cfg=cfg))
            except Exception as e:  # noqa: BLE001  (a config that does not compile)
                rows.append({"cfg": cfg, "splits": s, "error": str(e)[:200]})
                continue
            rows.append({"cfg": cfg, "splits": s, "ms": ms})
            if best is None or ms < best["ms"]:
                best = {"cfg": cfg, "splits": s, "ms": ms}
    return best, rows


def _decode_inputs(res, B, T, Hq, Hk, D, n, seed):
    """The shape's key and result dict, the generator, and bf16 inputs: one query [B, 1, Hq, D] and a
    cache of ``n`` tokens k, v [B, Hk, n, D]."""
    key = f"B{B}-T{T}-Hq{Hq}-Hk{Hk}-D{D}"
    r = res.setdefault("shapes", {}).setdefault(key, {})
    g = torch.Generator(device=DEV).manual_seed(seed)
    q, k, v = (torch.randn(*shape, device=DEV, generator=g, dtype=torch.bfloat16)
               for shape in ((B, 1, Hq, D), (B, Hk, n, D), (B, Hk, n, D)))
    return key, r, g, q, k, v


def run_shape(B, T, Hq, Hk, D, budget, res, smoke):
    keep = math.ceil(T * budget)
    _, r, g, q, k, v = _decode_inputs(res, B, T, Hq, Hk, D, T, seed=1)
    kv_bytes_full = 2 * k.numel() * k.element_size()
    if smoke:
        cfgs, splits = [None], [None, 2]
    else:
        cfgs = [(64, 4, 3), (128, 4, 3), (64, 4, 4), (128, 8, 3), (32, 4, 4)]
        splits = [None, 4, 8, 16, 32]
    best_full, rows_full = sweep_ours(q, k, v, cfgs, splits)
    r["ours_full_sweep"] = rows_full
    r["ours_full"] = best_full
    r["ours_full"]["default_ms"] = bench(lambda: kd.decode_attention(q, k, v))
    r["ours_full"]["peak_bytes"] = peak(lambda: kd.decode_attention(q, k, v, num_splits=best_full["splits"],
                                                                    cfg=best_full["cfg"]))
    r["ours_full"]["GBps"] = kv_bytes_full / best_full["ms"] / 1e6
    # the 25% kept cache
    kk, vk = k[:, :, :keep].contiguous(), v[:, :, :keep].contiguous()
    best_keep, rows_keep = sweep_ours(q, kk, vk, cfgs, splits)
    r["ours_kept_sweep"] = rows_keep
    r["ours_kept"] = best_keep
    r["ours_kept"]["default_ms"] = bench(lambda: kd.decode_attention(q, kk, vk))
    r["ours_kept"]["peak_bytes"] = peak(lambda: kd.decode_attention(q, kk, vk, num_splits=best_keep["splits"],
                                                                    cfg=best_keep["cfg"]))
    r["ours_kept"]["GBps"] = 2 * kk.numel() * kk.element_size() / best_keep["ms"] / 1e6
    r["ratio_full_over_kept"] = best_full["ms"] / best_keep["ms"]
    r["ratio_full_over_kept_default"] = r["ours_full"]["default_ms"] / r["ours_kept"]["default_ms"]
    # check the big-shape output against plain torch (bf16) on two batch rows
    o, _ = kd.decode_attention(q, k, v)
    qs, ks, vs = q[:2].transpose(1, 2), k[:2], v[:2]
    want = torch_plain(qs.float(), ks.float(), vs.float()).transpose(1, 2)
    r["big_shape_err_vs_fp32"] = rel(o[:2].float(), want)
    # baselines on the full cache
    qs = q.transpose(1, 2).contiguous()  # [B, Hq, 1, D]
    base = {}
    for name in ("flash", "efficient", "cudnn", "math"):
        if smoke and name != "math":
            continue
        for mode, fn in zip(("gqa", "expanded"), sdpa_full(qs, k, v, name), strict=True):
            try:
                fn()
                if CUDA:
                    torch.cuda.synchronize()
                ms = bench(fn)
                base[f"sdpa_{name}_{mode}"] = {"ms": ms, "peak_bytes": peak(fn)}
                break
            except Exception as e:  # noqa: BLE001
                base[f"sdpa_{name}_{mode}"] = {"error": str(e).splitlines()[0][:200] if str(e) else repr(e)}
    try:
        base["torch_matmul_softmax"] = {"ms": bench(lambda: torch_plain(qs, k, v)),
                                        "peak_bytes": peak(lambda: torch_plain(qs, k, v))}
    except Exception as e:  # noqa: BLE001
        base["torch_matmul_softmax"] = {"error": str(e)[:200]}
    r["baselines_full"] = base
    # H2O policy step at the budget: cache of keep + 1 tokens after appending one
    t1 = keep + 1
    k1, v1 = k[:, :, :t1].contiguous(), v[:, :, :t1].contiguous()
    pos = torch.arange(t1, device=DEV).expand(B, Hk, t1).contiguous()
    acc = torch.rand(B, Hk, t1, device=DEV)
    cfg_k = (best_keep["cfg"], best_keep["splits"])
    step_ms = bench(lambda: kd.decode_attention(q, k1, v1, num_splits=cfg_k[1], cfg=cfg_k[0]))
    _, lse = kd.decode_attention(q, k1, v1)
    sc = kd.token_scores(q, k1, lse)
    new_acc = acc + sc
    idx = kd.select_topk(new_acc, pos, T + 1, keep, 4, 8)
    pol = {
        "decode_ms": step_ms,
        "scores_ms": bench(lambda: kd.token_scores(q, k1, lse)),
        "accumulate_ms": bench(lambda: acc + sc),
        "select_topk_ms": bench(lambda: kd.select_topk(new_acc, pos, T + 1, keep, 4, 8)),
        "select_sort_ms": bench(lambda: select(new_acc, pos, T + 1, keep, 4, 8)),
        "compact_triton_ms": bench(lambda: kd.compact(idx, k1, v1, pos, new_acc)),
        "compact_torch_ms": bench(lambda: ref_compact(idx, k1, v1, pos, new_acc)),
        "append_cat_ms": bench(lambda: (torch.cat([kk, k1[:, :, :1]], 2), torch.cat([vk, v1[:, :, :1]], 2))),
    }
    # what core/cache.py does now with a kernel backend: append the new token in place (spare
    # room in the buffers), pick the leaving token (drop_few: top-k of the lowest keys) and move
    # the newest token into its slot (fill_holes); the cache returns to `keep` tokens each call
    from blockzoo.core.cache import LayerCache, fill_holes
    from blockzoo.kernels.select import drop_few
    lc = LayerCache(k=k1[:, :, :keep].clone(), v=v1[:, :, :keep].clone(), pos=pos[:, :, :keep].clone(),
                    acc=new_acc[:, :, :keep].clone(), seen=T)
    k_new, v_new = k1[:, :, -1:].clone(), v1[:, :, -1:].clone()
    p_new = torch.full((B, Hk, 1), T, device=DEV, dtype=torch.long)
    lc.append(k_new, v_new, p_new)  # first append allocates the spare room
    fill_holes(lc, drop_few(lc.acc, lc.pos, T + 1, keep, 4, 8))

    def append_only():
        lc.append(k_new, v_new, p_new)
        lc.trim(keep)

    def in_place_step():
        lc.append(k_new, v_new, p_new)
        fill_holes(lc, drop_few(lc.acc, lc.pos, T + 1, keep, 4, 8))
    def in_place_step_kernel():
        lc.append(k_new, v_new, p_new)
        kd.evict_one(lc.acc, lc.k, lc.v, lc.pos, lc.acc, T + 1, 4, 8)
        lc.trim(keep)
    pol["append_evict_one_ms"] = bench(in_place_step_kernel)
    pol["append_in_place_ms"] = bench(append_only)
    pol["evict_one_ms"] = pol["append_evict_one_ms"] - pol["append_in_place_ms"]
    pol["in_place_append_select_fill_ms"] = bench(in_place_step)
    pol["slot_replace_ms"] = pol["in_place_append_select_fill_ms"] - pol["append_in_place_ms"]
    pol["compact_best_ms"] = min(pol["compact_triton_ms"], pol["compact_torch_ms"])
    pol["select_best_ms"] = min(pol["select_topk_ms"], pol["select_sort_ms"])
    pol["policy_ms"] = pol["scores_ms"] + pol["accumulate_ms"] + pol["select_best_ms"] + pol["compact_best_ms"]
    pol["policy_pct_of_kept_step"] = 100 * pol["policy_ms"] / step_ms
    # the policy step as core/cache.py now runs it with a kernel backend (scores, accumulate,
    # the evict_one kernel; the in-place append excluded: it is not policy work)
    pol["policy_in_place_ms"] = pol["scores_ms"] + pol["accumulate_ms"] + pol["evict_one_ms"]
    pol["policy_in_place_pct_of_kept_step"] = 100 * pol["policy_in_place_ms"] / step_ms
    pol["scores_pct"] = 100 * pol["scores_ms"] / step_ms
    pol["select_compact_pct"] = 100 * (pol["select_best_ms"] + pol["compact_best_ms"]) / step_ms
    pol["peak_bytes_scores"] = peak(lambda: kd.token_scores(q, k1, lse))
    pol["peak_bytes_select_compact"] = peak(lambda: kd.compact(kd.select_topk(new_acc, pos, T + 1, keep, 4, 8),
                                                               k1, v1, pos, new_acc))
    r["h2o_step"] = pol
    r["kv_bytes_full"] = kv_bytes_full
    r["kv_bytes_kept"] = 2 * kk.numel() * kk.element_size()
    # device copy bandwidth (read + write) on the same bytes
    if CUDA:
        dst = torch.empty_like(k)
        ms = bench(lambda: dst.copy_(k))
        r["copy_GBps"] = 2 * k.numel() * k.element_size() / ms / 1e6
        del dst


#: ((tokens per chunk, warps) or None = h2o_chunking's rule, L2 hints) of decode_h2o, timed as
#: whole steps
VARIANTS = [(None, False), ((512, 4), False), ((1024, 8), False), ((2048, 8), False), ((512, 4), True),
            (None, True), ((2048, 8), True)]
SMOKE_VARIANTS = [(None, False), ((64, 1), True)]
SINKS, RECENT = 4, 8
#: after this many seconds of the run, only the rule's configs are still timed
VARIANT_DEADLINE_S = float(os.environ.get("VARIANT_DEADLINE_S", "120"))
T_START = time.time()


def gtime(fn):
    """GPU time of fn per call: CUDA graph of many calls (no host launch overhead, no L2 flush;
    a whole decode step streams >= 0.5 GB, so each call starts with its policy data cold)."""
    if CUDA:
        return triton.testing.do_bench_cudagraph(fn, rep=GRAPH_REP_MS, return_mode="median")
    return bench(fn)


def expected_eviction(acc, pos, seen):
    """The slot that leaves per row by the selector's rule in torch (lowest acc among the
    unprotected, ties to the newest position)."""
    free = (pos >= SINKS) & (pos < seen - RECENT)
    key = torch.where(free, acc, torch.full_like(acc, float("inf")))
    m = key.min(-1, keepdim=True).values
    cand = free & (key == m)
    bp = torch.where(cand, pos, torch.full_like(pos, -1)).max(-1, keepdim=True).values
    return (cand & (pos == bp)).int().argmax(-1)  # [B, Hk] slot


def apply_eviction(dst, k, v, pos, acc):
    """Copies with the newest token (last slot) moved into slot dst of each row."""
    k, v, pos, acc = k.clone(), v.clone(), pos.clone(), acc.clone()
    last = pos.shape[-1] - 1
    ix = dst[..., None]
    pos.scatter_(-1, ix, pos[..., last:])
    acc.scatter_(-1, ix, acc[..., last:])
    kx = ix[..., None].expand(*dst.shape, 1, k.shape[-1])
    k.scatter_(2, kx, k[:, :, last:])
    v.scatter_(2, kx, v[:, :, last:])
    return k, v, pos, acc


def policy_variants(B, T, Hq, Hk, D, budget, res, smoke):
    """The H2O step at the budget (cache of keep + 1 tokens after the step's append: one leaves)
    for every VARIANTS entry, as whole steps (decode + policy in one call): policy = step - the
    kept decode alone (both by CUDA graph). Each variant is first checked on fresh copies: the
    same o / acc / positions / K / V bits as decode_attention + h2o_step (the two-launch path),
    the eviction the torch selector makes on the accumulated scores, the protected tokens kept,
    and the fp32 reference's accumulated scores / evictions."""
    keep = math.ceil(T * budget)
    t1, seen = keep + 1, T + 1
    key, r, g, q, k1, v1 = _decode_inputs(res, B, T, Hq, Hk, D, t1, seed=2)
    pos = torch.arange(t1, device=DEV).expand(B, Hk, t1).contiguous()
    pos[..., -1] = seen - 1
    acc0 = torch.rand(B, Hk, t1, device=DEV, generator=g)
    acc0[..., -1] = 0
    G = Hq // Hk
    pol = {"cache_tokens": t1, "keep": keep, "rule_cfg": kd.h2o_chunking(B * Hk, t1, G, q.device),
           "lg_bytes": B * Hq * t1 * 4, "acc_bytes": B * Hk * t1 * 4, "pos_bytes": B * Hk * t1 * 8}
    # the expected step: decode with logits, h2o_step's accumulate (no eviction), then the torch selector
    acc_a = acc0.clone()
    o_want, lse_a, lg_a = kd.decode_attention(q, k1, v1, return_logits=True)
    kd.h2o_step(lg_a, lse_a, acc_a, pos, k1, v1, seen, SINKS, RECENT, False)
    del lse_a, lg_a
    dst = expected_eviction(acc_a, pos, seen)
    want_k, want_v, want_p, want_a = apply_eviction(dst, k1, v1, pos, acc_a)
    # the fp32 reference (plugins/token/reference.py): probabilities, accumulated scores, eviction
    _, p_ref = ref_decode(q.float(), k1.float(), v1.float())
    ref_acc = acc0 + per_kv_head(p_ref, Hk)
    del p_ref
    ref_dst = expected_eviction(ref_acc, pos, seen)
    pol["acc_rel_err_vs_fp32_reference"] = rel(acc_a, ref_acc)
    pol["evictions_equal_fp32_reference"] = float((ref_dst == dst).float().mean())
    # timings: the kept decode alone, with its logits, then every variant's whole step
    pol["decode_split_ms"] = gtime(lambda: kd.decode_attention(q, k1, v1))
    pol["decode_1split_ms"] = gtime(lambda: kd.decode_attention(q, k1, v1, num_splits=1))
    # the baseline of the policy's cost: the faster of the two plain decodes
    pol["decode_ms"] = min(pol["decode_split_ms"], pol["decode_1split_ms"])
    pol["decode_logits_ms"] = gtime(lambda: kd.decode_attention(q, k1, v1, return_logits=True))
    pol["logits_extra_ms"] = pol["decode_logits_ms"] - pol["decode_split_ms"]
    if CUDA:  # the earlier runs' method (eager, L2 flushed before each call), for comparison
        pol["decode_eager_ms"] = bench(lambda: kd.decode_attention(q, k1, v1))
    rows = []
    for cfg, hints in (SMOKE_VARIANTS if smoke else VARIANTS):
        row = {"cfg": cfg or pol["rule_cfg"], "rule": cfg is None, "l2_hints": hints}
        if CUDA and time.time() - T_START > VARIANT_DEADLINE_S and cfg is not None:  # keep the run short
            row.update(ok=False, error=f"skipped: past {VARIANT_DEADLINE_S} s")
            rows.append(row)
            continue
        try:
            kk, vv, pp, aa = k1.clone(), v1.clone(), pos.clone(), acc0.clone()
            o, ev = kd.decode_h2o(q, kk, vv, pp, aa, seen, keep, SINKS, RECENT, step_cfg=cfg, l2_hints=hints)
            n = keep
            row["evicted"] = bool(ev)
            row["o_equal"] = bool(torch.equal(o, o_want))
            row["same_as_expected"] = (bool(torch.equal(pp[..., :n], want_p[..., :n]))
                                       and bool(torch.equal(aa[..., :n], want_a[..., :n]))
                                       and bool(torch.equal(kk[:, :, :n], want_k[:, :, :n]))
                                       and bool(torch.equal(vv[:, :, :n], want_v[:, :, :n])))
            kept = pp[..., :n]
            row["protected_kept"] = bool(((kept < SINKS).sum(-1) == SINKS).all()) and bool(
                (kept == seen - 1).any(-1).all())
            row["budget_kept"] = bool((torch.sort(kept, -1).values.diff(dim=-1) > 0).all())  # n distinct tokens
            row["evictions_equal_fp32_reference"] = float(
                ((pos.sum(-1) - kept.sum(-1)) == pos.gather(-1, ref_dst[..., None])[..., 0]).float().mean())
            row["ok"] = (row["evicted"] and row["o_equal"] and row["same_as_expected"] and row["protected_kept"]
                         and row["budget_kept"])
            del kk, vv
            bufs = (k1.clone(), v1.clone(), pos.clone(), acc0.clone())  # stepped in place, again and again

            def step(c=cfg, h=hints, bufs=bufs):
                return kd.decode_h2o(q, *bufs, seen, keep, SINKS, RECENT, step_cfg=c, l2_hints=h)
            row["step_ms"] = gtime(step)
            if CUDA and cfg is None:
                row["step_eager_ms"] = bench(step)
            del bufs, step
            row["policy_ms"] = row["step_ms"] - pol["decode_ms"]
            row["policy_pct"] = 100 * row["policy_ms"] / pol["decode_ms"]
        except Exception as e:  # noqa: BLE001  (a variant that fails to compile or run: recorded, not fatal)
            row["ok"] = False
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        what = f"policy {row['policy_pct']:.1f}%" if "policy_pct" in row else row.get("error", "")
        print(f"  {key} {row['cfg']}{' L2 hints' if hints else ''} ({time.time() - T_START:.0f} s): "
              f"{what} ok={row['ok']}", flush=True)
    pol["variants"] = rows
    good = [x for x in rows if x["ok"] and "policy_pct" in x]
    pol["best"] = min(good, key=lambda x: x["policy_ms"]) if good else None
    pol["all_ok"] = all(x["ok"] for x in rows)
    r["h2o_policy"] = pol
    return pol


def fmt_mb(x):
    return "-" if x is None else f"{x / 2**20:.0f}"


def table(res):
    lines = []
    for key, r in res.get("shapes", {}).items():
        lines.append(f"\n## {key}, bf16, Tq=1, budget 25%")
        if "ours_full" in r:
            of, ok = r["ours_full"], r["ours_kept"]
            lines.append(f"(KV full {r['kv_bytes_full'] / 2**30:.2f} GiB)")
            lines.append("| method | ms | peak MiB above inputs | GB/s (K+V) |")
            lines.append("|---|---|---|---|")
            lines.append(f"| ours, full cache (best: cfg {of['cfg']}, splits {of['splits']}) | {of['ms']:.3f} | "
                         f"{fmt_mb(of['peak_bytes'])} | {of['GBps']:.0f} |")
            lines.append(f"| ours, full cache (default cfg/splits) | {of['default_ms']:.3f} | | |")
            lines.append(f"| ours, 25% kept (best: cfg {ok['cfg']}, splits {ok['splits']}) | {ok['ms']:.3f} | "
                         f"{fmt_mb(ok['peak_bytes'])} | {ok['GBps']:.0f} |")
            lines.append(f"| ours, 25% kept (default) | {ok['default_ms']:.3f} | | |")
            for name, b in r["baselines_full"].items():
                if "ms" in b:
                    lines.append(f"| {name}, full cache | {b['ms']:.3f} | {fmt_mb(b['peak_bytes'])} | "
                                 f"{r['kv_bytes_full'] / b['ms'] / 1e6:.0f} |")
                else:
                    lines.append(f"| {name} | failed: {b['error'][:80]} | | |")
            lines.append(f"\nfull / 25% (ours, best): **{r['ratio_full_over_kept']:.2f}x** "
                         f"(defaults: {r['ratio_full_over_kept_default']:.2f}x); "
                         f"device copy {r.get('copy_GBps', 0):.0f} GB/s; big-shape rel err vs fp32 "
                         f"{r['big_shape_err_vs_fp32']:.2e}")
            p = r["h2o_step"]
            lines.append(f"Old H2O pieces: scores {p['scores_ms']:.3f}, select top-k {p['select_topk_ms']:.3f}, "
                         f"compact triton {p['compact_triton_ms']:.3f}, evict_one {p['evict_one_ms']:.3f} ms; "
                         f"policy (scores + accumulate + evict_one) {p['policy_in_place_ms']:.3f} ms = "
                         f"{p['policy_in_place_pct_of_kept_step']:.0f}% of the kept decode")
        pol = r.get("h2o_policy")
        if not pol:
            continue
        lines.append(f"H2O step, cache {pol['cache_tokens']} tokens -> {pol['keep']}: kept decode "
                     f"{pol['decode_ms']:.4f} ms (the faster of split {pol.get('decode_split_ms', pol['decode_ms']):.4f} "
                     f"and one split {pol.get('decode_1split_ms', pol['decode_ms']):.4f}; CUDA graph; eager with L2 "
                     f"flush {pol.get('decode_eager_ms', 0):.4f}), "
                     f"+ logits {pol['logits_extra_ms']:+.4f} ms; rule cfg {pol['rule_cfg']}; acc vs fp32 ref "
                     f"{pol['acc_rel_err_vs_fp32_reference']:.1e}, evictions = fp32 ref in "
                     f"{100 * pol['evictions_equal_fp32_reference']:.1f}% of rows")
        lines.append("| (tokens/chunk, warps) | step ms | policy ms | policy % of kept decode | checks |")
        lines.append("|---|---|---|---|---|")
        for x in pol["variants"]:
            cfg = f"{tuple(x['cfg'])}{' rule' if x['rule'] else ''}{' +L2 hints' if x.get('l2_hints') else ''}"
            if "policy_pct" not in x:
                lines.append(f"| {cfg} | - | - | - | {x.get('error', 'failed')[:60]} |")
                continue
            eager = f" (eager {x['step_eager_ms']:.4f})" if "step_eager_ms" in x else ""
            lines.append(f"| {cfg} | {x['step_ms']:.4f}{eager} | {x['policy_ms']:.4f} | "
                         f"**{x['policy_pct']:.1f}%** | {'ok' if x['ok'] else 'FAIL'} |")
        b = pol["best"]
        if b:
            lines.append(f"best: {tuple(b['cfg'])}{' +L2 hints' if b.get('l2_hints') else ''}: policy {b['policy_pct']:.1f}% (target <= 10%: "
                         f"{'met' if b['policy_pct'] <= 10 else 'NOT met'})")
    if "tests" in res:
        lines.append(f"\ncompiled tests/test_kernel_kv_decode.py: {res['tests']}")
    return "\n".join(lines)


def run_tests(res):
    """The compiled tests/test_kernel_kv_decode.py (the Triton and selection tests) on this GPU."""
    import subprocess
    root = pathlib.Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "pytest", "-q", "-rf", "--tb=short", "-p", "no:cacheprovider",
           "--import-mode=importlib", "tests/test_kernel_kv_decode.py", "-k", "triton or select"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    t0 = time.time()
    try:
        out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True,
                             timeout=int(os.environ.get("KTEST_TIMEOUT", "150")))
        tail = (out.stdout + out.stderr).strip().splitlines()
        res["tests_log"] = "\n".join(tail[-40:])
        res["tests"] = f"rc={out.returncode}, {tail[-1] if tail else ''} ({time.time() - t0:.0f} s)"
    except subprocess.TimeoutExpired:
        res["tests"] = f"TIMEOUT after {time.time() - t0:.0f} s"
    print(res.get("tests_log", ""))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--heads", default="32:8,8:8")
    ap.add_argument("--policy-only", action="store_true",
                    help="only the H2O policy variants (and the correctness checks / compiled tests)")
    args = ap.parse_args()
    res = {"device": torch.cuda.get_device_name() if CUDA else "cpu (interpreter)",
           "torch": torch.__version__, "triton": triton.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "args": vars(args)}
    print(res)
    t_all = time.time()
    if not args.policy_only:  # (--policy-only: the compiled test file covers these kernels on odd shapes)
        res["correct"] = correctness(res)
        print(f"correctness done at {time.time() - t_all:.0f} s", flush=True)
    B, T, D = (2, 200, 64) if args.smoke else (16, 32768, 128)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for hh in args.heads.split(","):
        hq, hk = (int(x) for x in hh.split(":"))
        t0 = time.time()
        if not args.policy_only:
            run_shape(B, T, hq, hk, D, 0.25, res, args.smoke)
        policy_variants(B, T, hq, hk, D, 0.25, res, args.smoke)
        if CUDA:
            torch.cuda.empty_cache()
        print(f"shape Hq={hq} Hk={hk} done in {time.time() - t0:.0f} s", flush=True)
        (out / "kv_decode_gpu.json").write_text(json.dumps(res, indent=1, default=str))
    if not os.environ.get("SKIP_TESTS") and not args.smoke:
        run_tests(res)
    res["total_s"] = time.time() - t_all
    (out / "kv_decode_gpu.json").write_text(json.dumps(res, indent=1, default=str))
    print(table(res))
    print(f"total {res['total_s']:.0f} s")


if __name__ == "__main__":
    main()
