"""KV-cache decode kernels (kernels/{triton,numba}/kv_decode.py) and the token.* kernel backends
(plugins/token/backends.py).

- decode attention (o and lse) and the token scores (per kv head and per query head) of each
  backend against the fp32 reference on fresh random inputs: odd T (1, 37, 63), D=40, GQA 4:1,
  Tq = 1 and 3 (bottom-right causal), split counts that do not divide T, NaN-poisoned outputs;
- the top-k selector gives exactly the reference selector's kept set (ties, protected tokens,
  both of its paths); the Triton gather equals the torch gather;
- decoding a tiny model through ``make_cache`` with a policy on the triton / numba backend keeps
  the same tokens and generates the same tokens as the reference backend, and full-cache
  decoding with ``decode_backend`` gives the parallel forward's logits.

Scorer ops against the reference: the generated matrix (tests/test_matrix.py). Triton runs here
only under TRITON_INTERPRET=1 (or on a GPU).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from blockzoo.core.cache import make_cache
from blockzoo.core.composer import build
from blockzoo.core.spec import ComponentRef
from blockzoo.kernels._alloc import poisoned
from blockzoo.plugins.token.backends import KernelPolicyOps, decode_op
from blockzoo.plugins.token.module import make_policy
from blockzoo.plugins.token.reference import compact, decode_attention, per_kv_head, select
from blockzoo.testing.compare import assert_close
from blockzoo.testing.tolerances import tolerance

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()
BACKENDS = ["numba"] + (["triton"] if INTERP or HAS_CUDA else [])
DEV = "cuda" if HAS_CUDA and not INTERP else "cpu"


def _dev(backend):
    return DEV if backend == "triton" else "cpu"


def _kernels(backend):
    if backend == "triton":
        from blockzoo.kernels.triton import kv_decode
    else:
        from blockzoo.kernels.numba import kv_decode
    return kv_decode


# (B, Tq, Hq, Hk, T, D, splits)
SHAPES = [
    (2, 1, 4, 1, 37, 40, 3),     # GQA 4:1, D=40, 3 splits of a 37-token cache
    (1, 3, 4, 1, 63, 40, 5),     # Tq=3 (causal tail), 5 splits (uneven)
    (2, 3, 2, 2, 37, 16, 2),
    (1, 1, 2, 2, 1, 16, None),   # T=1
    (1, 2, 8, 2, 63, 32, None),
]


def _dtypes(backend):
    return [torch.float32, torch.bfloat16] if backend == "triton" else [torch.float32, torch.float64]


def _inputs(shape, dtype, device, seed):
    b, tq, hq, hk, t, d, _ = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, tq, hq, d, generator=g) * 1.5
    k = torch.randn(b, hk, t, d, generator=g) * 1.5
    v = torch.randn(b, hk, t, d, generator=g)
    return [x.to(dtype).to(device) for x in (q, k, v)]


def _lse_ref(q, k):
    b, tq, hq, d = q.shape
    hk, t = k.shape[1], k.shape[2]
    kf = k.repeat_interleave(hq // hk, 1)
    s = torch.einsum("bqhd,bhkd->bhqk", q, kf) / math.sqrt(d)
    vis = torch.arange(t)[None, :] <= torch.arange(tq)[:, None] + t - tq
    return torch.logsumexp(s.masked_fill(~vis, float("-inf")), -1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-Tq{}-H{}:{}-T{}-D{}-S{}".format(*s))
def test_decode_and_scores_match_reference(backend, shape):
    kern = _kernels(backend)
    dev = _dev(backend)
    for i, dtype in enumerate(_dtypes(backend)):
        q, k, v = _inputs(shape, dtype, dev, seed=hash((shape, i)) % 1000)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        qf, kf, vf = (x.cpu().to(acc) for x in (q, k, v))
        want_o, p = decode_attention(qf, kf, vf)
        kw = {"num_splits": shape[-1]} if backend == "triton" else {}
        with poisoned():
            o, lse = kern.decode_attention(q, k, v, **kw)
            sc = kern.token_scores(q, k, lse)
            sch = kern.token_scores(q, k, lse, per_query_head=True)
        tol = tolerance(dtype, "fwd", backend, dev)
        assert o.dtype == dtype and o.shape == q.shape
        assert_close(o.cpu(), want_o.to(dtype), tol, "o")
        assert_close(lse.cpu().to(acc), _lse_ref(qf, kf), tolerance(acc, "fwd", backend, dev), "lse")
        # scores are sums of probabilities computed in fp32 from the (rounded) inputs: fp32 bounds
        stol = tolerance(acc, "fwd", backend, dev)
        assert_close(sc.cpu().to(acc), per_kv_head(p, shape[3]), stol, "scores")
        assert_close(sch.cpu().to(acc), p.sum(2), stol, "per-head scores")
        # every query row's probabilities sum to 1: per kv head, G * Tq in total
        torch.testing.assert_close(sc.cpu().double().sum(-1),
                                   torch.full(sc.shape[:2], float(shape[1] * shape[2] // shape[3]),
                                              dtype=torch.float64), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not (INTERP or HAS_CUDA), reason="triton needs CUDA or TRITON_INTERPRET=1")
def test_triton_splits_do_not_change_the_result():
    from blockzoo.kernels.triton.kv_decode import decode_attention as dec
    q, k, v = _inputs((1, 1, 4, 2, 150, 32, None), torch.float32, DEV, 3)
    ref = decode_attention(q.cpu(), k.cpu(), v.cpu())[0]
    for s in (1, 2, 4, 7, 64):  # 64 > the number of key blocks: clipped
        o, _ = dec(q, k, v, num_splits=s)
        assert_close(o.cpu(), ref, tolerance(torch.float32, "fwd", "triton", DEV), f"o (splits={s})")


@pytest.mark.skipif(not (INTERP or HAS_CUDA), reason="triton needs CUDA or TRITON_INTERPRET=1")
def test_triton_large_group_goes_to_the_core_kernel():
    from blockzoo.kernels.triton.kv_decode import MAX_ROWS
    from blockzoo.kernels.triton.kv_decode import decode_attention as dec
    q, k, v = _inputs((1, MAX_ROWS // 2 + 1, 2, 1, 70, 16, None), torch.float32, DEV, 4)
    o, lse = dec(q, k, v)
    assert_close(o.cpu(), decode_attention(q.cpu(), k.cpu(), v.cpu())[0],
                 tolerance(torch.float32, "fwd", "triton", DEV), "o")
    assert_close(lse.cpu(), _lse_ref(q.cpu(), k.cpu()), tolerance(torch.float32, "fwd", "triton", DEV), "lse")


def test_decode_errors_name_the_problem():
    from blockzoo.kernels.numba.kv_decode import decode_attention as dec
    q = torch.randn(1, 1, 3, 16)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        dec(q, torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16))
    with pytest.raises(ValueError, match="disagree"):
        dec(q, torch.randn(1, 3, 5, 8), torch.randn(1, 3, 5, 8))
    with pytest.raises(TypeError, match="float32 and torch.float64"):
        dec(q.bfloat16(), torch.randn(1, 3, 5, 16).bfloat16(), torch.randn(1, 3, 5, 16).bfloat16())
    with pytest.raises(ValueError, match="decode backend must be"):
        decode_op("cudnn")


# ---------------------------------------------------------------------------------------------
# selection and compaction
def test_select_topk_equals_reference_select():
    from blockzoo.kernels.select import select_topk
    g = torch.Generator().manual_seed(11)
    for seen, t, keep, sinks, recent, ties in [(50, 50, 20, 4, 6, False), (90, 30, 25, 2, 5, True),
                                               (12, 12, 12, 4, 8, False), (200, 200, 199, 4, 8, True),
                                               (201, 201, 200, 0, 1, False), (64, 64, 16, 4, 8, True),
                                               (80, 70, 62, 3, 4, True), (80, 70, 61, 3, 4, False)]:
        scores = torch.randn(3, 2, t, generator=g)
        if ties:  # many exact ties, +0.0 / -0.0 and infinities
            scores = torch.randint(-2, 3, (3, 2, t), generator=g).float()
            scores[0, 0, ::7] = -0.0
            scores[1, 1, ::5] = float("inf")
            scores[2, 0, ::3] = float("-inf")
        pos = torch.stack([torch.cat([torch.arange(sinks), torch.sort(torch.randperm(seen - sinks - recent,
                           generator=g)[:t - sinks - recent] + sinks).values, torch.arange(seen - recent, seen)])
                           for _ in range(6)]).view(3, 2, t)
        want = select(scores, pos, seen, keep, sinks, recent)
        got = select_topk(scores, pos, seen, keep, sinks, recent)
        assert torch.equal(got, want), (seen, t, keep)
    with pytest.raises(ValueError, match="smaller than the 6 protected"):
        select_topk(torch.zeros(1, 1, 20), torch.arange(20).view(1, 1, 20), 20, 5, 2, 4)


@pytest.mark.skipif(not (INTERP or HAS_CUDA), reason="triton needs CUDA or TRITON_INTERPRET=1")
def test_triton_compact_equals_torch_gather():
    from blockzoo.kernels.triton.kv_decode import compact as tcompact
    g = torch.Generator().manual_seed(2)
    k = torch.randn(2, 3, 45, 40, generator=g).to(DEV)
    v = torch.randn(2, 3, 45, 40, generator=g).bfloat16().to(DEV)
    pos = torch.arange(45).expand(2, 3, 45).contiguous().to(DEV)
    idx = torch.sort(torch.stack([torch.randperm(45, generator=g)[:19] for _ in range(6)]).view(2, 3, 19)).values
    idx = idx.to(DEV)
    with poisoned():
        got = tcompact(idx, k, v, pos)
    for a, b in zip(got, compact(idx, k, v, pos), strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# decoding through the cache
def _model(n_kv_heads=2, seed=0):
    spec = {"model": {"d_model": 48, "n_heads": 4, "n_kv_heads": n_kv_heads, "n_layers": 2, "max_seq": 128,
                      "backend": "reference"}, "block": {"mixer": {"type": "attention.dense"}}}
    torch.manual_seed(seed)
    m = build(spec, training=False).eval()
    with torch.no_grad():
        for blk in m.blocks:
            blk.mixer.qkv.weight.mul_(4.0)
    return m


def _greedy(m, x, n_new, cache):
    with torch.no_grad():
        logits = m.prefill(x, cache)[:, -1]
        out = []
        for i in range(n_new):
            nxt = logits.argmax(-1, keepdim=True)
            out.append(nxt)
            if i + 1 < n_new:
                logits = m.step(nxt, cache)[:, -1]
    return torch.cat(out, 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cid", ["token.streaming", "token.h2o", "token.snapkv"])
def test_generation_with_kernel_backend_equals_reference(backend, cid):
    m = _model().to(_dev(backend))
    x = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1)).to(_dev(backend))
    params = {"budget": 0.5, "sinks": 2, "recent": 3}
    if cid == "token.snapkv":
        params.update(window=4, pool=3)
    ref_cache = make_cache(m, make_policy(ComponentRef(type=cid, params=params), "reference"))
    ker_cache = make_cache(m, make_policy(ComponentRef(type=cid, params=params, backend=backend)))
    assert isinstance(ker_cache.policy.scorer, KernelPolicyOps)
    n_new = 6 if backend == "triton" and INTERP else 12
    want = _greedy(m, x, n_new, ref_cache)
    got = _greedy(m, x, n_new, ker_cache)
    assert torch.equal(got, want)
    for a, b in zip(ker_cache.layers, ref_cache.layers, strict=True):
        # the same kept tokens; the kernel backends evict in place (core/cache.py:fill_holes),
        # so their slots are not in time order: compare in position order
        order = torch.argsort(a.pos, dim=-1)
        assert torch.equal(a.pos.gather(-1, order), b.pos)
        torch.testing.assert_close(a.k.gather(2, order[..., None].expand_as(a.k)), b.k)
        if b.acc is not None:
            torch.testing.assert_close(a.acc.gather(-1, order), b.acc, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_full_cache_decode_backend_matches_parallel(backend):
    m = _model(n_kv_heads=1).to(_dev(backend))
    x = torch.randint(0, 256, (2, 14), generator=torch.Generator().manual_seed(2)).to(_dev(backend))
    with torch.no_grad():
        want = m(x)
        cache = make_cache(m, None, decode_backend=backend)
        parts = [m.prefill(x[:, :5], cache), m.step(x[:, 5:6], cache), m.step(x[:, 6:9], cache)]
        parts += [m.step(x[:, i:i + 1], cache) for i in range(9, 14)]
    torch.testing.assert_close(torch.cat(parts, 1), want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="decode_backend must be one of"):
        make_cache(m, None, decode_backend="cuda")


def test_policy_auto_backend_runs_here():
    pol = make_policy("token.h2o", "auto")
    assert pol.scorer is not None
    want = "triton" if HAS_CUDA or INTERP else "numba"  # the interpreter lets triton run on the CPU
    assert getattr(pol.scorer, "kind", None) == want


@pytest.mark.skipif(not (INTERP or HAS_CUDA), reason="Triton kernel: needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("with_acc", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_triton_evict_one_equals_drop_few_and_fill_holes(with_acc, seed):
    """The one-launch eviction kernel moves the same token into the same slot as the torch path
    (drop_few + fill_holes): ties (integer scores), protected sinks / recent, shuffled slots, a
    row whose leaving token is the newest, D=40, a token count that is not a block multiple."""
    from blockzoo.core.cache import LayerCache, fill_holes
    from blockzoo.kernels.select import drop_few
    from blockzoo.kernels.triton.kv_decode import evict_one
    g = torch.Generator().manual_seed(seed)
    b, hk, n, d, seen, sinks, recent = 2, 3, 301, 40, 400, 3, 0 if seed == 2 else 5
    older = torch.stack([torch.randperm(seen - 1, generator=g)[:n - 1] for _ in range(b * hk)]).view(b, hk, n - 1)
    pos = torch.cat([older, torch.full((b, hk, 1), seen - 1)], -1)  # the newest token, just appended, last
    scores = torch.randint(0, 5, (b, hk, n), generator=g).float()
    if seed == 2:  # recent = 0: the newest token may be the one that leaves
        scores[0, 0, -1] = -1.0
    k = torch.randn(b, hk, n, d, generator=g)
    v = torch.randn(b, hk, n, d, generator=g)
    acc = torch.rand(b, hk, n, generator=g) if with_acc else None
    want = LayerCache(k=k.clone(), v=v.clone(), pos=pos.clone(), acc=None if acc is None else acc.clone(), seen=seen)
    fill_holes(want, drop_few(scores, want.pos, seen, n - 1, sinks, recent))
    dev = _dev("triton")
    kk, vv, pp = k.to(dev), v.to(dev), pos.to(dev)
    aa = None if acc is None else acc.to(dev)
    evict_one(scores.to(dev), kk, vv, pp, aa, seen, sinks, recent)
    assert torch.equal(pp[..., : n - 1].cpu(), want.pos)
    assert torch.equal(kk[:, :, : n - 1].cpu(), want.k) and torch.equal(vv[:, :, : n - 1].cpu(), want.v)
    if with_acc:
        assert torch.equal(aa[..., : n - 1].cpu(), want.acc)


# ---------------------------------------------------------------------------------------------
# the fused H2O step: logits from the decode pass, accumulate + evict in one kernel
H2O_SHAPES = [  # (B, Tq, Hq, Hk, T, D, splits)
    (2, 1, 4, 1, 37, 40, 3),     # GQA 4:1, odd T, D=40, uneven splits
    (1, 3, 4, 2, 63, 16, 5),     # Tq=3 (causal tail), GQA 2:1
    (2, 1, 2, 2, 70, 32, None),  # more tokens than one interpreter chunk (32), no GQA
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", H2O_SHAPES, ids=lambda s: "B{}-Tq{}-H{}:{}-T{}-D{}-S{}".format(*s))
def test_decode_logits_match_reference(backend, shape):
    """return_logits: the same o and lse as without, and lg = q.k * scale * log2(e) for every key."""
    kern = _kernels(backend)
    dev = _dev(backend)
    for i, dtype in enumerate(_dtypes(backend)):
        q, k, v = _inputs(shape, dtype, dev, seed=100 + i)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        kw = {"num_splits": shape[-1]} if backend == "triton" else {}
        with poisoned():
            o0, lse0 = kern.decode_attention(q, k, v, **kw)
            o, lse, lg = kern.decode_attention(q, k, v, return_logits=True, **kw)
        assert torch.equal(o, o0) and torch.equal(lse, lse0)
        qf, kf = q.cpu().to(acc), k.cpu().to(acc)
        want = torch.einsum("bqhd,bhkd->bhqk", qf, kf.repeat_interleave(shape[2] // shape[3], 1))
        want = want / math.sqrt(shape[5]) * (1 / math.log(2))
        assert lg.shape == want.shape
        assert_close(lg.cpu().to(acc), want, tolerance(acc, "fwd", backend, dev), "logits")


def _h2o_case(shape, dtype, dev, seed, ties=False):
    b, tq, hq, hk, t, d, _ = shape
    q, k, v = _inputs(shape, dtype, dev, seed)
    g = torch.Generator().manual_seed(seed)
    seen, sinks, recent = t + 40, 3, 0 if seed % 2 else 4
    older = torch.stack([torch.randperm(seen - tq, generator=g)[:t - tq] for _ in range(b * hk)]).view(b, hk, t - tq)
    newest = torch.arange(seen - tq, seen).expand(b, hk, tq)
    pos = torch.cat([older, newest], -1)  # shuffled slots (as after in-place evictions), the new tokens last
    acc = torch.rand(b, hk, t, generator=g) * 2
    if ties:  # equal logits (zero keys: uniform attention) on integer running scores: exact ties
        k = torch.zeros_like(k)
        acc = torch.randint(0, 3, (b, hk, t), generator=g).float()
    acc[..., -tq:] = 0  # the new tokens' running scores start at 0
    return q, k, v, pos.to(dev), acc.to(dev), seen, sinks, recent


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", H2O_SHAPES, ids=lambda s: "B{}-Tq{}-H{}:{}-T{}-D{}-S{}".format(*s))
def test_h2o_step_equals_reference_accumulate_and_eviction(backend, shape):
    """acc += the step's attention (vs the fp32 reference probabilities), and the evicting step
    moves exactly what drop_few + fill_holes move given those scores (lowest unprotected, ties to
    the newest position, sinks / recent kept), NaN-poisoned buffers, ties included."""
    from blockzoo.core.cache import LayerCache, fill_holes
    from blockzoo.kernels.select import drop_few
    kern = _kernels(backend)
    dev = _dev(backend)
    b, tq, hq, hk, t, d, splits = shape
    for i, (dtype, ties) in enumerate([(torch.float32, False), (_dtypes(backend)[1], False), (torch.float32, True)]):
        q, k, v, pos, acc0, seen, sinks, recent = _h2o_case(shape, dtype, dev, seed=7 * i + t, ties=ties)
        kw = {"num_splits": splits} if backend == "triton" else {}
        with poisoned():
            _, lse, lg = kern.decode_attention(q, k, v, return_logits=True, **kw)
        # accumulate only
        acc1 = acc0.clone()
        kern.h2o_step(lg, lse, acc1, pos.clone(), k.clone(), v.clone(), seen, sinks, recent, False)
        fl = torch.float64 if dtype == torch.float64 else torch.float32
        _, p = decode_attention(q.cpu().to(fl), k.cpu().to(fl), v.cpu().to(fl))
        want_acc = acc0.cpu().to(fl) + per_kv_head(p, hk)
        # acc is float32 storage (as in the cache) whatever the cache dtype: fp32 bounds
        assert_close(acc1.cpu().double(), want_acc.double(), tolerance(torch.float32, "fwd", backend, dev), "acc")
        if ties:  # equal running scores stay exactly equal (the tokens every query sees)
            a0, a1 = acc0.cpu()[..., :t - tq + 1], acc1.cpu()[..., :t - tq + 1]
            for c in (0.0, 1.0, 2.0):
                same = a1[a0 == c]
                assert same.numel() > 1 and bool((same == same[0]).all())
        # accumulate + evict: exactly the torch selection on the accumulated scores
        kk, vv, pp, aa = k.clone(), v.clone(), pos.clone(), acc0.clone()
        with poisoned():
            kern.h2o_step(lg, lse, aa, pp, kk, vv, seen, sinks, recent, True)
        want = LayerCache(k=k.cpu().clone(), v=v.cpu().clone(), pos=pos.cpu().clone(), acc=acc1.cpu().clone(),
                          seen=seen)
        fill_holes(want, drop_few(want.acc, want.pos, seen, t - 1, sinks, recent))
        assert torch.equal(pp[..., :t - 1].cpu(), want.pos), (dtype, ties)
        # (the accumulate-only and the evicting launch are two compiled variants: on a GPU their sums
        # may round differently in the last bit)
        torch.testing.assert_close(aa[..., :t - 1].cpu(), want.acc, rtol=2e-7, atol=0)
        if backend == "triton":
            # other chunk sizes (several chunks, one chunk for the whole row): the same bits, since
            # the group's rows are added one at a time in row order whatever the tiling
            for cfg in ((16, 1), (128, 1)):
                k1, v1, p1, a1 = k.clone(), v.clone(), pos.clone(), acc0.clone()
                kern.h2o_step(lg, lse, a1, p1, k1, v1, seen, sinks, recent, True, cfg=cfg)
                assert torch.equal(p1, pp) and torch.equal(a1, aa) and torch.equal(k1, kk) and torch.equal(v1, vv)
        assert torch.equal(kk[:, :, :t - 1].cpu(), want.k) and torch.equal(vv[:, :, :t - 1].cpu(), want.v)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_h2o_evicts_only_one_over_budget(backend):
    kern = _kernels(backend)
    dev = _dev(backend)
    shape = H2O_SHAPES[0]
    q, k, v, pos, acc, seen, sinks, recent = _h2o_case(shape, torch.float32, dev, seed=5)
    t = shape[4]
    for keep, evicts in ((t, False), (t - 1, True), (t - 2, False)):
        kk, pp, aa = k.clone(), pos.clone(), acc.clone()
        o, ev = kern.decode_h2o(q, kk, v.clone(), pp, aa, seen, keep, sinks, recent)
        assert ev is evicts
        assert_close(o.cpu(), decode_attention(q.cpu(), k.cpu(), v.cpu())[0],
                     tolerance(torch.float32, "fwd", backend, dev), "o")
        if not evicts:
            assert torch.equal(pp, pos) and torch.equal(kk, k)
    with pytest.raises(ValueError, match="protected"):
        kern.decode_h2o(q, k.clone(), v.clone(), pos.clone(), acc.clone(), seen, sinks + recent - 1, sinks, recent)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("budget", [{"budget_tokens": 7}, {"budget": 0.5}])
def test_h2o_generation_takes_the_fused_step(backend, budget, monkeypatch):
    """Generation through make_cache with token.h2o on a kernel backend goes through decode_h2o
    (every step: a fixed budget evicts one token per step) and keeps the reference policy's tokens
    and running scores."""
    kern = _kernels(backend)
    calls = {"fused": 0, "evicted": 0}
    real = kern.decode_h2o

    def counting(*a, **kw):
        o, ev = real(*a, **kw)
        calls["fused"] += 1
        calls["evicted"] += int(ev)
        return o, ev
    monkeypatch.setattr(kern, "decode_h2o", counting)
    m = _model().to(_dev(backend))
    x = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(3)).to(_dev(backend))
    params = {"sinks": 2, "recent": 3, **budget}
    ref_cache = make_cache(m, make_policy(ComponentRef(type="token.h2o", params=params), "reference"))
    ker_cache = make_cache(m, make_policy(ComponentRef(type="token.h2o", params=params, backend=backend)))
    n_new = 5 if backend == "triton" and INTERP else 9
    assert torch.equal(_greedy(m, x, n_new, ker_cache), _greedy(m, x, n_new, ref_cache))
    steps = (n_new - 1) * len(m.blocks)
    assert calls["fused"] == steps
    if "budget_tokens" in budget:
        assert calls["evicted"] == steps
    # a 3-token step: accumulated by the fused kernel, then (3 over a fixed budget) the general eviction
    nxt = torch.randint(0, 256, (2, 3), generator=torch.Generator().manual_seed(4)).to(_dev(backend))
    with torch.no_grad():
        torch.testing.assert_close(m.step(nxt, ker_cache), m.step(nxt, ref_cache), rtol=1e-4, atol=1e-5)
    assert calls["fused"] == steps + len(m.blocks)
    for a, b in zip(ker_cache.layers, ref_cache.layers, strict=True):
        order = torch.argsort(a.pos, dim=-1)
        assert torch.equal(a.pos.gather(-1, order), b.pos)
        torch.testing.assert_close(a.k.gather(2, order[..., None].expand_as(a.k)), b.k)
        torch.testing.assert_close(a.acc.gather(-1, order), b.acc, rtol=1e-5, atol=1e-5)


def _count_calls(monkeypatch, mod, name):
    """Replace ``mod.name`` by a wrapper that counts its calls; returns the counter (a list)."""
    calls = []
    real = getattr(mod, name)

    def counting(*a, **kw):
        calls.append(name)
        return real(*a, **kw)
    monkeypatch.setattr(mod, name, counting)
    return calls


@pytest.mark.skipif(not (INTERP or HAS_CUDA), reason="Triton kernel: needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("shape", H2O_SHAPES, ids=lambda s: "B{}-Tq{}-H{}:{}-T{}-D{}-S{}".format(*s))
def test_triton_decode_h2o_fused_equals_decode_then_step(shape, monkeypatch):
    """decode_h2o takes the fused path (the split pass, then ONE kernel that merges the splits,
    accumulates and picks; h2o_step is not called) and gives the same o, acc, positions, K and V
    bits as decode_attention(return_logits=True) + h2o_step (accumulate + pick kernels), with and
    without an eviction, for several chunk sizes; the evicting step is the torch selector's on the
    accumulated scores (protected sinks / recent kept); the counters end at 0."""
    from blockzoo.core.cache import LayerCache, fill_holes
    from blockzoo.kernels.select import drop_few
    from blockzoo.kernels.triton import kv_decode as kern
    b, tq, hq, hk, t, d, splits = shape
    dev = _dev("triton")
    steps = _count_calls(monkeypatch, kern, "h2o_step")
    for i, dtype in enumerate((torch.float32, torch.bfloat16)):
        q, k, v, pos, acc0, seen, sinks, recent = _h2o_case(shape, dtype, dev, seed=31 + 5 * i + t, ties=i == 1)
        want_o = decode_attention(q.cpu().float(), k.cpu().float(), v.cpu().float())[0]
        for keep in (t - 1, t):  # one over the budget: evicts; at the budget: accumulates only
            # the unfused composition: decode (split + combine), then h2o_step's two kernels
            kk, vv, pp, aa = k.clone(), v.clone(), pos.clone(), acc0.clone()
            with poisoned():
                o, lse, lg = kern.decode_attention(q, kk, vv, None, splits, return_logits=True)
                kern.h2o_step(lg, lse, aa, pp, kk, vv, seen, sinks, recent, keep == t - 1)
            base = (o, kk, vv, pp, aa)
            assert_close(base[0].cpu(), want_o.to(dtype), tolerance(dtype, "fwd", "triton", dev), "o")
            n_steps = len(steps)
            for cfg in (None, (16, 1), (128, 1)):
                kk, vv, pp, aa = k.clone(), v.clone(), pos.clone(), acc0.clone()
                with poisoned():
                    o, ev = kern.decode_h2o(q, kk, vv, pp, aa, seen, keep, sinks, recent, None, splits, step_cfg=cfg)
                assert ev is (keep == t - 1)
                for name, x, y in zip(("o", "k", "v", "pos", "acc"), (o, kk, vv, pp, aa), base, strict=True):
                    assert torch.equal(x, y), (cfg, name, keep, dtype)
            assert len(steps) == n_steps  # the fused kernel did the policy step, not the fallback
            assert not kern._COUNTERS[k.device].any()
            if keep == t - 1:  # the torch selector on the accumulated scores
                acc1 = acc0.clone()
                kern.decode_h2o(q, k.clone(), v.clone(), pos.clone(), acc1, seen, t, sinks, recent, None, splits)
                want = LayerCache(k=k.cpu().clone(), v=v.cpu().clone(), pos=pos.cpu().clone(), acc=acc1.cpu().clone(),
                                  seen=seen)
                fill_holes(want, drop_few(want.acc, want.pos, seen, keep, sinks, recent))
                _, kk, vv, pp, aa = base
                assert torch.equal(pp[..., :keep].cpu(), want.pos) and torch.equal(aa[..., :keep].cpu(), want.acc)
                assert torch.equal(kk[:, :, :keep].cpu(), want.k) and torch.equal(vv[:, :, :keep].cpu(), want.v)
                kept, before = pp[..., :keep].cpu(), pos.cpu()
                assert torch.equal((kept < sinks).sum(-1), (before < sinks).sum(-1))  # every sink kept
                assert torch.equal((kept >= seen - recent).sum(-1), (before >= seen - recent).sum(-1))  # and recent


@pytest.mark.skipif(not (INTERP or HAS_CUDA), reason="Triton kernel: needs a GPU or TRITON_INTERPRET=1")
def test_triton_decode_h2o_large_group_falls_back(monkeypatch):
    """More than MAX_ROWS query rows per kv head: no split pass, so decode_h2o takes the
    two-launch path (decode_attention + h2o_step, not the fused kernel) with the same result as
    calling those two, and evicts the torch selector's token."""
    from blockzoo.core.cache import LayerCache, fill_holes
    from blockzoo.kernels.select import drop_few
    from blockzoo.kernels.triton import kv_decode as kern
    shape = (1, kern.MAX_ROWS // 2 + 1, 2, 1, 70, 16, None)
    q, k, v, pos, acc0, seen, sinks, recent = _h2o_case(shape, torch.float32, _dev("triton"), seed=9)
    kk, vv, pp, aa = k.clone(), v.clone(), pos.clone(), acc0.clone()
    o0, lse, lg = kern.decode_attention(q, kk, vv, return_logits=True)
    kern.h2o_step(lg, lse, aa, pp, kk, vv, seen, sinks, recent, True)
    want = (o0, pp, aa, kk, vv)
    steps = _count_calls(monkeypatch, kern, "h2o_step")
    fused = _count_calls(monkeypatch, kern, "_decode_h2o_fused")
    kk, vv, pp, aa = k.clone(), v.clone(), pos.clone(), acc0.clone()
    o, ev = kern.decode_h2o(q, kk, vv, pp, aa, seen, 69, sinks, recent)
    assert ev
    assert steps == ["h2o_step"] and not fused
    for x, y in zip((o, pp, aa, kk, vv), want, strict=True):
        assert torch.equal(x, y)
    acc1 = acc0.clone()
    kern.h2o_step(lg, lse, acc1, pos.clone(), k.clone(), v.clone(), seen, sinks, recent, False)
    ref = LayerCache(k=k.cpu().clone(), v=v.cpu().clone(), pos=pos.cpu().clone(), acc=acc1.cpu().clone(), seen=seen)
    fill_holes(ref, drop_few(ref.acc, ref.pos, seen, 69, sinks, recent))
    assert torch.equal(pp[..., :69].cpu(), ref.pos) and torch.equal(kk[:, :, :69].cpu(), ref.k)


def test_triton_h2o_chunking_rule():
    """Powers of two in [256, 8192] on a GPU, about 4 programs per SM, 8 warps above 1024 tokens."""
    import importlib
    pytest.importorskip("triton")
    kern = importlib.import_module("blockzoo.kernels.triton.kv_decode")
    if INTERP:
        assert kern.h2o_chunking(128, 8193, 4, torch.device("cpu")) == (32, 1)
        return
    saved = dict(kern._SM_COUNT)
    try:
        kern._SM_COUNT[0] = 132
        dev = torch.device("cuda", 0)
        assert kern.h2o_chunking(128, 8193, 4, dev) == (1024, 4)     # 1152 programs on 132 SMs
        assert kern.h2o_chunking(1, 100, 1, dev) == (256, 4)         # small: the floor
        assert kern.h2o_chunking(4096, 200000, 4, dev) == (8192, 8)  # huge: the ceiling
    finally:
        kern._SM_COUNT.clear()
        kern._SM_COUNT.update(saved)
