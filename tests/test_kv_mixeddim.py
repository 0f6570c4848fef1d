"""token.mixeddim's packed cache (plugins/token/mixeddim.py) and its decode kernels
(kernels/triton/kv_mixeddim.py, kernels/numba/kv_mixeddim.py):

- the pools hold exactly the kept channels of every token (unpacked == the original k, v with
  the dropped channels zeroed) and exactly ``keep * D`` K and V elements per row, in real
  buffer bytes;
- every backend's decode over the pools (ONE softmax over pools + tail) against a float64
  evaluation of dense attention over the zeroed keys/values, and the per-token scores against
  the probabilities; odd T, D = 40 / 48, GQA, multi-token steps, a longer tail, empty pools;
  float32 and bfloat16 (Triton);
- decoding a model: the budget in real bytes after every step, protected tokens whole, budget
  1.0 == no policy token for token, the packed layout makes the zeroed layout's decisions.

Triton cases run under TRITON_INTERPRET=1 (or on CUDA); skipped otherwise.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from blockzoo.core.cache import make_cache
from blockzoo.core.composer import build
from blockzoo.kernels._alloc import poisoned
from blockzoo.plugins.token.mixeddim import PackedKV, decode_kernel, decode_reference, repack
from blockzoo.plugins.token.module import make_policy
from blockzoo.registry import get_registry

TRITON = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
DEV = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
KERNELS = ["numba"] + (["triton"] if TRITON else [])


def _store(b, hk, d, levels, t_pool, keep, seed=0, dtype=torch.float32, sinks=2, recent=3, device="cpu"):
    """A packed store of t_pool random tokens compressed to ``keep`` tokens' worth of elements,
    plus the original (full-width) k, v and the ranks."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, hk, t_pool, d, generator=g).to(dtype)
    v = torch.randn(b, hk, t_pool, d, generator=g).to(dtype)
    pos = torch.arange(t_pool).expand(b, hk, t_pool).contiguous()
    acc = torch.rand(b, hk, t_pool, generator=g) ** 3
    kr = torch.stack([torch.randperm(d, generator=g) for _ in range(b * hk)]).view(b, hk, d)
    vr = torch.stack([torch.randperm(d, generator=g) for _ in range(b * hk)]).view(b, hk, d)
    st = PackedKV.empty(b, hk, d, levels, kr, vr, dtype, "cpu")
    if keep < t_pool:
        st = repack(st, k, v, pos, acc, t_pool, keep, sinks, recent)
    else:  # nothing to compress: every token in the top level
        st = _all_full(st, k, v, pos, acc)
    if device != "cpu":
        for name in ("k_order", "v_order", "kbuf", "vbuf", "pos", "acc", "tok_off", "elem_base"):
            setattr(st, name, getattr(st, name).to(device))
    return st, k, v, kr, vr


def _all_full(st, k, v, pos, acc):
    """Every token kept whole (the top level), built by hand."""
    b, hk, t, d = k.shape
    r = b * hk
    kr = torch.gather(k.reshape(r, t, d), -1, st.k_order[:, None, :].expand(r, t, d))
    vr = torch.gather(v.reshape(r, t, d), -1, st.v_order[:, None, :].expand(r, t, d))
    tok_off = torch.zeros(st.levels, r + 1, dtype=torch.long)
    tok_off[-1] = torch.arange(r + 1) * t
    return PackedKV(b, hk, d, st.levels, st.k_order, st.v_order, kr.reshape(-1).clone(), vr.reshape(-1).clone(),
                    pos.reshape(-1).clone(), acc.reshape(-1).float(), tok_off,
                    torch.zeros(st.levels, dtype=torch.long))


def _dense64(q, k, v, tq, scale=None):
    """float64 attention of q [B, Tq, Hq, D] over k, v [B, Hk, T, D] (bottom-right causal):
    o [B, Tq, Hq, D] and the attention each key received per kv head [B, Hk, T]."""
    b, _, hq, d = q.shape
    hk, t = k.shape[1], k.shape[2]
    grp = hq // hk
    kf = k.double().repeat_interleave(grp, 1)
    vf = v.double().repeat_interleave(grp, 1)
    s = torch.einsum("bqhd,bhkd->bhqk", q.double(), kf) * (scale or 1.0 / math.sqrt(d))
    vis = torch.arange(t)[None, :] <= torch.arange(tq)[:, None] + t - tq
    p = torch.softmax(s.masked_fill(~vis, float("-inf")), -1)
    o = torch.einsum("bhqk,bhkd->bqhd", p, vf)
    return o, p.sum(2).view(b, hk, grp, t).sum(2)


def test_pools_hold_exactly_the_kept_channels_and_budget():
    b, hk, d, levels, t, keep = 2, 3, 48, 4, 41, 13
    st, k, v, kr, vr = _store(b, hk, d, levels, t, keep, seed=5)
    uk, uv, pos, acc, dims, idx = st.unpack()
    g = d // levels
    assert bool((dims % g == 0).all()) and bool((dims >= g).all())
    assert bool((dims.sum(-1) == keep * d).all())
    # real buffers: exactly keep * D elements per row for K and for V, nothing else in their storage
    elt = st.kbuf.element_size()
    assert st.kv_elements() == 2 * keep * d * b * hk
    assert st.kv_nbytes() == 2 * keep * d * b * hk * elt
    # the content is the original token with the dropped channels (rank >= dims) zeroed
    ko = torch.gather(k, 2, pos[..., None].expand(-1, -1, -1, d))
    vo = torch.gather(v, 2, pos[..., None].expand(-1, -1, -1, d))
    torch.testing.assert_close(uk, ko * (kr[:, :, None, :] < dims[..., None]), rtol=0, atol=0)
    torch.testing.assert_close(uv, vo * (vr[:, :, None, :] < dims[..., None]), rtol=0, atol=0)
    for p in list(range(2)) + list(range(t - 3, t)):  # protected: present, whole
        at = pos == p
        assert bool(at.any(-1).all()) and bool((dims[at] == d).all())


CASES = [  # b, hk, group, d, levels, t_pool, keep, tq, extra_tail
    ("T37-D40-gqa3", 2, 2, 3, 40, 4, 37, 11, 1, 0),
    ("D48-tq3", 1, 2, 2, 48, 4, 30, 9, 3, 0),
    ("tail-longer-than-step", 2, 1, 4, 32, 8, 25, 10, 1, 5),
    ("empty-pools", 1, 2, 1, 16, 2, 0, 0, 2, 7),
    ("all-full-width", 1, 1, 2, 24, 3, 9, 99, 1, 0),
    ("levels=D", 1, 2, 2, 12, 12, 21, 6, 1, 2),
]


def _case(case, dtype, device="cpu"):
    _, b, hk, grp, d, levels, t_pool, keep, tq, extra = case
    st, *_ = _store(b, hk, d, levels, max(t_pool, 0), keep if t_pool else 99, seed=7, dtype=dtype, device=device)
    g = torch.Generator().manual_seed(11)
    tt = tq + extra
    tk = torch.randn(b, hk, tt, d, generator=g).to(dtype).to(device)
    tv = torch.randn(b, hk, tt, d, generator=g).to(dtype).to(device)
    q = torch.randn(b, tq, hk * grp, d, generator=g).to(dtype).to(device)
    return st, q, tk, tv, tq


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_reference_decode_equals_float64_dense_over_zeroed_cache(case):
    st, q, tk, tv, tq = _case(case, torch.float32)
    o, s_pool, s_tail = decode_reference(q, st, tk, tv)
    uk, uv, _, _, _, idx = st.unpack()
    want_o, want_s = _dense64(q, torch.cat([uk, tk], 2), torch.cat([uv, tv], 2), tq)
    torch.testing.assert_close(o.double(), want_o, rtol=1e-5, atol=1e-5)
    n = uk.shape[2]
    torch.testing.assert_close(s_pool[idx.reshape(-1)].double(), want_s[..., :n].reshape(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s_tail.double(), want_s[..., n:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernel_decode_matches_fp32_reference(kind, dtype, case):
    dev = DEV if kind == "triton" else "cpu"
    st, q, tk, tv, tq = _case(case, dtype, device=dev)
    with poisoned():
        o, s_pool, s_tail = decode_kernel(kind, q, st, tk, tv)
    # the fp32 reference on the same stored values
    ref = PackedKV(**{**st.__dict__, "kbuf": st.kbuf.float().cpu(), "vbuf": st.vbuf.float().cpu(),
                      **{n: getattr(st, n).cpu() for n in ("k_order", "v_order", "pos", "acc", "tok_off",
                                                            "elem_base")}})
    want_o, want_sp, want_st = decode_reference(q.float().cpu(), ref, tk.float().cpu(), tv.float().cpu())
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    assert o.dtype == dtype and o.shape == q.shape
    torch.testing.assert_close(o.float().cpu(), want_o, **tol)
    torch.testing.assert_close(s_pool.cpu(), want_sp, **tol)
    torch.testing.assert_close(s_tail.cpu(), want_st, **tol)
    assert not bool(torch.isnan(o).any())


def test_pooled_decode_rejects_bad_shapes():
    st, q, tk, tv, _ = _case(CASES[0], torch.float32)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        decode_kernel("numba", q[:, :, :5], st, tk, tv)
    with pytest.raises(ValueError, match="tail must hold"):
        decode_kernel("numba", q, st, tk[:, :, :0], tv[:, :, :0])
    with pytest.raises(ValueError, match="kind must be"):
        decode_kernel("cuda", q, st, tk, tv)


# ---------------------------------------------------------------------------------------------
# decoding a model
BACKENDS = ["reference", "numba"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])


def _model(kv, seed=0, d_model=48, heads=4, kv_heads=2):
    spec = {"model": {"d_model": d_model, "n_heads": heads, "n_kv_heads": kv_heads, "n_layers": 2, "max_seq": 128,
                      "backend": "reference", "rope": True},
            "block": {"mixer": {"type": "attention.dense"}}}
    if kv is not None:
        spec["kv"] = kv
    torch.manual_seed(seed)
    m = build(spec, training=False).eval()
    with torch.no_grad():
        for blk in m.blocks:
            blk.mixer.qkv.weight.mul_(4.0)
    return m


def _tokens(b, t, seed=1):
    return torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(seed))


def _held(lc):
    """Positions and kept dims of every token a packed layer holds (pools, then the full-width
    tail), [B, Hk, n] each."""
    _, _, pos, _, dims, _ = lc.extra["packed"].unpack()
    return torch.cat([pos, lc.pos], -1), torch.cat([dims, torch.full_like(lc.pos, lc.k.shape[-1])], -1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("budget", [0.25, 0.5, {"budget_tokens": 11}])
def test_budget_in_real_bytes_and_protected_whole(backend, budget):
    params = dict(budget) if isinstance(budget, dict) else {"budget": budget}
    params.update(sinks=3, recent=4)
    m = _model({"type": "token.mixeddim", "backend": backend, "params": params})
    cache = make_cache(m)
    x = _tokens(2, 40)
    d, g, rows = 12, 3, 2 * 2
    n_steps = 5 if backend == "triton" else 12
    with torch.no_grad():
        m.prefill(x[:, :20], cache)
        for i in range(20, 21 + n_steps):
            if i > 20:
                m.step(x[:, i - 1:i], cache)
            seen = cache.seen
            keep = cache.policy.keep(seen)
            held = 0
            for lc in cache.layers:
                st = lc.extra["packed"]
                # the new token goes into the pools unless the budget grew by a whole token this step
                assert lc.size <= 1
                tail = lc.k.untyped_storage().nbytes() + lc.v.untyped_storage().nbytes() if lc.size else 0
                assert st.kv_nbytes() + tail == 2 * keep * d * rows * 4  # fp32, exact, real storage
                pos, dims = _held(lc)
                assert bool((dims.sum(-1) == keep * d).all()) and bool((dims % g == 0).all())
                for p in list(range(3)) + list(range(seen - 4, seen)):
                    at = pos == p
                    assert bool(at.any(-1).all()), f"protected {p} evicted at seen={seen}"
                    assert bool((dims[at] == d).all()), f"protected {p} lost channels at seen={seen}"
                held += st.kv_elements() + lc.k.numel() + lc.v.numel()
            assert cache.kept_fraction() == pytest.approx(held / (2 * rows * d * 2 * seen))


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_budget_generates_exactly_like_no_policy(backend):
    m = _model({"type": "token.mixeddim", "backend": backend, "params": {"budget": 1.0}})
    x = _tokens(2, 9)
    n = 8 if backend == "triton" else 12
    assert torch.equal(m.generate(x, n), m.generate(x, n, policy=None))


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_makes_the_zeroed_layouts_decisions(backend):
    """Greedy generation and, after every step, the kept positions and dims per token of the packed
    layout (this backend) equal those of the zeroed full-width layout (reference backend)."""
    params = {"budget": 0.3, "sinks": 2, "recent": 3}
    m = _model(None, d_model=64, heads=4, kv_heads=2)  # head dim 16, levels 4
    packed = make_policy("token.mixeddim", backend=backend)
    packed.params = packed.params.model_copy(update=params)
    zeroed = make_policy("token.mixeddim")
    zeroed.params = zeroed.params.model_copy(update={**params, "layout": "zeroed"})
    n = 6 if backend == "triton" else 12
    assert torch.equal(m.generate(_tokens(2, 10), n, policy=packed), m.generate(_tokens(2, 10), n, policy=zeroed))
    x = _tokens(2, 34, seed=3)
    cp, cz = make_cache(m, packed), make_cache(m, zeroed)
    with torch.no_grad():
        lp, lz = m.prefill(x[:, :16], cp), m.prefill(x[:, :16], cz)
        for i in range(16, 30 if backend != "triton" else 22):
            for a, bz in zip(cp.layers, cz.layers, strict=True):
                pos, dims = _held(a)
                assert torch.equal(pos, bz.pos) and torch.equal(dims, bz.extra["dims"]), i
            torch.testing.assert_close(lp[:, -1], lz[:, -1], rtol=1e-4, atol=1e-5)
            lp, lz = m.step(x[:, i:i + 1], cp), m.step(x[:, i:i + 1], cz)


def test_levels_must_divide_the_head_dim():
    m = _model({"type": "token.mixeddim", "params": {"budget": 0.5, "levels": 5}})
    with pytest.raises(ValueError, match="levels=5 must divide the head dim"):
        m.generate(_tokens(1, 20), 2)


def test_registry_lists_the_kernel_backends():
    names = {b.name for b in get_registry().backends_for("token.mixeddim")}
    assert {"reference", "numba", "triton"} <= names


# ---------------------------------------------------------------------------------------------
# the Triton split path (several programs per row, each a slice of every level and of the tail)
def _handmade_store(counts, b, hk, d, levels, seed, dtype):
    """A store with the given tokens per (level, row) (``counts[l][r]``; every row the same total),
    random content and positions: ragged levels, empty levels, rows without a level."""
    g = torch.Generator().manual_seed(seed)
    R, step = b * hk, d // levels
    n_row = sum(c[0] for c in counts)
    assert all(sum(c[r] for c in counts) == n_row for r in range(R))
    perms = [torch.randperm(n_row, generator=g) for _ in range(R)]  # each row's positions
    used = [0] * R
    ks, vs, ps, tok_off, elem_base = [], [], [], [], []
    n_tok = n_el = 0
    for lv in range(levels):
        w = (lv + 1) * step
        off = [n_tok]
        for r in range(R):
            c = counts[lv][r]
            ks.append(torch.randn(c * w, generator=g))
            vs.append(torch.randn(c * w, generator=g))
            ps.append(perms[r][used[r]:used[r] + c])
            used[r] += c
            n_tok += c
            off.append(n_tok)
        tok_off.append(torch.tensor(off))
        elem_base.append(n_el)
        n_el += (off[-1] - off[0]) * w
    order = [torch.stack([torch.randperm(d, generator=g) for _ in range(R)]) for _ in range(2)]
    return PackedKV(b, hk, d, levels, order[0], order[1], torch.cat(ks).to(dtype), torch.cat(vs).to(dtype),
                    torch.cat(ps).long(), torch.rand(n_tok, generator=g), torch.stack(tok_off),
                    torch.tensor(elem_base, dtype=torch.long))


SPLIT_CASES = [  # id, store, b, hk, group, d, levels, tq, extra tail, splits, (BLOCK_N, warps, stages, narrow)
    # level 2 empty everywhere, row 1 only level 0 (more tokens than one narrow tile), tail > one tile
    ("handmade-emptylevel-D40-gqa3-tq2", [[70, 150, 20], [40, 0, 50], [0, 0, 0], [40, 0, 80]], 1, 3, 3, 40, 4, 2,
     20, 3, (16, 1, 1, True)),
    ("handmade-full-width-tiles", [[70, 150, 20], [40, 0, 50], [0, 0, 0], [40, 0, 80]], 1, 3, 3, 40, 4, 1, 0, 4,
     (16, 1, 1, False)),
    ("repacked-T63-D40-gqa3", None, 2, 2, 3, 40, 4, 1, 2, 5, (16, 1, 1, True)),
    ("repacked-D48-tq3-levels8", None, 1, 2, 2, 48, 8, 3, 1, 2, (16, 1, 1, True)),
]


def _split_case(case, dtype):
    _, counts, b, hk, grp, d, levels, tq, extra, _, _ = case
    if counts is None:
        st, *_ = _store(b, hk, d, levels, 63, 20, seed=3, dtype=dtype)
    else:
        st = _handmade_store(counts, b, hk, d, levels, seed=4, dtype=dtype)
    g = torch.Generator().manual_seed(12)
    tt = tq + extra
    tk = torch.randn(b, hk, tt, d, generator=g).to(dtype).to(DEV)
    tv = torch.randn(b, hk, tt, d, generator=g).to(dtype).to(DEV)
    q = torch.randn(b, tq, hk * grp, d, generator=g).to(dtype).to(DEV)
    for name in ("k_order", "v_order", "kbuf", "vbuf", "pos", "acc", "tok_off", "elem_base"):
        setattr(st, name, getattr(st, name).to(DEV))
    return st, q, tk, tv


def _pooled(fn, q, st, tk, tv, **kw):
    from blockzoo.plugins.token.mixeddim import permute_queries, unpermute_output
    qp = permute_queries(q, st.k_order, st.hk)
    o_n, o_r, sp, stl = fn(q, qp, st.kbuf, st.vbuf, st.tok_off, st.elem_base, st.step, tk, tv, **kw)
    return o_n + unpermute_output(o_r, st.v_order, st.hk), sp, stl


@pytest.mark.skipif(not TRITON, reason="Triton needs TRITON_INTERPRET=1 or CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", SPLIT_CASES, ids=[c[0] for c in SPLIT_CASES])
def test_triton_split_decode_matches_fp32_reference(case, dtype):
    from blockzoo.kernels.triton import kv_mixeddim as km
    st, q, tk, tv = _split_case(case, dtype)
    splits, cfg = case[-2], case[-1]
    with poisoned():
        o, sp, stl = _pooled(km.pooled_decode, q, st, tk, tv, num_splits=splits, cfg=cfg)
    ref = PackedKV(**{**st.__dict__, "kbuf": st.kbuf.float().cpu(), "vbuf": st.vbuf.float().cpu(),
                      **{n: getattr(st, n).cpu() for n in ("k_order", "v_order", "pos", "acc", "tok_off",
                                                            "elem_base")}})
    want_o, want_sp, want_st = decode_reference(q.float().cpu(), ref, tk.float().cpu(), tv.float().cpu())
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(o.cpu(), want_o, **tol)  # fp32 outputs (o_n + o_r)
    torch.testing.assert_close(sp.cpu(), want_sp, **tol)
    torch.testing.assert_close(stl.cpu(), want_st, **tol)
    # the case really splits: some level (or the tail) of some row has tokens in two splits' chunks
    assert _levels_split(st, q.shape[1] * case[4], tk.shape[2], splits, cfg)


def _levels_split(st, rows, tail, splits, cfg):
    """Whether some row's level (or the tail) is spread over more than one split, with the
    kernel's chunking (a level's tokens in chunks of ``ceil(n / S)`` rounded up to whole tiles)."""
    bn, _, _, narrow = cfg
    bd, bm = max(16, 1 << (st.d - 1).bit_length()), max(16, 1 << (rows - 1).bit_length())
    counts = (st.tok_off[:, 1:] - st.tok_off[:, :-1]).cpu()
    for lv in range(st.levels):
        wp = min(bd, max(16, 1 << ((lv + 1) * st.step - 1).bit_length())) if narrow else bd
        tile = max(16, min(bn * (bd // wp), 4096 // bm)) if narrow else bn
        for n in counts[lv].tolist():
            if n > math.ceil(math.ceil(n / splits) / tile) * tile:
                return True
    return tail > math.ceil(math.ceil(tail / splits) / bn) * bn


@pytest.mark.skipif(not TRITON, reason="Triton needs TRITON_INTERPRET=1 or CUDA")
def test_triton_split_counts_agree():
    """Several splits and one split agree; scores=False gives the same output."""
    from blockzoo.kernels.triton import kv_mixeddim as km
    st, q, tk, tv = _split_case(SPLIT_CASES[0], torch.float32)
    outs = [_pooled(km.pooled_decode, q, st, tk, tv, num_splits=s, cfg=(16, 1, 1, True)) for s in (1, 6)]
    for other in outs[1:]:
        for a, b in zip(outs[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    o, sp, stl = _pooled(km.pooled_decode, q, st, tk, tv, scores=False, num_splits=3)
    assert sp is None and stl is None
    torch.testing.assert_close(o, outs[0][0], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not TRITON, reason="Triton needs TRITON_INTERPRET=1 or CUDA")
@pytest.mark.parametrize("case", SPLIT_CASES[::2], ids=[c[0] for c in SPLIT_CASES[::2]])
def test_triton_scores_from_logits_equal_scores_from_keys(case):
    """The two scores paths (the split pass's logits read back / the logits recomputed from K)
    agree, outputs included: bit for bit in the interpreter; compiled, the two kernels' dots may
    round differently (last fp32 bits: on the H100 both stay within 1e-6 of the fp32 reference at
    the benchmark shape), so there to fp32 rounding. Each path is also checked against the
    reference on its own: logits (the default) in test_triton_split_decode_matches_fp32_reference,
    keys below."""
    from blockzoo.kernels.triton import kv_mixeddim as km
    st, q, tk, tv = _split_case(case, torch.float32)
    with poisoned():
        outs = [_pooled(km.pooled_decode, q, st, tk, tv, num_splits=case[-2], cfg=case[-1], scores_from=sf)
                for sf in ("keys", "logits")]
    for a, b in zip(*outs, strict=True):
        if DEV == "cpu":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    ref = PackedKV(**{**st.__dict__, "kbuf": st.kbuf.float().cpu(), "vbuf": st.vbuf.float().cpu(),
                      **{n: getattr(st, n).cpu() for n in ("k_order", "v_order", "pos", "acc", "tok_off",
                                                            "elem_base")}})
    want = decode_reference(q.float().cpu(), ref, tk.float().cpu(), tv.float().cpu())
    for got, w in zip(outs[0], want, strict=True):  # the keys path against the fp32 reference
        torch.testing.assert_close(got.cpu(), w, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="scores_from must be"):
        _pooled(km.pooled_decode, q, st, tk, tv, scores_from="both")


def test_default_split_rule_balances_bytes_and_fills_the_gpu(monkeypatch):
    """The default grid: level splits proportional to each level's bytes (the kernels compute
    the same rule from tok_off: tests above), about 4 programs per SM, none for empty levels."""
    from blockzoo.kernels.triton import kv_mixeddim as km
    dev = torch.device("cuda", 0)
    monkeypatch.setitem(km._SM_COUNT, 0, 132)  # an H100's SM count (no GPU is touched once it is known)
    # the benchmark's shape: 128 rows, D=128 in 4 levels, most kept tokens at full width
    R, step, lev_tok = 128, 32, [300 * 128, 0, 500 * 128, 7800 * 128]
    tgt = km.default_target(lev_tok, step, R, 1, 128, 64, dev)
    spl = km.level_splits(lev_tok, step, R, tgt)
    st = km.tail_splits(1, 128, tgt)
    assert spl[1] == 0 and spl[0] >= 1 and spl[2] >= 1 and st == 1
    assert spl[3] >= 3 * spl[2]  # the full-width level holds most bytes: most programs
    # about 4 per SM: at least that many, at most one more per non-empty level and row (rounding up)
    total = R * (sum(spl) + st)
    assert 4 * 132 <= total <= 4 * 132 + R * (3 + 1)
    # a tiny row: one program per non-empty level, at least 4 full-width tiles' worth each
    tiny = [40, 0, 0, 12]
    tgt = km.default_target(tiny, 10, 2, 3, 40, 64, dev)
    assert tgt >= 4 * 64 * 64 and km.level_splits(tiny, 10, 2, tgt) == [1, 0, 0, 1]
    # forced splits: that many for every non-empty level, capped
    assert km.level_splits(tiny, 10, 2, tgt, fixed=3) == [3, 0, 0, 3]
    assert km.level_splits([10 ** 9], 128, 1, 1) == [km.MAX_SPLITS]


def test_pooled_decode_rejects_bad_splits():
    from blockzoo.kernels.triton import kv_mixeddim as km
    st, q, tk, tv, _ = _case(CASES[0], torch.float32)
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="num_splits must be an int >= 1"):
            _pooled(km.pooled_decode, q, st, tk, tv, num_splits=bad)
    with pytest.raises(ValueError, match="BLOCK_N must be a power of 2"):
        _pooled(km.pooled_decode, q, st, tk, tv, cfg=(24, 1, 1, True))
