"""Triton online-softmax attention core vs an explicit float64 reference.

CI runs this on the CPU with ``TRITON_INTERPRET=1`` (set before Python starts); on a CUDA machine
the same tests run compiled. Shapes stay small under the interpreter.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

triton = pytest.importorskip("triton")

INTERP = os.environ.get("TRITON_INTERPRET", "0") == "1"
if INTERP:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)


from blockzoo.kernels._alloc import poisoned  # noqa: E402
from blockzoo.kernels.triton import attention as A  # noqa: E402

TOL = {torch.float32: 1e-4 if INTERP else 5e-3, torch.bfloat16: 2e-2, torch.float16: 5e-3}


# ------------------------------------------------------------------------------------------
# reference: explicit float64 math with GQA expansion and bottom-right causal mask
# ------------------------------------------------------------------------------------------


def ref_attention(q, k, v, causal, scale):
    """Returns (o [B,Tq,Hq,D], lse [B,Hq,Tq]) in float64; rows with no visible key give o=0."""
    B, Tq, Hq, D = q.shape
    Tk, Hk = k.shape[1], k.shape[2]
    G = Hq // Hk
    qd, kd, vd = q.double(), k.double(), v.double()
    kd = kd.repeat_interleave(G, dim=2)
    vd = vd.repeat_interleave(G, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", qd, kd) * scale
    i = torch.arange(Tq, device=q.device)[:, None]
    j = torch.arange(Tk, device=q.device)[None, :]
    mask = (j <= i + (Tk - Tq)) if causal else torch.ones(Tq, Tk, dtype=torch.bool, device=q.device)
    row_ok = mask.any(-1)  # [Tq]
    s = s.masked_fill(~mask, float("-inf"))
    s = torch.where(row_ok[:, None], s, torch.zeros_like(s))  # empty rows: finite dummy row
    p = torch.softmax(s, dim=-1) * (mask & row_ok[:, None])
    o = torch.einsum("bhqk,bkhd->bqhd", p, vd)
    lse = torch.logsumexp(s, dim=-1)
    lse = torch.where(row_ok, lse, torch.full_like(lse, float("-inf")))
    return o, lse


def maxnorm_err(out, ref):
    """max|out - ref| / max|ref|; the normaliser is floored at 0.1 because some gradients vanish
    analytically (with one visible key, dq = 0 exactly and only rounding noise remains)."""
    out = out.double()
    ref = ref.double()
    assert not torch.isnan(out).any(), "NaN in output"
    denom = ref.abs().max().clamp_min(0.1)
    return ((out - ref).abs().max() / denom).item()


def check(name, out, ref, dtype):
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} vs {tuple(ref.shape)}"
    err = maxnorm_err(out, ref)
    assert err <= TOL[dtype], f"{name}: max-normalised error {err:.3e} > {TOL[dtype]:.1e}"


def check_lse(lse, ref_lse):
    assert lse.dtype == torch.float32
    assert not torch.isnan(lse).any(), "NaN in lse"
    ninf = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), ninf), "lse = -inf rows differ"
    fin = ~ninf
    if fin.any():
        err = (lse.double()[fin] - ref_lse[fin]).abs().max().item()
        assert err <= 1e-3 * max(1.0, ref_lse[fin].abs().max().item()), f"lse error {err:.3e}"


def rand(*shape, dtype):
    return torch.randn(*shape, device=DEVICE, dtype=torch.float32).to(dtype)


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Fill every output buffer with NaN before the kernels run (proves each element is written)."""
    with poisoned():
        yield


# B, Tq, Tk, Hq, Hk, D, causal
SHAPES = [
    (1, 1, 1, 2, 2, 16, True),
    (1, 63, 63, 2, 2, 64, True),
    (2, 100, 100, 4, 2, 40, False),  # GQA 4:2, D=40 (BLOCK_D 64 with masks)
    (1, 37, 100, 4, 1, 32, True),  # Tq < Tk, GQA 4:1
    (1, 100, 37, 2, 1, 16, True),  # Tq > Tk: first 63 rows see no key
    (1, 1, 77, 2, 2, 64, True),  # decode-like
    (1, 64, 96, 2, 2, 24, False),  # block-aligned Tq, ragged Tk
]


def _run_case(B, Tq, Tk, Hq, Hk, D, causal, dtype, mode, scale=None):
    q = rand(B, Tq, Hq, D, dtype=dtype)
    k = rand(B, Tk, Hk, D, dtype=dtype)
    v = rand(B, Tk, Hk, D, dtype=dtype)
    do = rand(B, Tq, Hq, D, dtype=dtype)
    sc = 1.0 / math.sqrt(D) if scale is None else scale

    o, lse = A.attention_fwd(q, k, v, causal, scale)
    assert o.dtype == dtype and o.shape == q.shape and lse.shape == (B, Hq, Tq)

    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    ro, rlse = ref_attention(qr, kr, vr, causal, sc)
    check("o", o, ro, dtype)
    check_lse(lse, rlse.detach())

    dq, dk, dv = A._bwd_impl(do, q, k, v, o, lse, causal, sc, None, mode=mode)
    rdq, rdk, rdv = torch.autograd.grad(ro, (qr, kr, vr), do.double())
    for name, got, want in (("dq", dq, rdq), ("dk", dk, rdk), ("dv", dv, rdv)):
        assert got.dtype == dtype
        check(name, got, want, dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_Tq{}_Tk{}_H{}-{}_D{}_{}".format(
    *s[:6], "causal" if s[6] else "full"))
def test_fp32(shape):
    _run_case(*shape, dtype=torch.float32, mode="split")


@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[2], SHAPES[4]], ids=["T63", "gqa_D40", "TqgtTk"])
def test_bf16(shape):
    _run_case(*shape, dtype=torch.bfloat16, mode="split")


def test_fp16_atomic():
    _run_case(1, 70, 70, 4, 2, 32, True, dtype=torch.float16, mode="atomic")


@pytest.mark.parametrize("shape", [SHAPES[2], SHAPES[3], SHAPES[4]], ids=["gqa_D40", "TqltTk", "TqgtTk"])
def test_atomic_dq_fp32(shape):
    _run_case(*shape, dtype=torch.float32, mode="atomic")


def test_negative_scale():
    _run_case(1, 50, 50, 2, 2, 16, False, dtype=torch.float32, mode="split", scale=-0.3)
    _run_case(1, 50, 50, 2, 2, 16, True, dtype=torch.float32, mode="split", scale=-0.3)


@pytest.mark.skipif(not INTERP, reason="interpreter tilings")
@pytest.mark.parametrize("tiles", [((16, 32), (32, 16), (16, 32)), ((64, 16), (16, 64), (64, 16))],
                         ids=["BM16_BN32", "BM64_BN16"])
def test_other_tilings(monkeypatch, tiles):
    """Unequal BLOCK_M / BLOCK_N exercise the causal range split and ragged-tail logic."""
    (fm, fn), (kn, km), (qm, qn) = tiles
    monkeypatch.setattr(A, "INTERP_CFGS", {"fwd": A.Cfg(fm, fn, 4, 1), "dkdv": A.Cfg(kn, km, 4, 1),
                                           "dq": A.Cfg(qm, qn, 4, 1)})
    _run_case(1, 45, 83, 2, 1, 16, True, dtype=torch.float32, mode="split")
    _run_case(1, 83, 45, 2, 2, 16, True, dtype=torch.float32, mode="atomic")
    _run_case(1, 50, 50, 2, 2, 16, False, dtype=torch.float32, mode="split")


def test_strided_fused_qkv_and_autograd():
    """q/k/v sliced out of one [B, T, 3, H, D] projection; gradients through `attention`,
    including a loss on lse (the dlse path)."""
    B, T, H, D = 2, 33, 2, 32
    qkv = rand(B, T, 3, H, D, dtype=torch.float32).requires_grad_()
    q, k, v = qkv.unbind(2)
    assert q.stride(1) == 3 * H * D and not q.is_contiguous()
    o = A.attention(q, k, v, causal=True)
    o2, lse = A.attention_fwd(q, k, v, True, None)
    w = torch.randn_like(o)
    w2 = torch.randn_like(lse)
    loss = (o * w).sum() + (o2 * w).sum() + (lse * w2).sum()
    (g,) = torch.autograd.grad(loss, (qkv,))

    ref_in = qkv.detach().double().requires_grad_()
    rq, rk, rv = ref_in.unbind(2)
    ro, rlse = ref_attention(rq, rk, rv, True, 1.0 / math.sqrt(D))
    check("o", o, ro, torch.float32)
    rloss = 2 * (ro * w.double()).sum() + (rlse * w2.double()).sum()
    (rg,) = torch.autograd.grad(rloss, (ref_in,))
    check("dqkv", g, rg, torch.float32)


def test_lse_only_gradient():
    """Gradient flows when only lse is used (do is None inside the backward)."""
    q = rand(1, 20, 2, 16, dtype=torch.float32).requires_grad_()
    k = rand(1, 20, 2, 16, dtype=torch.float32).requires_grad_()
    v = rand(1, 20, 2, 16, dtype=torch.float32).requires_grad_()
    _, lse = A.attention_fwd(q, k, v, False, None)
    gq, gk, gv = torch.autograd.grad(lse.sum(), (q, k, v))
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    _, rlse = ref_attention(qr, kr, vr, False, 0.25)
    rq, rk = torch.autograd.grad(rlse.sum(), (qr, kr))
    check("dq", gq, rq, torch.float32)
    check("dk", gk, rk, torch.float32)
    assert gv.abs().max().item() == 0.0


def test_custom_op_registration_and_compile():
    """Fake/autograd registrations are consistent (opcheck) and the op traces under torch.compile."""
    q = rand(1, 8, 2, 16, dtype=torch.float32).requires_grad_()
    k = rand(1, 8, 1, 16, dtype=torch.float32).requires_grad_()
    v = rand(1, 8, 1, 16, dtype=torch.float32).requires_grad_()
    torch.library.opcheck(torch.ops.blockzoo.attention_fwd.default, (q, k, v, True, 0.25),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))

    def f(q, k, v):
        return A.attention(q, k, v, causal=True).sum()

    cf = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = cf(q, k, v)
    g = torch.autograd.grad(out, (q, k, v))
    ref = f(q, k, v)
    rg = torch.autograd.grad(ref, (q, k, v))
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(g, rg, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_rejects_bad_inputs():
    q = rand(1, 8, 3, 16, dtype=torch.float32)
    k = rand(1, 8, 2, 16, dtype=torch.float32)
    with pytest.raises(Exception, match="Hq % Hk"):
        A.attention_fwd(q, k, k, True, None)
    with pytest.raises(Exception, match="head dim"):
        x = rand(1, 8, 2, 300, dtype=torch.float32)
        A.attention_fwd(x, x, x, True, None)
