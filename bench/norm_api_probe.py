"""Probe: fwd+bwd of the Triton add+norm through the public API, bf16 vs fp32 weights, with the
kernels listed by the torch profiler (why bf16 fwd+bwd trails torch eager in `blockzoo bench`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bootstrap import ensure_blockzoo  # noqa: E402

ensure_blockzoo()
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton.testing  # noqa: E402

from blockzoo.kernels.triton.norm import add_norm  # noqa: E402


def run(M, N, dt, wdt, kind="layernorm"):
    x = torch.randn(M, N, device="cuda", dtype=dt, requires_grad=True)
    d = torch.randn(M, N, device="cuda", dtype=dt, requires_grad=True)
    w = (1 + 0.1 * torch.randn(N, device="cuda")).to(wdt).requires_grad_(True)
    dy, dh = torch.randn_like(x), torch.randn_like(x)

    def ours():
        y, h = add_norm(x, d, w, None, 1e-5, kind)
        torch.autograd.grad((y, h), (x, d, w), (dy, dh))

    def eager():
        h = x + d
        we = w.to(dt)
        y = F.layer_norm(h, (N,), we, None, 1e-5) if kind == "layernorm" else F.rms_norm(h, (N,), we, 1e-5)
        torch.autograd.grad((y, h), (x, d, w), (dy, dh))
    t_o = triton.testing.do_bench(ours, warmup=25, rep=100, return_mode="median")
    t_e = triton.testing.do_bench(eager, warmup=25, rep=100, return_mode="median")
    print(f"{M}x{N} x:{dt} w:{wdt} {kind}: ours {t_o:.3f} ms eager {t_e:.3f} ms ({t_e / t_o:.2f}x)", flush=True)
    return ours


fn = run(4096, 16384, torch.bfloat16, torch.bfloat16)
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU],
                            acc_events=True) as prof:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))
import time  # noqa: E402

for label, sync in (("async", False), ("sync each", True)):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        fn()
        if sync:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    print(label, f"{(time.perf_counter() - t0) / 20 * 1e3:.3f} ms per fwd+bwd (host clock)")
