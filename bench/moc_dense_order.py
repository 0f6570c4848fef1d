#!/usr/bin/env python3
"""Probe (GPU): context.moc's forward as the dense core's causal loop plus a per-row selection.

At T = 8192 with per-token routing, every 64-row query block's chunk union covers all its past
chunks (tile density 1.0), so the list-driven MoC forward visits the dense causal tile set, yet
takes about 1.35x our dense core's time at the same tiles (docs/performance.md, session 12
ablations). This probe walks key tiles in the dense kernel's order (affine loop, unmasked loads
below the diagonal) and masks rows that did not select a tile's chunk, either with a 0 / -inf
row bias in the exponent (``bias``) or with the core's masked step (``where``); then, with the
bias, masked or plain K/V loads and three forms of the loop index (the core's affine start with a
``multiple_of`` hint, without it, and the flattened MoC loop's (chunk, tile) division). Fixed chunk
sizes (a multiple of BLOCK_N), no prefix, Tq = Tk, causal. (The shipped kernels that grew out of
it: ``kernels/triton/moc.py: _moc_fwd_dense_kernel`` / ``_moc_dq_dense_kernel``.) It checks the output against the
shipped kernel's on the same routing, then times both and the dense core.

    python3 bench/moc_dense_order.py [--T 8192] [--kinds random,coherent] [--out DIR]
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _bootstrap import ensure_blockzoo  # noqa: E402

ensure_blockzoo()

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from moc_gpu import inputs  # noqa: E402

from blockzoo.kernels.triton import moc as tmoc  # noqa: E402
from blockzoo.kernels.triton.attention import (  # noqa: E402
    _dot,
    _load_tile,
    _store_tile,
    attention,
    attn_fwd_inner,
    attn_fwd_tile,
    attn_fwd_tile_rows,
)


@triton.jit
def _probe_fwd(Q, K, V, Out, Sel, s_qt, s_qh, s_kt, s_kh, Hq, T, GROUP, C, CHUNK, qk_scale,
               D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BIAS: tl.constexpr,
               LATE_FIRST: tl.constexpr, MASKED_LOADS: tl.constexpr, LOOP: tl.constexpr):
    pid_m = tl.program_id(0)
    if LATE_FIRST:
        pid_m = tl.num_programs(0) - 1 - pid_m
    h = tl.program_id(1)
    hk = h // GROUP
    q_base = Q + h.to(tl.int64) * s_qh
    k_base = K + hk.to(tl.int64) * s_kh
    v_base = V + hk.to(tl.int64) * s_kh
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    rmask = offs_m < T
    q = _load_tile(q_base, offs_m, s_qt, offs_d, T, D, True, True)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    sel_row = Sel + h.to(tl.int64) * T * C + offs_m.to(tl.int64) * C
    n_full = (m0 // BLOCK_N) * BLOCK_N
    offs_n0 = tl.arange(0, BLOCK_N)
    TPC = CHUNK // BLOCK_N
    for i in range(0, n_full // BLOCK_N):
        if LOOP == 0:   # the dense core's form (an affine start, multiple_of hint)
            start_n = tl.multiple_of(i * BLOCK_N, BLOCK_N)
        elif LOOP == 1:  # no hint
            start_n = i * BLOCK_N
        else:            # the flattened MoC loop's index math: (chunk, tile in chunk) by a division
            e = i // TPC
            start_n = e * CHUNK + (i - e * TPC) * BLOCK_N
        cols = start_n + offs_n0
        keep = tl.load(sel_row + start_n // CHUNK, mask=rmask, other=0) != 0
        k = _load_tile(k_base, cols, s_kt, offs_d, T, D, MASKED_LOADS, True)
        qk = _dot(q, tl.trans(k))
        v = _load_tile(v_base, cols, s_kt, offs_d, T, D, MASKED_LOADS, True)
        if BIAS:
            acc, m_i, l_i = attn_fwd_tile_rows(acc, m_i, l_i, qk, v, keep, qk_scale, False)
        else:
            acc, m_i, l_i = attn_fwd_tile(acc, m_i, l_i, qk, v, keep[:, None], qk_scale)
    # the diagonal tiles lie in the rows' own chunk (always selected): the core's masked sweep
    acc, m_i, l_i = attn_fwd_inner(acc, m_i, l_i, q, k_base, v_base, s_kt, s_kt, offs_m, offs_d, n_full,
                                   tl.minimum(T, m0 + BLOCK_M), qk_scale, T, 0, D, BLOCK_N, True, True, True, False)
    o = acc * (1.0 / tl.where(l_i == 0.0, 1.0, l_i))[:, None]
    _store_tile(Out + h.to(tl.int64) * s_qh, o.to(Out.dtype.element_ty), offs_m, s_qt, offs_d, T, D, True)


def probe(q, k, v, sel, chunk, bias: bool, late_first: bool, masked_loads=False, loop=0, bm=64, bn=64, warps=4,
          stages=3):
    B, T, Hq, D = q.shape
    o = torch.empty_like(q)
    _probe_fwd[(triton.cdiv(T, bm), Hq)](q, k, v, o, sel, q.stride(1), q.stride(2), k.stride(1), k.stride(2),
                                         Hq, T, Hq // k.shape[2], sel.shape[-1], chunk,
                                         (1.0 / math.sqrt(D)) * 1.4426950408889634, D=D, BLOCK_M=bm, BLOCK_N=bn,
                                         BIAS=bias, LATE_FIRST=late_first, MASKED_LOADS=masked_loads, LOOP=loop,
                                         num_warps=warps, num_stages=stages)
    return o


def measure(kind, T, H, D, chunk, bench) -> dict:
    params = dict(causal=True, chunk_size=chunk, top_k=8)
    sc = 1.0 / math.sqrt(D)
    q, k, v = inputs(kind, T, H, D, seed=T)
    sel, bounds, lim, _ = tmoc.moc_route(q, k, **params)
    seg = tmoc._flat_seg_len(T, chunk, None, 0)
    want, _ = tmoc._fwd_impl(q, k, v, sel, bounds, lim, 0, sc, True, seg)
    row = {"inputs": kind, "T": T}
    for bias in (True, False):
        for late in (True, False):
            tag = f"{'bias' if bias else 'where'}{'/latefirst' if late else ''}"
            got = probe(q, k, v, sel, chunk, bias, late)
            row[f"maxdiff {tag}"] = float((got.float() - want.float()).abs().max())
            row[f"probe {tag}"] = bench(lambda b=bias, lf=late: probe(q, k, v, sel, chunk, b, lf))
    for masked in (False, True):
        for loop in (0, 1, 2):
            tag = f"bias/latefirst/{'masked' if masked else 'plain'} loads/loop {loop}"
            row[f"probe {tag}"] = bench(lambda ml=masked, lp=loop: probe(q, k, v, sel, chunk, True, True, ml, lp))
    row["moc fwd (shipped, lists included)"] = bench(lambda: tmoc._fwd_impl(q, k, v, sel, bounds, lim, 0, sc, True, seg))
    row["dense core fwd"] = bench(lambda: attention(q, k, v, causal=True))
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=8192)
    ap.add_argument("--kinds", default="random,coherent")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    bench = functools.partial(triton.testing.do_bench, return_mode="median")
    H, D, T, chunk = 16, 128, a.T, 512
    rows = [measure(kind, T, H, D, chunk, bench) for kind in a.kinds.split(",")]
    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    pathlib.Path(a.out, "moc_dense_order.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    print(env)
    for r in rows:
        print(f"--- T={r['T']} {r['inputs']}")
        for key, x in r.items():
            if isinstance(x, float):
                print(f"  {key:>36}: {x:.4g}")


if __name__ == "__main__":
    main()
