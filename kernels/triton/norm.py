"""Fused residual-add + LayerNorm / RMSNorm in Triton, forward and backward.

Public entry point::

    y, h = add_norm(x, delta, weight, bias, eps, kind)     # kind: "layernorm" | "rmsnorm"

``h = x + delta`` (the residual stream; when ``delta`` is None, ``h`` IS ``x``, no copy) and
``y = norm(h) * weight + bias`` over the last dim, statistics in fp32, outputs in x's dtype.
Both outputs are differentiable: the backward takes ``dy`` and ``dh`` and returns
``dx = ddelta = dh + d norm(h)/dh . dy`` in one pass, with per-program partial weight/bias
gradients (a ``[programs, N]`` fp32 buffer, summed once; no atomics).

The kernels are wrapped as ``torch.library`` custom ops ``blockzoo::add_norm_fwd`` and
``blockzoo::add_norm_bwd`` (fake and autograd registered), so they compose with autograd and
``torch.compile``. They run on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was
set before Python started (CI). This module imports only torch, triton and the standard library.

Layout choices (see docs/notes/triton-norm.md for measurements):

* forward: one program per tile of ``BLOCK_M`` rows x ``BLOCK_N >= N`` columns (several rows per
  program for narrow rows); rows wider than ``FWD_MAX_BLOCK_N`` loop over column chunks in two
  passes (Chan-merged chunk statistics, then normalise re-reading ``h`` from L2).
* backward: persistent grid (about ``CTAS_PER_SM`` programs per SM), each program walks row
  tiles with a stride and keeps the dweight/dbias partial sums in registers. Rows wider than
  ``BWD_MAX_BLOCK_N`` (whose N-wide fp32 partial sums would not fit in registers) take two
  steps: per-row statistics c1 = mean(xhat * w * dy), c2 = mean(w * dy) (reads h, dy), then a
  grid of column blocks x row groups computes dx and the partial sums of its columns (reads h,
  dy, dh, writes dx): 6 passes over [M, N] instead of 4, but no register spills.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._alloc import empty
from ._common import INTERPRET, _cast

__all__ = ["add_norm", "KINDS", "INTERPRET"]

KINDS = ("layernorm", "rmsnorm")

# ---- tunables (module attributes so tests and bench/triton_norm_tune.py can override) --------
FWD_MAX_BLOCK_N = 16384     # widest row held whole in registers by the forward
BWD_MAX_BLOCK_N = 8192      # widest row the backward holds whole (with dweight/dbias sums)
LOOP_BLOCK_N = 8192         # forward: column chunk for wider rows
SPLIT_BLOCK_M = 2           # backward, wide rows: rows x columns tile of the dx/dweight step
SPLIT_BLOCK_N = 2048
STATS_BLOCK_N = 4096        # backward, wide rows: column chunk of the per-row statistics step
FWD_TILE = 4096             # target elements per forward program (rows x BLOCK_N)
BWD_TILE = 4096             # target elements per backward row tile
CTAS_PER_SM = 2             # persistent backward programs per SM
CPU_PROGRAMS = 3            # persistent backward programs under the interpreter
MAX_N = 65536




def _bound(v: int):
    """A runtime scalar that bounds a loop inside a kernel. Triton 3.6's interpreter passes int
    arguments as 1-element arrays and ``range()`` calls ``int()`` on them, which NumPy >= 2.4
    rejects (triton-lang/triton#9171, fixed after 3.6.0); a ``tl.constexpr`` argument passes
    through as a Python int. The interpreter compiles nothing, so this costs nothing there;
    compiled kernels get a plain int (no recompilation per value)."""
    return tl.constexpr(int(v)) if INTERPRET else int(v)


# ======================================================================================
# kernels
# ======================================================================================
@triton.jit
def _add_norm_fwd_kernel(
    X, D, W, B, Y, H, MEAN, RSTD,
    M, N, eps,
    IS_RMS: tl.constexpr, HAS_D: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LOOPED: tl.constexpr,
):
    pid = tl.program_id(0)
    if not LOOPED:
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        rmask = rows < M
        cmask = cols < N
        mask = rmask[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        h = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_D:
            d = tl.load(D + offs, mask=mask, other=0.0).to(tl.float32)
            h_st = _cast(h + d, H.dtype.element_ty)
            tl.store(H + offs, h_st, mask=mask)
            h = h_st.to(tl.float32)           # statistics of the stored (rounded) residual
        if IS_RMS:
            rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=1) / N + eps)
            xhat = h * rstd[:, None]
        else:
            mean = tl.sum(h, axis=1) / N
            diff = tl.where(mask, h - mean[:, None], 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / N + eps)
            xhat = diff * rstd[:, None]
            tl.store(MEAN + rows, mean, mask=rmask)
        tl.store(RSTD + rows, rstd, mask=rmask)
        y = xhat
        if HAS_W:
            w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
            y = y * w[None, :]
        if HAS_B:
            b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
            y = y + b[None, :]
        tl.store(Y + offs, _cast(y, Y.dtype.element_ty), mask=mask)
    else:
        # one row per program, columns in chunks: pass 1 statistics (and h), pass 2 normalise
        row = pid
        base = row.to(tl.int64) * N
        n_a = 0.0
        mean_a = 0.0
        m2_a = 0.0
        for off in range(0, N, BLOCK_N):
            cols = off + tl.arange(0, BLOCK_N)
            cmask = cols < N
            h = tl.load(X + base + cols, mask=cmask, other=0.0).to(tl.float32)
            if HAS_D:
                d = tl.load(D + base + cols, mask=cmask, other=0.0).to(tl.float32)
                h_st = _cast(h + d, H.dtype.element_ty)
                tl.store(H + base + cols, h_st, mask=cmask)
                h = h_st.to(tl.float32)
            if IS_RMS:
                m2_a += tl.sum(h * h, axis=0)
            else:
                # Chan et al. merge of (count, mean, M2) per chunk: no cancellation
                n_b = tl.minimum(N - off, BLOCK_N).to(tl.float32)
                mean_b = tl.sum(h, axis=0) / n_b
                dlt = tl.where(cmask, h - mean_b, 0.0)
                m2_b = tl.sum(dlt * dlt, axis=0)
                n_ab = n_a + n_b
                step = mean_b - mean_a
                mean_a = mean_a + step * (n_b / n_ab)
                m2_a = m2_a + m2_b + step * step * (n_a * n_b / n_ab)
                n_a = n_ab
        rstd = 1.0 / tl.sqrt(m2_a / N + eps)
        tl.store(RSTD + row, rstd)
        if not IS_RMS:
            tl.store(MEAN + row, mean_a)
        tl.debug_barrier()  # h written above is re-read below by (possibly) other threads
        for off in range(0, N, BLOCK_N):
            cols = off + tl.arange(0, BLOCK_N)
            cmask = cols < N
            if HAS_D:
                h = tl.load(H + base + cols, mask=cmask, other=0.0).to(tl.float32)
            else:
                h = tl.load(X + base + cols, mask=cmask, other=0.0).to(tl.float32)
            if IS_RMS:
                y = h * rstd
            else:
                y = (h - mean_a) * rstd
            if HAS_W:
                w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
                y = y * w
            if HAS_B:
                b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
                y = y + b
            tl.store(Y + base + cols, _cast(y, Y.dtype.element_ty), mask=cmask)


@triton.jit
def _add_norm_bwd_kernel(
    DY, DH, H, W, MEAN, RSTD, DX, DWP, DBP,
    M, N, G, ITERS,
    IS_RMS: tl.constexpr, HAS_DH: tl.constexpr, HAS_W: tl.constexpr,
    NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Whole rows in registers. Persistent: program pid takes row tiles pid, pid + G, ...
    (ITERS = cdiv(tiles, G) steps), keeps dweight/dbias partial sums in registers and writes
    them to row pid of the [G, N] partial buffers."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for it in range(0, ITERS):
        tile = pid + it * G
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        h = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        if IS_RMS:
            xhat = h * rstd[:, None]
        else:
            mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
            xhat = tl.where(mask, (h - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_W:
            wdy = dy * w[None, :]
        else:
            wdy = dy
        c1 = tl.sum(xhat * wdy, axis=1) / N
        if IS_RMS:
            dx = (wdy - xhat * c1[:, None]) * rstd[:, None]
        else:
            c2 = tl.sum(wdy, axis=1) / N
            dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DH:
            dx += tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + offs, _cast(dx, DX.dtype.element_ty), mask=mask)
        if NEED_DW:
            dw_acc += dy * xhat
        if NEED_DB:
            db_acc += dy
    if NEED_DW:
        tl.store(DWP + pid * N + cols, tl.sum(dw_acc, axis=0), mask=cmask)
    if NEED_DB:
        tl.store(DBP + pid * N + cols, tl.sum(db_acc, axis=0), mask=cmask)


@triton.jit
def _add_norm_bwd_stats_kernel(
    DY, H, W, MEAN, RSTD, C1, C2, N,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Wide rows, step 1 of 2: per row c1 = mean(xhat * w * dy), c2 = mean(w * dy)."""
    row = tl.program_id(0)
    base = row.to(tl.int64) * N
    rstd = tl.load(RSTD + row)
    if not IS_RMS:
        mean = tl.load(MEAN + row)
    acc1 = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N], dtype=tl.float32)
    for off in range(0, N, BLOCK_N):
        cols = off + tl.arange(0, BLOCK_N)
        cmask = cols < N
        h = tl.load(H + base + cols, mask=cmask, other=0.0).to(tl.float32)
        dy = tl.load(DY + base + cols, mask=cmask, other=0.0).to(tl.float32)
        if IS_RMS:
            xhat = h * rstd
        else:
            xhat = tl.where(cmask, (h - mean) * rstd, 0.0)
        if HAS_W:
            dy = dy * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        acc1 += xhat * dy
        acc2 += dy
    tl.store(C1 + row, tl.sum(acc1, axis=0) / N)
    if not IS_RMS:
        tl.store(C2 + row, tl.sum(acc2, axis=0) / N)


@triton.jit
def _add_norm_bwd_cols_kernel(
    DY, DH, H, W, MEAN, RSTD, C1, C2, DX, DWP, DBP,
    M, N, GR, ITERS,
    IS_RMS: tl.constexpr, HAS_DH: tl.constexpr, HAS_W: tl.constexpr,
    NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Wide rows, step 2 of 2: grid (column blocks, GR row groups). Program (n, g) takes row
    tiles g, g + GR, ... of column block n: dx from the per-row c1/c2, and dweight/dbias partial
    sums of its columns in registers, written to row g of the [GR, N] partial buffers."""
    pid_n = tl.program_id(0)
    pid_g = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for it in range(0, ITERS):
        tile = pid_g + it * GR
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        h = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        c1 = tl.load(C1 + rows, mask=rmask, other=0.0)
        if IS_RMS:
            xhat = h * rstd[:, None]
        else:
            mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
            c2 = tl.load(C2 + rows, mask=rmask, other=0.0)
            xhat = tl.where(mask, (h - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_W:
            wdy = dy * w[None, :]
        else:
            wdy = dy
        if IS_RMS:
            dx = (wdy - xhat * c1[:, None]) * rstd[:, None]
        else:
            dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DH:
            dx += tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + offs, _cast(dx, DX.dtype.element_ty), mask=mask)
        if NEED_DW:
            dw_acc += dy * xhat
        if NEED_DB:
            db_acc += dy
    if NEED_DW:
        tl.store(DWP + pid_g * N + cols, tl.sum(dw_acc, axis=0), mask=cmask)
    if NEED_DB:
        tl.store(DBP + pid_g * N + cols, tl.sum(db_acc, axis=0), mask=cmask)


# ======================================================================================
# launch configuration
# ======================================================================================
def _pow2_warps(elems: int, per_thread: int, lo: int = 1, hi: int = 16) -> int:
    w = triton.next_power_of_2(max(1, elems // (per_thread * 32)))
    return int(min(max(w, lo), hi))


def fwd_config(M: int, N: int, elem_size: int) -> dict:
    """Launch parameters of the forward for an [M, N] problem (override keys by passing cfg)."""
    bn = triton.next_power_of_2(N)
    if bn <= FWD_MAX_BLOCK_N:
        bm = max(1, min(FWD_TILE // bn, triton.next_power_of_2(max(M, 1))))
        return dict(BLOCK_M=bm, BLOCK_N=bn, LOOPED=False,
                    num_warps=_pow2_warps(bm * bn, 8))
    return dict(BLOCK_M=1, BLOCK_N=LOOP_BLOCK_N, LOOPED=True,
                num_warps=_pow2_warps(LOOP_BLOCK_N, 8))


def bwd_config(M: int, N: int, elem_size: int) -> dict:
    """Launch parameters of the backward for an [M, N] problem.

    Whole rows (BLOCK_N = next_pow2(N) <= BWD_MAX_BLOCK_N): picked from a sweep on an H100
    (bf16, 64M elements; docs/notes/triton-norm.md). Wider rows: the two-step split kernels."""
    bn = triton.next_power_of_2(N)
    if bn <= BWD_MAX_BLOCK_N:
        bm = max(1, min(BWD_TILE // bn, triton.next_power_of_2(max(M, 1))))
        if bn <= 2048:
            nw, ctas = 8, CTAS_PER_SM
        elif bn <= 4096:
            nw, ctas = 16, CTAS_PER_SM
        else:
            nw, ctas = 32, 1
        nw = min(nw, max(1, triton.next_power_of_2(bm * bn // 256)))  # tiny rows: fewer warps
        return dict(BLOCK_M=bm, BLOCK_N=bn, SPLIT=False, ctas_per_sm=ctas, num_warps=nw)
    return dict(BLOCK_M=SPLIT_BLOCK_M, BLOCK_N=SPLIT_BLOCK_N, SPLIT=True, ctas_per_sm=CTAS_PER_SM,
                num_warps=8, STATS_BLOCK_N=min(STATS_BLOCK_N, bn), stats_warps=8)


_SM_COUNT: dict = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return CPU_PROGRAMS
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _check_device(t: torch.Tensor) -> None:
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and INTERPRET:
        return
    raise RuntimeError(
        f"blockzoo triton add_norm: tensors on {t.device} need CUDA, or CPU with "
        "TRITON_INTERPRET=1 set before Python started")


def _new(shape, dtype, device):
    """Outputs and scratch: NaN-filled inside ``kernels._alloc.poisoned()`` (tests)."""
    return empty(shape, dtype=dtype, device=device)


class _DeviceGuard:
    def __init__(self, device: torch.device):
        self.ctx = torch.cuda.device(device) if device.type == "cuda" else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *a):
        if self.ctx is not None:
            self.ctx.__exit__(*a)


# ======================================================================================
# raw launchers (no autograd): also used by bench/triton_norm_tune.py with explicit cfg
# ======================================================================================
def _fwd(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor | None,
         bias: torch.Tensor | None, eps: float, kind: str, cfg: dict | None = None):
    _check_device(x)
    N = x.shape[-1]
    x2 = x.contiguous().view(-1, N)
    M = x2.shape[0]
    dev = x.device
    y = _new(x.shape, x.dtype, dev)
    h = _new(x.shape, x.dtype, dev) if delta is not None else torch.empty(0, dtype=x.dtype, device=dev)
    is_rms = kind == "rmsnorm"
    mean = _new((0,) if is_rms else (M,), torch.float32, dev)
    rstd = _new((M,), torch.float32, dev)
    if M == 0 or N == 0:
        return y, h, mean, rstd
    d2 = delta.contiguous().view(-1, N) if delta is not None else x2
    w = weight.contiguous() if weight is not None else x2
    b = bias.contiguous() if bias is not None else x2
    c = dict(fwd_config(M, N, x.element_size()))
    if cfg:
        c.update(cfg)
    grid = (triton.cdiv(M, c["BLOCK_M"]) if not c["LOOPED"] else M,)
    with _DeviceGuard(dev):
        _add_norm_fwd_kernel[grid](
            x2, d2, w, b, y, h if delta is not None else y, mean if not is_rms else rstd, rstd,
            M, _bound(N), float(eps),
            IS_RMS=is_rms, HAS_D=delta is not None, HAS_W=weight is not None,
            HAS_B=bias is not None, BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"],
            LOOPED=c["LOOPED"], num_warps=c["num_warps"], num_stages=c.get("num_stages", 1),
        )
    return y, h, mean, rstd


def _bwd(dy: torch.Tensor, dh: torch.Tensor | None, h: torch.Tensor,
         weight: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor,
         kind: str, need_dw: bool, need_db: bool, cfg: dict | None = None):
    """Returns (dx, dweight_fp32 or empty, dbias_fp32 or empty)."""
    _check_device(h)
    N = h.shape[-1]
    h2 = h.contiguous().view(-1, N)
    M = h2.shape[0]
    dev = h.device
    dx = _new(h.shape, h.dtype, dev)
    need_dw = bool(need_dw and weight is not None)

    def empty():  # a fresh one each time: custom-op outputs must not alias each other
        return torch.empty(0, dtype=torch.float32, device=dev)

    if M == 0 or N == 0:
        dw = torch.zeros(N, dtype=torch.float32, device=dev) if need_dw else empty()
        db = torch.zeros(N, dtype=torch.float32, device=dev) if need_db else empty()
        return dx, dw, db
    dy2 = dy.contiguous().view(-1, N)
    dh2 = dh.contiguous().view(-1, N) if dh is not None else dy2
    is_rms = kind == "rmsnorm"
    c = dict(bwd_config(M, N, h.element_size()))
    if cfg:
        c.update(cfg)
    w = weight.contiguous() if weight is not None else h2
    mean_arg = mean if not is_rms else rstd
    flags = dict(IS_RMS=is_rms, HAS_DH=dh is not None, HAS_W=weight is not None,
                 NEED_DW=need_dw, NEED_DB=bool(need_db))
    tiles = triton.cdiv(M, c["BLOCK_M"])
    target = _num_sms(dev) * c["ctas_per_sm"]       # persistent programs wanted
    if not c["SPLIT"]:
        G = max(1, min(tiles, target))
        col_blocks = 1
    else:
        col_blocks = triton.cdiv(N, c["BLOCK_N"])
        G = max(1, min(tiles, triton.cdiv(target, col_blocks)))
    dwp = _new((G, N), torch.float32, dev) if need_dw else None
    dbp = _new((G, N), torch.float32, dev) if need_db else None
    with _DeviceGuard(dev):
        if not c["SPLIT"]:
            _add_norm_bwd_kernel[(G,)](
                dy2, dh2, h2, w, mean_arg, rstd, dx,
                dwp if need_dw else dx, dbp if need_db else dx,
                M, _bound(N), G, _bound(triton.cdiv(tiles, G)),
                BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], **flags,
                num_warps=c["num_warps"], num_stages=c.get("num_stages", 1),
            )
        else:
            c1 = _new((M,), torch.float32, dev)
            c2 = _new((M,), torch.float32, dev) if not is_rms else c1
            _add_norm_bwd_stats_kernel[(M,)](
                dy2, h2, w, mean_arg, rstd, c1, c2, _bound(N),
                IS_RMS=is_rms, HAS_W=weight is not None, BLOCK_N=c["STATS_BLOCK_N"],
                num_warps=c["stats_warps"],
            )
            _add_norm_bwd_cols_kernel[(col_blocks, G)](
                dy2, dh2, h2, w, mean_arg, rstd, c1, c2, dx,
                dwp if need_dw else dx, dbp if need_db else dx,
                M, N, G, _bound(triton.cdiv(tiles, G)),
                BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], **flags,
                num_warps=c["num_warps"], num_stages=c.get("num_stages", 1),
            )
    dw = dwp.sum(0) if need_dw else empty()
    db = dbp.sum(0) if need_db else empty()
    return dx, dw, db


# ======================================================================================
# torch.library custom ops
# ======================================================================================
def _op_exists(name: str) -> bool:
    try:
        getattr(torch.ops.blockzoo, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def _fwd_op_impl(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor | None,
                 bias: torch.Tensor | None, eps: float, kind: str
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _fwd(x, delta, weight, bias, eps, kind)


def _fwd_op_fake(x, delta, weight, bias, eps, kind):
    M = x.numel() // x.shape[-1] if x.dim() > 0 and x.shape[-1] != 0 else 0
    y = x.new_empty(x.shape)
    h = x.new_empty(x.shape) if delta is not None else x.new_empty((0,))
    mean = x.new_empty((0,) if kind == "rmsnorm" else (M,), dtype=torch.float32)
    rstd = x.new_empty((M,), dtype=torch.float32)
    return y, h, mean, rstd


def _bwd_op_impl(dy: torch.Tensor, dh: torch.Tensor | None, h: torch.Tensor,
                 weight: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor,
                 kind: str, need_dw: bool, need_db: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd(dy, dh, h, weight, mean, rstd, kind, need_dw, need_db)


def _bwd_op_fake(dy, dh, h, weight, mean, rstd, kind, need_dw, need_db):
    N = h.shape[-1]
    dx = h.new_empty(h.shape)
    dw = h.new_empty((N,) if (need_dw and weight is not None) else (0,), dtype=torch.float32)
    db = h.new_empty((N,) if need_db else (0,), dtype=torch.float32)
    return dx, dw, db


def _fwd_setup_context(ctx, inputs, output):
    x, delta, weight, bias, eps, kind = inputs
    y, h, mean, rstd = output
    ctx.save_for_backward(h if delta is not None else x, weight, mean, rstd)
    ctx.has_delta = delta is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.kind = kind
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)


def _fwd_backward(ctx, dy, dh, dmean, drstd):
    hs, weight, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    if not ctx.has_delta:
        dh = None                      # h was an empty placeholder; x itself is returned as h
    if dy is None:                     # only h was used downstream: dx = ddelta = dh
        return (dh if need[0] else None, dh if need[1] else None, None, None, None, None)
    need_dw = weight is not None and need[2]
    need_db = ctx.bias_dtype is not None and need[3]
    dx, dw, db = torch.ops.blockzoo.add_norm_bwd(dy, dh, hs, weight, mean, rstd, ctx.kind,
                                                 need_dw, need_db)
    return (dx if need[0] else None,
            dx if (ctx.has_delta and need[1]) else None,
            dw.to(weight.dtype) if need_dw else None,
            db.to(ctx.bias_dtype) if need_db else None,
            None, None)


if not _op_exists("add_norm_fwd"):
    torch.library.custom_op("blockzoo::add_norm_fwd", mutates_args=())(_fwd_op_impl)
    torch.library.register_fake("blockzoo::add_norm_fwd", _fwd_op_fake)
    torch.library.register_autograd("blockzoo::add_norm_fwd", _fwd_backward,
                                    setup_context=_fwd_setup_context)
if not _op_exists("add_norm_bwd"):
    torch.library.custom_op("blockzoo::add_norm_bwd", mutates_args=())(_bwd_op_impl)
    torch.library.register_fake("blockzoo::add_norm_bwd", _bwd_op_fake)


# ======================================================================================
# public API
# ======================================================================================
def add_norm(x: torch.Tensor, delta: torch.Tensor | None = None,
             weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
             eps: float = 1e-5, kind: str = "layernorm") -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``h = x + delta; y = norm(h) * weight + bias``. Returns ``(y, h)``.

    ``delta`` None: ``h`` is ``x`` itself (no copy). ``weight``/``bias`` None: no affine part.
    ``kind``: "layernorm" (mean and variance) or "rmsnorm" (root mean square). Normalised over
    the last dim, statistics in fp32, ``y`` and ``h`` in ``x.dtype``. Differentiable in all
    tensor arguments, through both outputs.
    """
    if kind not in KINDS:
        raise ValueError(f"add_norm: kind must be one of {KINDS}, got {kind!r}")
    if x.dim() == 0:
        raise ValueError("add_norm: x needs at least one dim")
    N = x.shape[-1]
    if not (1 <= N <= MAX_N):
        raise ValueError(f"add_norm: last dim must be in 1..{MAX_N}, got {N}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"add_norm: dtype {x.dtype} not supported (fp32, fp16, bf16)")
    if delta is not None and (delta.shape != x.shape or delta.dtype != x.dtype
                              or delta.device != x.device):
        raise ValueError(f"add_norm: delta {tuple(delta.shape)} {delta.dtype} {delta.device} must "
                         f"match x {tuple(x.shape)} {x.dtype} {x.device}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and (p.shape != (N,) or p.device != x.device
                              or not p.dtype.is_floating_point):
            raise ValueError(f"add_norm: {name} must be a float tensor of shape ({N},) on "
                             f"{x.device}, got {tuple(p.shape)} {p.dtype} {p.device}")
    y, h, _, _ = torch.ops.blockzoo.add_norm_fwd(x, delta, weight, bias, float(eps), kind)
    if delta is None:
        h = x
    return y, h
