"""CPU timing of normres.dyt / normres.agu: numba vs reference, forward+backward, 4096 x 4096
fp32, median of 7 runs of each in one process (the table in docs/components/dyt.md, agu.md).

    .venv/bin/python bench/normres_gated_cpu_bench.py
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bootstrap import ensure_blockzoo  # noqa: E402

ensure_blockzoo()

CONFIGS = (("normres.dyt", "add", False, False), ("normres.agu scale_dyt static", "scale_dyt", True, False),
           ("normres.agu gate_dyt static", "gate_dyt", True, False),
           ("normres.agu scale_dyt input", "scale_dyt", True, True))


def main(m: int = 4096, n: int = 4096, reps: int = 7) -> None:
    from blockzoo.kernels.numba.normres_gated import gated_dyt
    from blockzoo.plugins.normres.reference import gated_dyt_reference

    torch.manual_seed(0)
    gy, gh = torch.randn(m, n), torch.randn(m, n)

    def inputs(gated, gw):
        t = dict(x=torch.randn(m, n), delta=torch.randn(m, n), weight=torch.ones(n) + 0.1 * torch.randn(n),
                 bias=0.1 * torch.randn(n), alpha=torch.full((1,), 0.5),
                 gate=torch.randn(n) if gated else None, gate_w=0.5 * torch.randn(n) if gw else None)
        return {k: (v.requires_grad_(True) if v is not None else None) for k, v in t.items()}

    def step(fn, t, variant):
        y, h = fn(t["x"], t["delta"], t["weight"], t["bias"], t["alpha"], t["gate"], t["gate_w"], variant)
        torch.autograd.backward([y, h], [gy, gh])

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {m} x {n} fp32, fwd+bwd")
    print("| component / variant | reference ms | numba ms | speed-up |")
    print("| --- | --- | --- | --- |")
    for name, variant, gated, gw in CONFIGS:
        t = inputs(gated, gw)
        res = {}
        for label, fn in (("reference", gated_dyt_reference), ("numba", gated_dyt)):
            step(fn, t, variant)  # warm-up (and numba compile / cache load)
            times = []
            for _ in range(reps):
                for v in t.values():
                    if v is not None:
                        v.grad = None
                t0 = time.perf_counter()
                step(fn, t, variant)
                times.append(time.perf_counter() - t0)
            res[label] = statistics.median(times) * 1e3
        ref, nb = res["reference"], res["numba"]
        print(f"| {name} | {ref:.0f} | {nb:.0f} | {ref / nb:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
