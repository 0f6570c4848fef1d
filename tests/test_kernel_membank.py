"""token.membank: the op's oracle against plain-Python loops, causality (op and whole model,
compressor included), decoding (prefill + steps == the parallel forward, cache bounded by
M + W per kv head), the compressor's gradients, Triton tilings that reach the unmasked interior
paths, bad-input errors, registry and cost model.

Backend-vs-reference on odd shapes (outputs and every gradient) is the generated matrix
(tests/test_matrix.py, cases in plugins/token/membank/plugin.py). Triton runs here only under
TRITON_INTERPRET=1 (or on a GPU).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import blockzoo
from blockzoo.core.cache import decode_logits, make_cache, prefill, step
from blockzoo.core.composer import build
from blockzoo.core.context import BuildContext
from blockzoo.kernels._alloc import poisoned
from blockzoo.plugins.token.membank.params import MemBankParams
from blockzoo.plugins.token.membank.reference import (
    bank_scan,
    compress_blocks,
    membank_reference,
    n_chunks,
)
from blockzoo.registry import get_registry
from blockzoo.registry.dispatch import BackendUnavailable

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()
CID = "token.membank"


def _inputs(b, tq, tk, hq, hk, d, w, m, dtype=torch.float64, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    n = n_chunks(tk, w)

    def mk(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(grad)
    return mk(b, tq, hq, d), mk(b, tk, hk, d), mk(b, tk, hk, d), mk(b, n * m, hk, d), mk(b, n * m, hk, d)


def brute_force(q, k, v, bk, bv, window, scale=None):
    """Per (batch, head, row): list the visible keys explicitly, one softmax, float64."""
    B, Tq, Hq, D = q.shape
    Tk, Hk = k.shape[1], k.shape[2]
    G = Hq // Hk
    n = n_chunks(Tk, window)
    M = bk.shape[1] // n if n else 0
    scale = 1 / math.sqrt(D) if scale is None else scale
    out = torch.zeros(B, Tq, Hq, D, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            for i in range(Tq):
                p = i + Tk - Tq
                c = p // window
                keys = [bk[b, c * M + s, h // G] for s in range(M)]
                vals = [bv[b, c * M + s, h // G] for s in range(M)]
                for j in range(max(0, p - window + 1), p + 1):
                    keys.append(k[b, j, h // G])
                    vals.append(v[b, j, h // G])
                kk, vv = torch.stack(keys).double(), torch.stack(vals).double()
                out[b, i, h] = torch.softmax(kk @ q[b, i, h].double() * scale, 0) @ vv
    return out


SHAPES = [(1, 20, 20, 2, 1, 16, 6, 2), (2, 23, 23, 2, 2, 8, 16, 3), (1, 9, 40, 4, 2, 8, 7, 3),
          (1, 1, 12, 2, 1, 8, 12, 4), (1, 19, 19, 2, 1, 8, 32, 5), (1, 10, 10, 2, 1, 8, 1, 2)]


@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_reference_matches_brute_force(shape):
    *dims, w, m = shape
    t = _inputs(*dims, w, m, grad=False)
    torch.testing.assert_close(membank_reference(*t, window=w), brute_force(*t, w), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(membank_reference(*t, window=w, scale=0.2), brute_force(*t, w, 0.2),
                               rtol=1e-10, atol=1e-10)


def _backends():
    out = ["reference", "numba"]
    if INTERP or HAS_CUDA:
        out.append("triton")
    return out


def _run(backend, *t, **params):
    dev = "cuda" if backend == "triton" and HAS_CUDA and not INTERP else "cpu"
    dtype = torch.float64 if backend != "triton" else torch.float32
    t = [x.detach().to(dev, dtype) for x in t]
    with torch.no_grad(), poisoned():
        return blockzoo.op(CID, backend)(*t, **params).double().cpu()


@pytest.mark.parametrize("backend", _backends())
def test_op_is_causal_and_reads_only_its_chunk(backend):
    """Changing key/value j or the bank of chunk c changes exactly the rows that may see it."""
    b, t, hq, hk, d, w, m = 1, 30, 2, 1, 16, 7, 3
    q, k, v, bk, bv = _inputs(b, t, t, hq, hk, d, w, m, grad=False)
    base = _run(backend, q, k, v, bk, bv, window=w)
    pos = torch.arange(t)
    for j in (0, 6, 13, 29):
        k2, v2 = k.clone(), v.clone()
        k2[:, j] += 3.0
        v2[:, j] -= 2.0
        diff = (_run(backend, q, k2, v2, bk, bv, window=w) - base).abs().amax(dim=(0, 2, 3))
        sees = (pos >= j) & (pos < j + w)
        assert torch.all(diff[~sees] == 0), f"key {j} leaks to rows {pos[~sees & (diff > 0)].tolist()}"
        assert torch.all(diff[sees] > 0)
    for c in range(n_chunks(t, w)):
        bk2 = bk.clone()
        bk2[:, c * m:(c + 1) * m] += 3.0
        diff = (_run(backend, q, k, v, bk2, bv, window=w) - base).abs().amax(dim=(0, 2, 3))
        mine = pos // w == c
        assert torch.all(diff[~mine] == 0) and torch.all(diff[mine] > 0)


# ---------------------------------------------------------------------------------------------
# the model: causality with the compressor, decoding
# ---------------------------------------------------------------------------------------------
def _spec(window=5, slots=3, backend="reference", n_kv_heads=2, rope=True, layers=2, d_model=48):
    return {"model": {"d_model": d_model, "n_heads": 4, "n_kv_heads": n_kv_heads, "n_layers": layers, "max_seq": 512,
                      "backend": backend, "rope": rope},
            "block": {"mixer": {"type": CID, "params": {"window": window, "slots": slots}}}}


def _model(spec, seed=0, training=False, device=None):
    torch.manual_seed(seed)
    m = build(spec, training=training, device=device)  # built where it runs: the backends resolve there
    m.train(training)
    with torch.no_grad():  # sharper attention and pooling than the init gives
        for blk in m.blocks:
            blk.mixer.qkv.weight.mul_(4.0)
            blk.mixer.pool_q.mul_(3.0)
            blk.mixer.init_v.normal_()
    return m


def _tokens(b, t, seed=1):
    return torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(seed))


def test_model_is_causal_through_the_bank():
    m = _model(_spec(window=4, slots=2))
    x = _tokens(2, 29)
    with torch.no_grad():
        base = m(x)
        for j in (3, 8, 17, 28):
            x2 = x.clone()
            x2[:, j] = (x2[:, j] + 101) % 256
            out = m(x2)
            torch.testing.assert_close(out[:, :j], base[:, :j], rtol=0, atol=0)
            assert (out[:, j:] - base[:, j:]).abs().amax() > 0
            # beyond the window the change still arrives through the bank (the compressor works)
            if j + 9 < 29:
                assert (out[:, j + 9:] - base[:, j + 9:]).abs().amax() > 1e-6


@pytest.mark.parametrize("backend", ["reference", "numba"])
@pytest.mark.parametrize("window,slots,n_kv_heads,rope", [(5, 3, 2, True), (1, 2, 4, True), (8, 1, 1, False),
                                                         (64, 4, 2, True)])
def test_decoding_matches_parallel_forward(backend, window, slots, n_kv_heads, rope):
    m = _model(_spec(window, slots, backend, n_kv_heads, rope))
    x = _tokens(2, 37)
    with torch.no_grad():
        want = m(x)
    for prefill_len in sorted({1, window, window + 1}):  # chunk boundary at the prefill's end, and not
        if prefill_len > 37:
            continue
        got, _ = decode_logits(m, x, prefill_len, policy=None)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_multi_token_steps_and_bounded_cache():
    window, slots = 6, 3
    m = _model(_spec(window, slots, n_kv_heads=2))
    x = _tokens(1, 150)
    cache = make_cache(m, None)
    with torch.no_grad():
        want = m(x)
        parts = [prefill(m, x[:, :7], cache), step(m, x[:, 7:8], cache), step(m, x[:, 8:21], cache)]
        sizes = []
        for i in range(21, 150):
            parts.append(step(m, x[:, i:i + 1], cache))
            sizes.append({lc.size for lc in cache.layers})
            for lc in cache.layers:
                assert lc.k.shape == (1, 2, lc.size, m.blocks[0].mixer.head_dim)
                assert lc.pos[0, 0, :slots].eq(-1).all()  # the bank
                assert lc.pos[0, 0, slots:].tolist() == list(range(i + 1 - (lc.size - slots), i + 1))
    torch.testing.assert_close(torch.cat(parts, 1), want, rtol=1e-5, atol=1e-5)
    assert cache.seen == 150
    # at most M + W - 1 kept between steps (W during a step), whatever T: here exactly M + W - 1
    assert all(s == {slots + window - 1} for s in sizes)


def test_decoding_is_allowed_and_policies_are_refused():
    m = _model(_spec())
    x = _tokens(1, 9)
    make_cache(m, None)  # check_decodable accepts the mixer (decodes_with_cache)
    cache = make_cache(m, "token.streaming")
    with torch.no_grad(), pytest.raises(ValueError, match="eviction policy"):
        prefill(m, x, cache)


def test_compressor_learns_through_the_op_gradients():
    m = _model(_spec(window=4, slots=2), training=True)
    x = _tokens(2, 30)
    loss = m.loss(x)
    loss.backward()
    mix = m.blocks[0].mixer
    for name in ("pool_q", "decay_logit", "init_k", "init_v"):
        g = getattr(mix, name).grad
        assert g is not None and g.abs().sum() > 0, name


def test_bank_scan_is_the_recurrence():
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 20, 3, 8, generator=g), torch.randn(2, 20, 3, 8, generator=g)
    pool = torch.randn(3, 4, 8, generator=g)
    decay = torch.rand(3, 4, generator=g)
    init_k, init_v = torch.randn(2, 3, 4, 8, generator=g), torch.randn(2, 3, 4, 8, generator=g)
    u_k, u_v = compress_blocks(k, v, pool, 6)                                   # 3 complete chunks
    assert u_k.shape == (2, 3, 3, 4, 8)
    # chunk 1 pooled by hand
    a = torch.softmax(torch.einsum("whd,hmd->hmw", k[0, 6:12], pool) / math.sqrt(8), -1)
    torch.testing.assert_close(u_v[0, 1], torch.einsum("hmw,whd->hmd", a, v[0, 6:12]))
    for max_elems in (1 << 24, 0):  # closed form, and the sequential fallback
        s_k, s_v = bank_scan(init_k, init_v, u_k, u_v, decay, 4, max_elems=max_elems)
        want = init_v
        for c in range(3):
            want = decay[..., None] * want + (1 - decay[..., None]) * u_v[:, c]
            torch.testing.assert_close(s_v[:, c + 1], want)
        torch.testing.assert_close(s_k[:, 0], init_k)
        assert s_k.shape == (2, 4, 3, 4, 8)
    # gradients of the closed form equal those of the recurrence (decay, u, init)
    leaves = [x.clone().requires_grad_() for x in (init_k, init_v, u_k, u_v, decay)]
    a = bank_scan(*leaves[:4], leaves[4], 4)
    ga = torch.autograd.grad(a[0].sum() + (a[1] ** 2).sum(), leaves)
    b = bank_scan(*leaves[:4], leaves[4], 4, max_elems=0)
    gb = torch.autograd.grad(b[0].sum() + (b[1] ** 2).sum(), leaves)
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Triton: tilings that reach the unmasked interior paths and chunk-spanning query blocks
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not (INTERP or HAS_CUDA), reason="Triton needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("shape", [(1, 80, 80, 2, 1, 16, 48, 3), (1, 50, 70, 4, 2, 16, 40, 20),
                                   (1, 64, 64, 2, 1, 40, 32, 1), (1, 45, 45, 2, 2, 16, 3, 2)])
def test_triton_small_tiles(shape, monkeypatch):
    from blockzoo.kernels.triton import attention as core
    from blockzoo.kernels.triton.membank import membank_attention
    monkeypatch.setattr(core, "INTERP_CFGS", {k: core.Cfg(16, 16, 4, 1) for k in ("fwd", "dkdv", "dq")})
    *dims, w, m = shape
    dev = "cuda" if HAS_CUDA and not INTERP else "cpu"
    t = [x.detach().float().to(dev).requires_grad_() for x in _inputs(*dims, w, m, seed=3)]
    with poisoned():
        o = membank_attention(*t, window=w)
    ref_in = [x.detach().requires_grad_() for x in t]
    r = membank_reference(*ref_in, window=w)
    torch.testing.assert_close(o, r, rtol=2e-5, atol=2e-5)
    do = torch.randn_like(o)
    with poisoned():
        got = torch.autograd.grad(o, t, do)
    want = torch.autograd.grad(r, ref_in, do)
    for name, a, b in zip(("q", "k", "v", "bank_k", "bank_v"), got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5, msg=lambda s, n=name: f"grad {n}: {s}")


@pytest.mark.skipif(not (INTERP or HAS_CUDA), reason="Triton needs a GPU or TRITON_INTERPRET=1")
def test_triton_model_matches_reference_model():
    """Training forward + backward of a whole model on the triton backend vs the reference."""
    dev = "cuda" if HAS_CUDA and not INTERP else "cpu"
    ref = _model(_spec(window=4, slots=2, backend="reference", layers=1, d_model=64), training=True, device=dev)
    tri = _model(_spec(window=4, slots=2, backend="triton", layers=1, d_model=64), training=True, device=dev)
    tri.load_state_dict(ref.state_dict())
    x = _tokens(1, 21).to(dev)
    lr, lt = ref.loss(x), tri.loss(x)
    lr.backward(), lt.backward()
    torch.testing.assert_close(lt, lr, rtol=1e-5, atol=1e-5)
    for (n, p), (_, p2) in zip(ref.named_parameters(), tri.named_parameters(), strict=True):
        torch.testing.assert_close(p2.grad, p.grad, rtol=1e-4, atol=1e-5, msg=lambda s, n=n: f"{n}: {s}")


# ---------------------------------------------------------------------------------------------
# errors, registry, cost
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", _backends())
def test_bad_inputs_name_the_problem(backend):
    dev = "cuda" if backend == "triton" and HAS_CUDA and not INTERP else "cpu"  # where the backend runs
    q, k, v, bk, bv = (x.to(dev) for x in _inputs(1, 10, 10, 2, 1, 16, 4, 2, dtype=torch.float32, grad=False))
    op = blockzoo.op(CID, backend)
    with pytest.raises((ValueError, BackendUnavailable), match="not a multiple of N"):
        op(q, k, v, bk[:, :5], bv[:, :5], window=4)
    with pytest.raises((ValueError, BackendUnavailable), match="Tq"):
        op(torch.cat([q, q], 1), k, v, bk, bv, window=4)
    with pytest.raises(Exception, match="window"):
        op(q, k, v, bk, bv, window=0)
    with pytest.raises((ValueError, BackendUnavailable), match="bank_k"):
        op(q, k, v, bk[..., :8], bv[..., :8], window=4)


def test_numba_is_forward_only():
    q, k, v, bk, bv = _inputs(1, 10, 10, 2, 1, 16, 4, 2, dtype=torch.float32)
    with pytest.raises(BackendUnavailable, match="backward not implemented"):
        blockzoo.op(CID, "numba")(q, k, v, bk, bv, window=4)
    from blockzoo.kernels.numba.membank import membank_attention
    with pytest.raises(NotImplementedError, match="forward-only"):
        membank_attention(q, k, v, bk, bv, window=4)


def test_registry_and_cost():
    reg = get_registry()
    comp = reg.component(CID)
    assert comp.slot == "mixer" and "ours" in comp.source
    assert {b.name for b in reg.backends_for(CID)} >= {"reference", "numba", "triton"}
    with pytest.raises(Exception, match="window"):
        MemBankParams(window=0)
    ctx = BuildContext(d_model=64, n_heads=4, n_kv_heads=2, max_seq=4096, layer=0, n_layers=1)
    p = MemBankParams(window=128, slots=16)
    dense = 2.0 * 4096 * 2 * 16 * 4
    assert comp.kv_bytes(ctx, p, 4096) == pytest.approx(dense * (128 + 16) / 4096)
    assert comp.kv_bytes(ctx, p, 100) == pytest.approx(2.0 * 116 * 2 * 16 * 4)
    from blockzoo.registry import Inputs
    inp = Inputs(device="cpu", dtype=torch.float32, head_dim=16,
                 shapes=(("q", (1, 300, 4, 16)), ("k", (1, 300, 2, 16)), ("v", (1, 300, 2, 16))))
    pairs = sum(min(128, i + 1) for i in range(300)) + 300 * 16
    assert comp.flops(inp, p) == pytest.approx(4.0 * 4 * 16 * pairs)
