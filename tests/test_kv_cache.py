"""KV cache and decoding (core/cache.py) and the token.* cache policies (plugins/token).

- decoding with the full cache gives the parallel forward's logits (dense attention on the
  reference and Numba backends, GQA, RoPE at absolute positions; context.moc whose routing spans
  many chunks), for one-token and multi-token steps;
- every policy keeps exactly its budget and its protected tokens, per layer and kv head, after
  every step; what it keeps is what an independent computation of its score says;
- the shared selector against a brute-force oracle; decode attention over a compacted cache
  against dense attention over the kept keys;
- spec validation of the ``kv:`` section (file:line, nearest name, bad pairings).

Scorer ops against their fp32 evaluation: the generated matrix (tests/test_matrix.py).
"""

from __future__ import annotations

import math

import pytest
import torch

from blockzoo.core.cache import KVCache, decode_logits, make_cache
from blockzoo.core.composer import build
from blockzoo.core.spec import SpecError, load_spec
from blockzoo.plugins.attention.reference import attention_reference
from blockzoo.plugins.token.module import make_policy
from blockzoo.plugins.token.params import H2OParams, SnapKVParams, StreamingParams
from blockzoo.plugins.token.reference import compact, decode_attention, protected_mask, select
from blockzoo.registry import Backend, get_registry

POLICIES = ("token.streaming", "token.h2o", "token.snapkv")


def _spec(mixer=None, kv=None, backend="reference", n_kv_heads=2, rope=True):
    s = {"model": {"d_model": 48, "n_heads": 4, "n_kv_heads": n_kv_heads, "n_layers": 2, "max_seq": 128,
                   "backend": backend, "rope": rope},
         "block": {"mixer": mixer or {"type": "attention.dense"}}}
    if kv is not None:
        s["kv"] = kv
    return s


def _model(spec, seed=0):
    torch.manual_seed(seed)
    m = build(spec, training=False).eval()
    with torch.no_grad():  # non-trivial attention: larger q/k projections than the init gives
        for blk in m.blocks:
            blk.mixer.qkv.weight.mul_(4.0)
    return m


def _tokens(b, t, seed=1):
    return torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# full cache == parallel forward
@pytest.mark.parametrize("backend", ["reference", "numba"])
@pytest.mark.parametrize("n_kv_heads,rope,prefill_len", [(2, True, 1), (4, True, 9), (1, False, 30)])
def test_full_cache_decoding_matches_parallel_dense(backend, n_kv_heads, rope, prefill_len):
    m = _model(_spec(backend=backend, n_kv_heads=n_kv_heads, rope=rope))
    x = _tokens(2, 37)
    with torch.no_grad():
        want = m(x)
    got, rel = decode_logits(m, x, prefill_len, policy=None)
    assert rel == 1.0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_full_cache_decoding_matches_parallel_moc(backend):
    mixer = {"type": "context.moc", "params": {"chunk_size": 4, "top_k": 2, "prefix": 1}}
    m = _model(_spec(mixer, backend=backend))
    x = _tokens(2, 41)
    with torch.no_grad():
        want = m(x)
    for prefill_len in (3, 20):
        got, _ = decode_logits(m, x, prefill_len, policy=None)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_multi_token_steps_match_parallel():
    m = _model(_spec())
    x = _tokens(2, 30)
    cache = m.make_cache(None)
    with torch.no_grad():
        want = m(x)
        parts = [m.prefill(x[:, :7], cache), m.step(x[:, 7:8], cache), m.step(x[:, 8:19], cache),
                 m.step(x[:, 19:], cache)]
    torch.testing.assert_close(torch.cat(parts, 1), want, rtol=1e-4, atol=1e-5)
    assert cache.seen == 30 and all(lc.size == 30 for lc in cache.layers)


def test_generate_greedy_matches_full_forward_loop():
    m = _model(_spec())
    x = _tokens(2, 6)
    out = m.generate(x, 8, policy=None)
    seq = x
    with torch.no_grad():
        for _ in range(8):
            seq = torch.cat([seq, m(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("cid", POLICIES)
def test_policy_at_full_budget_matches_parallel(cid):
    m = _model(_spec(kv={"type": cid, "params": {"budget": 1.0}}))
    x = _tokens(2, 33)
    with torch.no_grad():
        want = m(x)
    got, rel = decode_logits(m, x, 5)
    assert rel == 1.0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# budgets and protected tokens
@pytest.mark.parametrize("cid", POLICIES)
@pytest.mark.parametrize("budget", [0.25, 0.5, 0.75, {"budget_tokens": 15}])
def test_policy_keeps_exactly_budget_and_protected(cid, budget):
    params = dict(budget) if isinstance(budget, dict) else {"budget": budget}
    params.update(sinks=3, recent=5)
    m = _model(_spec(kv={"type": cid, "params": params}))
    pol = m.make_cache().policy
    x = _tokens(2, 48)
    cache = m.make_cache()
    n_prompt = 24
    with torch.no_grad():
        m.prefill(x[:, :n_prompt], cache)
        for i in range(n_prompt, 49):
            if i > n_prompt:
                m.step(x[:, i - 1:i], cache)
            seen = cache.seen
            if cid == "token.snapkv":
                want = pol.keep(n_prompt) + (seen - n_prompt)
            else:
                want = min(seen, max(math.ceil(seen * params.get("budget", 0)) if "budget" in params
                                     else params["budget_tokens"], 8))
            for lc in cache.layers:
                assert lc.seen == seen
                assert lc.k.shape[2] == lc.v.shape[2] == lc.pos.shape[2] == want, (seen, lc.size, want)
                pos = lc.pos
                assert bool((pos[..., 1:] > pos[..., :-1]).all()), "kept positions must be unique and in order"
                for p in list(range(min(3, seen))) + list(range(max(0, seen - 5), seen)):
                    assert bool((pos == p).any(-1).all()), f"protected position {p} evicted at seen={seen}"


def test_budget_is_raised_to_protected_count_and_capped_by_seen():
    p = StreamingParams(budget=0.25, sinks=4, recent=8)
    assert [p.keep(s) for s in (5, 12, 40, 100)] == [5, 12, 12, 25]
    assert StreamingParams(budget_tokens=20, sinks=2, recent=2).keep(100) == 20
    assert H2OParams(budget=0.5).keep(7) == 7


def test_streaming_keeps_sinks_and_recent_window():
    m = _model(_spec(kv={"type": "token.streaming", "params": {"budget_tokens": 10, "sinks": 2, "recent": 4}}))
    cache = m.make_cache()
    x = _tokens(1, 40)
    with torch.no_grad():
        m.prefill(x[:, :20], cache)
        for i in range(20, 40):
            m.step(x[:, i:i + 1], cache)
    want = torch.tensor([0, 1] + list(range(32, 40)))
    for lc in cache.layers:
        assert torch.equal(lc.pos[0, 0], want) and torch.equal(lc.pos[0, 1], want)


def _probs(q, k):
    """Independent causal softmax (bottom-right), per query head: [B, Hq, Tq, Tk] fp64."""
    b, tq, hq, d = q.shape
    tk, hk = k.shape[1], k.shape[2]
    out = torch.zeros(b, hq, tq, tk, dtype=torch.float64)
    for h in range(hq):
        kh = k[:, :, h // (hq // hk)].double()
        s = torch.einsum("bqd,bkd->bqk", q[:, :, h].double(), kh) / math.sqrt(d)
        for i in range(tq):
            lim = i + tk - tq + 1
            out[:, h, i, :lim] = torch.softmax(s[:, i, :lim], -1)
    return out


def _kept_by_oracle(scores, seen, keep, sinks, recent):
    """Protected positions + highest remaining scores (brute force, one row)."""
    prot = [j for j in range(seen) if j < sinks or j >= seen - recent]
    rest = sorted((j for j in range(seen) if j not in prot), key=lambda j: (-scores[j], j))
    return sorted(prot + rest[:keep - len(prot)])


@pytest.mark.parametrize("cid", ["token.h2o", "token.snapkv"])
def test_prefill_selection_matches_independent_scores(cid):
    params = {"budget_tokens": 12, "sinks": 2, "recent": 3}
    if cid == "token.snapkv":
        params.update(window=4, pool=3)
    pol = make_policy(load_spec(_spec(kv={"type": cid, "params": params})).kv)
    b, t, hq, hk, d = 2, 30, 4, 2, 16
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(b, t, h, d, generator=g) * 2 for h in (hq, hk, hk))
    cache = KVCache(1, pol)

    class Op:
        kwargs = {"causal": True, "scale": None}

        def __call__(self, q, k, v):
            return attention_reference(q, k, v)
    cache.attend(0, q, k, v, torch.arange(t), Op())
    p = _probs(q, k)
    if cid == "token.h2o":
        s = p.sum(2)
    else:
        s = p[:, :, -4:].sum(2)
        s = torch.stack([s[..., max(0, j - 1):j + 2].max(-1).values for j in range(t)], -1)
    s = s.view(b, hk, hq // hk, t).sum(2)
    for bi in range(b):
        for h in range(hk):
            want = _kept_by_oracle(s[bi, h].tolist(), t, 12, 2, 3)
            assert cache.layers[0].pos[bi, h].tolist() == want


def test_h2o_accumulates_decode_attention():
    """After prefill + steps at full budget, the running score of each token equals the attention
    it received from every later query (prefill and decode), recomputed independently."""
    m = _model(_spec(kv={"type": "token.h2o", "params": {"budget": 1.0}}))
    x = _tokens(1, 20)
    cache = m.make_cache()
    hooks = []
    with torch.no_grad():
        m.prefill(x[:, :8], cache)
        for i in range(8, 20):
            m.step(x[:, i:i + 1], cache)
    lc = cache.layers[0]
    # recompute layer 0's q, k from the parallel forward at the same positions
    captured = {}

    def hook(mod, inp, out):
        captured["qkv"] = out
    hooks.append(m.blocks[0].mixer.qkv.register_forward_hook(hook))
    with torch.no_grad():
        m(x)
    for h in hooks:
        h.remove()
    from blockzoo.plugins.attention.module import rotary
    qkv = captured["qkv"]
    hq, hk, d = 4, 2, 12
    q = rotary(qkv[..., :hq * d].view(1, 20, hq, d), torch.arange(20), 10000.0)
    k = rotary(qkv[..., hq * d:(hq + hk) * d].view(1, 20, hk, d), torch.arange(20), 10000.0)
    want = _probs(q, k).sum(2).view(1, hk, 2, 20).sum(2)
    torch.testing.assert_close(lc.acc.double(), want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# shared pieces
def test_select_matches_brute_force():
    g = torch.Generator().manual_seed(3)
    for seen, t, keep, sinks, recent in [(50, 50, 20, 4, 6), (90, 30, 25, 2, 5), (12, 12, 12, 4, 8)]:
        scores = torch.randn(2, 3, t, generator=g)
        # a compacted cache: sorted distinct positions including the protected ones
        pos = torch.stack([torch.cat([torch.arange(sinks), torch.sort(torch.randperm(seen - sinks - recent,
                           generator=g)[:t - sinks - recent] + sinks).values, torch.arange(seen - recent, seen)])
                           for _ in range(6)]).view(2, 3, t)
        idx = select(scores, pos, seen, keep, sinks, recent)
        for b in range(2):
            for h in range(3):
                prot = protected_mask(pos[b, h], seen, sinks, recent)
                order = sorted(range(t), key=lambda j: (not bool(prot[j]), -float(scores[b, h, j]), j))
                assert idx[b, h].tolist() == sorted(order[:keep])


def test_select_rejects_budget_below_protected():
    with pytest.raises(ValueError, match="smaller than the 6 protected"):
        select(torch.zeros(1, 1, 20), torch.arange(20).view(1, 1, 20), 20, 5, 2, 4)


def test_decode_attention_over_compacted_cache_is_dense_over_kept():
    g = torch.Generator().manual_seed(7)
    b, hq, hk, d, t = 2, 4, 2, 16, 40
    k, v = torch.randn(b, hk, t, d, generator=g), torch.randn(b, hk, t, d, generator=g)
    idx = torch.sort(torch.stack([torch.randperm(t, generator=g)[:15] for _ in range(b * hk)]).view(b, hk, 15)).values
    kk, vk = compact(idx, k, v)
    q = torch.randn(b, 1, hq, d, generator=g)
    o, p = decode_attention(q, kk, vk)
    for h in range(hk):  # each kv head has its own subset: compare per kv head group
        qs = q[:, :, 2 * h:2 * h + 2]
        want = attention_reference(qs, kk[:, h:h + 1].transpose(1, 2), vk[:, h:h + 1].transpose(1, 2), causal=False)
        torch.testing.assert_close(o[:, :, 2 * h:2 * h + 2], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p.sum(-1), torch.ones(b, hq, 1))


def test_cache_api_errors():
    m = _model(_spec())
    cache = m.make_cache(None)
    x = _tokens(1, 5)
    with pytest.raises(ValueError, match="prefilled cache"):
        m.step(x, cache)
    m.prefill(x, cache)
    with pytest.raises(ValueError, match="empty cache"):
        m.prefill(x, cache)
    with pytest.raises(ValueError, match="max_new_tokens"):
        m.generate(x, -1)
    with pytest.raises(ValueError, match="causal=False"):
        nc = _model(_spec({"type": "attention.dense", "params": {"causal": False}}))
        nc.prefill(x, nc.make_cache(None))
    with pytest.raises(ValueError, match="not a KV-cache policy"):
        make_cache(m, "attention.dense")


# ---------------------------------------------------------------------------------------------
# spec
def _err(text):
    with pytest.raises(SpecError) as err:
        load_spec(text)
    return err.value.issues[0]


BASE = "model: {d_model: 32, n_heads: 4, n_layers: 2}\n"


def test_spec_kv_unknown_policy_names_line_and_nearest():
    issue = _err(BASE + "kv:\n  type: token.snapvk\n")
    assert issue.where.line == 3 and issue.path == "kv.type"
    assert "did you mean 'token.snapkv'?" in issue.message


def test_spec_kv_wrong_slot_and_bad_params():
    issue = _err(BASE + "kv: {type: attention.dense}\n")
    assert "cannot be the kv" in issue.message and "token.h2o" in issue.message
    issue = _err(BASE + "kv: {type: token.h2o, params: {budgett: 0.5}}\n")
    assert issue.path == "kv.params.budgett" and "did you mean 'budget'?" in issue.message
    issue = _err(BASE + "kv: {type: token.snapkv, params: {pool: 4}}\n")
    assert "pool must be odd" in issue.message
    issue = _err(BASE + "kv: {type: token.h2o, params: {budget: 1.5}}\n")
    assert issue.path == "kv.params.budget"
    issue = _err(BASE + "kv: {type: token.h2o, backend: cutlass}\n")
    assert issue.path == "kv.backend" and "has no backend 'cutlass'" in issue.message


def test_spec_kv_needs_dense_mixers():
    issue = _err(BASE + "layers:\n  - {at: 1, mixer: {type: context.moc}}\nkv: {type: token.streaming}\n")
    assert issue.where.line == 4 and "layer 1 uses context.moc" in issue.message


def test_spec_kv_attention_policy_with_backend_that_does_not_materialise():
    reg = get_registry()
    added = []
    for cid in ("token.h2o", "token.streaming", "token.snapkv"):
        b = Backend(cid, "flashlike", reg.backend(cid, "reference").fn)
        b.materialises_attention = False
        reg.add_backend(b)
        added.append(cid)
    try:
        for cid in ("token.h2o", "token.snapkv"):
            issue = _err(BASE + f"kv: {{type: {cid}, backend: flashlike}}\n")
            assert issue.path == "kv.backend" and "never materialises" in issue.message
        load_spec(BASE + "kv: {type: token.streaming, backend: flashlike}\n")  # needs no attention: fine
    finally:
        for cid in added:
            del reg.backends[cid]["flashlike"]


def test_spec_without_kv_keeps_its_hash_and_kv_is_expanded():
    a = load_spec(BASE)
    assert "kv" not in a.expanded()
    b = load_spec(BASE + "kv: {type: token.snapkv}\n")
    assert b.expanded()["kv"]["params"] == SnapKVParams().model_dump(mode="json")
    assert a.spec_hash() != b.spec_hash()


def test_task_evaluates_under_the_spec_policy():
    from blockzoo.core.tasks import run_passkey
    spec = load_spec(_spec(kv={"type": "token.streaming", "params": {"budget": 0.25}}))
    out = run_passkey(lambda: build(spec), 256, {"steps": 1, "batch": 2, "seq": 64, "eval_batches": 1}, "cpu")
    # prompt of 59 tokens at 25% -> 15 kept, then 5 steps: ~ (15..19) / (59..64)
    assert 0.2 < out["passkey_kv_rel_bytes"] < 0.35
    full = run_passkey(lambda: build(load_spec(_spec())), 256, {"steps": 1, "batch": 2, "seq": 64,
                                                               "eval_batches": 1}, "cpu")
    assert "passkey_kv_rel_bytes" not in full


def test_policy_trials_reuse_the_full_cache_training(monkeypatch):
    """Specs that differ only in kv: train once per process (same init, same config); a different
    init trains again."""
    from blockzoo.core import tasks
    calls = []
    real = tasks._train_steps

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(tasks, "_train_steps", counting)
    monkeypatch.setattr(tasks, "_TRAINED", type(tasks._TRAINED)())
    cfg = {"steps": 2, "batch": 2, "seq": 64, "eval_batches": 1}

    def make(kv, seed=0):
        spec = load_spec(_spec(kv=kv))

        def f():
            torch.manual_seed(seed)
            return build(spec)
        return f
    full = tasks.run_passkey(make(None), 256, cfg, "cpu")
    pol = tasks.run_passkey(make({"type": "token.h2o", "params": {"budget": 1.0}}), 256, cfg, "cpu")
    assert len(calls) == 1
    assert pol["passkey_train_loss"] == full["passkey_train_loss"]
    assert pol["passkey_accuracy"] == full["passkey_accuracy"]  # budget 1.0 == the full cache
    tasks.run_passkey(make({"type": "token.h2o"}, seed=1), 256, cfg, "cpu")
    assert len(calls) == 2


def test_attention_cost_reports_the_policy_cache():
    from blockzoo.core.trial import attention_cost
    full = attention_cost(load_spec(_spec()), 100)
    half = attention_cost(load_spec(_spec(kv={"type": "token.snapkv", "params": {"budget": 0.25}})), 100)
    assert full["rel_kv_bytes"] == 1.0 and half["rel_kv_bytes"] == 0.25


# ---------------------------------------------------------------------------------------------
# cache storage: in-place append and in-place eviction (core/cache.py)
def _layer(b=2, hk=3, t=40, d=5, seed=0, acc=True):
    from blockzoo.core.cache import LayerCache
    g = torch.Generator().manual_seed(seed)
    pos = torch.stack([torch.randperm(t, generator=g) for _ in range(b * hk)]).view(b, hk, t)
    k = pos[..., None].float() + torch.rand(b, hk, t, d, generator=g)  # row carries its position
    return LayerCache(k=k, v=-k, pos=pos, acc=torch.rand(b, hk, t, generator=g) if acc else None, seen=t)


def test_append_writes_in_place_and_equals_concatenation():
    lc = _layer()
    k0, v0, p0, a0 = lc.k.clone(), lc.v.clone(), lc.pos.clone(), lc.acc.clone()
    news = [torch.randn(2, 3, t, 5) for t in (1, 1, 3, 1)]
    ptrs = set()
    for i, x in enumerate(news):
        pos = torch.full((2, 3, x.shape[2]), 100 + i)
        lc.append(x, 2 * x, pos)
        ptrs.add(lc.k.data_ptr())
        k0, v0 = torch.cat([k0, x], 2), torch.cat([v0, 2 * x], 2)
        p0, a0 = torch.cat([p0, pos], 2), torch.cat([a0, torch.zeros(2, 3, x.shape[2])], 2)
        assert torch.equal(lc.k, k0) and torch.equal(lc.v, v0) and torch.equal(lc.pos, p0)
        assert torch.equal(lc.acc, a0)
    assert len(ptrs) == 1  # one buffer, grown once (from the assigned tensor), then written in place
    lc.k = lc.k.clone()  # assigned from outside: the next append starts a new buffer, same values
    lc.append(news[0], news[0], torch.zeros(2, 3, 1, dtype=torch.long))
    assert torch.equal(lc.k, torch.cat([k0, news[0]], 2))


@pytest.mark.parametrize("e", [1, 2, 5, 8])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("order", ["ascending", "descending", "shuffled"])
def test_fill_holes_drops_exactly_the_given_slots(e, seed, order):
    """Any order of the dropped slots (a tail drop listed before a drop outside the tail once
    shared a scatter index with it: CUDA kept either value, and the H100 lost a recent token)."""
    from blockzoo.core.cache import fill_holes
    lc = _layer(seed=seed)
    n = lc.size
    g = torch.Generator().manual_seed(100 + seed)
    # drops anywhere, including inside the last e slots (some rows drop only tail slots)
    drop = torch.stack([torch.randperm(n, generator=g)[:e] for _ in range(6)]).view(2, 3, e)
    drop[0, 0] = torch.arange(n - e, n)
    drop[0, 1] = torch.cat([torch.arange(n - e // 2, n), torch.arange(e - e // 2)])  # tail and head slots
    drop = torch.sort(drop, -1, descending=order == "descending").values
    if order == "shuffled":
        drop = drop.gather(-1, torch.stack([torch.randperm(e, generator=g) for _ in range(6)]).view(2, 3, e))
    before = {(b, h, int(p)): (lc.k[b, h, j].clone(), float(lc.acc[b, h, j]))
              for b in range(2) for h in range(3) for j, p in enumerate(lc.pos[b, h])}
    gone = {(b, h, int(lc.pos[b, h, j])) for b in range(2) for h in range(3) for j in drop[b, h]}
    fill_holes(lc, drop)
    assert lc.size == n - e and lc.k.shape[2] == lc.v.shape[2] == lc.pos.shape[2] == lc.acc.shape[2] == n - e
    after = {(b, h, int(p)) for b in range(2) for h in range(3) for p in lc.pos[b, h]}
    assert after == set(before) - gone
    for b in range(2):
        for h in range(3):
            for j, p in enumerate(lc.pos[b, h]):  # every kept row moved with its position
                k, a = before[(b, h, int(p))]
                assert torch.equal(lc.k[b, h, j], k) and torch.equal(lc.v[b, h, j], -k)
                assert float(lc.acc[b, h, j]) == a


def test_selection_ties_go_to_the_older_token_in_any_slot_order():
    from blockzoo.kernels.select import drop_few, select_topk
    from blockzoo.plugins.token.reference import select
    g = torch.Generator().manual_seed(3)
    t, keep = 30, 21
    scores = torch.randint(0, 4, (2, 2, t), generator=g).float()  # many ties
    pos = torch.arange(t).expand(2, 2, t)
    want = select(scores, pos, t, keep, 2, 3)  # ordered cache
    perm = torch.stack([torch.randperm(t, generator=g) for _ in range(4)]).view(2, 2, t)
    s_p, pos_p = scores.gather(-1, perm), pos.gather(-1, perm)  # the same tokens, shuffled slots
    for fn in (select, select_topk):
        got = pos_p.gather(-1, fn(s_p, pos_p, t, keep, 2, 3))
        assert torch.equal(torch.sort(got, -1).values, want)
    dropped = pos_p.gather(-1, drop_few(s_p, pos_p, t, keep, 2, 3))
    for b in range(2):
        for h in range(2):
            assert set(dropped[b, h].tolist()) == set(range(t)) - set(want[b, h].tolist())
