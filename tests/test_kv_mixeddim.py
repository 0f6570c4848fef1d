"""token.mixeddim's packed cache (plugins/token/mixeddim.py) and its decode kernels
(kernels/triton/kv_mixeddim.py, kernels/numba/kv_mixeddim.py):

- the pools hold exactly the kept channels of every token (unpacked == the original k, v with
  the dropped channels zeroed) and exactly ``keep * D`` K and V elements per row, in real
  buffer bytes (no slack); with slack, the buffers hold the kept elements plus the spare slots';
- spare capacity: a store repacked with slack and its held tokens shuffled inside each
  (level, row) decodes (reference, every kernel) like the dense one, unused slots get score 0,
  and repacks to the same store;
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


def _store(b, hk, d, levels, t_pool, keep, seed=0, dtype=torch.float32, sinks=2, recent=3, device="cpu", slack=0):
    """A packed store of t_pool random tokens compressed to ``keep`` tokens' worth of elements
    (``slack`` spare slots per (level, row)), plus the original (full-width) k, v and the ranks."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, hk, t_pool, d, generator=g).to(dtype)
    v = torch.randn(b, hk, t_pool, d, generator=g).to(dtype)
    pos = torch.arange(t_pool).expand(b, hk, t_pool).contiguous()
    acc = torch.rand(b, hk, t_pool, generator=g) ** 3
    kr = torch.stack([torch.randperm(d, generator=g) for _ in range(b * hk)]).view(b, hk, d)
    vr = torch.stack([torch.randperm(d, generator=g) for _ in range(b * hk)]).view(b, hk, d)
    st = PackedKV.empty(b, hk, d, levels, kr, vr, dtype, "cpu")
    if keep < t_pool:
        st = repack(st, k, v, pos, acc, t_pool, keep, sinks, recent, slack=slack)
    else:  # nothing to compress: every token in the top level
        st = _all_full(st, k, v, pos, acc)
    if device != "cpu":
        for name in ("k_order", "v_order", "kbuf", "vbuf", "pos", "acc", "tok_off", "count", "elem_base"):
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
    count = torch.zeros(st.levels, r, dtype=torch.long)
    count[-1] = t
    return PackedKV(b, hk, d, st.levels, st.k_order, st.v_order, kr.reshape(-1).clone(), vr.reshape(-1).clone(),
                    pos.reshape(-1).clone(), acc.reshape(-1).float(), tok_off,
                    torch.zeros(st.levels, dtype=torch.long), count=count)


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
    # real buffers (no slack): exactly keep * D elements per row for K and for V, nothing else in
    # their storage; every slot held
    elt = st.kbuf.element_size()
    assert st.kv_elements() == st.kept_elements() == 2 * keep * d * b * hk
    assert st.kv_nbytes() == 2 * keep * d * b * hk * elt
    assert st.held == st.slots == st.pos.shape[0]
    torch.testing.assert_close(st.count, st.tok_off[:, 1:] - st.tok_off[:, :-1], rtol=0, atol=0)
    assert st.host == (tuple(st.count.sum(1).tolist()), tuple(st.elem_base.tolist()))
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
                                                            "count", "elem_base")}})
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
@pytest.mark.parametrize("budget,slack", [(0.25, None), (0.5, 16), ({"budget_tokens": 11}, None),
                                          ({"budget_tokens": 11}, 12)],
                         ids=["0.25", "0.5-slack16", "tokens11", "tokens11-slack12"])
def test_budget_in_real_bytes_and_protected_whole(backend, budget, slack):
    """slack None: the default (no spare slots at this size: whole-cache rewrites); 12 / 16: spare
    slots, so the steps rewrite incrementally."""
    params = dict(budget) if isinstance(budget, dict) else {"budget": budget}
    params.update(sinks=3, recent=4, slack=slack)
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
                assert st.kept_elements() * 4 + tail == 2 * keep * d * rows * 4  # fp32, exact
                # the real storage: the buffers (kept elements + any slack), nothing else
                assert st.kv_nbytes() == st.kv_elements() * 4 >= st.kept_elements() * 4
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
@pytest.mark.parametrize("slack", [None, 16], ids=["default", "slack16"])
def test_packed_makes_the_zeroed_layouts_decisions(backend, slack):
    """Greedy generation and, after every step, the kept positions and dims per token of the packed
    layout (this backend) equal those of the zeroed full-width layout (reference backend); with
    spare slots (slack16) the packed steps rewrite incrementally."""
    params = {"budget": 0.3, "sinks": 2, "recent": 3, "slack": slack}
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
                    torch.tensor(elem_base, dtype=torch.long), count=torch.tensor(counts, dtype=torch.long))


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
    for name in ("k_order", "v_order", "kbuf", "vbuf", "pos", "acc", "tok_off", "count", "elem_base"):
        setattr(st, name, getattr(st, name).to(DEV))
    return st, q, tk, tv


def _pooled(fn, q, st, tk, tv, **kw):
    from blockzoo.plugins.token.mixeddim import permute_queries, unpermute_output
    qp = permute_queries(q, st.k_order, st.hk)
    o_n, o_r, sp, stl = fn(q, qp, st.kbuf, st.vbuf, st.tok_off, st.count, st.elem_base, st.step, tk, tv, **kw)
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
                                                            "count", "elem_base")}})
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
    counts = st.count.cpu()
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
                                                            "count", "elem_base")}})
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


# ---------------------------------------------------------------------------------------------
# spare capacity: slots a (level, row) owns beyond the tokens it holds; held tokens in any order
def _on(st, device):
    """``st`` with its tensors on ``device``."""
    return PackedKV(**{**st.__dict__, **{n: getattr(st, n).to(device) for n in (
        "k_order", "v_order", "kbuf", "vbuf", "pos", "acc", "tok_off", "count", "elem_base")}})


def _shuffled(st, seed):
    """A copy of ``st`` whose held tokens are permuted inside every (level, row): the slots
    ``tok_off[l, r] .. tok_off[l, r] + count[l, r]`` (K, V, pos and acc together)."""
    g = torch.Generator().manual_seed(seed)
    kb, vb, pos, acc = st.kbuf.clone(), st.vbuf.clone(), st.pos.clone(), st.acc.clone()
    for lv in range(st.levels):
        w, t0, eb = st.width(lv), int(st.tok_off[lv, 0]), int(st.elem_base[lv])
        for r in range(st.rows):
            s0, c = int(st.tok_off[lv, r]), int(st.count[lv, r])
            src, dst = s0 + torch.randperm(c, generator=g), s0 + torch.arange(c)
            pos[dst], acc[dst] = st.pos[src], st.acc[src]
            e_src = eb + (src - t0)[:, None] * w + torch.arange(w)
            e_dst = eb + (dst - t0)[:, None] * w + torch.arange(w)
            kb[e_dst], vb[e_dst] = st.kbuf[e_src], st.vbuf[e_src]
    return PackedKV(**{**st.__dict__, "kbuf": kb, "vbuf": vb, "pos": pos, "acc": acc})


SLACK_CASES = [  # id, b, hk, group, d, levels, t_pool, keep, tq, extra tail, slack
    ("T37-D40-gqa3-slack3", 2, 2, 3, 40, 4, 37, 11, 1, 0, 3),
    ("T29-D48-tq3-levels8-slack3", 1, 3, 2, 48, 8, 29, 9, 3, 2, 3),
    ("T23-D12-slack1", 2, 1, 2, 12, 3, 23, 7, 1, 4, 1),
]


def _slack_case(case, dtype, seed):
    """(the store without slack, the same tokens repacked with slack and shuffled inside every
    (level, row), the store with slack unshuffled, q, tail k, tail v)."""
    _, b, hk, grp, d, levels, t_pool, keep, tq, extra, slack = case
    dense, *_ = _store(b, hk, d, levels, t_pool, keep, seed=seed, dtype=dtype)
    spare, *_ = _store(b, hk, d, levels, t_pool, keep, seed=seed, dtype=dtype, slack=slack)
    shuf = _shuffled(spare, seed + 1)
    assert not torch.equal(shuf.pos, spare.pos)  # the shuffle really moved tokens
    g = torch.Generator().manual_seed(seed + 2)
    tt = tq + extra
    tk = torch.randn(b, hk, tt, d, generator=g).to(dtype)
    tv = torch.randn(b, hk, tt, d, generator=g).to(dtype)
    q = torch.randn(b, tq, hk * grp, d, generator=g).to(dtype)
    return dense, shuf, spare, q, tk, tv


def _unused(st):
    """[slots] bool: the slots no token occupies."""
    held = torch.zeros(st.slots, dtype=torch.bool)
    held[st.meta()[0].cpu()] = True
    return ~held


def _check_pool_scores(st, s_pool, dense, want_sp, **tol):
    """The scores per slot of ``st`` against the scores per slot of ``dense`` (the same tokens),
    matched through the time-order tables (the same positions, checked); unused slots exactly 0."""
    idx, idx_d = st.table().cpu(), dense.table()
    assert torch.equal(st.pos.cpu()[idx], dense.pos[idx_d])
    torch.testing.assert_close(s_pool.cpu()[idx], want_sp[idx_d], **tol)
    assert bool((s_pool.cpu()[_unused(st)] == 0).all())


@pytest.mark.parametrize("case", SLACK_CASES, ids=[c[0] for c in SLACK_CASES])
def test_slack_layout_and_storage_accounting(case):
    dense, shuf, spare, *_ = _slack_case(case, torch.float32, seed=21)
    slack, R, L = case[-1], dense.rows, dense.levels
    widths = sum(dense.width(lv) for lv in range(L))
    # the same tokens held; each (level, row) owns count + slack slots, the held ones first
    assert torch.equal(spare.count, dense.count) and torch.equal(shuf.count, dense.count)
    assert torch.equal(spare.tok_off[:, 1:] - spare.tok_off[:, :-1], spare.count + slack)
    assert spare.held == dense.held == dense.slots and spare.slots == dense.slots + slack * R * L
    assert spare.host == (tuple((spare.tok_off[:, -1] - spare.tok_off[:, 0]).tolist()),
                          tuple(spare.elem_base.tolist()))
    # storage: the buffers hold the kept elements plus the slack's, nothing else
    elt = spare.kbuf.element_size()
    assert dense.kv_elements() == dense.kept_elements() == spare.kept_elements() == shuf.kept_elements()
    assert spare.kv_elements() == spare.kept_elements() + 2 * slack * R * widths
    assert spare.kv_nbytes() == spare.kv_elements() * elt
    # unused slots: pos -1, acc 0, K and V zero; the held ones are the dense store's tokens
    unused = _unused(spare)
    assert int(unused.sum()) == slack * R * L and torch.equal(unused, _unused(shuf))
    assert bool((spare.pos[unused] == -1).all()) and bool((spare.acc[unused] == 0).all())
    assert bool((spare.pos[~unused] >= 0).all())
    slot_of_el = torch.cat([torch.arange(int(spare.tok_off[lv, 0]), int(spare.tok_off[lv, -1]))
                            .repeat_interleave(spare.width(lv)) for lv in range(L)])
    for buf in (spare.kbuf, spare.vbuf, shuf.kbuf, shuf.vbuf):
        assert bool((buf[unused[slot_of_el]] == 0).all())
    want = dense.unpack()
    for st in (spare, shuf):
        got = st.unpack()
        for a, b in zip(got[:5], want[:5], strict=True):
            assert torch.equal(a, b)
        assert got[5].shape == want[5].shape and not bool(unused[got[5].reshape(-1)].any())
        assert st.meta()[0].shape[0] == dense.slots


@pytest.mark.parametrize("case", SLACK_CASES, ids=[c[0] for c in SLACK_CASES])
def test_slack_shuffled_reference_decode_equals_the_dense_one(case):
    dense, shuf, _, q, tk, tv = _slack_case(case, torch.float32, seed=23)
    want_o, want_sp, want_st = decode_reference(q, dense, tk, tv)
    o, s_pool, s_tail = decode_reference(q, shuf, tk, tv)
    assert s_pool.shape == (shuf.slots,)
    torch.testing.assert_close(o, want_o, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s_tail, want_st, rtol=1e-5, atol=1e-7)
    _check_pool_scores(shuf, s_pool, dense, want_sp, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", SLACK_CASES, ids=[c[0] for c in SLACK_CASES])
def test_slack_shuffled_kernel_decode_matches_fp32_dense_reference(kind, dtype, case):
    dense, shuf, _, q, tk, tv = _slack_case(case, dtype, seed=25)
    dev = DEV if kind == "triton" else "cpu"
    with poisoned():
        o, s_pool, s_tail = decode_kernel(kind, q.to(dev), _on(shuf, dev), tk.to(dev), tv.to(dev))
    # the fp32 reference decode of the same logical cache: the dense, unshuffled store
    ref = PackedKV(**{**dense.__dict__, "kbuf": dense.kbuf.float(), "vbuf": dense.vbuf.float()})
    want_o, want_sp, want_st = decode_reference(q.float(), ref, tk.float(), tv.float())
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    assert o.dtype == dtype and o.shape == q.shape and s_pool.shape == (shuf.slots,)
    torch.testing.assert_close(o.float().cpu(), want_o, **tol)
    torch.testing.assert_close(s_tail.cpu(), want_st, **tol)
    _check_pool_scores(shuf, s_pool, dense, want_sp, **tol)


@pytest.mark.skipif(not TRITON, reason="Triton needs TRITON_INTERPRET=1 or CUDA")
@pytest.mark.parametrize("splits", [1, 4])
def test_triton_split_decode_over_a_slack_store(splits):
    """Forced splits over a slack store: splits are sized from the slots, chunks from the held
    count, so some programs start beyond the held tokens (nothing to read), and the last split
    of every (level, row) zeroes its unused slots' scores."""
    from blockzoo.kernels.triton import kv_mixeddim as km
    case = ("T41-D40-gqa3-tq2-slack5", 2, 2, 3, 40, 4, 41, 13, 2, 1, 5)
    dense, shuf, _, q, tk, tv = _slack_case(case, torch.float32, seed=27)
    st = _on(shuf, DEV)
    with poisoned():
        o, sp, stl = _pooled(km.pooled_decode, q.to(DEV), st, tk.to(DEV), tv.to(DEV), num_splits=splits,
                             cfg=(16, 1, 1, True))
    want_o, want_sp, want_st = decode_reference(q, dense, tk, tv)
    tol = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(o.cpu(), want_o, **tol)
    torch.testing.assert_close(stl.cpu(), want_st, **tol)
    _check_pool_scores(shuf, sp, dense, want_sp, **tol)


@pytest.mark.parametrize("slack", [0, 2])
def test_repack_of_a_slack_store_equals_repack_of_the_dense_one(slack):
    """The rewrite reads only the held slots, in time order whatever their order in the slots:
    repacking the shuffled slack store and the dense one (plus one new token) gives the same
    store, bit for bit (the new store's slack aside)."""
    case = ("T37-D40-gqa3-slack3", 2, 2, 3, 40, 4, 37, 11, 1, 0, 3)
    dense, shuf, *_ = _slack_case(case, torch.float32, seed=29)
    b, hk, d, t_pool, keep = 2, 2, 40, 37, 11
    g = torch.Generator().manual_seed(30)
    tk, tv = torch.randn(b, hk, 1, d, generator=g), torch.randn(b, hk, 1, d, generator=g)
    tpos, tacc = torch.full((b, hk, 1), t_pool), torch.rand(b, hk, 1, generator=g)
    want = repack(dense, tk, tv, tpos, tacc, t_pool + 1, keep, 2, 3)
    got = repack(shuf, tk, tv, tpos, tacc, t_pool + 1, keep, 2, 3, slack=slack)
    assert torch.equal(got.count, want.count)
    if slack == 0:
        for f in ("kbuf", "vbuf", "pos", "acc", "tok_off", "elem_base"):
            assert torch.equal(getattr(got, f), getattr(want, f)), f
        assert got.host == want.host
    for a, b_ in zip(got.unpack()[:5], want.unpack()[:5], strict=True):
        assert torch.equal(a, b_)
    with pytest.raises(ValueError, match="slack must be an int >= 0"):
        repack(shuf, tk, tv, tpos, tacc, t_pool + 1, keep, 2, 3, slack=-1)


def test_pooled_decode_rejects_a_bad_count():
    from blockzoo.kernels.numba import kv_mixeddim as kn
    st, q, tk, tv, _ = _case(CASES[0], torch.float32)
    # wrong shape, a float dtype, another device, not a tensor
    for c in (st.count[:, :-1], st.count.float(), st.count.to("meta"), st.count.tolist()):
        with pytest.raises(ValueError, match="count"):
            decode_kernel("numba", q, PackedKV(**{**st.__dict__, "count": c}), tk, tv)
        with pytest.raises(ValueError, match="count"):
            _pooled(kn.pooled_decode, q, PackedKV(**{**st.__dict__, "count": c}), tk, tv)
    over = st.count.clone()
    over[0, 0] += 1  # more tokens than the row's slots in the level
    with pytest.raises(ValueError, match=r"count must be in \[0"):
        decode_kernel("numba", q, PackedKV(**{**st.__dict__, "count": over}), tk, tv)
    with pytest.raises(TypeError, match="count"):  # keyword-only, required
        PackedKV(*[st.__dict__[f] for f in ("b", "hk", "d", "levels", "k_order", "v_order", "kbuf", "vbuf", "pos",
                                            "acc", "tok_off", "elem_base", "host")])
