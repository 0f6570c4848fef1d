#!/usr/bin/env python3
"""context.moc on one GPU: routing cost, density and speed against dense attention, same run.

For each T (chunk 512, top_k 8, head dim 128, bf16, causal, 16 heads, batch 1) and two input
kinds -- ``random`` (iid normal q/k/v: every query routes independently, the worst case for a
block-sparse kernel) and ``coherent`` (q and k drift slowly along the sequence, as neighbouring
video or text tokens do, so neighbouring queries route alike) -- it reports:

* row density: mean over (head, query) of visible keys / causal dense keys (what MoC's FLOP
  claim counts);
* block density: (query block, key block) tile pairs the kernel computes / causal dense pairs;
* routing time (chunk means, scores, Triton top-k selection, query-block lists: what the
  forward pays) and its share of SDPA flash forward, and the torch router's time beside it;
* blockzoo Triton MoC forward and forward+backward (routing included), SDPA flash (FA2) and the
  blockzoo dense Triton core, all timed with triton.testing.do_bench (median) in this run.

    python3 bench/moc_gpu.py [--T 8192,16384,32768] [--out DIR]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _bootstrap import ensure_blockzoo, warm_up  # noqa: E402

ensure_blockzoo()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from blockzoo.kernels.triton import moc as tmoc  # noqa: E402
from blockzoo.kernels.triton.attention import attention as dense_attention  # noqa: E402
from blockzoo.plugins.context.reference import moc_routing  # noqa: E402


def inputs(kind: str, T: int, H: int, D: int, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def one():
        if kind == "random":
            return torch.randn(1, T, H, D, device="cuda", generator=g)
        # slow drift: a random walk over 64-token steps, interpolated, plus per-token noise
        steps = torch.randn(1, T // 64 + 2, H, D, device="cuda", generator=g).cumsum(1) / 4
        base = F.interpolate(steps.permute(0, 2, 3, 1).reshape(1, H * D, -1), size=T, mode="linear",
                             align_corners=False).reshape(1, H, D, T).permute(0, 3, 1, 2)
        return base + 0.5 * torch.randn(1, T, H, D, device="cuda", generator=g)
    return [one().to(torch.bfloat16).contiguous() for _ in range(3)]


def densities(routing, T: int, bm: int, bn: int, prefix: int = 0):
    sel, bounds, lim = routing.sel, routing.bounds, routing.lim
    sizes = (bounds[1:] - bounds[:-1]).float()                         # [C]
    own = routing.own
    vis = (sel.float() * sizes).sum(-1)                                # [B, H, T] keys in chosen chunks
    # own chunk counted causally: subtract its keys after the row
    own_end = bounds[(own + 1).clamp(max=bounds.numel() - 1)]
    vis = vis - (own_end - lim).clamp(min=0).float()
    row_density = (vis.sum() / (lim.float().sum() * sel.shape[0] * sel.shape[1])).item()
    qlist, qcount, klist, kmeta = tmoc.moc_block_lists(sel.to(torch.uint8), bounds.int(), lim.int(), prefix, 1, bm, bn)
    # tiles: per query block, key blocks of its listed chunks (prefix is 0 here), causal-clipped
    nqb = qcount.shape[-1]
    blk_lim = torch.nn.functional.pad(lim, (0, nqb * bm - T)).view(nqb, bm).amax(1)
    tiles = 0.0
    cstart, cend = bounds[:-1], bounds[1:]
    C = cstart.numel()
    for qb in range(nqb):
        mask = torch.zeros(sel.shape[0], sel.shape[1], C, dtype=torch.bool, device=sel.device)
        cnt = qcount[..., qb].long()
        ar = torch.arange(C, device=sel.device)
        mask = ar[None, None, :] < cnt[..., None]
        chosen = torch.where(mask, qlist[..., qb, :].long(), torch.zeros_like(qlist[..., qb, :].long()))
        lo = cstart[chosen]
        hi = torch.minimum(cend[chosen], blk_lim[qb].expand_as(chosen))
        nb = ((hi - lo).clamp(min=0) + bn - 1) // bn
        tiles += (nb * mask).sum().item()
    dense_tiles = sel.shape[0] * sel.shape[1] * sum(((int(blk_lim[qb]) + bn - 1) // bn) for qb in range(nqb))
    return row_density, tiles / dense_tiles


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", default="8192,16384,32768")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    H, D, chunk, top_k = a.heads, 128, 512, 8
    warm_up()
    rows = []
    for T in (int(t) for t in a.T.split(",")):
        for kind in ("random", "coherent"):
            rows.append(measure(T, kind, H, D, chunk, top_k))
            torch.cuda.empty_cache()
    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    pathlib.Path(a.out, "moc_gpu.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    print(env)
    print(f"{'T':>6} {'inputs':>8} {'rowdens':>7} {'blkdens':>7} {'route%':>6} {'fwd x':>6} {'f+b x':>6} "
          f"{'target':>6} {'moc f ms':>8} {'fa2 f ms':>8} {'moc fb':>8} {'fa2 fb':>8}")
    for r in rows:
        print(f"{r['T']:>6} {r['inputs']:>8} {r['row_density']:7.3f} {r['block_density']:7.3f} "
              f"{r['route_pct_of_flash_fwd']:6.1f} {r['fwd_speedup']:6.2f} {r['fb_speedup']:6.2f} {r['target']:6.2f} "
              f"{r['moc_fwd_ms']:8.3f} {r['flash_fwd_ms']:8.3f} {r['moc_fb_ms']:8.3f} {r['flash_fb_ms']:8.3f}")


def measure(T, kind, H, D, chunk, top_k):
    bench = functools.partial(triton.testing.do_bench, return_mode="median")
    q, k, v = inputs(kind, T, H, D, seed=T)
    params = dict(causal=True, chunk_size=chunk, top_k=top_k)
    routing = moc_routing(q, k, **params)
    bd = tmoc._block_d(D)
    bm, bn, _, _ = tmoc._blocks(bd)
    row_d, blk_d = densities(routing, T, bm, bn)

    def route():   # what the forward pays: router (Triton selection) + query-block lists
        sel = tmoc.moc_route(q, k, **params)[0]
        tmoc._query_block_lists(sel, bm)

    def route_torch():   # the reference router + torch block lists, for comparison
        r = moc_routing(q, k, **params)
        tmoc.moc_block_lists(r.sel.to(torch.uint8), r.bounds.int(), r.lim.int(), 0, 1, bm, bn)
    t_route = bench(route)
    t_route_torch = bench(route_torch)
    qs, ks, vs = (x.transpose(1, 2).contiguous() for x in (q, k, v))

    def flash():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
    t_flash = bench(flash)
    t_dense = bench(lambda: dense_attention(q, k, v, causal=True))
    t_moc = bench(lambda: tmoc.moc_attention(q, k, v, **params))
    # check the kernel against the dense reference on the rows' union (sanity, not the matrix)
    o = tmoc.moc_attention(q, k, v, routing=routing, **params)
    assert torch.isfinite(o.float()).all()
    qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, k, v))
    qsg, ksg, vsg = (x.detach().clone().requires_grad_() for x in (qs, ks, vs))
    do = torch.randn_like(q)
    dos = do.transpose(1, 2).contiguous()

    def moc_fb():
        out = tmoc.moc_attention(qg, kg, vg, **params)
        torch.autograd.grad(out, (qg, kg, vg), do)

    def flash_fb():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = F.scaled_dot_product_attention(qsg, ksg, vsg, is_causal=True)
        torch.autograd.grad(out, (qsg, ksg, vsg), dos)
    t_moc_fb = bench(moc_fb)
    t_flash_fb = bench(flash_fb)
    r = dict(T=T, inputs=kind, H=H, D=D, chunk=chunk, top_k=top_k, row_density=row_d, block_density=blk_d,
             route_ms=t_route, route_torch_ms=t_route_torch, flash_fwd_ms=t_flash, dense_triton_fwd_ms=t_dense, moc_fwd_ms=t_moc,
             moc_fb_ms=t_moc_fb, flash_fb_ms=t_flash_fb)
    r["fwd_speedup"] = t_flash / t_moc
    r["fb_speedup"] = t_flash_fb / t_moc_fb
    r["target"] = 0.5 / row_d
    r["route_pct_of_flash_fwd"] = 100 * t_route / t_flash
    print(json.dumps(r), flush=True)
    return r


if __name__ == "__main__":
    main()
