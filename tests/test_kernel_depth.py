"""depth.moda and depth.mod kernels on their own: the oracle against plain-Python loops, depth
causality (a query sees the depth slots of its own position only), several Triton tilings
(packed GQA tiles), bad-input errors, the MoD selection and the gather / scatter kernels.

Backend-vs-reference on odd shapes (outputs and every gradient) is the generated matrix
(tests/test_matrix.py, cases in plugins/depth/plugin.py). Triton runs here only under
TRITON_INTERPRET=1 (or on a GPU).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import blockzoo
from blockzoo.kernels._alloc import poisoned
from blockzoo.plugins.attention.reference import attention_reference
from blockzoo.plugins.depth.reference import (
    mod_gather_reference,
    mod_k,
    mod_reference,
    mod_select,
    moda_reference,
)
from blockzoo.registry.dispatch import BackendUnavailable

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()


def _backends():
    out = ["reference", "numba"]
    if INTERP or HAS_CUDA:
        out.append("triton")
    return out


def _dev(backend):
    return "cuda" if backend == "triton" and HAS_CUDA and not INTERP else "cpu"


def _inputs(b, tq, tk, hq, hk, d, s, dev="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def mk(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(dev).requires_grad_()
    return mk(b, tq, hq, d), mk(b, tk, hk, d), mk(b, tk, hk, d), mk(b, tq * s, hk, d), mk(b, tq * s, hk, d)


def _moda(backend, *tensors, **params):
    with poisoned():
        return blockzoo.op("depth.moda", backend)(*tensors, **params)


# ------------------------------------------------------------------------------------------------
# the oracle
# ------------------------------------------------------------------------------------------------
def brute_force_moda(q, k, v, dk, dv, causal=True, scale=None):
    """Per (batch, head, row): list the visible keys explicitly, one softmax, in float64."""
    B, Tq, Hq, D = q.shape
    Tk, Hk = k.shape[1], k.shape[2]
    S = dk.shape[1] // Tq if Tq else 0
    G = Hq // Hk
    scale = 1 / math.sqrt(D) if scale is None else scale
    out = torch.zeros(B, Tq, Hq, D, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            for i in range(Tq):
                keys, vals = [], []
                for j in range(Tk):
                    if not causal or j <= i + Tk - Tq:
                        keys.append(k[b, j, h // G].double())
                        vals.append(v[b, j, h // G].double())
                for s in range(S):
                    keys.append(dk[b, i * S + s, h // G].double())
                    vals.append(dv[b, i * S + s, h // G].double())
                if not keys:
                    continue
                sc = torch.stack([q[b, i, h].double() @ kk for kk in keys]) * scale
                p = torch.softmax(sc, 0)
                out[b, i, h] = sum(pp * vv for pp, vv in zip(p, vals, strict=True))
    return out


@pytest.mark.parametrize("shape,causal", [((1, 7, 7, 4, 2, 8, 3), True), ((2, 5, 9, 3, 1, 4, 2), True),
                                          ((1, 9, 4, 2, 2, 4, 1), True), ((1, 6, 6, 2, 1, 4, 2), False)])
def test_reference_matches_brute_force(shape, causal):
    q, k, v, dk, dv = (t.detach() for t in _inputs(*shape, dtype=torch.float64))
    want = brute_force_moda(q, k, v, dk, dv, causal)
    got = moda_reference(q, k, v, dk, dv, causal=causal)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", _backends())
def test_no_depth_slots_is_dense_attention(backend):
    dev = _dev(backend)
    q, k, v, dk, dv = _inputs(2, 23, 23, 4, 2, 16, 0, dev)
    got = _moda(backend, q, k, v, dk, dv)
    want = attention_reference(q.detach().float(), k.detach().float(), v.detach().float())
    torch.testing.assert_close(got.float(), want, rtol=2e-5, atol=2e-5)


# ------------------------------------------------------------------------------------------------
# causality: depth slots of other positions are never visible
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", _backends())
def test_depth_slots_of_other_positions_are_invisible(backend):
    dev = _dev(backend)
    B, T, Hq, Hk, D, S = 1, 21, 4, 2, 16, 3
    q, k, v, dk, dv = _inputs(B, T, T, Hq, Hk, D, S, dev, seed=5)
    base = _moda(backend, q, k, v, dk, dv).detach()
    for u in (0, 7, T - 1):
        dk2, dv2 = dk.detach().clone(), dv.detach().clone()
        dk2[:, u * S:(u + 1) * S] += 3.0
        dv2[:, u * S:(u + 1) * S] -= 5.0
        out = _moda(backend, q, k, v, dk2, dv2).detach()
        changed = (out - base).abs().amax(dim=(0, 2, 3)) > 1e-6
        assert changed.tolist() == [t == u for t in range(T)], (u, changed)
    # gradients: a loss on row i reaches the depth slots of position i only, and (causal) the
    # sequence keys j <= i only
    i = 11
    o = _moda(backend, q, k, v, dk, dv)
    gk, gdk = torch.autograd.grad(o[:, i].sum(), (k, dk))
    rows_dk = gdk.abs().amax(dim=(0, 2, 3)).reshape(T, S).amax(1) > 0
    assert rows_dk.tolist() == [t == i for t in range(T)]
    rows_k = gk.abs().amax(dim=(0, 2, 3)) > 0
    assert rows_k.tolist() == [j <= i for j in range(T)]


@pytest.mark.skipif(not INTERP, reason="Triton tilings: TRITON_INTERPRET=1 only (the GPU run covers compiled)")
@pytest.mark.parametrize("cfg,hq,hk", [((16, 16, 1), 8, 1), ((32, 16, 0), 6, 2), ((64, 32, 1), 2, 2),
                                        ((16, 32, 0), 16, 1), ((64, 16, 0), 8, 1), ((32, 32, 1), 3, 1)])
def test_triton_tilings(cfg, hq, hk):
    """cfg = (BLOCK_M, BLOCK_N, prefetch); packed tiles with GP = 8, 4, 2, 16 (TOK = 1), 4."""
    from blockzoo.kernels.triton import moda as tm
    tm.CFGS["interp"] = tm.MCfg(cfg[0], cfg[1], 4, 1, cfg[2])
    try:
        q, k, v, dk, dv = _inputs(1, 37, 37, hq, hk, 24, 2, seed=hq * 7 + cfg[0])
        with poisoned():
            o = tm.moda_attention(q, k, v, dk, dv, True)
            got = torch.autograd.grad(o, (q, k, v, dk, dv), torch.ones_like(o))
    finally:
        tm.CFGS.pop("interp", None)
    ins = [t.detach().double().requires_grad_() for t in (q, k, v, dk, dv)]
    r = moda_reference(*ins)
    want = torch.autograd.grad(r, ins, torch.ones_like(r))
    torch.testing.assert_close(o.double(), r, rtol=1e-4, atol=1e-5)
    for name, a, w in zip("q k v depth_k depth_v".split(), got, want, strict=True):
        torch.testing.assert_close(a.double(), w, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"grad {n}: {m}")


def _triton_vs_reference(shape, path, cfg=None, dtype=torch.float32, causal=True, scale=None, seed=0):
    """Output and all five gradients of the Triton kernel (depth path ``path``) vs the fp32/fp64
    reference, NaN-poisoned outputs, a random cotangent."""
    from blockzoo.kernels.triton import moda as tm
    b, tq, tk, hq, hk, d, s = shape
    q, k, v, dk, dv = _inputs(b, tq, tk, hq, hk, d, s, dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    cot = torch.randn((b, tq, hq, d), generator=g)
    if cfg is not None:
        tm.CFGS["interp"] = tm.MCfg(*cfg)
    try:
        with poisoned():
            o = tm.moda_attention(q, k, v, dk, dv, causal, scale, path=path)
            got = torch.autograd.grad(o, (q, k, v, dk, dv), cot.to(dtype))
    finally:
        tm.CFGS.pop("interp", None)
    ins = [t.detach().double().requires_grad_() for t in (q, k, v, dk, dv)]
    r = moda_reference(*ins, causal=causal, scale=scale)
    want = torch.autograd.grad(r, ins, cot.double())
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(o.double(), r, **tol)
    for name, a, w in zip("q k v depth_k depth_v".split(), got, want, strict=True):
        torch.testing.assert_close(a.double(), w, **tol, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.skipif(not INTERP, reason="Triton depth paths: TRITON_INTERPRET=1 only (the GPU bench covers compiled)")
@pytest.mark.parametrize("path", ["mma", "rowwise"])
@pytest.mark.parametrize("shape,cfg", [
    ((1, 21, 21, 2, 2, 40, 1), None),                 # GQA 1 (P = 16 positions per dot), S = 1, D = 40
    ((2, 13, 13, 4, 2, 48, 19), None),                # GQA 2, S > T, D = 48
    ((1, 29, 29, 4, 1, 24, 3), (32, 16, 4, 1, 0, 16)),  # GQA 4, odd T, one step = 2 slots
    ((1, 25, 25, 8, 2, 32, 37), (32, 16, 4, 1, 0, 8)),  # GQA 4:1 x 2 kv heads, 37 slots in steps of 8
    ((1, 17, 30, 8, 1, 16, 5), None),                 # GQA 8, Tq < Tk
    ((1, 30, 12, 3, 1, 16, 2), None),                 # GQA 3 (padded to 4), Tq > Tk
])
def test_triton_depth_paths(shape, cfg, path):
    """Both depth paths (the tensor-core "mma" one and the row-wise one) against the reference."""
    _triton_vs_reference(shape, path, cfg, seed=sum(shape))


@pytest.mark.skipif(not INTERP, reason="Triton depth paths: TRITON_INTERPRET=1 only (the GPU bench covers compiled)")
@pytest.mark.parametrize("case", ["bf16", "noncausal-gqa16", "neg-scale", "S0", "T1"])
def test_triton_mma_path_edges(case):
    shape, kw = {
        "bf16": ((1, 23, 23, 8, 2, 40, 4), dict(dtype=torch.bfloat16)),
        "noncausal-gqa16": ((1, 9, 9, 16, 1, 16, 3), dict(causal=False)),  # P = 1: no wasted depth work
        "neg-scale": ((1, 20, 20, 4, 2, 16, 3), dict(scale=-0.3)),
        "S0": ((1, 19, 19, 2, 1, 16, 0), {}),
        "T1": ((1, 1, 1, 2, 1, 16, 5), {}),
    }[case]
    _triton_vs_reference(shape, "mma", seed=len(case), **kw)


def test_depth_path_rule_and_errors():
    from blockzoo.kernels.triton import moda as tm
    assert [tm.depth_path(g) for g in (1, 2, 3, 8, 16)] == ["rowwise", "rowwise", "mma", "mma", "mma"]
    assert tm.depth_path(8, "rowwise") == "rowwise" and tm.depth_path(1, "mma") == "mma"
    with pytest.raises(ValueError, match="'tc' is not one of"):
        tm.depth_path(8, "tc")
    if INTERP:
        q, k, v, dk, dv = (t.detach() for t in _inputs(1, 4, 4, 2, 1, 16, 1))
        with pytest.raises(ValueError, match="path='tc'"):
            tm.moda_attention(q, k, v, dk, dv, path="tc")
    # tilings: a tensor-core batch has >= 16 rows and >= 16 depth columns, TOK a multiple of P
    for g in (1, 2, 3, 4, 8, 16, 32):
        for s in (0, 1, 3, 32, 64):
            for kind in ("fwd_mma", "dq_mma"):
                tok, gp, p, sb = tm._mma_tiling(tm.MCfg(64, 64, 4, 2), g, s, kind, 64, 2)
                assert p * gp >= 16 and p * sb >= 16 and tok % p == 0 and gp >= g
                assert sb & (sb - 1) == 0 and tok * gp >= 16


@pytest.mark.parametrize("backend", _backends())
def test_bad_depth_shapes_are_clear_errors(backend):
    dev = _dev(backend)
    q, k, v, dk, dv = (t.detach() for t in _inputs(1, 10, 10, 4, 2, 16, 2, dev))
    # through the op: the dispatch rule names the problem
    with pytest.raises(BackendUnavailable, match="not a multiple of Tq=10"):
        blockzoo.op("depth.moda", backend)(q, k, v, dk[:, :-1], dv[:, :-1])
    with pytest.raises(BackendUnavailable, match="Hk=2"):
        blockzoo.op("depth.moda", backend)(q, k, v, dk[:, :, :1], dv[:, :, :1])
    # the backend functions themselves check too
    fn = blockzoo.registry.get_registry().backend("depth.moda", backend).fn
    with pytest.raises(ValueError, match="not a multiple of Tq=10"):
        fn(q, k, v, dk[:, :-1], dv[:, :-1])
    with pytest.raises(ValueError, match="Hk=2"):
        fn(q, k, v, dk[:, :, :1], dv[:, :, :1])


# ------------------------------------------------------------------------------------------------
# MoD
# ------------------------------------------------------------------------------------------------
def test_capacity_and_selection_tie_breaking():
    assert [mod_k(t, 0.125) for t in (0, 1, 7, 8, 9, 63, 64)] == [0, 1, 1, 1, 2, 8, 8]
    assert mod_k(10, 1.0) == 10 and mod_k(100, 0.05) == 5
    r = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, 2.0]])
    # top-3 = the three 3.0s; top-2 = the two lowest positions among the tie
    assert mod_select(r, 0.5).tolist() == [[1, 2, 4]]
    assert mod_select(r, 2 / 6).tolist() == [[1, 2]]
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-3, 3, (4, 40), generator=g).float()
    for row, idx in zip(x, mod_select(x, 0.2), strict=True):
        order = sorted(range(40), key=lambda j: (-row[j].item(), j))[:8]
        assert idx.tolist() == sorted(order)


@pytest.mark.parametrize("backend", _backends())
def test_mod_gather_kernels(backend):
    dev = _dev(backend)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 29, 37, generator=g, dtype=torch.float64).float().to(dev).requires_grad_()
    idx = torch.stack([torch.sort(torch.randperm(29, generator=g)[:6])[0] for _ in range(3)]).to(dev)
    if backend == "reference":
        fn = mod_gather_reference
    elif backend == "numba":
        from blockzoo.kernels.numba.mod import mod_gather as fn
    else:
        from blockzoo.kernels.triton.mod import mod_gather as fn
    with poisoned():
        out = fn(x, idx)
    want = mod_gather_reference(x.detach(), idx)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    cot = torch.randn(out.shape, generator=g).to(dev)
    (gx,) = torch.autograd.grad(out, (x,), cot)
    exp = torch.zeros_like(x.detach())
    for b in range(3):
        exp[b, idx[b]] = cot[b]
    torch.testing.assert_close(gx, exp, rtol=0, atol=0)


@pytest.mark.parametrize("backend", _backends())
def test_mod_unrouted_tokens_skip(backend):
    """Tokens outside the top-k come out exactly as they went in, and get no router gradient."""
    dev = _dev(backend)
    g = torch.Generator().manual_seed(4)
    b, t, c, cap = 2, 30, 12, 0.2
    x = torch.randn(b, t, c, generator=g).to(dev).requires_grad_()
    r = torch.randn(b, t, generator=g).to(dev).requires_grad_()
    y = torch.randn(b, mod_k(t, cap), c, generator=g).to(dev).requires_grad_()
    with poisoned():
        out = blockzoo.op("depth.mod", backend)(x, r, y, capacity=cap)
    idx = mod_select(r, cap)
    routed = torch.zeros(b, t, dtype=torch.bool, device=dev).scatter_(1, idx, True)
    assert torch.equal(out[~routed], x.detach()[~routed])
    assert not torch.equal(out[routed], x.detach()[routed])
    gr = torch.autograd.grad(out.sum(), r)[0]
    assert torch.all(gr[~routed] == 0) and torch.all(gr[routed] != 0)
    torch.testing.assert_close(out, mod_reference(x.detach(), r.detach(), y.detach(), capacity=cap))


def test_mod_bad_inputs():
    x, r = torch.randn(1, 16, 8), torch.randn(1, 16)
    with pytest.raises(ValueError, match="routed rows"):
        blockzoo.op("depth.mod", "reference")(x, r, torch.randn(1, 3, 8))  # capacity 0.125 of 16 -> 2
    with pytest.raises(ValueError, match="router must be"):
        blockzoo.op("depth.mod", "reference")(x, torch.randn(1, 15), torch.randn(1, 2, 8))
    with pytest.raises(blockzoo.core.ops.OpArgumentError, match="capacity"):
        blockzoo.op("depth.mod", "reference")(x, r, torch.randn(1, 2, 8), capacity=0.0)
