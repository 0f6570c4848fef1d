"""precision.int8 / precision.qaas: quantisation primitives of every backend against the
reference's, the accuracy bounds against fp32 attention (random and outlier-channel inputs,
printed as a report), straight-through gradients, a model that trains, and input errors.

The generated matrix (tests/test_matrix.py) compares each backend's forward with the QUANTISED
reference and every gradient with the straight-through reference; this file adds what the
matrix cannot: the accuracy of the quantised function itself vs fp32 attention.
"""

from __future__ import annotations

import pytest
import torch

import blockzoo
from blockzoo.plugins.precision import reference as R
from blockzoo.registry import Capabilities, get_registry
from blockzoo.testing.training import assert_model_learns

HAVE_TRITON = not Capabilities(interpreted_on_cpu=True).environment_reasons()
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _backends(cid: str) -> list[str]:
    reg = get_registry()
    names = ["reference", "numba"]
    if HAVE_TRITON:
        names.append("triton")
    return [n for n in names if not reg.backend(cid, n).capabilities.environment_reasons()]


# ---------------------------------------------------------------------------------------------
# quantisation primitives: every backend's codes are the reference's codes
# ---------------------------------------------------------------------------------------------
def _fp8_probe() -> torch.Tensor:
    """Every E4M3 value, the midpoints between neighbours (ties) and random values."""
    allv = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    allv = allv[torch.isfinite(allv)].unique()
    mids = (allv[1:] + allv[:-1]) / 2
    return torch.cat([allv, mids, torch.randn(5000) * 30, torch.randn(2000) * 0.01])


def test_numba_fp8_rounding_is_round_to_nearest_even():
    from blockzoo.kernels.numba.precision import _fp8_codes
    x = _fp8_probe().clamp(-448, 448)
    got = torch.from_numpy(_fp8_codes(x.numpy().copy()))
    assert torch.equal(got, R.round_fp8(x))


@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("backend", ["numba", "triton"])
def test_block_quantisation_codes_match_reference(kind, backend):
    if backend == "triton" and not HAVE_TRITON:
        pytest.skip("no CUDA device and TRITON_INTERPRET is not set")
    dev = DEV if backend == "triton" else "cpu"
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 70, 3, 40, generator=g) * torch.rand(1, 1, 3, 40, generator=g) * 5).to(dev)
    x[:, :, :, 5] *= 60  # an outlier channel
    mean = R.key_mean(x)
    if backend == "numba":
        from blockzoo.kernels.numba.precision import quantise
        codes, scale = quantise(x, 32, kind, mult=0.7, mean=mean)
        codes, scale = torch.from_numpy(codes), torch.from_numpy(scale)
    else:
        from blockzoo.kernels.triton.precision import quantise
        codes, scale = quantise(x, 32, kind, mult=0.7, mean=mean)
        codes, scale = codes.float().cpu(), scale.cpu()
    want_codes, want_scale = R.quant_blocks(x.float() * torch.tensor(0.7) - mean, 32, kind)
    assert torch.equal(scale, want_scale.cpu())
    assert torch.equal(codes, want_codes.cpu())


# ---------------------------------------------------------------------------------------------
# accuracy vs fp32 attention (the yardstick), with a printed report
# ---------------------------------------------------------------------------------------------
def _inputs(kind: str, seed: int, t: int = 256, d: int = 64):
    if kind == "outliers":
        return R.outlier_inputs(1, t, 4, 2, d, torch.float32, DEV if False else "cpu", seed=seed)
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, t, h, d, generator=g) for h in (4, 2, 2))


def _run(cid: str, backend: str, q, k, v, **params):
    dev = DEV if backend == "triton" else "cpu"
    q, k, v = q.to(dev), k.to(dev), v.to(dev)
    if cid == "precision.qaas":
        extra = (torch.full((q.shape[2],), 0.25, device=dev), torch.ones(q.shape[2], device=dev))
    else:
        extra = ()
    fn = blockzoo.op(cid, backend=backend)
    with torch.no_grad():
        return fn(q, k, v, *extra, **params).cpu()


# (component, params, inputs) -> minimum cosine similarity vs fp32 attention. int8: the issue's
# target (>= 0.999 on outlier inputs); qaas keeps P in FP8 (binary=False): 0.99 on random inputs;
# binarised qaas is lossy by design (docs/components/qaas.md): only a loose floor is asserted.
BOUNDS = [
    ("precision.int8", {}, "outliers", 0.999),
    ("precision.int8", {}, "random", 0.999),
    ("precision.int8", {"pv": "fp16"}, "outliers", 0.9995),
    ("precision.qaas", {"binary": False}, "random", 0.99),
    ("precision.qaas", {}, "random", 0.6),
]


@pytest.mark.parametrize("cid,params,kind,bound", BOUNDS, ids=[f"{c}-{p}-{k}" for c, p, k, _ in BOUNDS])
def test_accuracy_vs_fp32_attention(cid, params, kind, bound, capsys):
    rows = []
    for backend in _backends(cid):
        for seed in (0, 1):
            q, k, v = _inputs(kind, seed)
            ref = R.dense_fp32(q, k, v, causal=True)
            m = R.accuracy(_run(cid, backend, q, k, v, **params), ref)
            rows.append((backend, seed, m))
    with capsys.disabled():
        for backend, seed, m in rows:
            print(f"\n  accuracy {cid} {params} {kind:8s} {backend:9s} seed {seed}: cos={m['cos']:.6f} "
                  f"rel_l1={m['rel_l1']:.4f} rmse={m['rmse']:.4g}", end="")
    for backend, seed, m in rows:
        assert m["cos"] >= bound, (cid, params, kind, backend, seed, m)


def test_key_smoothing_is_what_makes_int8_accurate_on_outliers():
    """Without the key-mean smoothing the INT8 K scale is set by the channel offsets: clearly
    worse (the reason SageAttention smooths K)."""
    q, k, v = _inputs("outliers", 0)
    ref = R.dense_fp32(q, k, v)
    on = R.accuracy(R.int8_forward(q, k, v), ref)
    off = R.accuracy(R.int8_forward(q, k, v, smooth_k=False), ref)
    assert on["cos"] >= 0.999 and off["rel_l1"] > 2 * on["rel_l1"], (on, off)


def test_backends_agree_with_the_quantised_reference_on_outliers():
    """Large outlier inputs (the matrix uses unit normals): every backend vs the emulation."""
    q, k, v = _inputs("outliers", 2, t=200, d=64)
    for cid, want in (("precision.int8", R.int8_forward(q, k, v)),
                      ("precision.qaas", R.qaas_forward(q, k, v, torch.full((4,), 0.25), torch.ones(4)))):
        for backend in _backends(cid):
            got = _run(cid, backend, q, k, v)
            err = (got - want).abs().max() / want.abs().max()
            assert err < 2.0**-4, (cid, backend, float(err))


# ---------------------------------------------------------------------------------------------
# gradients (straight-through) and training
# ---------------------------------------------------------------------------------------------
def test_int8_gradient_is_the_dense_gradient():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 40, 2, 16, generator=g, requires_grad=True) for _ in range(3))
    dout = torch.randn(1, 40, 2, 16, generator=g)
    got = torch.autograd.grad(R.int8_reference(q, k, v, q_block=32, k_block=32), (q, k, v), dout)
    want = torch.autograd.grad(R.dense_fp32(q, k, v), (q, k, v), dout)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_qaas_gamma_gradient_is_exact_and_tau_gets_one():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 64, 2, 16, generator=g) for _ in range(3))
    tau = torch.tensor([0.3, 0.6], requires_grad=True)
    gamma = torch.tensor([1.0, 1.5], requires_grad=True)
    o = R.qaas_reference(q, k, v, tau, gamma, q_block=32, k_block=32)
    w = torch.randn(o.shape, generator=g)
    dtau, dgamma = torch.autograd.grad((o * w).sum(), (tau, gamma))
    # o is linear in gamma per head: d/dgamma_h sum(o * w) = sum over head h of (o / gamma_h) * w
    want = ((o.detach() / gamma.detach()[None, None, :, None]) * w).sum(dim=(0, 1, 3))
    torch.testing.assert_close(dgamma, want, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(dtau).all() and (dtau != 0).all()


def test_qaas_surrogate_describes_the_forward():
    """The straight-through surrogate is the same formula without the FP8 roundings."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 96, 2, 32, generator=g) for _ in range(3))
    tau, gamma = torch.tensor([0.3, 0.5]), torch.tensor([1.0, 0.7])
    fwd = R.qaas_forward(q, k, v, tau, gamma, q_block=32, k_block=32)
    sur = R.qaas_surrogate(q, k, v, tau, gamma, k_block=32)
    assert R.accuracy(fwd, sur)["cos"] > 0.98


SPEC = """
name: t
model: {d_model: 32, n_heads: 4, n_kv_heads: 2, n_layers: 2, max_seq: 64}
block:
  mixer: {type: MIXER, params: {q_block: 32, k_block: 32}}
  normres: {type: normres.rmsnorm}
  mlp: {type: mlp.swiglu}
"""


@pytest.mark.parametrize("mixer", ["precision.int8", "precision.qaas"])
@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_tiny_model_trains(mixer, backend):
    torch.manual_seed(1)
    model = blockzoo.build(SPEC.replace("MIXER", mixer), backend=backend)
    assert_model_learns(model)
    if mixer == "precision.qaas":
        mix = model.blocks[0].mixer
        assert mix.tau_logit.grad is not None and mix.tau_logit.grad.abs().sum() > 0
        assert mix.gamma.grad is not None and mix.gamma.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
def test_bad_params_name_the_parameter():
    from pydantic import ValidationError
    with pytest.raises(ValidationError, match="q_block"):
        get_registry().component("precision.int8").params(q_block=48)
    with pytest.raises(ValidationError, match="pv"):
        get_registry().component("precision.int8").params(pv="int4")
    with pytest.raises(ValidationError, match="threshold"):
        get_registry().component("precision.qaas").params(threshold=0.0)


@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_qaas_tau_shape_is_checked(backend):
    q = torch.randn(1, 8, 4, 16)
    with pytest.raises(ValueError, match="tau must be a tensor of shape"):
        blockzoo.op("precision.qaas", backend=backend)(q, q, q, torch.ones(2), torch.ones(4))
