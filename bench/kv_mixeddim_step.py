#!/usr/bin/env python3
"""token.mixeddim's allocation decision at one decode step on one GPU: the whole-cache allocator
(``reference.allocate_units``, two stable sorts of every unit of every row, as ``repack`` calls it)
against the incremental step (``reference.allocate_step``: top-k selections of a host bound, no
device -> host copy), on the same tokens, with the same result checked. Shape: the decode
benchmark's (B=16, Hk=8, T=32768, D=128, bf16, 25% budget, 4 levels): a cache rewritten to its
budget, plus the new token at full width, so each row must drop ``levels`` units.

Timed as wall time per call (``allocate_units`` copies to the host; ``allocate_step`` does not)
and as the GPU time of ``allocate_step`` replayed from a CUDA graph. The unit profiles are
computed once outside the timing (the incremental cache stores them per token); their cost is
reported separately.

    python3 bench/kv_mixeddim_step.py [--out DIR]       (JSON to DIR/kv_mixeddim_step.json)
    python3 bench/kv_mixeddim_step.py --smoke          (CPU, small)
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _bootstrap import ensure_blockzoo  # noqa: E402

ensure_blockzoo()

import torch  # noqa: E402
from kv_mixeddim_gpu import CUDA, DEV, make, wall_ms  # noqa: E402

from blockzoo.plugins.token.reference import (  # noqa: E402
    allocate_step,
    allocate_units,
    group_energy,
    protected_mask,
    unit_profile,
)


def graph_ms(fn, reps):
    """GPU time per call of ``fn`` replayed from a CUDA graph (no launch gaps)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(reps):
        g.replay()
    t1.record()
    torch.cuda.synchronize()
    return t0.elapsed_time(t1) / reps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args()
    B, Hq, Hk, T, D = (2, 4, 2, 256, 32) if a.smoke else (16, 32, 8, 32768, 128)
    L, keep = 4, T // 4
    sinks, recent = min(4, keep // 4), min(64, keep // 4)  # as make() rewrote the cache with
    st, q, k, v = make(B, Hk, Hq, T, D, L, keep, torch.bfloat16, sinks=sinks, recent=recent)
    g = D // L
    # the logical cache: the pools' tokens (rank order, zeros beyond each width) + the new token
    kz, vz, pos, acc, dims, _ = st.unpack()
    acc_dt = torch.float32

    def rank_energy(x, order):
        b, hk, t, d = x.shape
        xr = torch.gather(x.reshape(b * hk, t, d), -1, order[:, None, :].expand(-1, t, -1))
        return group_energy(xr.to(acc_dt) ** 2, g).view(b, hk, t, L)

    kz = torch.cat([kz, k[:, :, -1:]], 2)
    vz = torch.cat([vz, v[:, :, -1:]], 2)
    ke, ve = rank_energy(kz, st.k_order), rank_energy(vz, st.v_order)
    pos = torch.cat([pos, torch.full((B, Hk, 1), T - 1, device=DEV, dtype=pos.dtype)], 2)
    acc = torch.cat([acc, torch.rand(B, Hk, 1, device=DEV)], 2)
    caps = torch.cat([dims // g, torch.full((B, Hk, 1), L, device=DEV, dtype=dims.dtype)], 2)
    prot = protected_mask(pos, T, sinks, recent)
    budget = keep * L
    n_prot = prot.sum(-1).view(-1)
    rest = budget - n_prot * L
    R, S = B * Hk, pos.shape[2]
    k_max = int(((caps * ~prot).sum(-1).view(-1) - rest).max())
    prof = unit_profile(ke, ve)
    args = (acc.view(R, S), prof.view(R, S, L), caps.view(R, S), pos.view(R, S), prot.view(R, S), rest, k_max)
    want = allocate_units(acc, ke, ve, caps, prot, budget)
    got = allocate_step(*args)
    same = bool(torch.equal(got.view(B, Hk, S), want))
    reps = 3 if a.smoke else 20
    res = {"device": torch.cuda.get_device_name() if CUDA else "cpu", "torch": torch.__version__,
           "shape": [B, Hq, Hk, T, D], "levels": L, "tokens_per_row": S, "units_to_drop": k_max,
           "same_decisions": same,
           "changed_tokens": int((got.view(B, Hk, S) != caps).sum()),
           "whole_cache_allocate_units_ms": wall_ms(lambda: allocate_units(acc, ke, ve, caps, prot, budget), reps),
           "allocate_step_wall_ms": wall_ms(lambda: allocate_step(*args), reps),
           "unit_profile_all_tokens_ms": wall_ms(lambda: unit_profile(ke, ve), reps)}
    if CUDA:
        res["allocate_step_graph_ms"] = graph_ms(lambda: allocate_step(*args), reps)
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv_mixeddim_step.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res))
    if not same:
        raise SystemExit("allocate_step and allocate_units disagree")


if __name__ == "__main__":
    main()
