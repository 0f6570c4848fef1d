"""Numba CPU kernels (kernels/numba): forward and every gradient against explicit torch math.

The references are written here in float64 (for float32 inputs too: the float32 kernels are
compared with the exact answer on the same float32 inputs). Errors are max-normalised:
max|got - ref| / max|ref| (with a floor for all-zero references). Fresh inputs per test from a
seed drawn per test and printed on failure.
"""

from __future__ import annotations

import math
import random
import sys

import pytest
import torch

pytest.importorskip("numba")

from blockzoo.kernels.numba import activations as act_mod  # noqa: E402
from blockzoo.kernels.numba import attention as attn_mod  # noqa: E402
from blockzoo.kernels.numba import norm as norm_mod  # noqa: E402

TOL = {torch.float32: 2e-5, torch.float64: 1e-10}
DTYPES = [torch.float32, torch.float64]


@pytest.fixture
def gen(request):
    seed = random.SystemRandom().randrange(2**31)
    request.node.user_properties.append(("seed", seed))
    g = torch.Generator().manual_seed(seed)
    return g


def randn(gen, *shape, dtype=torch.float32, scale=1.0, grad=True):
    t = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
    return t.to(dtype).requires_grad_(grad)


def assert_close(name, got, ref, dtype, gen, floor=1e-6):
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert got.dtype == dtype, f"{name}: dtype {got.dtype} != {dtype}"
    got64 = got.detach().double()
    ref64 = ref.detach().double()
    assert torch.isfinite(got64).all(), f"{name}: non-finite values (seed {gen.initial_seed()})"
    denom = max(ref64.abs().max().item() if ref64.numel() else 0.0, floor)
    err = (got64 - ref64).abs().max().item() / denom if ref64.numel() else 0.0
    tol = TOL[dtype]
    assert err <= tol, (f"{name}: max-normalised error {err:.3e} > {tol:.0e} "
                        f"(seed {gen.initial_seed()}, |ref|max {denom:.3e})")


def _leaf64(*ts):
    return [t.detach().double().requires_grad_() if t is not None else None for t in ts]


# ----------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------
def ref_attention(q, k, v, causal, scale=None):
    """Explicit softmax(scale q k^T) v in the input precision, GQA, bottom-right causal mask;
    rows that see no key give 0. Returns (o, lse)."""
    b, tq, hq, d = q.shape
    tk, hk = k.shape[1], k.shape[2]
    rep = hq // hk
    k = k.repeat_interleave(rep, dim=2)
    v = v.repeat_interleave(rep, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q, k) * (scale if scale is not None else d ** -0.5)
    if causal:
        i = torch.arange(tq)[:, None]
        j = torch.arange(tk)[None, :]
        s = s.masked_fill(j > i + (tk - tq), -math.inf)
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    p = torch.exp(s - m)
    den = p.sum(-1, keepdim=True)
    o = torch.einsum("bhij,bjhd->bihd", p / torch.where(den > 0, den, torch.ones_like(den)), v)
    lse = (m + torch.log(den)).squeeze(-1)
    return o, lse


ATTN_CASES = [
    # B, Tq, Tk, Hq, Hk, D, causal
    (1, 1, 1, 1, 1, 40, True),
    (2, 63, 63, 4, 2, 40, True),
    (1, 100, 100, 4, 1, 40, True),
    (2, 63, 100, 4, 2, 40, True),     # Tq < Tk, causal (bottom-right)
    (1, 100, 63, 4, 4, 40, True),     # Tq > Tk, causal: the first 37 rows see no key
    (2, 100, 77, 4, 2, 40, False),
    (1, 63, 1, 2, 1, 16, False),
    (1, 300, 300, 2, 1, 64, True),    # several default-size blocks, ragged last block
]


@pytest.fixture(params=[None, (16, 32)], ids=["blocks-default", "blocks-16x32"])
def attn_blocks(request, monkeypatch):
    """Default blocks, and small ones so that T <= 100 spans many query and key blocks."""
    if request.param is not None:
        monkeypatch.setattr(attn_mod, "BLOCK_M", request.param[0])
        monkeypatch.setattr(attn_mod, "BLOCK_N", request.param[1])
    return request.param


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: "B{}-Tq{}-Tk{}-H{}:{}-D{}-{}".format(
    *c[:6], "causal" if c[6] else "full"))
def test_attention_fwd_bwd(case, dtype, gen, attn_blocks):
    b, tq, tk, hq, hk, d, causal = case
    q = randn(gen, b, tq, hq, d, dtype=dtype)
    k = randn(gen, b, tk, hk, d, dtype=dtype)
    v = randn(gen, b, tk, hk, d, dtype=dtype)
    do = randn(gen, b, tq, hq, d, dtype=dtype, grad=False)

    o = attn_mod.attention(q, k, v, causal=causal)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)

    q64, k64, v64 = _leaf64(q, k, v)
    o_ref, lse_ref = ref_attention(q64, k64, v64, causal)
    dq_ref, dk_ref, dv_ref = torch.autograd.grad(o_ref, (q64, k64, v64), do.double())

    # with a single key the softmax is constant: dq and dk are exactly zero, and what is
    # checked is the absolute size of the float rounding left over (floor 1 = inputs' scale)
    zfloor = 1.0 if tk == 1 else 1e-6
    assert_close("o", o, o_ref, dtype, gen)
    assert_close("dq", dq, dq_ref, dtype, gen, floor=zfloor)
    assert_close("dk", dk, dk_ref, dtype, gen, floor=zfloor)
    assert_close("dv", dv, dv_ref, dtype, gen)

    o2, lse = attn_mod.attention_fwd(q, k, v, causal, None)
    assert lse.shape == (b, hq, tq) and lse.dtype == dtype
    torch.testing.assert_close(o2, o, rtol=0, atol=0)
    empty_rows = torch.isinf(lse_ref)
    assert torch.equal(torch.isinf(lse), empty_rows)
    assert (lse[empty_rows] == -math.inf).all()
    assert_close("lse", lse.masked_fill(empty_rows, 0), lse_ref.masked_fill(empty_rows, 0),
                 dtype, gen)
    if empty_rows.any():  # rows that see no key: exact zeros, no NaN
        rows = empty_rows.permute(0, 2, 1)  # [B, Tq, Hq]
        assert (o.detach()[rows] == 0).all()
        assert (dq[rows] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_attention_scale_noncontiguous_and_bwd_api(dtype, gen):
    b, t, hq, hk, d = 2, 70, 4, 2, 24
    # non-contiguous inputs: [B, H, T, D] storage viewed as [B, T, H, D]
    q = randn(gen, b, hq, t, d, dtype=dtype, grad=False).transpose(1, 2).requires_grad_()
    k = randn(gen, b, hk, t, d, dtype=dtype, grad=False).transpose(1, 2).requires_grad_()
    v = randn(gen, b, t, hk, d, dtype=dtype)
    do = randn(gen, b, t, hq, d, dtype=dtype, grad=False)
    scale = 0.37
    o = attn_mod.attention(q, k, v, causal=True, scale=scale)
    grads = torch.autograd.grad(o, (q, k, v), do)
    q64, k64, v64 = _leaf64(q, k, v)
    o_ref, _ = ref_attention(q64, k64, v64, True, scale)
    grads_ref = torch.autograd.grad(o_ref, (q64, k64, v64), do.double())
    assert_close("o", o, o_ref, dtype, gen)
    for name, g, r in zip(("dq", "dk", "dv"), grads, grads_ref, strict=True):
        assert_close(name, g, r, dtype, gen)
    # the functional backward gives the same gradients as autograd
    o2, lse = attn_mod.attention_fwd(q, k, v, True, scale)
    for name, g, r in zip(("dq", "dk", "dv"),
                          attn_mod.attention_bwd(do, q, k, v, o2, lse, True, scale), grads,
                          strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=0, msg=name)


def test_attention_rejects_bad_inputs():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(TypeError, match="float32 and torch.float64"):
        attn_mod.attention(q.half(), q.half(), q.half())
    with pytest.raises(TypeError, match="float32 and torch.float64"):
        attn_mod.attention(q.to(torch.int32), q.to(torch.int32), q.to(torch.int32))
    with pytest.raises(TypeError, match="one dtype"):
        attn_mod.attention(q, q.double(), q)
    with pytest.raises(ValueError, match="multiple"):
        attn_mod.attention(torch.randn(1, 4, 3, 8), q, q)


# ----------------------------------------------------------------------------------------------
# add + norm
# ----------------------------------------------------------------------------------------------
def ref_add_norm(x, delta, w, b, eps, kind):
    h = x + delta if delta is not None else x
    if kind == "layernorm":
        mu = h.mean(-1, keepdim=True)
        var = ((h - mu) ** 2).mean(-1, keepdim=True)
        y = (h - mu) / torch.sqrt(var + eps)
    else:
        y = h / torch.sqrt((h * h).mean(-1, keepdim=True) + eps)
    if w is not None:
        y = y * w
    if b is not None:
        y = y + b
    return y, h


NORM_SHAPES = [(3, 5, 63), (7, 1), (4, 257), (2, 3, 100), (1, 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_delta,with_w,with_b", [
    (True, True, True), (True, True, False), (False, True, True), (False, False, False),
    (True, False, True)], ids=["add-w-b", "add-w", "w-b", "bare", "add-b"])
def test_add_norm_fwd_bwd(shape, kind, dtype, with_delta, with_w, with_b, gen):
    width = shape[-1]
    x = randn(gen, *shape, dtype=dtype, scale=2.0)
    delta = randn(gen, *shape, dtype=dtype) if with_delta else None
    w = randn(gen, width, dtype=dtype) if with_w else None
    b = randn(gen, width, dtype=dtype) if with_b else None
    eps = 1e-5
    y, h = norm_mod.add_norm(x, delta, w, b, eps, kind)
    if delta is None:
        assert h is x
    dy = randn(gen, *shape, dtype=dtype, grad=False)
    dh = randn(gen, *shape, dtype=dtype, grad=False)
    ins = [t for t in (x, delta, w, b) if t is not None]
    grads = torch.autograd.grad((y * dy).sum() + (h * dh).sum(), ins)

    r64 = _leaf64(x, delta, w, b)
    y_ref, h_ref = ref_add_norm(*r64, eps, kind)
    ins_ref = [t for t in r64 if t is not None]
    grads_ref = torch.autograd.grad((y_ref * dy.double()).sum() + (h_ref * dh.double()).sum(),
                                    ins_ref)
    # y = norm(h) * w + b: its rounding error scales with |norm(h) * w| + |b|, not with |y|, which
    # can be tiny where the two cancel (e.g. width 1: norm(h) = +-1)
    y_terms = y_ref.detach().abs() if b is None else (y_ref.detach() - r64[3].detach()).abs() + r64[3].detach().abs()
    assert_close("y", y, y_ref, dtype, gen, floor=max(1e-6, float(y_terms.max()) if y_terms.numel() else 0.0))
    assert_close("h", h, h_ref, dtype, gen)
    names = [n for n, t in zip(("dx", "ddelta", "dweight", "dbias"), (x, delta, w, b), strict=True)
             if t is not None]
    # dx = dh + rstd * (...): the norm's backward multiplies rounded terms by rstd, so where rstd
    # is large (layernorm of width 1: var = 0, rstd = eps^-1/2 ~ 316) the bound is 4 ulp * rstd * |w dy|
    hd = h_ref.detach().reshape(-1, width)
    c = hd - hd.mean(-1, keepdim=True) if kind == "layernorm" else hd
    rstd = float(torch.rsqrt(c.pow(2).mean(-1) + eps).max()) if hd.numel() else 0.0
    wdy = (dy.double() * (r64[2].detach() if w is not None else 1.0)).abs()
    ulp = float(torch.finfo(dtype).eps)
    dx_floor = 4 * ulp * rstd * (float(wdy.max()) if wdy.numel() else 0.0) / TOL[dtype]
    # dweight / dbias are sums over rows: bounded by tol x the sum of the terms' magnitudes, not
    # by the result's, which can cancel to almost nothing (7 x 1: dbias 2.5e-3 from terms of ~1)
    dy64 = dy.double().reshape(-1, width)
    yhat = c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + eps)
    sum_floor = {"dweight": float((dy64 * yhat).abs().sum(0).max()) if hd.numel() else 0.0,
                 "dbias": float(dy64.abs().sum(0).max()) if hd.numel() else 0.0}
    for name, g, r in zip(names, grads, grads_ref, strict=True):
        assert_close(name, g, r, dtype, gen, floor=max(1e-6, dx_floor) if name in ("dx", "ddelta") else
                     max(1e-6, sum_floor[name]))


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("use", ["y-only", "h-only"])
def test_add_norm_one_output_used(kind, dtype, use, gen):
    """Only y (dh is None in backward) or only h (dy is None) reaches the loss."""
    shape = (3, 5, 40)
    x, delta = randn(gen, *shape, dtype=dtype), randn(gen, *shape, dtype=dtype)
    w, b = randn(gen, 40, dtype=dtype), randn(gen, 40, dtype=dtype)
    g_out = randn(gen, *shape, dtype=dtype, grad=False)
    y, h = norm_mod.add_norm(x, delta, w, b, 1e-6, kind)
    out = y if use == "y-only" else h
    grads = torch.autograd.grad((out * g_out).sum(), (x, delta, w, b), allow_unused=True)
    r64 = _leaf64(x, delta, w, b)
    y_ref, h_ref = ref_add_norm(*r64, 1e-6, kind)
    out_ref = y_ref if use == "y-only" else h_ref
    grads_ref = torch.autograd.grad((out_ref * g_out.double()).sum(), r64, allow_unused=True)
    for name, g, r in zip(("dx", "ddelta", "dweight", "dbias"), grads, grads_ref, strict=True):
        if r is None:
            assert g is None or (g == 0).all(), name
        else:
            assert_close(name, g, r, dtype, gen)


def test_add_norm_rejects_bad_inputs():
    x = torch.randn(2, 8)
    with pytest.raises(TypeError, match="float32 and torch.float64"):
        norm_mod.add_norm(x.half(), None, None, None, 1e-5, "layernorm")
    with pytest.raises(TypeError, match="one dtype"):
        norm_mod.add_norm(x, x.double(), None, None, 1e-5, "layernorm")
    with pytest.raises(ValueError, match="kind"):
        norm_mod.add_norm(x, None, None, None, 1e-5, "batchnorm")
    with pytest.raises(ValueError, match="weight"):
        norm_mod.add_norm(x, None, torch.randn(7), None, 1e-5, "rmsnorm")


# ----------------------------------------------------------------------------------------------
# activations
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape", [(3, 5, 1), (3, 5, 63), (4, 257), (1, 1), (2, 1000)],
                         ids=lambda s: "x".join(map(str, s)))
def test_swiglu(shape, dtype, gen):
    hw = shape[-1]
    gu = randn(gen, *shape[:-1], 2 * hw, dtype=dtype, scale=3.0)
    dout = randn(gen, *shape, dtype=dtype, grad=False)
    out = act_mod.swiglu(gu)
    (dgu,) = torch.autograd.grad(out, gu, dout)
    (g64,) = _leaf64(gu)
    gate, up = g64[..., :hw], g64[..., hw:]
    ref = gate * torch.sigmoid(gate) * up
    (dref,) = torch.autograd.grad(ref, g64, dout.double())
    assert_close("out", out, ref, dtype, gen)
    assert_close("dgu", dgu, dref, dtype, gen)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape", [(3, 5, 1), (3, 5, 63), (4, 257), (1,), (40000,)],
                         ids=lambda s: "x".join(map(str, s)))
def test_gelu(shape, dtype, gen):
    x = randn(gen, *shape, dtype=dtype, scale=4.0)
    dy = randn(gen, *shape, dtype=dtype, grad=False)
    y = act_mod.gelu(x)
    (dx,) = torch.autograd.grad(y, x, dy)
    (x64,) = _leaf64(x)
    # erfc form: 1 + erf(x / sqrt 2) cancels for x << 0 and would make the oracle itself inexact
    ref = 0.5 * x64 * torch.erfc(-x64 / math.sqrt(2))
    (dref,) = torch.autograd.grad(ref, x64, dy.double())
    assert_close("y", y, ref, dtype, gen)
    assert_close("dx", dx, dref, dtype, gen)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_gelu_negative_tail_relative(dtype):
    """x Phi(x) for x in [-9, -1]: each value to the tolerance relative to itself (1 + erf
    cancels there, so a plain 1 + erf(x/sqrt 2) loses every digit)."""
    x = torch.linspace(-9.0, -1.0, 2001, dtype=torch.float64).to(dtype).requires_grad_()
    y = act_mod.gelu(x)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    x64 = x.detach().double()
    ref = x64 * 0.5 * torch.erfc(-x64 / math.sqrt(2))
    dref = 0.5 * torch.erfc(-x64 / math.sqrt(2)) + x64 * torch.exp(-x64 * x64 / 2) / math.sqrt(
        2 * math.pi)
    for name, got, r in (("y", y, ref), ("dx", dx, dref)):
        rel = ((got.detach().double() - r).abs() / r.abs()).max().item()
        assert rel <= TOL[dtype], f"{name}: max relative error {rel:.3e} in the tail"


def test_activations_reject_bad_inputs():
    with pytest.raises(TypeError, match="float32 and torch.float64"):
        act_mod.gelu(torch.randn(4).half())
    with pytest.raises(TypeError, match="float32 and torch.float64"):
        act_mod.swiglu(torch.ones(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="even"):
        act_mod.swiglu(torch.randn(2, 5))


def test_import_is_lazy():
    """Importing the kernel modules compiles nothing (kernels jit on first call)."""
    import subprocess
    code = ("import sys, importlib\n"
            "for n in ('attention', 'norm', 'activations'):\n"
            "    importlib.import_module('blockzoo.kernels.numba.' + n)\n"
            "print('numba' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"
