"""Tune, check and time the Triton attention core on a CUDA GPU against torch SDPA.

    python bench/triton_attention_tune.py [--out DIR] [--quick]

1. tunes the candidate configs at B=4, H=16, T=4096, D=128 bf16 (causal and not; both backward
   modes) and prints every candidate's time;
2. checks the compiled kernels against fp32 torch math (every tuned candidate at an aligned
   shape, then ragged / GQA / strided / fp16 / fp32 / D=40 / D=256 / Tq != Tk shapes), with
   NaN-poisoned outputs;
3. times forward and forward+backward for ours (both backward modes), SDPA FLASH_ATTENTION (FA2)
   and SDPA CUDNN_ATTENTION in the same run, with triton.testing.do_bench (median);
4. prints a table last and writes JSON to DIR (default $OUT or .).

Loads kernels/triton/attention.py by file path (no `blockzoo` package import: the GPU box has
no pydantic). FLOPs: forward 4*B*H*Tq*Tk*D (halved for causal), forward+backward 3.5x that.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import sys
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = pathlib.Path(__file__).resolve().parents[1]


sys.path.insert(0, str(ROOT / "bench"))
from _bootstrap import ensure_blockzoo  # noqa: E402

ensure_blockzoo()
from blockzoo.kernels import _alloc  # noqa: E402
from blockzoo.kernels.triton import attention as A  # noqa: E402

DEV = "cuda"


def log(*a):
    print(*a, flush=True)


# ------------------------------------------------------------------------------------------
# reference
# ------------------------------------------------------------------------------------------


def ref_attention(q, k, v, causal, scale):
    """fp32 torch math (TF32 off); returns (o [B,Tq,Hq,D], lse [B,Hq,Tq])."""
    B, Tq, Hq, D = q.shape
    Tk, Hk = k.shape[1], k.shape[2]
    G = Hq // Hk
    qf = q.float().transpose(1, 2)
    kf = k.float().transpose(1, 2).repeat_interleave(G, 1)
    vf = v.float().transpose(1, 2).repeat_interleave(G, 1)
    s = (qf @ kf.transpose(-1, -2)) * scale
    i = torch.arange(Tq, device=q.device)[:, None]
    j = torch.arange(Tk, device=q.device)[None, :]
    mask = (j <= i + (Tk - Tq)) if causal else torch.ones(Tq, Tk, dtype=torch.bool, device=q.device)
    row_ok = mask.any(-1)
    s = s.masked_fill(~mask, float("-inf"))
    s = torch.where(row_ok[:, None], s, torch.zeros_like(s))
    p = torch.softmax(s, -1) * (mask & row_ok[:, None])
    o = (p @ vf).transpose(1, 2)
    lse = torch.where(row_ok, torch.logsumexp(s, -1), torch.full_like(s[..., 0], float("-inf")))
    return o, lse


def maxnorm(a, b):
    a, b = a.float(), b.float()
    if torch.isnan(a).any():
        return float("nan")
    return ((a - b).abs().max() / b.abs().max().clamp_min(0.1)).item()


TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 5e-3}  # fp32 runs on TF32


def check_case(name, B, Tq, Tk, Hq, Hk, D, causal, dtype, mode, strided=False, results=None):
    torch.manual_seed(hash(name) % 2**31)
    if strided:
        assert Tq == Tk and Hq == Hk
        qkv = torch.randn(B, Tq, 3, Hq, D, device=DEV, dtype=dtype)
        q, k, v = qkv.unbind(2)
    else:
        q = torch.randn(B, Tq, Hq, D, device=DEV, dtype=dtype)
        k = torch.randn(B, Tk, Hk, D, device=DEV, dtype=dtype)
        v = torch.randn(B, Tk, Hk, D, device=DEV, dtype=dtype)
    do = torch.randn(B, Tq, Hq, D, device=DEV, dtype=dtype)
    scale = 1.0 / math.sqrt(D)
    o, lse = A.attention_fwd(q, k, v, causal, None)
    dq, dk, dv = A._bwd_impl(do, q, k, v, o, lse, causal, scale, None, mode=mode)
    torch.cuda.synchronize()
    qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
    ro, rlse = ref_attention(qr, kr, vr, causal, scale)
    rdq, rdk, rdv = torch.autograd.grad(ro, (qr, kr, vr), do.float())
    errs = {"o": maxnorm(o, ro), "dq": maxnorm(dq, rdq), "dk": maxnorm(dk, rdk), "dv": maxnorm(dv, rdv)}
    ninf_ok = torch.equal(torch.isneginf(lse), torch.isneginf(rlse))
    fin = ~torch.isneginf(rlse)
    errs["lse_abs"] = (lse[fin] - rlse[fin]).abs().max().item() if fin.any() else 0.0
    ok = ninf_ok and all(e == e and e <= TOL[dtype] for k_, e in errs.items() if k_ != "lse_abs")
    ok = ok and errs["lse_abs"] <= 1e-2
    log(f"  [{'ok' if ok else 'FAIL'}] {name:42s} " + " ".join(f"{k_}={e:.2e}" for k_, e in errs.items()))
    if results is not None:
        results.append({"name": name, "ok": ok, **errs})
    return ok


# ------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------


def bench(fn, rep=200):
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def make_inputs(B, H, T, D, dtype, grad):
    q = torch.randn(B, T, H, D, device=DEV, dtype=dtype, requires_grad=grad)
    k = torch.randn(B, T, H, D, device=DEV, dtype=dtype, requires_grad=grad)
    v = torch.randn(B, T, H, D, device=DEV, dtype=dtype, requires_grad=grad)
    return q, k, v


def time_shape(B, H, T, D, causal, dtype=torch.bfloat16):
    """Times every method twice, the second round in reverse order (so no method always runs on a
    hotter GPU), and keeps each method's faster round; both rounds are recorded."""
    fl_fwd = 4.0 * B * H * T * T * D * (0.5 if causal else 1.0)
    fl_fb = 3.5 * fl_fwd
    row = {"B": B, "H": H, "T": T, "D": D, "causal": causal}
    q, k, v = make_inputs(B, H, T, D, dtype, True)
    do = torch.randn_like(q)
    # SDPA gets contiguous [B, H, T, D] tensors (its native layout)
    qs, ks, vs = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    dos = do.transpose(1, 2).contiguous()
    scale = 1.0 / math.sqrt(D)

    def ours_fwd():
        with torch.no_grad():
            return A.attention_fwd(q, k, v, causal, None)

    def ours_fb(mode):
        def f():
            o, lse = A.attention_fwd(q, k, v, causal, None)
            return A._bwd_impl(do, q, k, v, o, lse, causal, scale, None, mode=mode)
        return f

    def ours_autograd():
        o = A.attention(q, k, v, causal=causal)
        return torch.autograd.grad(o, (q, k, v), do)

    def sdpa(backend, with_bwd):
        def f():
            with sdpa_kernel(backend):
                if with_bwd:
                    o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)
                    return torch.autograd.grad(o, (qs, ks, vs), dos)
                with torch.no_grad():
                    return F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)
        return f

    methods = [("flash_fwd", sdpa(SDPBackend.FLASH_ATTENTION, False)),
               ("cudnn_fwd", sdpa(SDPBackend.CUDNN_ATTENTION, False)),
               ("ours_fwd", ours_fwd),
               ("flash_fb", sdpa(SDPBackend.FLASH_ATTENTION, True)),
               ("cudnn_fb", sdpa(SDPBackend.CUDNN_ATTENTION, True)),
               ("ours_fb_split", ours_fb("split")),
               ("ours_fb_atomic", ours_fb("atomic")),
               ("ours_fb_autograd", ours_autograd)]
    rounds = {name: [] for name, _ in methods}
    for order in (methods, methods[::-1]):
        for name, fn in order:
            try:
                rounds[name].append(bench(fn))
            except Exception as e:  # backend unavailable
                row[f"{name}_error"] = repr(e)[:200]
    for name, ms in rounds.items():
        if not ms:
            continue
        fl = fl_fwd if name.endswith("_fwd") else fl_fb
        row[f"{name}_ms"] = min(ms)
        row[f"{name}_ms_rounds"] = ms
        row[f"{name}_tflops"] = fl / (min(ms) * 1e-3) / 1e12
    return row


# ------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true", help="one timing shape only")
    ap.add_argument("--skip-check", action="store_true")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    t_start = time.time()
    info = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.date.today().isoformat(),
        "bwd_mode_default": A.BWD_MODE,
    }
    log("env:", json.dumps(info))

    # 1. tuning at the headline shape (records every candidate's time in A.TUNE_LOG)
    log("== tuning (B=4, H=16, T=4096, D=128, bf16)")
    for causal in (False, True):
        q, k, v = make_inputs(4, 16, 4096, 128, torch.bfloat16, False)
        do = torch.randn_like(q)
        t0 = time.time()
        o, lse = A.attention_fwd(q, k, v, causal, None)
        for mode in ("split", "atomic"):
            A._bwd_impl(do, q, k, v, o, lse, causal, 1 / math.sqrt(128), None, mode=mode)
        torch.cuda.synchronize()
        log(f"  causal={causal}: tuned in {time.time() - t0:.1f}s")
        del q, k, v, do, o, lse
    tune_rows = []
    for key, cfg, ms in A.TUNE_LOG:
        tune_rows.append({"key": [str(x) for x in key], "cfg": list(cfg), "ms": ms})
        log(f"  {str(key[0]):5s} causal={key[2]!s:5s} {'atomic' if len(key) > 4 and key[4] else '':6s}"
            f" cfg={tuple(cfg)} {ms:.3f} ms")
    log("  chosen:", {str(k_): tuple(v_) for k_, v_ in A._TUNED.items()})

    # 2. compiled correctness
    checks = []
    if not args.skip_check:
        log("== correctness (compiled, vs fp32 torch math; NaN-poisoned outputs)")
        _alloc._state.on = True
        tuned = dict(A._TUNED)
        # every candidate config at an aligned shape (same specialisation as tuning: no recompiles)
        for kind in ("fwd", "dkdv", "dq"):
            for c in A._candidates(kind, 128, 2):
                os.environ[f"BLOCKZOO_ATTN_{kind.upper()}_CFG"] = ",".join(map(str, c))
                for causal in (True, False):
                    modes = ("split", "atomic") if kind == "dkdv" else ("split",)
                    for mode in modes:
                        check_case(f"{kind}{tuple(c)} c={int(causal)} {mode}", 1, 1024, 1024, 4, 4, 128,
                                   causal, torch.bfloat16, mode, results=checks)
                del os.environ[f"BLOCKZOO_ATTN_{kind.upper()}_CFG"]
        A._TUNED.clear()
        A._TUNED.update(tuned)
        A.AUTOTUNE = False  # other keys: first candidate (no tuning compiles)
        cases = [
            ("bf16 ragged GQA8:2 Tq1000 Tk1500 D64 c", (1, 1000, 1500, 8, 2, 64, True, torch.bfloat16)),
            ("bf16 Tq>Tk 300/100 D128 c", (2, 300, 100, 4, 4, 128, True, torch.bfloat16)),
            ("bf16 ragged T1023 D128 c", (2, 1023, 1023, 4, 4, 128, True, torch.bfloat16)),
            ("bf16 ragged T777 D128 nc", (1, 777, 777, 4, 2, 128, False, torch.bfloat16)),
            ("bf16 decode Tq1 Tk4097 D128 c", (2, 1, 4097, 8, 2, 128, True, torch.bfloat16)),
            ("fp16 D40 GQA4:1 T333 nc", (2, 333, 333, 4, 1, 40, False, torch.float16)),
            ("fp32(tf32) D96 T257 c", (1, 257, 257, 4, 4, 96, True, torch.float32)),
            ("bf16 D256 T512 c", (1, 512, 512, 4, 4, 256, True, torch.bfloat16)),
            ("fp32(tf32) D256 T130 nc", (1, 130, 130, 2, 2, 256, False, torch.float32)),
        ]
        for name, (B, Tq, Tk, Hq, Hk, D, causal, dt) in cases:
            for mode in ("split", "atomic"):
                check_case(f"{name} {mode}", B, Tq, Tk, Hq, Hk, D, causal, dt, mode, results=checks)
        check_case("bf16 strided fused-qkv T2048 D128 c split", 2, 2048, 2048, 8, 8, 128, True,
                   torch.bfloat16, "split", strided=True, results=checks)
        _alloc._state.on = False
        A.AUTOTUNE = True
        log(f"  correctness: {sum(c['ok'] for c in checks)}/{len(checks)} ok")

    # 3. timing
    log("== timing")
    shapes = [(4, 16, 4096, 128)] if args.quick else [(4, 16, 4096, 128), (4, 16, 8192, 128), (1, 16, 16384, 128)]
    rows = []
    for (B, H, T, D) in shapes:
        for causal in (False, True):
            r = time_shape(B, H, T, D, causal)
            torch.cuda.empty_cache()
            rows.append(r)
            log("  ", json.dumps({k_: (round(v_, 4) if isinstance(v_, float) else v_) for k_, v_ in r.items()}))

    out = {"info": info, "tune": tune_rows, "chosen": {str(k_): list(v_) for k_, v_ in A._TUNED.items()},
           "checks": checks, "timing": rows, "wall_s": time.time() - t_start}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "triton_attention_bench.json"), "w") as f:
        json.dump(out, f, indent=1, default=str)

    # 4. table (last)
    log("")
    log(f"{info['device']} | torch {info['torch']} | triton {info['triton']} | bf16 D=128 | TFLOP/s "
        "(fwd: 4BHT^2D, /2 causal; fwd+bwd: 3.5x)")
    hdr = (f"{'B':>2} {'H':>3} {'T':>6} {'causal':>6} | {'ours':>6} {'flash':>6} {'cudnn':>6} {'/fl':>5} {'/cu':>5}"
           f" | {'split':>6} {'atomic':>6} {'autogr':>6} {'flash':>6} {'cudnn':>6} {'best/fl':>7} {'best/cu':>7}")
    log("fwd" + " " * 21 + "| forward" + " " * 36 + "| forward+backward")
    log(hdr)
    for r in rows:
        fo, ff, fc = r.get("ours_fwd_tflops", 0), r.get("flash_fwd_tflops", float("nan")), r.get("cudnn_fwd_tflops", float("nan"))
        bs, ba, bg = r.get("ours_fb_split_tflops", 0), r.get("ours_fb_atomic_tflops", 0), r.get("ours_fb_autograd_tflops", 0)
        bf, bc = r.get("flash_fb_tflops", float("nan")), r.get("cudnn_fb_tflops", float("nan"))
        best = max(bs, ba)
        log(f"{r['B']:>2} {r['H']:>3} {r['T']:>6} {str(r['causal']):>6} | {fo:6.1f} {ff:6.1f} {fc:6.1f} {fo / ff:5.2f} {fo / fc:5.2f}"
            f" | {bs:6.1f} {ba:6.1f} {bg:6.1f} {bf:6.1f} {bc:6.1f} {best / bf:7.2f} {best / bc:7.2f}")
    spread = max((max(r[k_]) / min(r[k_]) - 1) * 100 for r in rows for k_ in r if k_.endswith("_ms_rounds"))
    log(f"each method timed twice (2nd round reversed order), faster kept; max round spread {spread:.1f}%")
    if checks:
        log(f"correctness: {sum(c['ok'] for c in checks)}/{len(checks)} ok; wall {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    sys.exit(main())
