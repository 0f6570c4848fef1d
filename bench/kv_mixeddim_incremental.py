#!/usr/bin/env python3
"""token.mixeddim's per-step rewrite on one GPU, incremental (``mixeddim_step.step_rewrite`` in a
store with ``slack`` spare slots per (level, row)) against the whole-cache ``repack``, over a run
of decode steps at the decode benchmark's shape (B=16, Hk=8, T=32768, D=128, bf16, 25% budget, 4
levels). Each step: a new token in the tail, fresh scores added to every token, then the rewrite.
Reported: wall time per step of each (the incremental step makes no device -> host copy; as the
policy does, the previous step's spare room is read one step late and a step that might not fit
falls back to ``repack``, counted and timed in), the pooled decode with
and without slack (the kernels read each run's held count), the memory the slack costs, and
whether the two caches are equal after the run (the same decisions, checked).

    python3 bench/kv_mixeddim_incremental.py [--steps N] [--slack S] [--impl auto|torch|triton] [--out DIR]
    python3 bench/kv_mixeddim_incremental.py --smoke          (CPU, small)
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
from kv_mixeddim_gpu import CUDA, DEV, make_inputs  # noqa: E402

from blockzoo.plugins.token.mixeddim import PackedKV, decode_kernel, repack  # noqa: E402
from blockzoo.plugins.token.mixeddim_step import step_bound, step_rewrite, step_state  # noqa: E402


def sync():
    if CUDA:
        torch.cuda.synchronize()


def _bump(p, i):
    """The step's attention score of the token at position ``p`` (the same in both caches)."""
    return ((p * 2654435761 + i * 9973) % 1000003).float() / 1000003.0


def pipelined(q, inc, state, keep, sinks, recent, L, T, slack, impl, n=24):
    """Decode steps as generation runs them: no synchronisation between steps, the step's
    ``[fits, free]`` read one step late. Wall time per step of the pooled decode alone, of the
    incremental step alone and of both; the step's share of a decode step is (both - decode) /
    decode. Each run's new tokens take fresh positions (from ``seen0``: after the cache's and the
    previous runs'); the budget stays ``keep`` (``L`` units a step)."""
    g = torch.Generator(device=DEV).manual_seed(0)
    D = inc.d
    toks = [(torch.randn(inc.b, inc.hk, 1, D, device=DEV, generator=g, dtype=inc.kbuf.dtype),
             torch.randn(inc.b, inc.hk, 1, D, device=DEV, generator=g, dtype=inc.kbuf.dtype),
             torch.rand(inc.b, inc.hk, 1, device=DEV, generator=g)) for _ in range(n)]
    out = {"pipelined_steps": n, "pipelined_fallbacks": 0}

    def run(decode: bool, step: bool, seen0: int):
        nonlocal inc, state
        flag = None
        sync()
        t0 = time.perf_counter()
        for i, (tk, tv, tacc) in enumerate(toks):
            if decode:
                decode_kernel("triton" if CUDA else "numba", q, inc, tk, tv)
            if step:
                seen = seen0 + i + 1
                tpos = torch.full((inc.b, inc.hk, 1), seen - 1, device=DEV, dtype=torch.int64)
                fits, free = (1, slack) if flag is None else flag.tolist()
                if not fits:
                    raise SystemExit("an incremental step had no room (the room check failed)")
                if free < step_bound(L, 1):
                    out["pipelined_fallbacks"] += 1
                    inc = repack(inc, tk, tv, tpos, tacc, seen, keep, sinks, recent, slack=slack)
                    state, flag = step_state(inc), None
                else:
                    flag = step_rewrite(inc, state, tk, tv, tpos, tacc, seen, keep, sinks, recent, drop=L,
                                        impl=impl)
        sync()
        return (time.perf_counter() - t0) * 1e3 / n

    run(True, True, T + 1000)  # warm-up (compiles), at later positions than the timed runs
    out["pipelined_decode_ms"] = run(True, False, 0)
    out["pipelined_step_ms"] = run(False, True, T + 2000)
    out["pipelined_decode_step_ms"] = run(True, True, T + 3000)
    out["pipelined_step_share"] = (out["pipelined_decode_step_ms"] - out["pipelined_decode_ms"]) / \
        out["pipelined_decode_ms"]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--slack", type=int, default=64)
    ap.add_argument("--impl", default="auto", choices=("auto", "torch", "triton"),
                    help="the incremental step's code: Triton kernels (auto on CUDA) or torch")
    ap.add_argument("--profile", action="store_true", help="also print torch.profiler's top ops of the last "
                                                           "incremental step")
    a = ap.parse_args()
    B, Hq, Hk, T, D = (2, 4, 2, 256, 32) if a.smoke else (16, 32, 8, 32768, 128)
    L, keep = 4, T // 4
    sinks, recent = min(4, keep // 4), min(64, keep // 4)
    steps = 4 if a.smoke else a.steps
    dt = torch.bfloat16
    k, v, pos, acc, kr, vr, q = make_inputs(B, Hk, Hq, T, D, dt)
    empty = PackedKV.empty(B, Hk, D, L, kr, vr, dt, DEV)
    T0 = T - steps
    full = repack(empty, k[:, :, :T0], v[:, :, :T0], pos[:, :, :T0], acc[:, :, :T0], T0, keep, sinks, recent)
    inc = repack(empty, k[:, :, :T0], v[:, :, :T0], pos[:, :, :T0], acc[:, :, :T0], T0, keep, sinks, recent,
                 slack=a.slack)
    state = step_state(inc)
    res = {"device": torch.cuda.get_device_name() if CUDA else "cpu", "torch": torch.__version__,
           "shape": [B, Hq, Hk, T, D], "levels": L, "keep": keep, "slack": a.slack, "steps": steps,
           "impl": a.impl}
    t_inc, t_full, fallbacks, flag = [], [], 0, None
    for i in range(steps):
        seen = T0 + i + 1
        tk, tv = k[:, :, seen - 1:seen].contiguous(), v[:, :, seen - 1:seen].contiguous()
        tpos = pos[:, :, seen - 1:seen].contiguous()
        # the step's attention scores, the same per token in both caches (a function of position)
        for st in (full, inc):
            st.acc += _bump(st.pos.clamp_min(0), i) * (st.pos >= 0)
        tacc = _bump(tpos, i)
        sync()
        t0 = time.perf_counter()
        full = repack(full, tk, tv, tpos, tacc, seen, keep, sinks, recent)
        sync()
        t1 = time.perf_counter()
        fits, free = (1, a.slack) if flag is None else flag.tolist()
        if not fits:
            raise SystemExit("an incremental step had no room (the room check failed)")
        if free < step_bound(L, 1):
            fallbacks += 1
            inc = repack(inc, tk, tv, tpos, tacc, seen, keep, sinks, recent, slack=a.slack)
            state, flag = step_state(inc), None
        elif a.profile and i == steps - 1:
            from torch.profiler import ProfilerActivity, profile
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
            with profile(activities=acts) as prof:
                flag = step_rewrite(inc, state, tk, tv, tpos, tacc, seen, keep, sinks, recent, drop=L, impl=a.impl)
                sync()
            for key in (("self_cuda_time_total",) if CUDA else ()) + ("cpu_time_total",):
                print(prof.key_averages().table(sort_by=key, row_limit=15), flush=True)
        else:
            flag = step_rewrite(inc, state, tk, tv, tpos, tacc, seen, keep, sinks, recent, drop=L, impl=a.impl)
        sync()
        t2 = time.perf_counter()
        t_full.append((t1 - t0) * 1e3)
        t_inc.append((t2 - t1) * 1e3)
    same = all(torch.equal(x, y) for x, y in zip(inc.unpack()[:5], full.unpack()[:5], strict=True))
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    res.update(same_cache=same, fallbacks=fallbacks, repack_ms_median=med(t_full),
               incremental_ms_median=med(t_inc), incremental_ms_mean=sum(t_inc) / len(t_inc),
               incremental_ms_all=t_inc, repack_ms_all=t_full,
               kv_bytes_no_slack=full.kv_nbytes(), kv_bytes_slack=inc.kv_nbytes(),
               kept_bytes=inc.kept_elements() * inc.kbuf.element_size())
    if CUDA:
        from triton.testing import do_bench
        tk, tv = k[:, :, -1:].contiguous(), v[:, :, -1:].contiguous()
        for name, st in (("decode_scores_no_slack_ms", full), ("decode_scores_slack_ms", inc)):
            res[name] = do_bench(lambda st=st: decode_kernel("triton", q, st, tk, tv), warmup=25, rep=200)
    res.update(pipelined(q, inc, state, keep, sinks, recent, L, T, a.slack, a.impl, n=4 if a.smoke else 24))
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"kv_mixeddim_incremental_{a.impl}.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k_: v_ for k_, v_ in res.items() if not k_.endswith("_all")}))
    if not same:
        raise SystemExit("the incremental and the whole-cache rewrite made different caches")


if __name__ == "__main__":
    main()
