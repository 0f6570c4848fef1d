"""GPU check and benchmark of the Triton flow kernels (flow.coupling, flow.actnorm), ONE process:

1. compiled correctness: the conformance matrix rows of flow.coupling / flow.actnorm on CUDA
   (forward and every gradient vs the fp32 reference, fp32 / bf16 / fp16), then
   ``inverse(forward(x)) == x`` within 1e-5 in fp32 at the benchmark shape and at odd shapes;
2. bandwidth at batch 65536 x 64 dims (and a few more shapes): coupling forward, inverse, and
   forward + inverse together, actnorm forward, each as GB/s of the bytes it must move, against
   a device copy measured in the same run with the same number of bytes moved (copy of
   ``bytes / 2`` read + ``bytes / 2`` written). ``triton.testing.do_bench`` medians (it flushes
   L2 between repetitions, so these are HBM numbers). Target (issue 10): coupling forward +
   inverse >= 60% of the copy bandwidth;
3. a short table printed last; JSON written under ``$OUT`` (default ``bench-out``).

Bytes counted: coupling, ``mask=alternate``: read x, s, t, write y (4 B D elements) + the
log-det (B); with ``mask=half`` s and t are read on the transformed half only (3 B D + B).
actnorm: read x, write y (2 B D) + log-det (B); the [D] parameters are negligible.

Usage on the GPU machine, from the repository root::

    python3 bench/gpu_flow.py [--shapes 65536x64,65536x256,16384x1024] [--dtypes float32,bfloat16]

Dry run on a CPU (checks the script, not the speed: wall-clock timing, no L2 flush)::

    TRITON_INTERPRET=1 python3 bench/gpu_flow.py --device cpu --shapes 64x16 --roundtrip-shapes 33x7,3x1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bootstrap import ensure_blockzoo  # noqa: E402

ensure_blockzoo()

import torch  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from blockzoo.kernels.triton.flow import actnorm, coupling  # noqa: E402
from blockzoo.plugins.flow.reference import actnorm_reference, coupling_reference  # noqa: E402
from blockzoo.testing.conformance import check, matrix  # noqa: E402

DEVICE = "cuda"


def timed(fn, warmup: int = 50, rep: int = 300) -> float:
    """Median ms: ``triton.testing.do_bench`` on CUDA; a plain wall-clock median on the CPU (the
    interpreter dry run only checks that the script works)."""
    if DEVICE == "cuda":
        return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    fn()
    samples = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return sorted(samples)[1]


def correctness(roundtrip_shapes) -> dict:
    out = {"matrix": {"passed": 0, "failed": []}, "roundtrip": []}
    cases = matrix(components=["flow.coupling", "flow.actnorm"], backends=["triton"],
                   dtypes=[torch.float32, torch.bfloat16, torch.float16], device=DEVICE)
    for cc in cases:
        try:
            check(cc)
            out["matrix"]["passed"] += 1
        except Exception as exc:  # noqa: BLE001
            out["matrix"]["failed"].append(f"{cc.id}: {str(exc)[:400]}")
    g = torch.Generator(device=DEVICE).manual_seed(0)
    for b, d in roundtrip_shapes:
        for mask in ("alternate", "half"):
            x = torch.randn(b, d, device=DEVICE, generator=g)
            s = torch.randn(b, d, device=DEVICE, generator=g) * 1.5
            t = torch.randn(b, d, device=DEVICE, generator=g)
            y, ld = coupling(x, s, t, mask=mask, parity=1)
            xr, ld2 = coupling(y, s, t, mask=mask, parity=1, inverse=True)
            yr, ldr = coupling_reference(x, s, t, mask=mask, parity=1)
            out["roundtrip"].append({
                "op": "coupling", "shape": [b, d], "mask": mask,
                "max_abs_roundtrip": float((xr - x).abs().max()),
                "max_abs_logdet_sum": float((ld + ld2).abs().max()),
                "fwd_max_rel_vs_ref": float((y - yr).abs().max() / yr.abs().max()),
                "logdet_max_rel_vs_ref": float((ld - ldr).abs().max() / ldr.abs().max().clamp_min(1e-30))})
        loc, ls = torch.randn(d, device=DEVICE, generator=g) * 0.5, torch.randn(d, device=DEVICE, generator=g) * 0.5
        y, _ = actnorm(x, loc, ls)
        xr, _ = actnorm(y, loc, ls, inverse=True)
        yr, _ = actnorm_reference(x, loc, ls)
        out["roundtrip"].append({"op": "actnorm", "shape": [b, d], "max_abs_roundtrip": float((xr - x).abs().max()),
                                 "fwd_max_rel_vs_ref": float((y - yr).abs().max() / yr.abs().max())})
    out["roundtrip_ok"] = all(r["max_abs_roundtrip"] <= 1e-5 for r in out["roundtrip"])
    return out


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / ms / 1e6


def copy_ms(n_elems: int, dtype) -> float:
    src = torch.randn(n_elems, device=DEVICE).to(dtype)
    dst = torch.empty_like(src)
    return timed(lambda: dst.copy_(src))


def bench(shapes, dtypes) -> list[dict]:
    rows = []
    for b, d in shapes:
        for dtype in dtypes:
            elt = torch.empty((), dtype=dtype).element_size()
            g = torch.Generator(device=DEVICE).manual_seed(1)
            x = torch.randn(b, d, device=DEVICE, generator=g).to(dtype)
            s = (torch.randn(b, d, device=DEVICE, generator=g) * 1.5).to(dtype)
            t = torch.randn(b, d, device=DEVICE, generator=g).to(dtype)
            loc = torch.randn(d, device=DEVICE, generator=g).to(dtype)
            ls = (torch.randn(d, device=DEVICE, generator=g) * 0.3).to(dtype)
            y, _ = coupling(x, s, t)
            for mask, n_el in (("alternate", 4 * b * d + b), ("half", 3 * b * d + b)):
                nbytes = n_el * elt
                f = timed(lambda: coupling(x, s, t, mask=mask))  # noqa: B023
                i = timed(lambda: coupling(y, s, t, mask=mask, inverse=True))  # noqa: B023
                c = copy_ms(n_el // 2, dtype)
                copy_bw = gbps(nbytes, c)
                both = gbps(2 * nbytes, f + i)
                rows.append({"op": f"coupling[{mask}]", "shape": f"{b}x{d}", "dtype": str(dtype).removeprefix("torch."),
                             "fwd_ms": f, "inv_ms": i, "fwd_GBps": gbps(nbytes, f), "inv_GBps": gbps(nbytes, i),
                             "fwd_inv_GBps": both, "copy_GBps": copy_bw, "pct_of_copy": 100 * both / copy_bw,
                             "fwd_pct_of_copy": 100 * gbps(nbytes, f) / copy_bw,
                             "inv_pct_of_copy": 100 * gbps(nbytes, i) / copy_bw, "bytes_per_call": nbytes})
            # training direction: forward + backward through autograd (x, s, t need grad)
            xg, sg, tg = (v.detach().requires_grad_() for v in (x, s, t))
            yy, ld = coupling(xg, sg, tg)
            dy, dld = torch.randn_like(yy), torch.randn_like(ld)
            fb = timed(lambda: torch.autograd.grad(coupling(xg, sg, tg), (xg, sg, tg), (dy, dld)))  # noqa: B023
            fb_el = (4 * b * d + b) + (7 * b * d + b)
            fb_copy = gbps(fb_el * elt, copy_ms(fb_el // 2, dtype))
            rows.append({"op": "coupling fwd+bwd", "shape": f"{b}x{d}", "dtype": str(dtype).removeprefix("torch."),
                         "fwd_inv_GBps": gbps(fb_el * elt, fb), "fwd_ms": fb, "copy_GBps": fb_copy,
                         "pct_of_copy": 100 * gbps(fb_el * elt, fb) / fb_copy})
            an = timed(lambda: actnorm(x, loc, ls))  # noqa: B023
            an_el = 2 * b * d + b
            cbw = gbps(an_el * elt, copy_ms(an_el // 2, dtype))
            rows.append({"op": "actnorm fwd", "shape": f"{b}x{d}", "dtype": str(dtype).removeprefix("torch."),
                         "fwd_ms": an, "fwd_inv_GBps": gbps(an_el * elt, an), "copy_GBps": cbw,
                         "pct_of_copy": 100 * gbps(an_el * elt, an) / cbw})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="65536x64,65536x256,16384x1024")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--roundtrip-shapes", default="65536x64,1000x63,4097x40,3x1")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: a dry run of the script under TRITON_INTERPRET=1 (timings meaningless)")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("--device cpu needs TRITON_INTERPRET=1")
        return 2
    res = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (TRITON_INTERPRET=1 dry run)",
           "torch": torch.__version__, "triton": triton.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "argv": sys.argv[1:]}
    parse = lambda text: [tuple(int(v) for v in s.split("x")) for s in text.split(",")]  # noqa: E731
    try:
        res["correctness"] = correctness(parse(args.roundtrip_shapes))
    except Exception:  # noqa: BLE001
        res["correctness_error"] = traceback.format_exc()
    shapes = parse(args.shapes)
    dtypes = [getattr(torch, n) for n in args.dtypes.split(",")]
    try:
        res["bench"] = bench(shapes, dtypes)
    except Exception:  # noqa: BLE001
        res["bench_error"] = traceback.format_exc()
    with open(os.path.join(args.out, "gpu_flow.json"), "w") as f:
        json.dump(res, f, indent=1)
    c = res.get("correctness", {})
    print(f"# {res['device']}  torch {res['torch']}  triton {res['triton']}  {res['date']}")
    if c:
        m = c["matrix"]
        print(f"matrix: {m['passed']} passed, {len(m['failed'])} failed")
        for line in m["failed"][:10]:
            print("  FAIL", line)
        worst = max(r["max_abs_roundtrip"] for r in c["roundtrip"])
        print(f"roundtrip fp32: worst max|inverse(forward(x)) - x| = {worst:.2e} ({'ok' if c['roundtrip_ok'] else 'OVER 1e-5'})")
    else:
        print(res.get("correctness_error", ""))
    print(f"{'op':<20}{'shape':<12}{'dtype':<10}{'fwd ms':>8}{'fwd GB/s':>10}{'inv ms':>8}{'inv GB/s':>10}"
          f"{'f+i GB/s':>10}{'copy GB/s':>11}{'f+i %copy':>10}")
    for r in res.get("bench", []):
        if "inv_ms" in r:
            inv = f"{r['inv_ms']:>8.4f}{r['inv_GBps']:>10.0f}{r['fwd_inv_GBps']:>10.0f}"
        else:
            inv = f"{'-':>8}{'-':>10}{'-':>10}"
        fwd_bw = r.get("fwd_GBps", r["fwd_inv_GBps"])
        print(f"{r['op']:<20}{r['shape']:<12}{r['dtype']:<10}{r['fwd_ms']:>8.4f}{fwd_bw:>10.0f}{inv}"
              f"{r['copy_GBps']:>11.0f}{r['pct_of_copy']:>9.1f}%")
    if "bench_error" in res:
        print(res["bench_error"])
    print("(coupling[*] rows: fwd / inverse / both together; 'coupling fwd+bwd' and 'actnorm fwd': one pass,"
          " in the fwd columns, %copy of that pass; copy = device copy of the same bytes, same run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
