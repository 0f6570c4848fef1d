"""Benchmark the Numba CPU kernels against torch on the same inputs, in one run.

    python bench/numba_cpu_bench.py [--reps 11] [--quick] [--json FILE]

Each op is warmed up first (numba compiles or loads its cache), then the variants of one
row (numba, the explicit torch reference, and SDPA / the fused torch op where there is one)
run interleaved, round after round; the whole table is measured in 5 passes (--passes)
so that a burst of load from other processes does not land on one row only, and the median
of all samples is reported. On a shared machine the ratios within a row are what to trust,
not the absolute times.

Columns: numba ms, ref ms (explicit torch math), alt ms (attention: torch SDPA on the same
data transposed to [B, H, T, D], is_causal=True; rmsnorm: torch.nn.functional.rms_norm),
then speedups ref/numba and alt/numba (> 1: numba is faster).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import pathlib
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _bootstrap import ensure_blockzoo  # noqa: E402

ensure_blockzoo()
from blockzoo.kernels.numba import activations as ACT  # noqa: E402
from blockzoo.kernels.numba import attention as A  # noqa: E402
from blockzoo.kernels.numba import norm as N  # noqa: E402


def _clear_grads(*ts):
    for t in ts:
        if t is not None:
            t.grad = None


def run_row(fns, reps, warmup=2):
    """fns: {label: callable or None}; interleaved rounds; seconds per label (lists)."""
    live = {k: f for k, f in fns.items() if f is not None}
    for f in live.values():
        for _ in range(warmup):
            f()
    times = {k: [] for k in live}
    for _ in range(reps):
        for k, f in live.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return times


# ----------------------------------------------------------------------------------------------
# rows
# ----------------------------------------------------------------------------------------------
def attention_rows(b, hq, hk, t, d, backward):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, t, hq, d, generator=g)
    k = torch.randn(b, t, hk, d, generator=g)
    v = torch.randn(b, t, hk, d, generator=g)
    do = torch.randn(b, t, hq, d, generator=g)
    qt, kt, vt, dot = (x.transpose(1, 2) for x in (q, k, v, do))  # [B, H, T, D] views
    scale = d ** -0.5
    gqa = hq != hk
    mask = torch.ones(t, t, dtype=torch.bool).tril()

    def ref_math(qh, kh, vh):
        if gqa:
            kh = kh.repeat_interleave(hq // hk, 1)
            vh = vh.repeat_interleave(hq // hk, 1)
        s = (qh @ kh.transpose(-1, -2)) * scale
        s = s.masked_fill(~mask, float("-inf"))
        return torch.softmax(s, -1) @ vh

    if not backward:
        def numba():
            A.attention_fwd(q, k, v, True, None)

        def ref():
            with torch.no_grad():
                ref_math(qt, kt, vt)

        def sdpa():
            with torch.no_grad():
                F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=gqa)
    else:
        ql, kl, vl = (x.clone().requires_grad_() for x in (q, k, v))
        qtl, ktl, vtl = (x.clone().requires_grad_() for x in (qt, kt, vt))

        def numba():
            _clear_grads(ql, kl, vl)
            A.attention(ql, kl, vl, causal=True).backward(do)

        def ref():
            _clear_grads(qtl, ktl, vtl)
            ref_math(qtl, ktl, vtl).backward(dot)

        def sdpa():
            _clear_grads(qtl, ktl, vtl)
            F.scaled_dot_product_attention(qtl, ktl, vtl, is_causal=True,
                                           enable_gqa=gqa).backward(dot)
    return {"numba": numba, "ref": ref, "alt": sdpa}


def norm_rows(n, w, kind, backward):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, w, generator=g)
    delta = torch.randn(n, w, generator=g)
    weight = torch.randn(w, generator=g)
    bias = torch.randn(w, generator=g) if kind == "layernorm" else None
    dy, dh = torch.randn(n, w, generator=g), torch.randn(n, w, generator=g)
    eps = 1e-5
    if backward:
        for tns in (x, delta, weight, bias):
            if tns is not None:
                tns.requires_grad_()

    def ref_math(fused=False):
        h = x + delta
        if kind == "layernorm":
            y = F.layer_norm(h, (w,), weight, bias, eps)
        elif fused:
            y = F.rms_norm(h, (w,), weight, eps)
        else:
            y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight
        return y, h

    def wrap(fn):
        if not backward:
            def f():
                with torch.no_grad():
                    fn()
        else:
            def f():
                _clear_grads(x, delta, weight, bias)
                torch.autograd.backward(fn(), (dy, dh))
        return f

    return {"numba": wrap(lambda: N.add_norm(x, delta, weight, bias, eps, kind)),
            "ref": wrap(ref_math),
            "alt": wrap(lambda: ref_math(fused=True)) if kind == "rmsnorm" else None}


def act_rows(op, n, w, backward):
    g = torch.Generator().manual_seed(0)
    if op == "swiglu":
        x = torch.randn(n, 2 * w, generator=g)
        dy = torch.randn(n, w, generator=g)

        def ref_fn(t):
            return F.silu(t[..., :w]) * t[..., w:]
        nb_fn = ACT.swiglu
    else:
        x = torch.randn(n, w, generator=g)
        dy = torch.randn(n, w, generator=g)

        def ref_fn(t):
            return 0.5 * t * (1 + torch.erf(t * (1 / math.sqrt(2))))
        nb_fn = ACT.gelu
    if backward:
        x.requires_grad_()

    def wrap(fn):
        if not backward:
            def f():
                with torch.no_grad():
                    fn(x)
        else:
            def f():
                x.grad = None
                fn(x).backward(dy)
        return f

    alt = (lambda t: F.gelu(t)) if op == "gelu" else None
    return {"numba": wrap(nb_fn), "ref": wrap(ref_fn), "alt": wrap(alt) if alt else None}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3, help="timed rounds per row and pass")
    ap.add_argument("--passes", type=int, default=5, help="passes over the whole table")
    ap.add_argument("--quick", action="store_true", help="smaller shapes, fewer reps")
    ap.add_argument("--json", help="also write the rows as JSON to this file")
    args = ap.parse_args(argv)
    reps = 3 if args.quick else args.reps
    passes = 1 if args.quick else args.passes
    t_att = 256 if args.quick else 1024
    n_big = 512 if args.quick else 4096

    import numba
    rows = []
    specs = []
    for bwd in (False, True):
        specs.append((f"attention {'fwd+bwd' if bwd else 'fwd'}", f"B1 H8 T{t_att} D64 causal",
                      lambda bwd=bwd: attention_rows(1, 8, 8, t_att, 64, bwd)))
    for bwd in (False, True):
        specs.append((f"attention GQA {'fwd+bwd' if bwd else 'fwd'}",
                      f"B1 Hq8 Hk2 T{t_att} D64 causal",
                      lambda bwd=bwd: attention_rows(1, 8, 2, t_att, 64, bwd)))
    for kind in ("layernorm", "rmsnorm"):
        for bwd in (False, True):
            specs.append((f"add+{kind} {'fwd+bwd' if bwd else 'fwd'}", f"{n_big}x{n_big}",
                          lambda kind=kind, bwd=bwd: norm_rows(n_big, n_big, kind, bwd)))
    for op in ("swiglu", "gelu"):
        for bwd in (False, True):
            shape = f"{n_big}x{2 * n_big}->{n_big}" if op == "swiglu" else f"{n_big}x{n_big}"
            specs.append((f"{op} {'fwd+bwd' if bwd else 'fwd'}", shape,
                          lambda op=op, bwd=bwd: act_rows(op, n_big, n_big, bwd)))

    samples = [dict() for _ in specs]
    for _ in range(passes):
        for i, (_, _, make) in enumerate(specs):
            for k, v in run_row(make(), reps).items():
                samples[i].setdefault(k, []).extend(v)
    for (name, shape, _), smp in zip(specs, samples, strict=True):
        med = {k: statistics.median(v) for k, v in smp.items()}
        row = {"op": name, "shape": shape, "dtype": "float32",
               **{f"{k}_ms": v * 1e3 for k, v in med.items()},
               **{f"{k}_min_ms": min(v) * 1e3 for k, v in smp.items()},
               "samples": len(smp["numba"])}
        row["ref_over_numba"] = med["ref"] / med["numba"]
        if "alt" in med:
            row["alt_over_numba"] = med["alt"] / med["numba"]
        rows.append(row)
        _print_row(row, header=len(rows) == 1)

    env = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
           "numba": numba.__version__, "python": platform.python_version(),
           "cpu": _cpu_name(), "cores": torch.get_num_threads(),
           "numba_threads": numba.get_num_threads(),
           "samples_per_variant": reps * passes}
    print("\n" + "  ".join(f"{k}={v}" for k, v in env.items()))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"env": env, "rows": rows}, indent=1))


def _print_row(row, header):
    if header:
        print(f"{'op':28s} {'shape':26s} {'numba ms':>9s} {'ref ms':>9s} {'alt ms':>9s} "
              f"{'ref/numba':>9s} {'alt/numba':>9s}")
    alt = row.get("alt_ms")
    print(f"{row['op']:28s} {row['shape']:26s} {row['numba_ms']:9.2f} {row['ref_ms']:9.2f} "
          f"{(f'{alt:9.2f}' if alt is not None else '        -')} "
          f"{row['ref_over_numba']:9.2f} "
          f"{(format(row['alt_over_numba'], '9.2f') if alt is not None else '        -')}",
          flush=True)


def _cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
