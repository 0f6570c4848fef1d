"""The Numba flow.coupling kernels' loop layout against the reference, exhaustively.

The kernels never load the coupling mask: ``half`` runs two contiguous column ranges and
``alternate`` a loop over column pairs with an odd-D tail column, one code path per
(mask, parity). Every path is checked here, forward (y and log-det) and every gradient, for
even and odd D including D = 1, 2, 3, in fp32 and fp64, with fresh random inputs; the conformance
matrix covers only a few of these combinations.
"""

import pytest
import torch

from blockzoo.kernels.numba.flow import coupling
from blockzoo.plugins.flow.reference import coupling_reference

DIMS = (1, 2, 3, 17, 40, 63)
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def _inputs(b, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    s = torch.randn(b, d, generator=g, dtype=torch.float64) * 1.5
    t = torch.randn(b, d, generator=g, dtype=torch.float64)
    return [v.to(dtype).requires_grad_() for v in (x, s, t)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("mask,parity", [("alternate", 0), ("alternate", 1), ("alternate", None),
                                         ("half", 0), ("half", 1)])
def test_every_layout_matches_reference(mask, parity, inverse, dtype):
    seed = torch.seed() % (2**31)
    for d in DIMS:
        b = 5 + d % 4
        x, s, t = _inputs(b, d, dtype, seed + d)
        kw = dict(mask=mask, parity=parity, clamp=1.7, inverse=inverse)
        y, ld = coupling(x, s, t, **kw)
        xr, sr, tr = (v.detach().double().requires_grad_() for v in (x, s, t))
        yr, ldr = coupling_reference(xr, sr, tr, **kw)
        tol = TOL[dtype]
        torch.testing.assert_close(y, yr.to(dtype), **tol, msg=f"y, d={d}, seed={seed}")
        torch.testing.assert_close(ld, ldr.to(dtype), **tol, msg=f"logdet, d={d}, seed={seed}")
        g = torch.Generator().manual_seed(seed + 1000 + d)
        dy = torch.randn(b, d, generator=g, dtype=torch.float64)
        dld = torch.randn(b, generator=g, dtype=torch.float64)
        got = torch.autograd.grad((y, ld), (x, s, t), (dy.to(dtype), dld.to(dtype)))
        want = torch.autograd.grad((yr, ldr), (xr, sr, tr), (dy, dld))
        for name, a, w in zip("xst", got, want, strict=True):
            torch.testing.assert_close(a, w.to(dtype), **tol, msg=f"d{name}, d={d}, seed={seed}")


@pytest.mark.parametrize("which", ["y", "logdet"])
def test_one_missing_cotangent(which):
    """Only y or only the log-det in the loss: the missing cotangent is a zero."""
    x, s, t = _inputs(6, 9, torch.float64, 3)
    y, ld = coupling(x, s, t, parity=1)
    yr, ldr = coupling_reference(x, s, t, parity=1)
    out, ref = (y, yr) if which == "y" else (ld, ldr)
    got = torch.autograd.grad(out.sin().sum(), (x, s, t), allow_unused=True, materialize_grads=True)
    want = torch.autograd.grad(ref.sin().sum(), (x, s, t), allow_unused=True, materialize_grads=True)
    for a, w in zip(got, want, strict=True):
        torch.testing.assert_close(a, w, rtol=1e-10, atol=1e-10)
    assert any(a.abs().max() > 0 for a in got)


def test_bad_mask_and_parity_are_named():
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="mask must be 'alternate' or 'half', got 'halves'"):
        coupling(x, x, x, mask="halves")
    with pytest.raises(ValueError, match="parity must be 0, 1 or None, got 2"):
        coupling(x, x, x, parity=2)
