"""context.moc (Mixture of Contexts): routing rules, causality, the dense limit, kernels on their
own (NaN-poisoned), and a tiny model that trains with a MoC mixer.

Backend-vs-reference on odd shapes is the generated matrix (tests/test_matrix.py, cases in
plugins/context/plugin.py). Triton runs here only under TRITON_INTERPRET=1 (or on a GPU).
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

import blockzoo
from blockzoo.kernels._alloc import poisoned
from blockzoo.plugins.attention.reference import attention_reference
from blockzoo.plugins.context.params import MoCParams
from blockzoo.plugins.context.reference import chunk_bounds, expected_pairs, moc_reference, moc_routing
from blockzoo.testing.training import assert_model_learns

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()


def _backends():
    out = ["reference", "numba"]
    if INTERP or HAS_CUDA:
        out.append("triton")
    return out


def _dev(backend):
    return "cuda" if backend == "triton" and HAS_CUDA and not INTERP else "cpu"


def _run(backend, q, k, v, **params):
    with poisoned():
        return blockzoo.op("context.moc", backend)(q, k, v, **params)


# ------------------------------------------------------------------------------------------------
# routing
# ------------------------------------------------------------------------------------------------
def brute_force_routing(q, k, causal, bounds, top_k, prefix):
    """Plain-Python MoC routing: sel[b][h][i] = set of chunks (own included)."""
    B, Tq, Hq, D = q.shape
    Tk, Hk = k.shape[1], k.shape[2]
    G = Hq // Hk
    C = len(bounds) - 1
    out = {}
    for b, h, i in itertools.product(range(B), range(Hq), range(Tq)):
        pos = i + Tk - Tq
        if causal and pos < 0:
            out[b, h, i] = set()
            continue
        own = next((c for c in range(C) if bounds[c] <= pos < bounds[c + 1]), -1)
        scores = []
        for c in range(C):
            if (causal and c >= own) or (not causal and c == own):
                continue
            keys = [k[b, j, h // G].double() for j in range(bounds[c], bounds[c + 1])]
            desc = sum(keys) / len(keys)
            scores.append((-float(q[b, i, h].double() @ desc), c))
        chosen = {c for _, c in sorted(scores)[:top_k]}  # higher score first, lower index on ties
        if own >= 0:
            chosen.add(own)
        out[b, h, i] = chosen
    return out


def _sel_sets(r):
    B, Hq, Tq, C = r.sel.shape
    return {(b, h, i): {c for c in range(C) if r.sel[b, h, i, c]} for b in range(B) for h in range(Hq)
            for i in range(Tq)}


@pytest.mark.parametrize("causal", [True, False])
def test_routing_matches_brute_force_with_ties(causal):
    # small integers and power-of-two chunks: means and dot products are exact, ties are common,
    # so the tie-breaking rule (lower chunk index first) is exercised
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-2, 3, (2, 37, 4, 8), generator=g).float()
    k = torch.randint(-2, 3, (2, 37, 2, 8), generator=g).float()
    r = moc_routing(q, k, causal=causal, chunk_size=4, top_k=3)
    bf = brute_force_routing(q, k, causal, chunk_bounds(37, 4), 3, 0)
    assert _sel_sets(r) == bf


def test_routing_matches_brute_force_variable_boundaries_and_tq_lt_tk():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 20, 2, 16, generator=g, dtype=torch.float64)
    k = torch.randn(1, 50, 1, 16, generator=g, dtype=torch.float64)
    bnd = (3, 10, 11, 29, 47, 60)  # 0 implied, 60 >= Tk dropped
    r = moc_routing(q, k, boundaries=bnd, top_k=2)
    assert r.bounds.tolist() == [0, 3, 10, 11, 29, 47, 50]
    assert _sel_sets(r) == brute_force_routing(q, k, True, r.bounds.tolist(), 2, 0)


def test_boundaries_accept_a_long_tensor():
    p = MoCParams(boundaries=torch.tensor([0, 16, 40]))
    assert p.boundaries == (0, 16, 40)
    with pytest.raises(ValueError):
        MoCParams(boundaries=(0, 16, 16))
    assert MoCParams(chunk=32).chunk_size == 32  # the spec-friendly alias


def test_causal_rule_no_future_chunk_is_ever_selected():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 90, 4, 16, generator=g)
    k = torch.randn(2, 90, 2, 16, generator=g)
    r = moc_routing(q, k, chunk_size=8, top_k=5, prefix=3, drop_in=0.5, seed=1)
    mask = r.key_mask()
    j = torch.arange(90)
    assert not (mask & (j[None, :] > j[:, None])[None, None]).any()
    # own chunk always kept, the prefix always visible, never more than top_k past chunks w/o drop-in
    own = r.own
    assert r.sel[..., torch.arange(90), own].all()
    assert mask[..., :3].sum(-1).eq(torch.clamp(j + 1, max=3)).all()
    r0 = moc_routing(q, k, chunk_size=8, top_k=5)
    assert (r0.sel.sum(-1) <= 6).all()


@pytest.mark.parametrize("backend", _backends())
def test_no_query_sees_the_future(backend):
    """Perturb keys/values after t0: outputs of queries <= t0 do not change at all."""
    dev = _dev(backend)
    g = torch.Generator().manual_seed(3)
    B, T, Hq, Hk, D = 1, 77, 4, 2, 16
    q = torch.randn(B, T, Hq, D, generator=g).to(dev)
    k = torch.randn(B, T, Hk, D, generator=g).to(dev)
    v = torch.randn(B, T, Hk, D, generator=g).to(dev)
    params = dict(chunk_size=8, top_k=2, prefix=2)
    o = _run(backend, q, k, v, **params)
    for t0 in (0, 5, 8, 30, 50):
        k2, v2 = k.clone(), v.clone()
        k2[:, t0 + 1:] = torch.randn(k2[:, t0 + 1:].shape, generator=g).to(dev) * 10
        v2[:, t0 + 1:] = torch.randn(v2[:, t0 + 1:].shape, generator=g).to(dev) * 10
        o2 = _run(backend, q, k2, v2, **params)
        # equal up to fp32 rounding: the numba kernel gathers the rows that selected a chunk
        # into one gemm, and the row count (which later rows' routing changes) can change the
        # BLAS rounding of the earlier rows by an ulp; a leak of the x10 future values would
        # move them by O(1)
        torch.testing.assert_close(o[:, :t0 + 1], o2[:, :t0 + 1], rtol=0, atol=1e-6, msg=f"{backend} t0={t0}")
        assert (o[:, t0 + 1:] - o2[:, t0 + 1:]).abs().max() > 0.1


@pytest.mark.parametrize("backend", _backends())
def test_top_k_all_chunks_is_dense_causal_attention(backend):
    dev = _dev(backend)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 45, 4, 32, generator=g).to(dev)
    k = torch.randn(2, 45, 2, 32, generator=g).to(dev)
    v = torch.randn(2, 45, 2, 32, generator=g).to(dev)
    dense = attention_reference(q.double(), k.double(), v.double(), causal=True)
    for params in (dict(chunk_size=8, top_k=6), dict(boundaries=(0, 3, 17, 30), top_k=10, prefix=4)):
        o = _run(backend, q, k, v, **params)
        torch.testing.assert_close(o.double(), dense, rtol=0, atol=2e-6)


def test_density_and_flops():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 128, 2, 16, generator=g)
    k = torch.randn(1, 128, 2, 16, generator=g)
    r = moc_routing(q, k, chunk_size=16, top_k=2)
    # equal chunks, no drops: the shape-only estimate is the exact count
    assert expected_pairs(128, 128, True, 16, 2, 0) * 2 == pytest.approx(r.pairs(), rel=1e-12)
    assert r.pairs() == int(r.key_mask().sum())
    assert r.density() == r.pairs() / (2 * 128 * 129 // 2) < 0.6
    assert moc_routing(q, k, chunk_size=16, top_k=99).density() == 1.0
    from blockzoo.registry import Inputs, get_registry
    reg = get_registry()
    moc, dense = reg.component("context.moc"), reg.component("attention.dense")
    inputs = Inputs(device="cpu", dtype=torch.float32, head_dim=64,
                    shapes=(("q", (1, 4096, 4, 64)), ("k", (1, 4096, 4, 64)), ("v", (1, 4096, 4, 64))))
    rel = moc.flops(inputs, MoCParams(chunk_size=128, top_k=4)) / dense.flops(inputs, dense.params())
    assert 0.2 < rel < 0.3, rel


def test_drop_options_are_seeded_and_keep_the_own_chunk():
    g = torch.Generator().manual_seed(6)
    q = torch.randn(1, 64, 2, 16, generator=g)
    k = torch.randn(1, 64, 2, 16, generator=g)
    base = moc_routing(q, k, chunk_size=8, top_k=3)
    a = moc_routing(q, k, chunk_size=8, top_k=3, drop_off=0.5, drop_in=0.3, seed=7)
    b = moc_routing(q, k, chunk_size=8, top_k=3, drop_off=0.5, drop_in=0.3, seed=7)
    c = moc_routing(q, k, chunk_size=8, top_k=3, drop_off=0.5, drop_in=0.3, seed=8)
    assert torch.equal(a.sel, b.sel) and not torch.equal(a.sel, c.sel) and not torch.equal(a.sel, base.sel)
    assert a.sel[..., torch.arange(64), a.own].all()
    assert not (a.key_mask() & torch.ones(64, 64).triu(1).bool()).any()


# ------------------------------------------------------------------------------------------------
# kernels on their own
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("block_m", "block_n"), [(64, 16), (512, 128)])
def test_numba_forward_lse_and_poison(monkeypatch, block_m, block_n):
    from blockzoo.kernels.numba import moc as nmoc
    from blockzoo.kernels.numba.moc import moc_attention_fwd
    monkeypatch.setattr(nmoc, "BLOCK_M", block_m)  # several query blocks per head, or one
    monkeypatch.setattr(nmoc, "BLOCK_N", block_n)  # several key steps per chunk, or one
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 300, 4, 24, generator=g, dtype=torch.float64)
    k = torch.randn(2, 300, 2, 24, generator=g, dtype=torch.float64)
    v = torch.randn(2, 300, 2, 24, generator=g, dtype=torch.float64)
    params = dict(boundaries=(0, 50, 51, 140, 200, 290), top_k=2, prefix=7)
    with poisoned():
        o, lse = moc_attention_fwd(q, k, v, **params)
    r = moc_routing(q, k, **params)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(2, 2)) / 24 ** 0.5
    want_lse = s.masked_fill(~r.key_mask(), float("-inf")).logsumexp(-1)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=1e-10)
    torch.testing.assert_close(o, moc_reference(q, k, v, **params), rtol=0, atol=1e-10)


@pytest.mark.parametrize(("block_m", "block_n"), [(64, 16), (512, 128)])
def test_numba_backward_poisoned_fp64(monkeypatch, block_m, block_n):
    from blockzoo.kernels.numba import moc as nmoc
    from blockzoo.kernels.numba.moc import moc_attention
    monkeypatch.setattr(nmoc, "BLOCK_M", block_m)
    monkeypatch.setattr(nmoc, "BLOCK_N", block_n)
    g = torch.Generator().manual_seed(10)
    shapes = ((2, 300, 4, 24), (2, 300, 2, 24), (2, 300, 2, 24))
    q, k, v = (torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for s in shapes)
    params = dict(boundaries=(0, 50, 51, 140, 200, 290), top_k=2, prefix=7)
    do = torch.randn(2, 300, 4, 24, generator=g, dtype=torch.float64)
    with poisoned():
        got = torch.autograd.grad(moc_attention(q, k, v, **params), (q, k, v), do)
    want = torch.autograd.grad(moc_reference(q, k, v, **params), (q, k, v), do)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.skipif(not (INTERP or HAS_CUDA), reason="needs TRITON_INTERPRET=1 or a GPU")
@pytest.mark.parametrize("path", ["query", "key"])
@pytest.mark.parametrize("tiles", [(16, 32), (32, 16),
                                   # per-kernel tiles: dQ blocks a multiple of the dK/dV step (one
                                   # list launch), and not (a second union launch)
                                   {"fwd": (32, 16), "dq": (32, 16), "dkdv": (16, 32)},
                                   {"fwd": (16, 16), "dq": (16, 32), "dkdv": (32, 16)}],
                         ids=["16x32", "32x16", "per-kernel-a", "per-kernel-b"])
def test_triton_other_tilings_fwd_bwd(monkeypatch, tiles, path):
    from blockzoo.kernels.triton import moc as tmoc
    monkeypatch.setattr(tmoc, "PATH", path)
    monkeypatch.delenv("BLOCKZOO_MOC_PATH", raising=False)
    if INTERP and isinstance(tiles, dict):
        for kind, t in tiles.items():
            monkeypatch.setitem(tmoc.BLOCKS, f"interp_{kind}", (*t, 4, 1))
            monkeypatch.setitem(tmoc.KM_BLOCKS, f"interp_{kind}", (*t, 4, 1))
    elif INTERP:
        monkeypatch.setitem(tmoc.BLOCKS, "interp", (*tiles, 4, 1))
        monkeypatch.setitem(tmoc.KM_BLOCKS, "interp", (*tiles, 4, 1))
    dev = _dev("triton")
    g = torch.Generator().manual_seed(8)
    q = torch.randn(1, 70, 4, 16, generator=g).to(dev).requires_grad_()
    k = torch.randn(1, 70, 2, 16, generator=g).to(dev).requires_grad_()
    v = torch.randn(1, 70, 2, 16, generator=g).to(dev).requires_grad_()
    params = dict(boundaries=(0, 5, 20, 21, 40, 64), top_k=2, prefix=3)
    with poisoned():
        o = tmoc.moc_attention(q, k, v, **params)
        do = torch.randn(o.shape, generator=g).to(dev)
        grads = torch.autograd.grad(o, (q, k, v), do)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = moc_reference(qd, kd, vd, **params)
    want = torch.autograd.grad(ref, (qd, kd, vd), do.double())
    torch.testing.assert_close(o.double(), ref, rtol=0, atol=2e-6)
    for a, b in zip(grads, want, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=2e-5)


@pytest.mark.skipif(not (INTERP or HAS_CUDA), reason="needs TRITON_INTERPRET=1 or a GPU")
@pytest.mark.parametrize("causal", [True, False])
def test_triton_query_major_whole_and_mixed_blocks(monkeypatch, causal):
    """Query blocks whose rows all selected a chunk (rows 32..63 have chunk 0 as their only
    candidate, so every one of them selects it) next to blocks that mix selected and unselected
    rows, with chunks longer than a key step. Output and gradients vs the fp64 reference."""
    from blockzoo.kernels.triton import moc as tmoc
    monkeypatch.setattr(tmoc, "PATH", "query")
    monkeypatch.delenv("BLOCKZOO_MOC_PATH", raising=False)
    dev = _dev("triton")
    g = torch.Generator().manual_seed(21)
    q = torch.randn(1, 100, 2, 16, generator=g).to(dev).requires_grad_()
    k = torch.randn(1, 100, 1, 16, generator=g).to(dev).requires_grad_()
    v = torch.randn(1, 100, 1, 16, generator=g).to(dev).requires_grad_()
    params = dict(causal=causal, chunk_size=32, top_k=1)
    r = moc_routing(q.detach().cpu(), k.detach().cpu(), **params)
    if causal:
        assert bool(r.sel[:, :, 32:64, 0].all())
    with poisoned():
        o = tmoc.moc_attention(q, k, v, **params)
        do = torch.randn(o.shape, generator=g).to(dev)
        grads = torch.autograd.grad(o, (q, k, v), do)
    qd, kd, vd = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref = moc_reference(qd, kd, vd, **params)
    want = torch.autograd.grad(ref, (qd, kd, vd), do.cpu().double())
    torch.testing.assert_close(o.detach().cpu().double(), ref, rtol=0, atol=2e-6)
    for a, b in zip(grads, want, strict=True):
        torch.testing.assert_close(a.cpu().double(), b, rtol=0, atol=2e-5)


FLAT_CASES = [
    # (Tq, Tk, Hq, Hk, D, params): ragged last chunk + prefix cutting chunk 0 + GQA; a prefix
    # spanning two whole chunks; non-causal with Tq < Tk; chunk not a multiple of the key step
    (45, 45, 4, 2, 40, dict(chunk_size=16, top_k=2, prefix=3)),
    (64, 64, 2, 1, 16, dict(chunk_size=8, top_k=2, prefix=16)),
    (30, 52, 2, 2, 16, dict(causal=False, chunk_size=16, top_k=2)),
    (50, 50, 2, 2, 24, dict(chunk_size=24, top_k=1)),
    (150, 150, 2, 1, 16, dict(chunk_size=128, top_k=1, prefix=5)),   # two 64-key tiles per chunk (GPU)
]


def test_flat_seg_len_rule():
    """The flattened loop is taken when every chunk but about one is as long as the longest."""
    from blockzoo.kernels.triton import moc as tmoc
    assert tmoc._flat_seg_len(8192, 512, None, 0) == 512
    assert tmoc._flat_seg_len(45, 16, None, 3) == 16          # 13 + 16 + 13: 6 keys short
    assert tmoc._flat_seg_len(64, 8, None, 16) == 0           # two whole chunks in the prefix
    assert tmoc._flat_seg_len(64, 8, None, 8) == 8            # one
    assert tmoc._flat_seg_len(61, 64, (0, 9, 10, 33, 50), 0) == 0


@pytest.mark.skipif(not (INTERP or HAS_CUDA), reason="needs TRITON_INTERPRET=1 or a GPU")
@pytest.mark.parametrize(("params", "want"), [(dict(chunk_size=16, top_k=1), 16),
                                              (dict(boundaries=(0, 5, 20, 21, 40, 48), top_k=1), 0)])
def test_public_op_passes_the_flat_segment_length(monkeypatch, params, want):
    """moc_attention's forward and backward both reach the kernels with the host's segment
    length (fixed chunks: the flattened loop; variable boundaries: 0, the per-chunk loops)."""
    from blockzoo.kernels.triton import moc as tmoc
    monkeypatch.setattr(tmoc, "PATH", "query")
    monkeypatch.setattr(tmoc, "DENSE_ORDER_MIN", 2.0)   # the forward's list walk (dense order: below)
    monkeypatch.delenv("BLOCKZOO_MOC_PATH", raising=False)
    seen = []
    real = tmoc._tiles_per_chunk
    monkeypatch.setattr(tmoc, "_tiles_per_chunk", lambda seg_len, bn: seen.append(seg_len) or real(seg_len, bn))
    dev = _dev("triton")
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 48, 2, 16, generator=g).to(dev).requires_grad_() for _ in range(3))
    o = tmoc.moc_attention(q, k, v, **params)
    torch.autograd.grad(o, (q, k, v), torch.ones_like(o))
    assert seen == [want, want]      # forward, then dQ


@pytest.mark.skipif(not (INTERP or HAS_CUDA), reason="needs TRITON_INTERPRET=1 or a GPU")
@pytest.mark.parametrize(("params", "share_min", "want"), [(dict(chunk_size=16, top_k=1), 0.0, 16),
                                                           (dict(chunk_size=16, top_k=1), 2.0, 0),
                                                           (dict(boundaries=(0, 16, 32, 48), top_k=1), 0.0, 0)])
def test_public_op_passes_the_dense_order_chunk(monkeypatch, params, share_min, want):
    """moc_attention's forward and backward reach the kernels with the fixed chunk size when the
    density rule picks the dense-order walk (0 otherwise); output and gradients match the
    reference."""
    from blockzoo.kernels.triton import moc as tmoc
    monkeypatch.setattr(tmoc, "PATH", "query")
    monkeypatch.setattr(tmoc, "DENSE_ORDER_MIN", share_min)
    monkeypatch.delenv("BLOCKZOO_MOC_PATH", raising=False)
    seen = []
    real_f, real_b = tmoc._fwd_impl, tmoc._bwd_impl
    monkeypatch.setattr(tmoc, "_fwd_impl", lambda *a: seen.append(a[-1]) or real_f(*a))
    monkeypatch.setattr(tmoc, "_bwd_impl", lambda *a: seen.append(a[-1]) or real_b(*a))
    dev = _dev("triton")
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 48, 2, 16, generator=g).to(dev).requires_grad_() for _ in range(3))
    do = torch.randn(1, 48, 2, 16, generator=g).to(dev)
    with poisoned():
        o = tmoc.moc_attention(q, k, v, **params)
        grads = torch.autograd.grad(o, (q, k, v), do)
    assert seen == [want, want]      # forward, then backward
    qd, kd, vd = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref = moc_reference(qd, kd, vd, **params)
    want_g = torch.autograd.grad(ref, (qd, kd, vd), do.cpu().double())
    for got, w in zip((o, *grads), (ref, *want_g), strict=True):
        torch.testing.assert_close(got.detach().cpu().double(), w.detach(), rtol=0, atol=2e-5)


@pytest.mark.skipif(not (INTERP or HAS_CUDA), reason="needs TRITON_INTERPRET=1 or a GPU")
@pytest.mark.parametrize("case", FLAT_CASES, ids=lambda c: f"Tq{c[0]}-Tk{c[1]}-H{c[2]}:{c[3]}-D{c[4]}-"
                         + "-".join(f"{k}{v}" for k, v in c[5].items()))
def test_triton_flat_chunk_loop_matches_per_chunk_loops(monkeypatch, case):
    """Forward and dQ walking every listed chunk's tiles in one loop (FLAT_CHUNKS, seg_len > 0)
    against one loop per chunk and the fp64 reference; the prefix-spanning case is run with a
    forced seg_len (the rule would pick the per-chunk loops) so whole-prefix chunks in the list
    are walked as masked tiles. The forward also runs in dense order (_moc_fwd_dense_kernel, where
    the chunk size and prefix are multiples of the key step: every key tile, unselected chunks
    masked per row). Interpreted, all three do the same arithmetic on every row that sees a
    tile, in the same order: equal bit for bit."""
    from blockzoo.kernels.triton import moc as tmoc
    Tq, Tk, Hq, Hk, D, params = case
    monkeypatch.setattr(tmoc, "PATH", "query")
    monkeypatch.delenv("BLOCKZOO_MOC_PATH", raising=False)
    if INTERP:   # 8-key steps: several tiles per chunk
        for kind in ("fwd", "dq"):
            monkeypatch.setitem(tmoc.BLOCKS, f"interp_{kind}", (16, 8, 4, 1))
    dev = _dev("triton")
    g = torch.Generator().manual_seed(Tq + Tk + D)
    q = torch.randn(1, Tq, Hq, D, generator=g).to(dev).requires_grad_()
    k = torch.randn(1, Tk, Hk, D, generator=g).to(dev).requires_grad_()
    v = torch.randn(1, Tk, Hk, D, generator=g).to(dev).requires_grad_()
    do = torch.randn(1, Tq, Hq, D, generator=g).to(dev)
    sel, bounds, lim, prefix = tmoc._routing_tensors(q, k, params, None)
    seg = params["chunk_size"]
    runs = {}
    # flattened list walk; per-chunk loops; the dense-order forward (chunk passed: taken where
    # the chunk size and prefix are multiples of the key step)
    for name, flat, chunk in (("flat", True, 0), ("per-chunk", False, 0), ("dense", True, seg)):
        monkeypatch.setattr(tmoc, "FLAT_CHUNKS", flat)
        with poisoned():
            o, _ = tmoc._fwd_op(q, k, v, sel, bounds, lim, prefix, D ** -0.5, True, seg, chunk)
            runs[name] = (o, *torch.autograd.grad(o, (q, k, v), do))
    qd, kd, vd = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref = moc_reference(qd, kd, vd, **params)
    want = (ref, *torch.autograd.grad(ref, (qd, kd, vd), do.cpu().double()))
    for a, b, d, w in zip(runs["flat"], runs["per-chunk"], runs["dense"], want, strict=True):
        torch.testing.assert_close(a.detach().cpu().double(), w.detach(), rtol=0, atol=2e-5)
        torch.testing.assert_close(d.detach().cpu().double(), w.detach(), rtol=0, atol=2e-5)
        if INTERP:
            assert torch.equal(a, b) and torch.equal(d, b)


def test_dense_order_rule():
    """The forward walks in dense order when fixed chunks give a high expected pair share (the
    issue's T = 8192 shape), not at T = 16384, never with variable boundaries or given routing."""
    from blockzoo.kernels.triton import moc as tmoc
    assert tmoc._pair_share(8192, 8192, True, 512, None, 8) > tmoc.DENSE_ORDER_MIN > \
        tmoc._pair_share(16384, 16384, True, 512, None, 8)
    assert tmoc._pair_share(64, 64, True, 16, None, 3) == 1.0       # every row takes every chunk
    q = torch.zeros(1, 8192, 1, 8)
    assert tmoc._dense_chunk_for(q, q, dict(chunk_size=512, top_k=8)) == 512
    assert tmoc._dense_chunk_for(q, q, dict(chunk_size=512, top_k=2)) == 0
    assert tmoc._dense_chunk_for(q, q, dict(boundaries=(0, 4096, 8192), top_k=8)) == 0


KM_CASES = [
    # (B, Tq, Tk, Hq, Hk, D, params): ragged last chunk + GQA 4:2 + prefix, GQA 4:1 with variable
    # boundaries (a 1-key chunk), non-causal, Tq < Tk, Tq > Tk (rows without keys), drops on
    (2, 45, 45, 4, 2, 40, dict(chunk_size=16, top_k=2, prefix=3)),
    (1, 61, 61, 4, 1, 24, dict(boundaries=(0, 9, 10, 33, 50), top_k=2)),
    (1, 40, 40, 2, 2, 16, dict(causal=False, chunk_size=8, top_k=2)),
    (1, 17, 50, 2, 1, 16, dict(chunk_size=8, top_k=3, prefix=4)),
    (1, 50, 17, 2, 2, 16, dict(chunk_size=4, top_k=1)),
    (1, 48, 48, 2, 2, 16, dict(chunk_size=8, top_k=2, drop_off=0.3, drop_in=0.3, seed=5)),
]


@pytest.mark.skipif(not (INTERP or HAS_CUDA), reason="needs TRITON_INTERPRET=1 or a GPU")
@pytest.mark.parametrize("case", KM_CASES, ids=lambda c: f"B{c[0]}-Tq{c[1]}-Tk{c[2]}-H{c[3]}:{c[4]}-D{c[5]}-"
                         + "-".join(f"{k}{v}" for k, v in c[6].items()))
def test_triton_key_major_matches_reference(monkeypatch, case):
    """The key-major path (forced): output, lse and every gradient against the fp64 reference."""
    _check_key_major(monkeypatch, case, "split")


@pytest.mark.skipif(not (INTERP or HAS_CUDA), reason="needs TRITON_INTERPRET=1 or a GPU")
@pytest.mark.parametrize("case", KM_CASES[:2], ids=["ragged-gqa4:2-prefix", "bounds-gqa4:1"])
def test_triton_key_major_atomic_dq(monkeypatch, case):
    """The key-major backward with dQ added by the dK/dV kernel (fp32 atomics)."""
    _check_key_major(monkeypatch, case, "atomic")


def _check_key_major(monkeypatch, case, bwd):
    from blockzoo.kernels.triton import moc as tmoc
    monkeypatch.setattr(tmoc, "PATH", "key")
    monkeypatch.setattr(tmoc, "KM_BWD", bwd)
    monkeypatch.delenv("BLOCKZOO_MOC_PATH", raising=False)
    monkeypatch.delenv("BLOCKZOO_MOC_BWD", raising=False)
    B, Tq, Tk, Hq, Hk, D, params = case
    dev = _dev("triton")
    g = torch.Generator().manual_seed(Tq * 7 + D)
    q = torch.randn(B, Tq, Hq, D, generator=g).to(dev).requires_grad_()
    k = torch.randn(B, Tk, Hk, D, generator=g).to(dev).requires_grad_()
    v = torch.randn(B, Tk, Hk, D, generator=g).to(dev).requires_grad_()
    do = torch.randn(B, Tq, Hq, D, generator=g).to(dev)
    with poisoned():
        o, lse = tmoc.moc_attention_fwd(q, k, v, **params)
        grads = torch.autograd.grad(o, (q, k, v), do)
    qd, kd, vd = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    r = moc_routing(qd, kd, **params)
    ref = moc_reference(qd, kd, vd, routing=r, **params)
    want = torch.autograd.grad(ref, (qd, kd, vd), do.cpu().double())
    s = torch.einsum("bqhd,bkhd->bhqk", qd, kd.repeat_interleave(Hq // Hk, 2)) / D ** 0.5
    want_lse = s.masked_fill(~r.key_mask(), float("-inf")).logsumexp(-1)
    torch.testing.assert_close(o.detach().cpu().double(), ref, rtol=0, atol=2e-6)
    torch.testing.assert_close(lse.cpu().double(), want_lse, rtol=0, atol=2e-5)
    for a, b in zip(grads, want, strict=True):
        torch.testing.assert_close(a.cpu().double(), b, rtol=0, atol=2e-5)


@pytest.mark.skipif(not (INTERP or HAS_CUDA), reason="needs TRITON_INTERPRET=1 or a GPU")
def test_triton_key_major_lists_are_a_counting_sort():
    """Per (batch, head, chunk) the rows that selected the chunk, ascending, each with its slot
    (rank of the chunk among the row's chunks); counts, tiles and per-row totals."""
    from blockzoo.kernels.triton import moc as tmoc
    dev = _dev("triton")
    g = torch.Generator().manual_seed(11)
    sel = (torch.rand(2, 3, 37, 6, generator=g) < 0.4).to(torch.uint8)
    sel[0, 1] = 0                      # a head with no selection at all
    sel[1, 2, :, 0] = 1                # a chunk selected by every row
    bm = 8
    with poisoned():
        km, q_tiles = tmoc.key_major_lists(sel.to(dev), bm, torch.ones(4, dtype=torch.int32, device=dev))
    ent, off, cnt = km.ent.cpu(), km.chunk_off.cpu(), km.cnt.cpu()
    assert q_tiles == 4 and km.ns == int(sel.sum(-1).max())
    assert torch.equal(km.nsel.cpu(), sel.sum(-1).int())
    assert torch.equal(cnt, sel.sum(2).int())
    tiles = (cnt + bm - 1) // bm
    assert torch.equal(km.tile_off.cpu()[..., 1:], tiles.cumsum(-1).int()) and km.tiles == int(tiles.sum())
    for b, h, c in itertools.product(range(2), range(3), range(6)):
        rows = torch.nonzero(sel[b, h, :, c]).flatten()
        e = ent[b, h, off[b, h, c]:off[b, h, c] + cnt[b, h, c]].long()
        assert torch.equal(e // km.ns, rows)
        slots = sel[b, h, rows, :c].sum(-1).long()
        assert torch.equal(e % km.ns, slots)


@pytest.mark.skipif(not (INTERP or HAS_CUDA), reason="needs TRITON_INTERPRET=1 or a GPU")
def test_triton_auto_path_follows_tile_density(monkeypatch):
    """auto: query-major when a query block's rows choose alike (union ~ each row's choice),
    key-major when each row chooses on its own (the union covers every chunk)."""
    from blockzoo.kernels.triton import moc as tmoc
    monkeypatch.setattr(tmoc, "PATH", "auto")
    monkeypatch.delenv("BLOCKZOO_MOC_PATH", raising=False)
    dev = _dev("triton")
    Tq, C, bm = 256, 32, 16
    g = torch.Generator().manual_seed(12)
    pick = torch.rand(1, 2, Tq // bm, C, generator=g).argsort(-1)[..., :3]          # 3 chunks per block
    coherent = torch.zeros(1, 2, Tq // bm, C, dtype=torch.uint8).scatter_(-1, pick, 1)
    coherent = coherent.repeat_interleave(bm, 2)
    rpick = torch.rand(1, 2, Tq, C, generator=g).argsort(-1)[..., :3]               # 3 chunks per row
    random = torch.zeros(1, 2, Tq, C, dtype=torch.uint8).scatter_(-1, rpick, 1)
    km, (ql, qc) = tmoc._plan(coherent.to(dev), bm, bm)
    assert km is None and ql is not None and int(qc.sum()) == 2 * (Tq // bm) * 3
    km, _ = tmoc._plan(random.to(dev), bm, bm)
    assert km is not None and km.ns == 3
    # a host proof that query-major wins skips the decision (no key-major counting at all)
    km, (ql, qc) = tmoc._plan(random.to(dev), bm, bm, query_major=True)
    assert km is None and int(qc.sum()) == int(tmoc._union_blocks(random, bm).sum())
    monkeypatch.setenv("BLOCKZOO_MOC_PATH", "key")
    assert tmoc._plan(coherent.to(dev), bm, bm)[0] is not None
    monkeypatch.setenv("BLOCKZOO_MOC_PATH", "query")
    assert tmoc._plan(random.to(dev), bm, bm)[0] is None
    monkeypatch.setenv("BLOCKZOO_MOC_PATH", "sideways")
    with pytest.raises(ValueError, match="path must be"):
        tmoc._plan(random.to(dev), bm, bm)


LIST_CASES = [
    dict(Tq=61, Tk=61, Hq=4, Hk=2, causal=True, chunk_size=8, top_k=2, prefix=0, tiles=(16, 16, 16)),
    dict(Tq=61, Tk=61, Hq=4, Hk=2, causal=True, chunk_size=8, top_k=2, prefix=11, tiles=(32, 16, 16)),
    dict(Tq=40, Tk=53, Hq=2, Hk=1, causal=True, boundaries=(5, 6, 19, 40), top_k=1, prefix=3, tiles=(16, 32, 32)),
    dict(Tq=50, Tk=37, Hq=3, Hk=3, causal=False, chunk_size=6, top_k=2, prefix=0, tiles=(16, 32, 16)),
    dict(Tq=33, Tk=33, Hq=2, Hk=1, causal=True, chunk_size=16, top_k=1, prefix=40, tiles=(32, 16, 32)),
]


@pytest.mark.skipif(not (INTERP or HAS_CUDA), reason="needs TRITON_INTERPRET=1 or a GPU")
@pytest.mark.parametrize("case", LIST_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_triton_backward_lists_match_torch_lists(case):
    """The backward's list kernels (query-block union per dK/dV step, key-block lists) build
    exactly the torch lists of moc_block_lists, for the dQ tiles and the dK/dV tiles separately
    (also when the dQ block is not a multiple of the dK/dV step: a second union launch, and
    without the dQ lists: the union launch alone)."""
    from blockzoo.kernels.triton import moc as tmoc
    case = dict(case)
    Tq, Tk, Hq, Hk = case.pop("Tq"), case.pop("Tk"), case.pop("Hq"), case.pop("Hk")
    bm_dq, bm_kv, bn_kv = case.pop("tiles")
    dev = _dev("triton")
    seed = int.from_bytes(os.urandom(4), "little")
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, Tq, Hq, 16, generator=g).to(dev)
    k = torch.randn(2, Tk, Hk, 16, generator=g).to(dev)
    with poisoned():
        sel, bounds, lim, prefix = tmoc.moc_route(q, k, **case)
        pre = min(prefix, Tk)
        ql, qc, kl, km = tmoc._backward_lists(sel, bounds, lim, pre, Hq // Hk, Tk, bm_dq, bm_kv, bn_kv)
        # the dense-order dQ reads no lists: the dK/dV lists alone, from the union-only launch
        nql, nqc, kl2, km2 = tmoc._backward_lists(sel, bounds, lim, pre, Hq // Hk, Tk, bm_dq, bm_kv, bn_kv, False)
        wql, wqc, _, _ = tmoc.moc_block_lists(sel, bounds, lim, pre, Hq // Hk, bm_dq, 16)
        _, _, wkl, wkm = tmoc.moc_block_lists(sel, bounds, lim, pre, Hq // Hk, bm_kv, bn_kv)
    assert nql is None and nqc is None
    for got, want, name in ((qc, wqc, "qcount"), (ql, wql, "qlist"), (km, wkm, "kmeta"), (kl, wkl, "klist"),
                            (km2, wkm, "kmeta without dQ lists"), (kl2, wkl, "klist without dQ lists")):
        assert torch.equal(got.cpu(), want.cpu()), f"{name}, seed {seed}"


@pytest.mark.skipif(not (INTERP or HAS_CUDA), reason="needs TRITON_INTERPRET=1 or a GPU")
@pytest.mark.parametrize("case", [dict(Tq=8192, Tk=8192, causal=True, chunk_size=512, top_k=8),
                                  dict(Tq=1024, Tk=1024, causal=True, chunk_size=64, top_k=8),
                                  dict(Tq=300, Tk=300, causal=True, chunk_size=16, top_k=3),
                                  dict(Tq=96, Tk=96, causal=False, chunk_size=8, top_k=4),
                                  dict(Tq=200, Tk=250, causal=True, boundaries=(9, 40, 41, 120), top_k=2),
                                  dict(Tq=257, Tk=257, causal=True, chunk_size=32, top_k=2, drop_off=0.5)])
@pytest.mark.parametrize("bm", [16, 64])
def test_query_major_proof_bounds_hold(monkeypatch, case, bm):
    """The host proof's two bounds against a real selection: the (row, chunk) pairs it counts
    are at most those selected, its query-major tile bound at least the real union tiles; and
    whenever it claims query-major, the synced auto decision on that selection agrees."""
    from blockzoo.kernels.triton import moc as tmoc
    monkeypatch.setattr(tmoc, "PATH", "auto")
    monkeypatch.delenv("BLOCKZOO_MOC_PATH", raising=False)
    case = dict(case)
    Tq, Tk = case.pop("Tq"), case.pop("Tk")
    drop_off = case.get("drop_off", 0.0)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, Tq, 2, 8, generator=g)
    k = torch.randn(1, Tk, 2, 8, generator=g)
    r = moc_routing(q, k, **case)
    shape = (Tq, Tk, case["causal"], case.get("chunk_size", 64), case.get("boundaries"))
    proven = tmoc._query_major_proven(*shape, case["top_k"], drop_off, bm)
    pairs, bound = tmoc._proof_counts(*tmoc._shape_key(*shape), case["top_k"], drop_off > 0, bm)
    sel = r.sel.to(torch.uint8)
    assert int(sel.sum((2, 3)).min()) >= pairs
    assert int(tmoc._union_blocks(sel, bm).sum((2, 3)).max()) * bm <= bound
    if case["top_k"] == 8:
        assert proven   # 16 chunks, top_k 8 (the T = 8192 shape): decided on the host
    if proven and Tq <= 1024:   # (T = 8192 is too slow for the interpreter's decision kernels)
        assert tmoc._plan(sel.to(_dev("triton")), bm, bm)[0] is None


@pytest.mark.skipif(not HAS_CUDA or INTERP, reason="host syncs are a CUDA matter")
def test_triton_moc_step_makes_no_host_sync():
    """Routing, forward and backward of a shape the host proof decides (16 chunks, top_k 8, as
    the issue's T = 8192) launch without a host sync once the geometry is cached."""
    from blockzoo.kernels.triton import moc as tmoc
    g = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = (torch.randn(1, 1024, 4, 64, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
               for _ in range(3))
    params = dict(chunk_size=64, top_k=8)

    def step():
        o = tmoc.moc_attention(q, k, v, **params)
        torch.autograd.grad(o, (q, k, v), torch.ones_like(o))
    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("T,chunk,bounds", [(63, 8, None), (64, 8, None), (5, 8, None), (70, 1, (0, 5, 20, 21, 40, 64)),
                                           (45, 1, (7, 30, 31))])
def test_chunk_descriptors_are_exact_means_and_deterministic(T, chunk, bounds):
    from blockzoo.plugins.context.reference import chunk_descriptors
    k = torch.randn(2, T, 3, 8, dtype=torch.float64)
    b = torch.tensor(chunk_bounds(T, chunk, bounds))
    d = chunk_descriptors(k, b)
    want = torch.stack([k[:, b[i]:b[i + 1]].mean(1) for i in range(len(b) - 1)], 1)
    torch.testing.assert_close(d, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(d, chunk_descriptors(k, b))
    # host lengths (the GPU router's sync-free call): the same values bit for bit
    lens = (b[1:] - b[:-1]).tolist()
    assert torch.equal(d, chunk_descriptors(k, b, lens))
    k32 = k.float()
    assert torch.equal(chunk_descriptors(k32, b), chunk_descriptors(k32, b, lens))


ROUTE_CASES = [
    dict(Tq=63, Tk=63, Hq=2, Hk=1, causal=True, chunk_size=8, top_k=3),
    dict(Tq=40, Tk=40, Hq=2, Hk=2, causal=False, chunk_size=8, top_k=2),
    dict(Tq=17, Tk=50, Hq=2, Hk=1, causal=True, chunk_size=4, top_k=5),
    dict(Tq=50, Tk=17, Hq=2, Hk=1, causal=True, chunk_size=4, top_k=1),
    dict(Tq=45, Tk=45, Hq=1, Hk=1, causal=True, boundaries=(7, 30, 31), top_k=1, prefix=3),
    dict(Tq=33, Tk=33, Hq=1, Hk=1, causal=True, chunk_size=8, top_k=0),
    dict(Tq=33, Tk=33, Hq=1, Hk=1, causal=True, chunk_size=2, top_k=99),
    dict(Tq=70, Tk=70, Hq=2, Hk=1, causal=True, chunk_size=4, top_k=4, ties=True),
    dict(Tq=30, Tk=30, Hq=1, Hk=1, causal=False, chunk_size=3, top_k=4, ties=True),
]


@pytest.mark.skipif(not (INTERP or HAS_CUDA), reason="needs TRITON_INTERPRET=1 or a GPU")
@pytest.mark.parametrize("case", ROUTE_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_triton_router_matches_torch_routing(case):
    """The Triton selection kernel and query-block lists give exactly the torch router's choice
    (ties included: equal keys make equal chunk means, and the lowest chunk index must win)."""
    from blockzoo.kernels.triton import moc as tmoc
    case = dict(case)
    Tq, Tk, Hq, Hk, ties = case.pop("Tq"), case.pop("Tk"), case.pop("Hq"), case.pop("Hk"), case.pop("ties", False)
    dev = _dev("triton")
    seed = int.from_bytes(os.urandom(4), "little")
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, Tq, Hq, 16, generator=g)
    k = torch.randn(2, Tk, Hk, 16, generator=g)
    if ties:   # a few distinct key rows repeated: many chunks share the same mean
        k = k[:, :2].repeat(1, (Tk + 1) // 2, 1, 1)[:, :Tk].contiguous()
    q, k = q.to(dev), k.to(dev)
    with poisoned():
        sel, bounds, lim, prefix = tmoc.moc_route(q, k, **case)
        want = moc_routing(q, k, **case)
        assert torch.equal(sel.bool().cpu(), want.sel.cpu()), f"seed {seed}"
        assert torch.equal(bounds.long().cpu(), want.bounds.cpu()) and torch.equal(lim.long().cpu(), want.lim.cpu())
        bm = 16
        ql, qc = tmoc._query_block_lists(sel, bm)
        wl, wc, _, _ = tmoc.moc_block_lists(sel, bounds, lim, prefix, Hq // Hk, bm, 16)
        assert torch.equal(qc.cpu(), wc.cpu()), f"seed {seed}"
        assert torch.equal(ql.cpu(), wl.cpu()), f"seed {seed}"


@pytest.mark.skipif(not (INTERP or HAS_CUDA), reason="needs TRITON_INTERPRET=1 or a GPU")
def test_triton_custom_op_opcheck():
    from blockzoo.kernels.triton import moc as tmoc
    dev = _dev("triton")
    g = torch.Generator().manual_seed(9)
    q = torch.randn(1, 24, 2, 16, generator=g).to(dev).requires_grad_()
    k = torch.randn(1, 24, 1, 16, generator=g).to(dev).requires_grad_()
    v = torch.randn(1, 24, 1, 16, generator=g).to(dev).requires_grad_()
    sel, bounds, lim, prefix = tmoc._routing_tensors(q, k, dict(chunk_size=8, top_k=1), None)
    torch.library.opcheck(torch.ops.blockzoo.moc_fwd, (q, k, v, sel, bounds, lim, prefix, 0.25, False, 8, 8),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


# ------------------------------------------------------------------------------------------------
# in a model
# ------------------------------------------------------------------------------------------------
MOC_SPEC = """
name: moc-tiny
model: {d_model: 32, n_heads: 4, n_kv_heads: 2, n_layers: 2, max_seq: 64}
block:
  mixer: {type: context.moc, params: {chunk: 8, top_k: 1, prefix: 1, drop_off: 0.1, seed: 3}}
  normres: {type: normres.rmsnorm}
  mlp: {type: mlp.swiglu}
layers:
  - {at: 0, mixer: {type: attention.dense}}
"""


@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_model_with_moc_mixer_trains(backend):
    torch.manual_seed(1)
    model = blockzoo.build(MOC_SPEC, backend=backend)
    assert_model_learns(model, length=40)
    assert {r["backend"] for r in model.backends() if r["component"] == "context.moc"} == {backend}
    model.eval()
    with torch.no_grad():
        tokens = torch.randint(0, 256, (2, 40))
        a, b = model(tokens), model(tokens)
    assert torch.equal(a, b)  # eval: drop options off, deterministic


def test_eval_model_uses_numba_forward_and_matches_reference():
    torch.manual_seed(2)
    spec = MOC_SPEC.replace("drop_off: 0.1, ", "")
    ref = blockzoo.build(spec, backend="reference", training=False)
    fast = blockzoo.build(spec, training=False)  # auto: numba for inference on the CPU
    assert {r["backend"] for r in fast.backends() if r["component"] == "context.moc"} == {"numba"}
    fast.load_state_dict(ref.state_dict())
    tokens = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(fast(tokens), ref(tokens), rtol=1e-5, atol=1e-5)
