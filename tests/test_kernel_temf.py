"""token.temf on its own: the oracle against plain-Python loops, causality of the op (own chunk up
to itself, summaries of earlier chunks only) and of the whole model (compressor included),
several Triton tilings (tiles smaller than a chunk, summary blocks spanning chunks), decoding
(prefill + steps give the parallel forward's logits; the cache holds (T//C)*S + T%C entries per
kv head), training through the compressor on Triton vs the reference, bad-input errors.

Backend-vs-reference on odd shapes (outputs and every gradient) is the generated matrix
(tests/test_matrix.py, cases in plugins/token/temf/plugin.py). Triton runs here only under
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
from blockzoo.core.ops import OpArgumentError
from blockzoo.core.spec import load_spec
from blockzoo.core.trial import attention_cost
from blockzoo.kernels._alloc import poisoned
from blockzoo.plugins.token.temf.reference import (
    decode_cache_tokens,
    n_summary_chunks,
    temf_pairs,
    temf_reference,
)

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()


def _backends(grad=False):
    out = ["reference"] + ([] if grad else ["numba"])
    if INTERP or HAS_CUDA:
        out.append("triton")
    return out


def _dev(backend):
    return "cuda" if backend == "triton" and HAS_CUDA and not INTERP else "cpu"


def _inputs(b, t, hq, hk, d, chunk, s, dev="cpu", dtype=torch.float32, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    n = n_summary_chunks(t, chunk)

    def mk(*shape):
        x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(dev)
        return x.requires_grad_(grad)
    return mk(b, t, hq, d), mk(b, t, hk, d), mk(b, t, hk, d), mk(b, n, s, hk, d), mk(b, n, s, hk, d)


def _temf(backend, *tensors, **params):
    with poisoned():
        return blockzoo.op("token.temf", backend)(*tensors, **params)


# ------------------------------------------------------------------------------------------------
# the oracle
# ------------------------------------------------------------------------------------------------

def _loops(q, k, v, sk, sv, chunk, scale=None):
    """Per (batch, head, row): the visible keys listed by hand, softmax, weighted sum (fp64)."""
    b, t, hq, d = q.shape
    hk = k.shape[2]
    s = sk.shape[2]
    scale = 1 / math.sqrt(d) if scale is None else scale
    o = torch.zeros(b, t, hq, d, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            kh = h // (hq // hk)
            for i in range(t):
                c = i // chunk
                keys = [sk[bi, n, j, kh] for n in range(c) for j in range(s)] + \
                       [k[bi, j, kh] for j in range(c * chunk, i + 1)]
                vals = [sv[bi, n, j, kh] for n in range(c) for j in range(s)] + \
                       [v[bi, j, kh] for j in range(c * chunk, i + 1)]
                sc = torch.stack([q[bi, i, h].double() @ x.double() for x in keys]) * scale
                p = torch.softmax(sc, 0)
                o[bi, i, h] = (p[:, None] * torch.stack(vals).double()).sum(0)
    return o


@pytest.mark.parametrize("b,t,hq,hk,d,chunk,s", [(1, 13, 2, 1, 4, 4, 2), (2, 10, 2, 2, 3, 3, 3),
                                                 (1, 9, 3, 1, 5, 1, 1), (1, 7, 2, 1, 4, 16, 2)])
def test_reference_matches_loops(b, t, hq, hk, d, chunk, s):
    x = _inputs(b, t, hq, hk, d, chunk, s, dtype=torch.float64, grad=False)
    torch.testing.assert_close(temf_reference(*x, chunk=chunk), _loops(*x, chunk), rtol=1e-12, atol=1e-12)


def test_pair_count_matches_masks():
    from blockzoo.plugins.token.temf.reference import temf_mask
    for t, c, s in [(63, 5, 3), (64, 8, 2), (10, 16, 4), (1, 1, 2), (100, 7, 1), (256, 256, 4)]:
        m_sum, m_seq = temf_mask(t, n_summary_chunks(t, c), s, c, "cpu")
        assert temf_pairs(t, c, s) == int(m_sum.sum() + m_seq.sum())


# ------------------------------------------------------------------------------------------------
# causality of the op: row i depends on k/v at j <= i of its chunk and on summaries of chunks < c
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", _backends())
def test_op_causality(backend):
    dev = _dev(backend)
    b, t, hq, hk, d, chunk, s = 1, 29, 2, 1, 16, 6, 2
    q, k, v, sk, sv = (x.detach() for x in _inputs(b, t, hq, hk, d, chunk, s, dev=dev, grad=False))
    base = _temf(backend, q, k, v, sk, sv, chunk=chunk)
    for i in (0, 5, 6, 13, 17, 28):
        c = i // chunk
        k2, v2, sk2, sv2 = k.clone(), v.clone(), sk.clone(), sv.clone()
        k2[:, i + 1:] += 3.0
        v2[:, i + 1:] -= 2.0
        k2[:, : c * chunk] += 5.0   # earlier chunks' keys are seen through their summaries only
        v2[:, : c * chunk] += 5.0
        sk2[:, c:] += 3.0            # summaries of the own and later chunks are invisible
        sv2[:, c:] -= 4.0
        got = _temf(backend, q, k2, v2, sk2, sv2, chunk=chunk)
        torch.testing.assert_close(got[:, i], base[:, i], rtol=0, atol=0)
        # and the summaries of earlier chunks do matter
        if c > 0:
            sv3 = sv.clone()
            sv3[:, c - 1] += 1.0
            assert (_temf(backend, q, k, v, sk, sv3, chunk=chunk)[:, i] - base[:, i]).abs().max() > 1e-3


@pytest.mark.parametrize("backend", _backends(grad=True))
def test_op_gradient_causality(backend):
    """d o[i] / d (k, v, sk, sv) is zero outside what row i may see."""
    dev = _dev(backend)
    b, t, hq, hk, d, chunk, s = 1, 21, 2, 1, 16, 5, 2
    q, k, v, sk, sv = _inputs(b, t, hq, hk, d, chunk, s, dev=dev)
    o = _temf(backend, q, k, v, sk, sv, chunk=chunk)
    i = 12  # chunk 2
    gq, gk, gv, gsk, gsv = torch.autograd.grad(o[:, i].sum(), (q, k, v, sk, sv))
    assert gk[:, :10].abs().max() == 0 and gk[:, 13:].abs().max() == 0
    assert gv[:, :10].abs().max() == 0 and gv[:, 13:].abs().max() == 0
    assert gsk[:, 2:].abs().max() == 0 and gsv[:, 2:].abs().max() == 0
    assert gv[:, 10:13].abs().min() > 0 and gsv[:, :2].abs().min() > 0
    assert gq[:, :i].abs().max() == 0 and gq[:, i + 1:].abs().max() == 0


# ------------------------------------------------------------------------------------------------
# Triton tilings (interpreter or GPU): tiles smaller than the chunk, summary blocks across chunks
# ------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not (INTERP or HAS_CUDA), reason="Triton needs TRITON_INTERPRET=1 or a GPU")
@pytest.mark.parametrize("cfg,splits", [((16, 16, 4, 1), None), ((32, 16, 4, 1), 3)])
@pytest.mark.parametrize("b,t,hq,hk,d,chunk,s", [(1, 100, 4, 2, 24, 48, 3), (1, 70, 2, 1, 16, 16, 5),
                                                 (2, 45, 2, 2, 16, 40, 7)])
def test_triton_tilings(cfg, splits, b, t, hq, hk, d, chunk, s, monkeypatch):
    """Tiles of 16 / 32 rows inside chunks of 16-48; summary dK/dV over 1 or 3 query slices."""
    from blockzoo.kernels.triton import temf as tk
    monkeypatch.setitem(tk.CFGS, "interp", cfg)
    monkeypatch.setattr(tk, "SUM_SPLITS", splits)
    dev = _dev("triton")
    x = _inputs(b, t, hq, hk, d, chunk, s, dev=dev)
    o = _temf("triton", *x, chunk=chunk)
    xr = [y.detach().cpu().double().requires_grad_() for y in x]
    r = temf_reference(*xr, chunk=chunk)
    torch.testing.assert_close(o.cpu().double(), r, rtol=2e-5, atol=2e-5)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = torch.autograd.grad(o, x, do.to(o.dtype).to(dev))
    want = torch.autograd.grad(r, xr, do)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.cpu().double(), w, rtol=2e-5, atol=2e-5 * max(1.0, float(w.abs().max())))


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", _backends())
def test_bad_summary_shape(backend):
    dev = _dev(backend)
    q, k, v, sk, sv = (x.detach() for x in _inputs(1, 20, 2, 1, 16, 5, 2, dev=dev, grad=False))
    with pytest.raises(ValueError, match=r"N=\(T-1\)//chunk=3"):
        _temf(backend, q, k, v, sk[:, :2], sv[:, :2], chunk=5)
    with pytest.raises(OpArgumentError, match="chunk"):
        blockzoo.op("token.temf", backend)(q, k, v, sk, sv, chunk=0)


def test_numba_refuses_grad():
    x = _inputs(1, 10, 2, 1, 16, 4, 2)
    with pytest.raises(Exception, match="backward not implemented"):
        blockzoo.op("token.temf", "numba")(*x, chunk=4)


# ------------------------------------------------------------------------------------------------
# the mixer in a model: decoding == parallel forward, cache size, causality, training
# ------------------------------------------------------------------------------------------------

def _spec(chunk=4, s=2, hidden=8, backend="reference", n_kv_heads=2, d_model=48):
    """The mixer on ``backend``, everything else on the reference."""
    return {"model": {"d_model": d_model, "n_heads": 4, "n_kv_heads": n_kv_heads, "n_layers": 2, "max_seq": 128,
                      "backend": "reference"},
            "block": {"mixer": {"type": "token.temf", "backend": backend,
                                "params": {"chunk": chunk, "summaries": s, "hidden": hidden}}}}


def _model(spec, seed=0, training=False, device=None):
    torch.manual_seed(seed)
    m = build(spec, training=training, device=device)  # built where it runs: the backends resolve there
    with torch.no_grad():  # sharper attention and a non-trivial compressor than the init gives
        for blk in m.blocks:
            blk.mixer.qkv.weight.mul_(4.0)
            for comp in (blk.mixer.comp_k, blk.mixer.comp_v):
                comp.w2.normal_(0, 0.3)
                comp.lin.add_(0.2 * torch.randn_like(comp.lin))
    return m.train(training)


def _tokens(b, t, seed=1):
    return torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend,chunk,s,prefill_len,n_kv", [
    ("reference", 4, 2, 1, 2), ("numba", 4, 2, 8, 2), ("reference", 5, 3, 7, 1), ("reference", 3, 1, 12, 4)])
def test_decoding_matches_parallel(backend, chunk, s, prefill_len, n_kv):
    m = _model(_spec(chunk, s, backend=backend, n_kv_heads=n_kv))
    x = _tokens(2, 19)
    with torch.no_grad():
        full = m(x)
    dec, rel = decode_logits(m, x, prefill_len, policy=None)
    torch.testing.assert_close(dec, full, rtol=1e-5, atol=1e-5)
    # multi-token steps crossing chunk boundaries
    cache = make_cache(m, None)
    with torch.no_grad():
        outs = [prefill(m, x[:, :prefill_len], cache)]
        i = prefill_len
        while i < x.shape[1]:
            outs.append(step(m, x[:, i:i + 3], cache))
            i += 3
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)
    t = x.shape[1]
    for lc in cache.layers:
        assert lc.size == decode_cache_tokens(t, chunk, s) == (t // chunk) * s + t % chunk
        assert lc.k.shape == (2, n_kv, lc.size, 48 // 4)
        assert lc.extra["n_sum"] == (t // chunk) * s
    # mean of kept/full over the decoding steps, as decode_logits reports it
    want = [decode_cache_tokens(n, chunk, s) / n for n in range(prefill_len, t + 1)]
    assert rel == pytest.approx(sum(want) / len(want))


def test_model_causality_through_compressor():
    """Changing tokens after position i changes no logit at <= i (the compressor included)."""
    m = _model(_spec(chunk=4, s=2))
    x = _tokens(1, 30)
    with torch.no_grad():
        base = m(x)
        for i in (2, 3, 4, 11, 20):
            y = x.clone()
            y[:, i + 1:] = (y[:, i + 1:] + 17) % 256
            out = m(y)
            torch.testing.assert_close(out[:, : i + 1], base[:, : i + 1], rtol=0, atol=0)
            assert (out[:, i + 1:] - base[:, i + 1:]).abs().max() > 1e-4


def test_kv_bytes_and_policy_errors():
    spec = load_spec(_spec(chunk=8, s=2) | {"workload": {"seq": 100}})
    cost = attention_cost(spec, 100)
    assert cost["rel_kv_bytes"] == pytest.approx(decode_cache_tokens(100, 8, 2) / 100)  # (12*2 + 4)/100
    m = _model(_spec())
    with pytest.raises(ValueError, match="eviction policy"):
        decode_logits(m, _tokens(1, 10), 4, policy="token.streaming")


@pytest.mark.skipif(not (INTERP or HAS_CUDA), reason="Triton needs TRITON_INTERPRET=1 or a GPU")
def test_training_triton_matches_reference():
    """Loss and every parameter gradient (compressor included) on Triton vs the reference."""
    dev = "cuda" if HAS_CUDA and not INTERP else "cpu"
    x = _tokens(2, 26).to(dev)
    grads, losses = [], []
    for backend in ("reference", "triton"):
        m = _model(_spec(chunk=8, s=3, backend=backend, d_model=64), training=True, device=dev)
        loss = m.loss(x)
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append({n: p.grad.detach().cpu() for n, p in m.named_parameters() if p.grad is not None})
        assert any(r["component"] == "token.temf" and r["backend"] == backend for r in m.backends())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert grads[0].keys() == grads[1].keys()
    assert any("comp_k.w2" in n for n in grads[0]) and any("comp_v.w1" in n for n in grads[0])
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-4, atol=1e-6 * max(1.0, float(g.abs().max())))
