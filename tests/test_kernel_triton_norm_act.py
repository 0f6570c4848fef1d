"""Triton fused add+norm and activation kernels against explicit torch references.

Runs on CPU under ``TRITON_INTERPRET=1`` (CI) and compiled on a CUDA device when one is present.
Every output and gradient (dx, ddelta, dweight, dbias, the dh path; dgu; gelu dx) is compared,
max-normalised, with a float64 reference computed from the same (upcast) inputs; outputs are
NaN-poisoned before the kernels write them, so an unwritten element fails the check.

    cd /work/main && TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/test_kernel_triton_norm_act.py -q
"""
from __future__ import annotations

import math
import os
import pathlib

import pytest
import torch

try:
    import triton  # noqa: F401
except Exception:  # pragma: no cover - no triton here
    pytest.skip("triton not installed", allow_module_level=True)

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
if torch.cuda.is_available() and not INTERPRET:
    DEVICE = "cuda"
elif INTERPRET:
    DEVICE = "cpu"
else:
    pytest.skip("needs CUDA or TRITON_INTERPRET=1 (set before Python starts)",
                allow_module_level=True)

_ROOT = pathlib.Path(__file__).resolve().parents[1]


from blockzoo.kernels._alloc import poisoned  # noqa: E402
from blockzoo.kernels.triton import activations as act  # noqa: E402
from blockzoo.kernels.triton import norm  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """NaN-fill every output buffer (and the partial dweight/dbias rows) before kernels write."""
    with poisoned():
        yield


def _gen(seed_extra: int = 0) -> torch.Generator:
    # fresh inputs per test: seeded from the OS, printed on failure through the test id/locals
    g = torch.Generator()
    g.manual_seed(int.from_bytes(os.urandom(6), "little") + seed_extra)
    return g


def _randn(shape, dtype, g, scale=1.0, offset=0.0):
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset).to(dtype).to(DEVICE)


def check(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: float,
          scale_floor: float = 0.0) -> None:
    """max |actual - expected| / max |expected| <= tol; NaN or inf anywhere fails.

    ``scale_floor``: for a sum over rows (dweight, dbias) the natural scale is the root-sum-square
    of its terms; a sum that cancels by chance (N = 1: one element) is normalised by that instead
    of by its own small value (fp32 rounding error of a sum grows with its terms, not its result).
    """
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    n_nan = int(torch.isnan(a).sum())
    assert n_nan == 0, f"{name}: {n_nan} NaN of {a.numel()} (unwritten output or bad math)"
    assert bool(torch.isfinite(a).all()), f"{name}: non-finite values"
    scale = max(float(e.abs().max()) if e.numel() else 0.0, scale_floor)
    diff = (a - e).abs()
    err = float(diff.max()) / max(scale, 1e-30) if e.numel() else 0.0
    if scale == 0.0:
        err = float(diff.max()) if e.numel() else 0.0
    if err > tol:
        i = int(diff.argmax())
        idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), diff.shape))
        raise AssertionError(f"{name}: max-normalised error {err:.3e} > {tol:.1e} at {idx}: "
                             f"got {a.flatten()[i]:.7g}, want {e.flatten()[i]:.7g} (scale {scale:.4g})")


# ======================================================================================
# reference: explicit float64 math, autograd for the gradients
# ======================================================================================
def ref_add_norm(x, delta, weight, bias, eps, kind, h_dtype=None):
    """float64 math. ``h_dtype``: the residual is stored in the input dtype and y normalises
    that stored value (as eager torch does); rounding is modelled with a straight-through
    gradient, so the reference differs from the kernel only by fp32-vs-float64 arithmetic."""
    h = x if delta is None else x + delta
    if delta is not None and h_dtype is not None:
        h = h + (h.detach().to(h_dtype).to(h.dtype) - h.detach())
    if kind == "layernorm":
        mean = h.mean(-1, keepdim=True)
        var = ((h - mean) ** 2).mean(-1, keepdim=True)
        y = (h - mean) / torch.sqrt(var + eps)
    else:
        y = h / torch.sqrt((h * h).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y, h


def _leaf(t, dtype=None):
    t = t.detach().clone()
    if dtype is not None:
        t = t.to(dtype)
    return t.requires_grad_(True)


def run_add_norm_case(shape, dtype, kind, has_delta, has_w, has_b, use_y=True, use_h=True,
                      eps=1e-5, offset=0.0, wdtype=None):
    g = _gen()
    N = shape[-1]
    wdtype = wdtype or dtype
    x = _randn(shape, dtype, g, offset=offset)
    delta = _randn(shape, dtype, g) if has_delta else None
    w = _randn((N,), wdtype, g, scale=0.5, offset=1.0) if has_w else None
    b = _randn((N,), wdtype, g, scale=0.5) if has_b else None
    dy = _randn(shape, dtype, g)
    dh = _randn(shape, dtype, g)

    ins = [x, delta, w, b]
    k_ins = [_leaf(t) if t is not None else None for t in ins]
    r_ins = [_leaf(t, torch.float64) if t is not None else None for t in ins]

    y, h = norm.add_norm(*k_ins, eps=eps, kind=kind)
    yr, hr = ref_add_norm(*r_ins, eps=eps, kind=kind, h_dtype=dtype)
    assert y.dtype == dtype and h.dtype == dtype and y.shape == x.shape and h.shape == x.shape
    if not has_delta:
        assert h is k_ins[0], "delta=None must return x itself as h"
    else:  # the stored residual is the correctly rounded sum, bit for bit
        h_exact = (x.double() + delta.double()).to(dtype)
        assert torch.equal(h.detach(), h_exact), "h != round(x + delta)"
    tol = TOL[dtype]
    check("y", y, yr, tol)
    check("h", h, hr, tol)

    loss = 0.0
    loss_r = 0.0
    if use_y:
        loss = loss + (y.float() * dy.float()).sum()
        loss_r = loss_r + (yr * dy.double()).sum()
    if use_h:
        loss = loss + (h.float() * dh.float()).sum()
        loss_r = loss_r + (hr * dh.double()).sum()
    wrt = [t for t in k_ins if t is not None]
    wrt_r = [t for t in r_ins if t is not None]
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    grads_r = torch.autograd.grad(loss_r, wrt_r, allow_unused=True)
    names = [n for n, t in zip(("dx", "ddelta", "dweight", "dbias"), ins, strict=True) if t is not None]
    for name, gk, gr, t in zip(names, grads, grads_r, wrt, strict=True):
        if gr is None:
            assert gk is None or float(gk.abs().max()) == 0.0, f"{name}: expected no gradient"
            continue
        assert gk is not None, f"{name}: missing gradient"
        assert gk.dtype == t.dtype, f"{name}: dtype {gk.dtype} != {t.dtype}"
        floor = 0.0
        if name in ("dweight", "dbias"):  # sums over rows of dy * xhat, dy
            terms = dy.double().reshape(-1, N)
            if name == "dweight":
                terms = terms * _xhat(hr.detach().reshape(-1, N), eps, kind)
            floor = float(terms.pow(2).sum(0).sqrt().max())
        gtol = tol
        if name in ("dx", "ddelta") and dtype == torch.float32:
            # the norm's backward multiplies a difference of rounded fp32 terms by rstd, so its
            # rounding error grows with rstd: degenerate rows (N = 1 layernorm: var = 0, rstd =
            # eps^-1/2 ~ 316) allow 4 ulp * rstd; ordinary rows (rstd ~ 1) keep the table's tol
            hd = hr.detach().double().reshape(-1, N)
            c = hd - hd.mean(-1, keepdim=True) if kind == "layernorm" else hd
            rstd = float(torch.rsqrt(c.pow(2).mean(-1) + eps).max())
            gtol = max(tol, 4 * 2.0**-24 * rstd)
        check(name, gk, gr, gtol, scale_floor=floor)


def _xhat(h, eps, kind):
    if kind == "layernorm":
        c = h - h.mean(-1, keepdim=True)
        return c / torch.sqrt((c * c).mean(-1, keepdim=True) + eps)
    return h / torch.sqrt((h * h).mean(-1, keepdim=True) + eps)


# ======================================================================================
# add_norm: forward and every gradient
# ======================================================================================
VARIANTS = [  # (has_delta, has_weight, has_bias)
    (True, True, True),
    (True, False, False),
    (False, True, True),
    (False, True, False),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "d{}w{}b{}".format(*map(int, v)))
@pytest.mark.parametrize("N", [1, 40, 63, 257])
@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_add_norm(dtype, kind, N, variant):
    run_add_norm_case((3, 5, N), dtype, kind, *variant)


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_add_norm_fp16_and_fp32_params(kind):
    run_add_norm_case((2, 7, 96), torch.float16, kind, True, True, True)
    run_add_norm_case((2, 7, 96), torch.bfloat16, kind, True, True, True, wdtype=torch.float32)


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("uses", [(True, False), (False, True)], ids=["y_only", "h_only"])
def test_add_norm_one_output_used(kind, uses):
    """dh absent (h unused: no zeros materialised) and dy absent (only the residual used)."""
    run_add_norm_case((3, 5, 63), torch.float32, kind, True, True, True, *uses)


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N", [1, 63, 130])
def test_add_norm_wide_row_path(monkeypatch, dtype, kind, N):
    """The kernels for rows wider than the register limit (chunked forward, two-step split
    backward), forced onto small widths."""
    monkeypatch.setattr(norm, "FWD_MAX_BLOCK_N", 16)
    monkeypatch.setattr(norm, "BWD_MAX_BLOCK_N", 16)
    monkeypatch.setattr(norm, "LOOP_BLOCK_N", 32)      # forward: several column chunks
    monkeypatch.setattr(norm, "STATS_BLOCK_N", 32)     # backward statistics: several chunks
    monkeypatch.setattr(norm, "SPLIT_BLOCK_N", 32)     # backward dx step: several column blocks
    monkeypatch.setattr(norm, "SPLIT_BLOCK_M", 2)      # ... and row tiles of 2 (ragged tail)
    monkeypatch.setattr(norm, "CPU_PROGRAMS", 48)      # -> several row groups per column block
    assert norm.fwd_config(15, N, 4)["LOOPED"] == (N > 16)
    assert norm.bwd_config(15, N, 4)["SPLIT"] == (N > 16)
    run_add_norm_case((3, 5, N), dtype, kind, True, True, True)
    run_add_norm_case((3, 5, N), dtype, kind, False, True, False)


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_add_norm_persistent_row_tiles(monkeypatch, kind):
    """Several rows per tile and several tiles per persistent program, with a ragged tail."""
    monkeypatch.setattr(norm, "FWD_TILE", 128)
    monkeypatch.setattr(norm, "BWD_TILE", 128)
    monkeypatch.setattr(norm, "CPU_PROGRAMS", 3)
    cfg = norm.bwd_config(37, 40, 4)
    assert cfg["BLOCK_M"] == 2 and not cfg["SPLIT"]
    run_add_norm_case((37, 40), torch.float32, kind, True, True, True)
    run_add_norm_case((37, 40), torch.bfloat16, kind, True, True, True)


@pytest.mark.parametrize("looped", [False, True], ids=["whole_row", "chunked"])
def test_layernorm_large_mean_no_cancellation(monkeypatch, looped):
    """mean = 100 std: statistics must not come from E[h^2] - E[h]^2 (that loses ~1e-3 here).

    The offset is chosen so that the fp32 limit itself (an fp32 mean is exact only to
    ulp(offset)/2 ~ 4e-6 absolute, i.e. ~1e-6 of the output) sits well inside the 1e-5 tolerance,
    while the naive one-pass variance misses it by two orders of magnitude."""
    if looped:
        monkeypatch.setattr(norm, "FWD_MAX_BLOCK_N", 16)
        monkeypatch.setattr(norm, "BWD_MAX_BLOCK_N", 16)
        monkeypatch.setattr(norm, "LOOP_BLOCK_N", 32)
        monkeypatch.setattr(norm, "STATS_BLOCK_N", 32)
        monkeypatch.setattr(norm, "SPLIT_BLOCK_N", 64)
    run_add_norm_case((4, 200), torch.float32, "layernorm", False, True, True, offset=100.0)


def test_add_norm_default_configs_at_wide_rows():
    """Default configs at wide rows: whole-row forward + split backward (16384), chunked
    forward + split backward (65536); few rows."""
    run_add_norm_case((2, 16384), torch.float32, "layernorm", True, True, True)
    run_add_norm_case((2, 65536), torch.bfloat16, "rmsnorm", True, True, False)


def test_add_norm_eps_and_validation():
    g = _gen()
    x = _randn((4, 8), torch.float32, g, scale=1e-3)
    y, _ = norm.add_norm(x, None, None, None, eps=1.0, kind="rmsnorm")
    yr, _ = ref_add_norm(x.double(), None, None, None, 1.0, "rmsnorm")
    check("y(eps=1)", y, yr, 1e-5)
    with pytest.raises(ValueError):
        norm.add_norm(x, None, None, None, 1e-5, "batchnorm")
    with pytest.raises(ValueError):
        norm.add_norm(x, torch.zeros(4, 7, device=DEVICE), None, None, 1e-5, "layernorm")
    with pytest.raises(ValueError):
        norm.add_norm(x, None, torch.ones(7, device=DEVICE), None, 1e-5, "layernorm")
    with pytest.raises(TypeError):
        norm.add_norm(x.double(), None, None, None, 1e-5, "layernorm")


def test_add_norm_empty_rows():
    x = torch.zeros(0, 5, 32, device=DEVICE, requires_grad=True)
    w = torch.ones(32, device=DEVICE, requires_grad=True)
    y, h = norm.add_norm(x, x.detach().clone(), w, None, 1e-5, "layernorm")
    assert y.shape == x.shape and h.shape == x.shape
    y.sum().backward()
    assert w.grad is not None and float(w.grad.abs().sum()) == 0.0


def test_add_norm_non_contiguous_input():
    g = _gen()
    base = _randn((6, 2 * 63), torch.float32, g)
    x = base[:, ::2]           # strided view
    d = _randn((6, 63), torch.float32, g)
    y, h = norm.add_norm(x, d, None, None, 1e-5, "layernorm")
    yr, hr = ref_add_norm(x.double(), d.double(), None, None, 1e-5, "layernorm")
    check("y(strided)", y, yr, 1e-5)
    check("h(strided)", h, hr, 1e-5)


def test_add_norm_opcheck():
    """Schema, fake (meta) kernel, autograd registration and dispatch, as torch checks them."""
    g = _gen()
    x = _randn((3, 40), torch.float32, g).requires_grad_(True)
    d = _randn((3, 40), torch.float32, g).requires_grad_(True)
    w = _randn((40,), torch.float32, g).requires_grad_(True)
    b = _randn((40,), torch.float32, g).requires_grad_(True)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.blockzoo.add_norm_fwd.default,
                          (x, d, w, b, 1e-5, "layernorm"), test_utils=tests)
    torch.library.opcheck(torch.ops.blockzoo.add_norm_fwd.default,
                          (x, None, w, None, 1e-5, "rmsnorm"), test_utils=tests)
    gu = _randn((3, 40), torch.float32, g).requires_grad_(True)
    torch.library.opcheck(torch.ops.blockzoo.swiglu_fwd.default, (gu,), test_utils=tests)
    torch.library.opcheck(torch.ops.blockzoo.gelu_fwd.default, (gu,), test_utils=tests)


def test_add_norm_torch_compile_aot_eager():
    """The custom ops trace through torch.compile (forward and backward graphs)."""
    g = _gen()
    x = _randn((3, 5, 40), torch.float32, g)
    d = _randn((3, 5, 40), torch.float32, g)
    w = _randn((40,), torch.float32, g)
    gu = _randn((3, 5, 80), torch.float32, g)

    def f(x, d, w, gu):
        y, h = norm.add_norm(x, d, w, None, 1e-5, "rmsnorm")
        return (y * act.swiglu(gu)).sum() + act.gelu(h).sum()

    torch._dynamo.reset()
    cf = torch.compile(f, backend="aot_eager", fullgraph=True)
    ins = [_leaf(t) for t in (x, d, w, gu)]
    ins_c = [_leaf(t) for t in (x, d, w, gu)]
    out = f(*ins)
    out_c = cf(*ins_c)
    check("compiled out", out_c, out, 1e-6)
    for name, a, b in zip(("dx", "ddelta", "dw", "dgu"), torch.autograd.grad(out_c, ins_c),
                          torch.autograd.grad(out, ins), strict=True):
        check(f"compiled {name}", a, b, 1e-6)


# ======================================================================================
# activations
# ======================================================================================
def ref_swiglu(gu):
    hd = gu.shape[-1] // 2
    gate, up = gu[..., :hd], gu[..., hd:]
    return gate / (1.0 + torch.exp(-gate)) * up


def ref_gelu(x):
    # x * Phi(x) with Phi = erfc(-x / sqrt 2) / 2: in float64 too, 1 + erf cancels for x < -5
    return 0.5 * x * torch.special.erfc(-x / math.sqrt(2.0))


def _act_case(fn, ref, shape, dtype, scale=2.0):
    g = _gen()
    inp = _randn(shape, dtype, g, scale=scale)
    k = _leaf(inp)
    r = _leaf(inp, torch.float64)
    out = fn(k)
    out_r = ref(r)
    assert out.dtype == dtype
    tol = TOL[dtype]
    check("out", out, out_r, tol)
    dout = _randn(out.shape, dtype, g)
    (gk,) = torch.autograd.grad((out.float() * dout.float()).sum(), k)
    (gr,) = torch.autograd.grad((out_r * dout.double()).sum(), r)
    assert gk.dtype == dtype
    check("grad", gk, gr, tol)


@pytest.mark.parametrize("hd", [1, 20, 63, 257])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_swiglu(dtype, hd):
    _act_case(act.swiglu, ref_swiglu, (3, 5, 2 * hd), dtype)


def test_swiglu_tiled_columns_and_fp16(monkeypatch):
    monkeypatch.setattr(act, "MAX_BLOCK_H", 16)
    monkeypatch.setattr(act, "TILE", 64)
    _act_case(act.swiglu, ref_swiglu, (7, 2 * 63), torch.float32)
    _act_case(act.swiglu, ref_swiglu, (7, 2 * 40), torch.float16)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
def test_swiglu_extreme_gate():
    """Large |gate|: silu and its derivative must stay finite (exp overflow to inf is fine)."""
    gu = torch.tensor([[-200.0, -30.0, 0.0, 30.0, 200.0, 1.0, 1.0, 1.0, 1.0, 1.0]], device=DEVICE)
    k = _leaf(gu)
    out = act.swiglu(k)
    (g,) = torch.autograd.grad(out.sum(), k)
    check("out", out, ref_swiglu(gu.double()), 1e-6)
    r = _leaf(gu, torch.float64)
    (gr,) = torch.autograd.grad(ref_swiglu(r).sum(), r)
    check("grad", g, gr, 1e-6)


@pytest.mark.parametrize("shape", [(3, 5, 63), (2, 4097)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gelu(dtype, shape):
    _act_case(act.gelu, ref_gelu, shape, dtype, scale=3.0)


def _elementwise_rel(name, a, e, tol):
    a, e = a.detach().double().cpu(), e.detach().double().cpu()
    rel = ((a - e).abs() / e.abs()).max().item()
    assert rel <= tol, f"{name}: elementwise relative error {rel:.3e} > {tol:.1e}"


@pytest.mark.parametrize("n", [1, 3, 700])
def test_gelu_relative_accuracy(n):
    """Every element to 1e-5 relative (fp32), also a lone element (masking) and the lower tail
    x in [-12, -2] where 0.5 * (1 + erf(x / sqrt 2)) cancels (relative error 1 at x = -6).
    The gradient is checked away from its root at x = -0.75, where any fp32 evaluation loses
    relative accuracy."""
    g = _gen()
    for lo, hi in ((-12.0, -2.0), (0.1, 4.0), (-2.0, -1.0)):
        x = (torch.rand(n, generator=g, dtype=torch.float64) * (hi - lo) + lo).float().to(DEVICE)
        k = _leaf(x)
        r = _leaf(x, torch.float64)
        y = act.gelu(k)
        yr = ref_gelu(r)
        _elementwise_rel(f"gelu[{lo},{hi}]", y, yr, 1e-5)
        (gk,) = torch.autograd.grad(y.sum(), k)
        (gr,) = torch.autograd.grad(yr.sum(), r)
        _elementwise_rel(f"dgelu[{lo},{hi}]", gk, gr, 1e-5)


def test_swiglu_odd_width_rejected():
    with pytest.raises(ValueError):
        act.swiglu(torch.zeros(3, 5, device=DEVICE))
