"""Fused residual (plain or gated) + DyT squash in Triton, forward and backward (normres.dyt,
normres.agu).

Public entry point::

    y, h = gated_dyt(x, delta, weight, bias, alpha, gate, gate_w, variant)

variant "add" (DyT):     h = x + delta
variant "gate_dyt":      h = g * x + (1 - g) * delta,  g = sigmoid(gate [+ gate_w * x])
variant "scale_dyt":     h = x + g * delta
then y = weight * tanh(alpha * h) + bias (alpha a 1-element tensor; weight, bias, gate,
gate_w per channel, the last dim). delta None: h is x itself (no copy, gate unused).
All math in fp32; h is stored in x's dtype, y squashes the unrounded fp32 h.

Everything is elementwise, so both directions are ONE pass over the activations:

* forward: 2-D grid of (row tiles, column blocks); reads x (+ delta), writes y (+ h).
* backward: grid (column blocks, GR row groups), persistent over row tiles; reads dy, dh and
  h (DyT) or x, delta (gated: h and g are recomputed), writes dx (+ ddelta for the gated
  variants), and keeps the per-column partial sums of dweight, dbias, dalpha, dgate and
  dgate_w in registers, written once to row g of [GR, N] fp32 buffers and summed once
  (no atomics).

Wrapped as ``torch.library`` custom ops ``blockzoo::gated_dyt_fwd`` / ``gated_dyt_bwd`` with
fake and autograd registrations. Runs on CUDA tensors, or on CPU tensors under
``TRITON_INTERPRET=1`` (the interpreter quirks are handled by norm.py's ``_cast`` / ``_bound``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .norm import _bound, _cast, _check_device, _DeviceGuard, _new, _num_sms, _op_exists

__all__ = ["gated_dyt", "MODES"]

MODES = {"add": 0, "gate_dyt": 1, "scale_dyt": 2}

# ---- tunables --------------------------------------------------------------------------------
FWD_TILE = 4096          # elements per forward program
BWD_TILE = 2048          # elements per backward row tile (5 fp32 accumulators of this size)
MAX_BLOCK_N = 1024       # column block
BWD_PROGRAMS_PER_SM = 4
BWD_STAGES = 1           # software-pipelining depth of the persistent row-tile loop
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _tanh(u):
    # tanh(u) = sign(u) (1 - e) / (1 + e), e = exp(-2|u|) in (0, 1]: no overflow
    e = tl.exp2(-2.0 * 1.4426950408889634 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u < 0, -t, t)


@triton.jit
def _gated_dyt_fwd_kernel(
    X, D, W, B, A, GL, GW, Y, H, M, N,
    HAS_D: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, MODE: tl.constexpr,
    HAS_GW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    alpha = tl.load(A).to(tl.float32)
    if HAS_D:
        d = tl.load(D + offs, mask=mask, other=0.0).to(tl.float32)
        if MODE == 0:
            hn = x + d
        else:
            z = tl.load(GL + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
            if HAS_GW:
                z = z + tl.load(GW + cols, mask=cmask, other=0.0).to(tl.float32)[None, :] * x
            g = 1.0 / (1.0 + tl.exp2(-LOG2E * z))
            if MODE == 1:
                hn = d + g * (x - d)
            else:
                hn = x + g * d
        tl.store(H + offs, _cast(hn, H.dtype.element_ty), mask=mask)   # y uses the fp32 hn
    else:
        hn = x
    y = _tanh(alpha * hn)
    if HAS_W:
        y = y * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs, _cast(y, Y.dtype.element_ty), mask=mask)


@triton.jit
def _gated_dyt_bwd_kernel(
    DY, DH, HX, D, W, A, GL, GW, DX, DD, DWP, DBP, DAP, DGP, DGWP,
    M, N, GR, ITERS,
    HAS_DH: tl.constexpr, HAS_W: tl.constexpr, MODE: tl.constexpr, HAS_GW: tl.constexpr,
    ADD_D: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, NEED_DA: tl.constexpr,
    NEED_DG: tl.constexpr, NEED_DGW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """HX is h (MODE 0, fp32), x + D (MODE 0 with ADD_D) or x (gated modes, D = delta). Program (n, g) walks row tiles
    g, g + GR, ... of column block n."""
    pid_n = tl.program_id(0)
    pid_g = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    alpha = tl.load(A).to(tl.float32)
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if MODE != 0:
        gl = tl.load(GL + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if HAS_GW:
            gw = tl.load(GW + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    da_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    dg_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    dgw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for it in range(0, ITERS):
        tile = pid_g + it * GR
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        if MODE == 0:
            hn = tl.load(HX + offs, mask=mask, other=0.0).to(tl.float32)
            if ADD_D:   # low precision: recompute the fp32 sum the forward squashed
                hn += tl.load(D + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            x = tl.load(HX + offs, mask=mask, other=0.0).to(tl.float32)
            d = tl.load(D + offs, mask=mask, other=0.0).to(tl.float32)
            z = gl
            if HAS_GW:
                z = z + gw * x
            g = 1.0 / (1.0 + tl.exp2(-LOG2E * z))
            if MODE == 1:
                hn = d + g * (x - d)
            else:
                hn = x + g * d
        t = _tanh(alpha * hn)
        if HAS_W:
            wdy = dy * w
        else:
            wdy = dy
        dpre = wdy * (1.0 - t * t)                 # d loss / d (alpha * h)
        dhn = dpre * alpha
        if HAS_DH:
            dhn += tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
        if MODE == 0:
            tl.store(DX + offs, _cast(dhn, DX.dtype.element_ty), mask=mask)
        else:
            gg = g * (1.0 - g)
            if MODE == 1:
                dz = dhn * (x - d) * gg
                dxv = dhn * g
                ddv = dhn - dxv
            else:
                dz = dhn * d * gg
                dxv = dhn
                ddv = dhn * g
            if HAS_GW:
                dxv += dz * gw
            tl.store(DX + offs, _cast(dxv, DX.dtype.element_ty), mask=mask)
            tl.store(DD + offs, _cast(ddv, DD.dtype.element_ty), mask=mask)
            if NEED_DG:
                dg_acc += dz
            if NEED_DGW:
                dgw_acc += dz * x
        # masked elements load 0 for dy and dh, so they add 0 to every partial sum
        if NEED_DW:
            dw_acc += dy * t
        if NEED_DB:
            db_acc += dy
        if NEED_DA:
            da_acc += dpre * hn
    out = pid_g * N + cols
    if NEED_DW:
        tl.store(DWP + out, tl.sum(dw_acc, axis=0), mask=cmask)
    if NEED_DB:
        tl.store(DBP + out, tl.sum(db_acc, axis=0), mask=cmask)
    if NEED_DA:
        tl.store(DAP + out, tl.sum(da_acc, axis=0), mask=cmask)
    if NEED_DG:
        tl.store(DGP + out, tl.sum(dg_acc, axis=0), mask=cmask)
    if NEED_DGW:
        tl.store(DGWP + out, tl.sum(dgw_acc, axis=0), mask=cmask)


# ======================================================================================
# launchers
# ======================================================================================
def _blocks(M: int, N: int, tile: int) -> tuple[int, int, int]:
    bn = min(MAX_BLOCK_N, triton.next_power_of_2(N))
    bm = max(1, min(tile // bn, triton.next_power_of_2(max(M, 1))))
    nw = int(min(8, max(1, triton.next_power_of_2(bm * bn // 256))))
    return bm, bn, nw


def _fwd(x, delta, weight, bias, alpha, gate, gate_w, mode: int):
    _check_device(x)
    N = x.shape[-1]
    x2 = x.contiguous().view(-1, N)
    M = x2.shape[0]
    dev = x.device
    y = _new(x.shape, x.dtype, dev)
    h = _new(x.shape, x.dtype, dev) if delta is not None else torch.empty(0, dtype=x.dtype, device=dev)
    if M == 0:
        return y, h
    d2 = delta.contiguous().view(-1, N) if delta is not None else x2
    bm, bn, nw = _blocks(M, N, FWD_TILE)

    def arg(t):
        return t.contiguous() if t is not None else x2

    with _DeviceGuard(dev):
        _gated_dyt_fwd_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
            x2, d2, arg(weight), arg(bias), alpha.contiguous(), arg(gate), arg(gate_w),
            y, h if delta is not None else y, M, N,
            HAS_D=delta is not None, HAS_W=weight is not None, HAS_B=bias is not None,
            MODE=mode if delta is not None else 0, HAS_GW=gate_w is not None,
            BLOCK_M=bm, BLOCK_N=bn, num_warps=nw, num_stages=1)
    return y, h


def _bwd(dy, dh, hx, delta, weight, alpha, gate, gate_w, mode: int, need: list[bool]):
    """need = [dw, db, dalpha, dgate, dgate_w]. Returns (dx, ddelta or empty, dw, db, dalpha,
    dgate, dgate_w), fp32 parameter gradients (empty when not needed)."""
    _check_device(hx)
    N = hx.shape[-1]
    h2 = hx.contiguous().view(-1, N)
    M = h2.shape[0]
    dev = hx.device
    dx = _new(hx.shape, hx.dtype, dev)
    dd = _new(hx.shape, hx.dtype, dev) if mode != 0 else torch.empty(0, dtype=hx.dtype, device=dev)
    need = [bool(n) for n in need]
    if weight is None:
        need[0] = False
    if mode == 0 or gate is None:
        need[3] = False
    if mode == 0 or gate_w is None:
        need[4] = False

    def empty():  # fresh each time: custom-op outputs must not alias
        return torch.empty(0, dtype=torch.float32, device=dev)

    if M == 0:
        grads = [torch.zeros(N if i != 2 else 1, dtype=torch.float32, device=dev) if n else empty()
                 for i, n in enumerate(need)]
        return (dx, dd, *grads)
    dy2 = dy.contiguous().view(-1, N)
    dh2 = dh.contiguous().view(-1, N) if dh is not None else dy2
    d2 = delta.contiguous().view(-1, N) if delta is not None else h2
    bm, bn, nw = _blocks(M, N, BWD_TILE)
    col_blocks = triton.cdiv(N, bn)
    tiles = triton.cdiv(M, bm)
    target = _num_sms(dev) * (BWD_PROGRAMS_PER_SM if dev.type == "cuda" else 1)
    GR = max(1, min(tiles, triton.cdiv(target, col_blocks)))
    parts = [_new((GR, N), torch.float32, dev) if n else None for n in need]

    def arg(t):
        return t.contiguous() if t is not None else h2

    with _DeviceGuard(dev):
        _gated_dyt_bwd_kernel[(col_blocks, GR)](
            dy2, dh2, h2, d2, arg(weight), alpha.contiguous(), arg(gate), arg(gate_w),
            dx, dd if mode != 0 else dx, *[p if p is not None else dx for p in parts],
            M, N, GR, _bound(triton.cdiv(tiles, GR)),
            HAS_DH=dh is not None, HAS_W=weight is not None, MODE=mode,
            HAS_GW=gate_w is not None, ADD_D=mode == 0 and delta is not None, NEED_DW=need[0], NEED_DB=need[1], NEED_DA=need[2],
            NEED_DG=need[3], NEED_DGW=need[4], BLOCK_M=bm, BLOCK_N=bn, num_warps=nw,
            num_stages=BWD_STAGES)
    grads = []
    for i, p in enumerate(parts):
        if p is None:
            grads.append(empty())
        elif i == 2:
            grads.append(p.sum().reshape(1))
        else:
            grads.append(p.sum(0))
    return (dx, dd, *grads)


# ======================================================================================
# torch.library custom ops
# ======================================================================================
def _fwd_op_impl(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor | None,
                 bias: torch.Tensor | None, alpha: torch.Tensor, gate: torch.Tensor | None,
                 gate_w: torch.Tensor | None, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _fwd(x, delta, weight, bias, alpha, gate, gate_w, mode)


def _fwd_op_fake(x, delta, weight, bias, alpha, gate, gate_w, mode):
    return x.new_empty(x.shape), (x.new_empty(x.shape) if delta is not None else x.new_empty((0,)))


def _bwd_op_impl(dy: torch.Tensor, dh: torch.Tensor | None, hx: torch.Tensor,
                 delta: torch.Tensor | None, weight: torch.Tensor | None, alpha: torch.Tensor,
                 gate: torch.Tensor | None, gate_w: torch.Tensor | None, mode: int,
                 need: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                            torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd(dy, dh, hx, delta, weight, alpha, gate, gate_w, mode, need)


def _bwd_op_fake(dy, dh, hx, delta, weight, alpha, gate, gate_w, mode, need):
    N = hx.shape[-1]
    need = list(need)
    have = [weight is not None, True, True, mode != 0 and gate is not None,
            mode != 0 and gate_w is not None]
    grads = [hx.new_empty(((1 if i == 2 else N) if (n and ok) else 0,), dtype=torch.float32)
             for i, (n, ok) in enumerate(zip(need, have, strict=True))]
    dd = hx.new_empty(hx.shape) if mode != 0 else hx.new_empty((0,))
    return (hx.new_empty(hx.shape), dd, *grads)


def _setup_context(ctx, inputs, output):
    x, delta, weight, bias, alpha, gate, gate_w, mode = inputs
    y, h = output
    ctx.mode = mode if delta is not None else 0
    ctx.has_delta = delta is not None
    # the squash saw the fp32 x + delta: fp32 h is exactly that; a bf16/fp16 h is not, so the
    # backward re-reads x and delta (gated modes always do: they recompute g)
    keep_h = ctx.mode == 0 and delta is not None and x.dtype == torch.float32
    hx = h if keep_h else x
    ctx.save_for_backward(hx, None if (keep_h or delta is None) else delta, weight, alpha, gate, gate_w)
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, dy, dh):
    hx, delta, weight, alpha, gate, gate_w = ctx.saved_tensors
    need = ctx.needs_input_grad
    if not ctx.has_delta:
        dh = None
    flags = [need[2] and weight is not None, need[3] and ctx.bias_dtype is not None, need[4],
             need[5] and ctx.mode != 0, need[6] and ctx.mode != 0]
    dx, dd, dw, db, da, dg, dgw = torch.ops.blockzoo.gated_dyt_bwd(
        dy, dh, hx, delta, weight, alpha, gate, gate_w, ctx.mode, flags)
    if ctx.mode == 0:
        dd = dx
    return (dx if need[0] else None,
            dd if (ctx.has_delta and need[1]) else None,
            dw.to(weight.dtype) if flags[0] else None,
            db.to(ctx.bias_dtype) if flags[1] else None,
            da.reshape(alpha.shape).to(alpha.dtype) if flags[2] else None,
            dg.to(gate.dtype) if flags[3] else None,
            dgw.to(gate_w.dtype) if flags[4] else None,
            None)


if not _op_exists("gated_dyt_fwd"):
    torch.library.custom_op("blockzoo::gated_dyt_fwd", mutates_args=())(_fwd_op_impl)
    torch.library.register_fake("blockzoo::gated_dyt_fwd", _fwd_op_fake)
    torch.library.register_autograd("blockzoo::gated_dyt_fwd", _backward,
                                    setup_context=_setup_context)
if not _op_exists("gated_dyt_bwd"):
    torch.library.custom_op("blockzoo::gated_dyt_bwd", mutates_args=())(_bwd_op_impl)
    torch.library.register_fake("blockzoo::gated_dyt_bwd", _bwd_op_fake)


# ======================================================================================
# public API
# ======================================================================================
def _check(x, delta, params: dict):
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError("gated_dyt: x needs a non-empty last dim")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"gated_dyt: dtype {x.dtype} not supported (fp32, fp16, bf16)")
    if delta is not None and (delta.shape != x.shape or delta.dtype != x.dtype or delta.device != x.device):
        raise ValueError(f"gated_dyt: delta {tuple(delta.shape)} {delta.dtype} must match x "
                         f"{tuple(x.shape)} {x.dtype}")
    N = x.shape[-1]
    for name, p in params.items():
        want = (1,) if name == "alpha" else (N,)
        if p is not None and (p.numel() != want[0] or (name != "alpha" and p.shape != want)
                              or p.device != x.device or not p.dtype.is_floating_point):
            raise ValueError(f"gated_dyt: {name} must be a float tensor of shape {want} on "
                             f"{x.device}, got {tuple(p.shape)} {p.dtype} {p.device}")


def gated_dyt(x: torch.Tensor, delta: torch.Tensor | None = None, weight: torch.Tensor | None = None,
              bias: torch.Tensor | None = None, alpha: torch.Tensor | float = 0.5,
              gate: torch.Tensor | None = None, gate_w: torch.Tensor | None = None,
              variant: str = "add") -> tuple[torch.Tensor, torch.Tensor]:
    """Fused (gated) residual + DyT. Returns ``(y, h)``; differentiable in every tensor."""
    if variant not in MODES:
        raise ValueError(f"gated_dyt: variant must be one of {tuple(MODES)}, got {variant!r}")
    if not isinstance(alpha, torch.Tensor):
        alpha = torch.full((1,), float(alpha), dtype=torch.float32, device=x.device)
    mode = MODES[variant]
    if mode == 0 or gate is None:
        mode, gate, gate_w = 0, None, None
    _check(x, delta, {"weight": weight, "bias": bias, "alpha": alpha, "gate": gate, "gate_w": gate_w})
    if delta is None:
        gate = gate_w = None
    y, h = torch.ops.blockzoo.gated_dyt_fwd(x, delta, weight, bias, alpha, gate, gate_w, mode)
    if delta is None:
        h = x
    return y, h
