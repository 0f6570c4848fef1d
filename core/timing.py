"""Timing: device events on a GPU (triton.testing.do_bench, median), a median of wall-clock
runs on the CPU. Always warm up first; never time on zeros."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def median_ms(fn: Callable[[], object], device: str, warmup_ms: float = 25, rep_ms: float = 100,
              min_reps: int = 5, max_reps: int = 1000) -> float:
    if device.startswith("cuda"):
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=max(rep_ms, 20), return_mode="median"))
    fn()  # warm-up (compilation, caches)
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-6)
    reps = int(min(max_reps, max(min_reps, rep_ms / 1e3 / once)))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def peak_memory(fn: Callable[[], object], device: str) -> int | None:
    """Peak device memory (bytes) allocated while running ``fn``; None where not measurable."""
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base
