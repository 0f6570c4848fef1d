"""token.evict (learned retention gate) and token.mixeddim (per-token kept dims), plus the
properties every KV-cache policy shares:

- at a 100% budget every policy generates exactly what decoding without a policy generates;
- token.evict keeps exactly its budget and its protected tokens, and what it keeps at prefill is
  what an independent evaluation of the gate (float64) ranks highest;
- token.mixeddim (zeroed layout) holds exactly ``keep(seen) * D`` K/V elements per (layer, batch, kv
  head) after every step, protected tokens whole, dropped channels zero; its allocator against
  brute force (the packed layout and its kernels: tests/test_kv_mixeddim.py);
- distilled gates beat an untrained gate and StreamingLLM on the teacher-forced KL at 25%;
- gate files (save/load, errors), ``blockzoo kv distill``, spec validation, ``blockzoo info``.

The scorer ops against their fp32 evaluation (forward and gradients): tests/test_matrix.py.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from blockzoo.core.cache import KVCache, decode_logits, make_cache
from blockzoo.core.composer import build
from blockzoo.core.spec import SpecError, load_spec
from blockzoo.plugins.attention.reference import attention_reference
from blockzoo.plugins.token.evict import EvictGates, distill
from blockzoo.plugins.token.module import make_policy
from blockzoo.plugins.token.params import EvictParams, StreamingParams
from blockzoo.plugins.token.reference import allocate_dims, running_min
from blockzoo.registry import Backend, get_registry

ALL = ("token.streaming", "token.h2o", "token.snapkv", "token.evict", "token.mixeddim")


def _spec(kv=None, n_kv_heads=2, rope=True, layers=2):
    s = {"model": {"d_model": 48, "n_heads": 4, "n_kv_heads": n_kv_heads, "n_layers": layers, "max_seq": 128,
                   "backend": "reference", "rope": rope},
         "block": {"mixer": {"type": "attention.dense"}}}
    if kv is not None:
        s["kv"] = kv
    return s


def _model(spec, seed=0):
    torch.manual_seed(seed)
    m = build(spec, training=False).eval()
    with torch.no_grad():  # non-trivial attention
        for blk in m.blocks:
            blk.mixer.qkv.weight.mul_(4.0)
    return m


def _tokens(b, t, seed=1):
    return torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def gate_file(tmp_path):
    """Untrained gates for _spec()'s shapes (2 layers, 2 kv heads, head dim 12), seeded."""
    path = tmp_path / "gates.pt"
    EvictGates(2, 2, 12, hidden=16, seed=3).save(path)
    return str(path)


def _kv(cid, gate_file, **params):
    if cid == "token.evict":
        params["gate_path"] = gate_file
    return {"type": cid, "params": params}


# ---------------------------------------------------------------------------------------------
# 100% budget == no policy
@pytest.mark.parametrize("cid", ALL)
def test_full_budget_generates_exactly_like_no_policy(cid, gate_file):
    m = _model(_spec(_kv(cid, gate_file, budget=1.0)))
    x = _tokens(2, 9)
    want = m.generate(x, 14, policy=None)
    got = m.generate(x, 14)  # the spec's policy
    assert torch.equal(got, want)
    with torch.no_grad():
        ref = m(want)
    logits, rel = decode_logits(m, want, 5)
    assert rel == 1.0
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# token.evict
def _logbeta64(k, v, w1, b1, w2, b2):
    """Independent float64 gate: k, v [T, D] of one kv head; its weights w1 [F, E], ..."""
    k, v = k.double(), v.double()
    half = k.shape[-1] // 2
    pn = torch.sqrt(k[:, :half] ** 2 + k[:, half:2 * half] ** 2 + 1e-12)
    f = torch.cat([v, pn, k[:, 2 * half:].abs()], -1)
    h = f @ w1.double() + b1.double()
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    logit = h @ w2.double() + b2.double()
    return -torch.log1p(torch.exp(-logit))


@pytest.mark.parametrize("d", [16, 15])
def test_evict_prefill_keeps_protected_and_top_gate_scores(d):
    gates = EvictGates(1, 2, d, hidden=6, seed=11).requires_grad_(False)
    with torch.no_grad():  # spread the betas so the ranking is not a recency tie-break
        gates.b2.fill_(0.0)
        gates.w2.mul_(3.0)
    params = {"budget_tokens": 12, "sinks": 2, "recent": 3}
    pol = make_policy(load_spec(_spec({"type": "token.evict", "params": params})).kv)
    pol.gates = gates
    b, t, hq, hk = 2, 30, 4, 2
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(b, t, h, d, generator=g) for h in (hq, hk, hk))
    cache = KVCache(1, pol)

    class Op:
        kwargs = {"causal": True, "scale": None}

        def __call__(self, q, k, v):
            return attention_reference(q, k, v)
    cache.attend(0, q, k, v, torch.arange(t), Op())
    for bi in range(b):
        for h in range(hk):
            lb = _logbeta64(k[bi, :, h], v[bi, :, h], *(p[0, h] for p in (gates.w1, gates.b1, gates.w2, gates.b2)))
            score = [(t - 1 - j) * float(lb[j]) for j in range(t)]
            prot = [j for j in range(t) if j < 2 or j >= t - 3]
            rest = sorted((j for j in range(t) if j not in prot), key=lambda j: (-score[j], j))
            assert cache.layers[0].pos[bi, h].tolist() == sorted(prot + rest[:12 - len(prot)])


@pytest.mark.parametrize("budget", [0.25, 0.5, {"budget_tokens": 15}])
def test_evict_keeps_exactly_budget_and_protected_while_decoding(budget, gate_file):
    params = dict(budget) if isinstance(budget, dict) else {"budget": budget}
    params.update(sinks=3, recent=5)
    m = _model(_spec(_kv("token.evict", gate_file, **params)))
    cache = make_cache(m)
    x = _tokens(2, 44)
    with torch.no_grad():
        m.prefill(x[:, :20], cache)
        for i in range(20, 45):
            if i > 20:
                m.step(x[:, i - 1:i], cache)
            seen = cache.seen
            want = min(seen, max(math.ceil(seen * params["budget"]) if "budget" in params
                                 else params["budget_tokens"], 8))
            for lc in cache.layers:
                assert lc.k.shape[2] == lc.v.shape[2] == lc.pos.shape[2] == want
                assert bool((lc.pos[..., 1:] > lc.pos[..., :-1]).all())
                for p in list(range(3)) + list(range(seen - 5, seen)):
                    assert bool((lc.pos == p).any(-1).all()), f"protected {p} evicted at seen={seen}"
    assert cache.kept_fraction() == pytest.approx(want / seen)


def test_evict_step_scores_decay_with_age(gate_file):
    """The same token's score falls as it ages (beta < 1): (now - pos) * log(beta)."""
    m = _model(_spec(_kv("token.evict", gate_file, budget=1.0)))
    cache = make_cache(m)
    x = _tokens(1, 12)
    with torch.no_grad():
        m.prefill(x[:, :6], cache)
        pol, lc = cache.policy, cache.layers[0]
        s1 = pol.step_scores(lc, None, layer=0)
        m.step(x[:, 6:7], cache)
        s2 = pol.step_scores(lc, None, layer=0)
    lb = s2[..., :6] - s1                     # one more step of age: log(beta) per token
    assert bool((lb < 0).all())
    age = (lc.seen - 1 - lc.pos[..., :6]).float()
    torch.testing.assert_close(s2[..., :6], age * lb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s1, (age - 1) * lb, rtol=1e-5, atol=1e-5)


def test_distilled_gates_beat_untrained_gate_and_streaming():
    """A random 2-layer model (no RoPE) on mqar-like inputs (key/value pairs, then filler): at a
    25% budget the distilled gates' teacher-forced KL to the dense model is lower than with the
    untrained gates and with StreamingLLM."""
    from blockzoo.core.tasks import mqar_batch
    m = _model(_spec(rope=False))
    t, prefill = 64, 16

    def sample(g):
        return mqar_batch(g, 8, t, 6, 256)[0], None
    x = sample(torch.Generator().manual_seed(99))[0][:4]
    with torch.no_grad():
        want = F.log_softmax(m(x).float(), -1)[:, prefill:]

    params = EvictParams(budget=0.25, sinks=2, recent=4)

    def kl(policy):
        got, rel = decode_logits(m, x, prefill, policy=policy)
        assert rel < 0.3
        return float(F.kl_div(F.log_softmax(got.float(), -1)[:, prefill:], want, log_target=True,
                              reduction="none").sum(-1).mean())

    def evict(gates):
        pol = make_policy("token.evict")
        pol.params, pol.gates = params, gates
        return pol
    streaming = make_policy("token.streaming")
    streaming.params = StreamingParams(budget=0.25, sinks=2, recent=4)
    untrained = kl(evict(EvictGates.for_model(m)))
    trained_gates = distill(m, 25, params=params, sample=sample, lr=1e-2, penalty=0.1)
    assert len(trained_gates.history) == 25
    trained = kl(evict(trained_gates))
    base = kl(streaming)
    assert trained < 0.95 * untrained and trained < 0.95 * base, (trained, untrained, base)


def test_gate_file_round_trip_and_errors(tmp_path, gate_file):
    m = _model(_spec(_kv("token.evict", gate_file, budget=0.5)))
    loaded = EvictGates.load(gate_file)
    fresh = EvictGates(2, 2, 12, hidden=16, seed=3)
    for a, b in zip(loaded.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)
    x = _tokens(1, 30)
    a, _ = decode_logits(m, x, 10)
    pol = make_policy(m.spec.kv)
    pol.gates = fresh
    b, _ = decode_logits(m, x, 10, policy=pol)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"\(layers, kv heads, head dim\) \(3, 2, 12\)"):
        EvictGates(3, 2, 12).check_model(m)
    with pytest.raises(FileNotFoundError, match="blockzoo kv distill"):
        EvictGates.load(tmp_path / "nope.pt")
    torch.save({"x": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a token.evict gate file"):
        EvictGates.load(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="no gates"):
        make_cache(_model(_spec({"type": "token.evict", "params": {"distill_steps": 0}})))


def test_cli_kv_distill_writes_loadable_gates(tmp_path):
    from blockzoo.cli import main
    spec = tmp_path / "m.yaml"
    spec.write_text("model: {d_model: 32, n_heads: 4, n_kv_heads: 2, n_layers: 2, backend: reference}\n"
                    "kv: {type: token.evict, params: {hidden: 4}}\n")
    out = tmp_path / "g.pt"
    assert main(["kv", "distill", str(spec), "--budget", "0.25", "--steps", "2", "--seq", "32", "--batch", "2",
                 "--out", str(out)]) == 0
    g = EvictGates.load(out)
    assert g.shape == (2, 2, 8, 4) and g.meta["budget"] == 0.25 and g.meta["steps"] == 2
    assert main(["kv", "distill", str(tmp_path / "missing.yaml"), "--out", str(out)]) == 2


# ---------------------------------------------------------------------------------------------
# token.mixeddim
@pytest.mark.parametrize("budget", [0.25, 0.5, {"budget_tokens": 13}])
def test_mixeddim_keeps_exactly_its_element_budget(budget):
    params = dict(budget) if isinstance(budget, dict) else {"budget": budget}
    params.update(sinks=3, recent=5, layout="zeroed")  # the packed layout: tests/test_kv_mixeddim.py
    m = _model(_spec({"type": "token.mixeddim", "params": params}))
    cache = make_cache(m)
    x = _tokens(2, 50)
    d = 12
    with torch.no_grad():
        m.prefill(x[:, :22], cache)
        for i in range(22, 51):
            if i > 22:
                m.step(x[:, i - 1:i], cache)
            seen = cache.seen
            keep = min(seen, max(math.ceil(seen * params["budget"]) if "budget" in params
                                 else params["budget_tokens"], 8))
            held = 0.0
            for lc in cache.layers:
                dims = lc.extra["dims"]
                assert bool((dims.sum(-1) == keep * d).all()), (seen, dims.sum(-1), keep * d)
                assert bool((dims >= 1).all()) and bool((dims <= d).all())
                assert bool((lc.pos[..., 1:] > lc.pos[..., :-1]).all())
                for p in list(range(3)) + list(range(seen - 5, seen)):
                    at = lc.pos == p
                    assert bool(at.any(-1).all()), f"protected {p} evicted at seen={seen}"
                    assert bool((dims[at] == d).all()), f"protected {p} lost dims at seen={seen}"
                for t, rank in ((lc.k, lc.extra["k_rank"]), (lc.v, lc.extra["v_rank"])):
                    dropped = rank[:, :, None, :] >= dims[..., None]
                    assert bool((t[dropped] == 0).all())
                held += float(dims.sum()) / (2 * 2 * d)
            assert cache.kept_fraction() == pytest.approx(held / (2 * seen))


def test_mixeddim_attention_uses_the_reduced_cache():
    """After compression, a step's output is dense attention over the kept, channel-zeroed keys
    and values (recomputed here from the cache contents)."""
    m = _model(_spec({"type": "token.mixeddim", "params": {"budget": 0.3, "sinks": 2, "recent": 3,
                                                      "layout": "zeroed"}}, layers=1))
    cache = make_cache(m)
    x = _tokens(1, 30)
    captured = {}
    mixer = m.blocks[0].mixer
    hook = mixer.out.register_forward_hook(lambda mod, inp, out: captured.update(o=inp[0]))
    try:
        with torch.no_grad():
            m.prefill(x[:, :20], cache)
            lc = cache.layers[0]
            k0, v0 = lc.k.clone(), lc.v.clone()
            qkv = {}
            h2 = mixer.qkv.register_forward_hook(lambda mod, inp, out: qkv.update(out=out))
            m.step(x[:, 20:21], cache)
            h2.remove()
    finally:
        hook.remove()
    assert int(lc.extra["dims"].sum(-1).max()) < lc.size * 12  # some tokens really are reduced
    from blockzoo.plugins.attention.module import rotary
    out = qkv["out"]
    q = rotary(out[..., :48].view(1, 1, 4, 12), torch.tensor([20]), 10000.0)
    k = torch.cat([k0, rotary(out[..., 48:72].view(1, 1, 2, 12), torch.tensor([20]), 10000.0).transpose(1, 2)], 2)
    v = torch.cat([v0, out[..., 72:].view(1, 1, 2, 12).transpose(1, 2)], 2)
    want = attention_reference(q, k.transpose(1, 2), v.transpose(1, 2), causal=False)
    torch.testing.assert_close(captured["o"], want.reshape(1, 1, 48), rtol=1e-5, atol=1e-6)


def _gains(scores, k, v, k_rank, v_rank):
    """Independent per-rank gains of one row: score * (share of k^2 + share of v^2) / 2, made
    non-increasing along the ranks."""
    t, d = k.shape
    out = torch.zeros(t, d, dtype=torch.float64)
    for j in range(t):
        ko = [float(k[j, c]) ** 2 for c in sorted(range(d), key=lambda c: int(k_rank[c]))]
        vo = [float(v[j, c]) ** 2 for c in sorted(range(d), key=lambda c: int(v_rank[c]))]
        run = math.inf
        for r in range(d):
            gnew = float(scores[j]) * 0.5 * (ko[r] / max(sum(ko), 1e-30) + vo[r] / max(sum(vo), 1e-30))
            run = min(run, gnew)
            out[j, r] = run
    return out


def test_allocate_dims_matches_brute_force_on_one_row():
    g = torch.Generator().manual_seed(2)
    t, d = 5, 3
    for trial in range(6):
        k = torch.randn(1, 1, t, d, generator=g, dtype=torch.float64)
        v = torch.randn(1, 1, t, d, generator=g, dtype=torch.float64)
        scores = torch.rand(1, 1, t, generator=g, dtype=torch.float64)
        caps = torch.randint(1, d + 1, (1, 1, t), generator=g)
        prot = torch.zeros(1, 1, t, dtype=torch.bool)
        prot[..., 0] = True
        caps[..., 0] = d
        k_rank = torch.randperm(d, generator=g).view(1, 1, d)
        v_rank = torch.randperm(d, generator=g).view(1, 1, d)
        budget = int(d + torch.randint(1, int(caps[0, 0, 1:].sum()), (1,), generator=g))
        dims = allocate_dims(scores, k, v, caps, prot, k_rank, v_rank, budget)[0, 0]
        gains = _gains(scores[0, 0], k[0, 0], v[0, 0], k_rank[0, 0], v_rank[0, 0])
        best = max(sum(float(gains[j, :c[j - 1]].sum()) for j in range(1, t))
                   for c in itertools.product(*(range(int(caps[0, 0, j]) + 1) for j in range(1, t)))
                   if sum(c) == budget - d)
        assert int(dims.sum()) == budget and int(dims[0]) == d
        assert bool((dims <= caps[0, 0]).all())
        assert sum(float(gains[j, :dims[j]].sum()) for j in range(1, t)) == pytest.approx(best), trial


def test_allocate_dims_rows_keep_the_same_token_count():
    g = torch.Generator().manual_seed(4)
    b, hk, t, d = 2, 3, 20, 8
    k, v = torch.randn(b, hk, t, d, generator=g), torch.randn(b, hk, t, d, generator=g)
    scores = torch.rand(b, hk, t, generator=g) ** 4  # skewed: rows differ in how many tokens they want
    caps = torch.full((b, hk, t), d)
    prot = torch.zeros(b, hk, t, dtype=torch.bool)
    prot[..., :2] = True
    prot[..., -2:] = True
    rank = torch.stack([torch.randperm(d, generator=g) for _ in range(b * hk)]).view(b, hk, d)
    dims = allocate_dims(scores, k, v, caps, prot, rank, rank, 7 * d)
    assert bool((dims.sum(-1) == 7 * d).all())
    n = (dims > 0).sum(-1)
    assert bool((n == n.flatten()[0]).all())
    assert bool((dims[prot] == d).all())
    with pytest.raises(ValueError, match="smaller than the protected"):
        allocate_dims(scores, k, v, caps, prot, rank, rank, 3 * d)


# ---------------------------------------------------------------------------------------------
# spec, registry
BASE = "model: {d_model: 32, n_heads: 4, n_layers: 2}\n"


def test_spec_rejects_mixeddim_on_a_backend_that_never_materialises_attention():
    reg = get_registry()
    for cid in ("token.mixeddim", "token.evict"):
        b = Backend(cid, "flashlike", reg.backend(cid, "reference").fn)
        b.materialises_attention = False
        reg.add_backend(b)
    try:
        with pytest.raises(SpecError) as err:
            load_spec(BASE + "kv: {type: token.mixeddim, backend: flashlike}\n")
        issue = err.value.issues[0]
        assert issue.path == "kv.backend" and "never materialises" in issue.message
        load_spec(BASE + "kv: {type: token.evict, backend: flashlike}\n")  # the gate needs no attention
    finally:
        for cid in ("token.mixeddim", "token.evict"):
            del reg.backends[cid]["flashlike"]
    with pytest.raises(SpecError) as err:
        load_spec(BASE + "kv: {type: token.evict, params: {hiden: 4}}\n")
    assert "did you mean 'hidden'?" in err.value.issues[0].message


def test_info_lists_the_policies_with_their_backends():
    from blockzoo.cli import info_data
    comps = {c["id"]: c for c in info_data()["components"]}
    for cid in ALL:
        assert comps[cid]["slot"] == "kv" and "reference" in [b["name"] for b in comps[cid]["backends"]]
        assert comps[cid]["source"]
    assert "arXiv 2603.20616" in comps["token.mixeddim"]["source"]
    assert "press" in comps["token.evict"]["source"]


def test_report_renders_the_retention_table(tmp_path):
    import json

    from blockzoo.core.report import render
    rows = []
    trials = [("a", {"kv": {"type": "token.h2o"}, "kv.params.budget": 0.25}, 0.5, 0.30),
              ("b", {"kv": {"type": "token.h2o"}, "kv.params.budget": 0.5}, 0.7, 0.55),
              ("c", {"kv.type": "token.streaming", "kv.params.budget": 1.0}, 0.9, 1.0),
              ("d", {"kv": {"type": "token.mixeddim", "params": {"budget": 0.25}}}, 0.4, 0.27)]
    for key, axes, acc, rel in trials:
        common = {"sweep": "kv", "trial": key, "label": key, "axes": axes, "device": "cpu"}
        rows += [{**common, "metric": "mqar_accuracy", "value": acc},
                 {**common, "metric": "mqar_kv_rel_bytes", "value": rel},
                 {**common, "metric": "status", "status": "ok", "value": 1.0}]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    render(tmp_path)
    md = (tmp_path / "report.md").read_text()
    table = md.split("## Retention table", 1)[1]
    assert "| policy | budget | mqar acc ↑ | KV ×full |" in table and "passkey" not in table
    assert table.index("| token.h2o | 0.25 | 0.500 | 0.300 |") < table.index("| token.h2o | 0.5 | 0.700 | 0.550 |")
    assert "| token.mixeddim | 0.25 | 0.400 | 0.270 |" in table
    assert table.split("![", 1)[0].rstrip().endswith("| full cache | 1 | 0.900 | 1.000 |")  # the last row
    assert "Retention table" in (tmp_path / "report.html").read_text()
    # the plot: one mqar panel, a line per policy over its budgets, sorted by memory held
    from blockzoo.core.report import retention_series
    from blockzoo.core.store import read_rows, wide
    series = retention_series(wide(read_rows(tmp_path)))
    assert list(series) == ["mqar_accuracy"]
    assert series["mqar_accuracy"] == {"token.h2o": [(0.30, 0.5), (0.55, 0.7)], "full cache": [(1.0, 0.9)],
                                       "token.mixeddim": [(0.27, 0.4)]}
    assert "![quality vs KV memory held](retention.png)" in md and "retention.png" in (tmp_path / "report.html").read_text()
    assert (tmp_path / "retention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_without_kv_policies_has_no_retention_plot(tmp_path):
    import json

    from blockzoo.core.report import render
    rows = []
    for key, acc in (("a", 0.5), ("b", 0.6)):
        common = {"sweep": "s", "trial": key, "label": key, "axes": {"block.mixer": key}, "device": "cpu"}
        rows += [{**common, "metric": "mqar_accuracy", "value": acc},
                 {**common, "metric": "status", "status": "ok", "value": 1.0}]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    written = render(tmp_path)
    assert "retention.png" not in written and not (tmp_path / "retention.png").exists()
    assert "Retention table" not in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 13, 128])
def test_running_min_equals_cummin(n):
    """token.mixeddim's allocator takes the running minimum of the gains along the ranks with a
    log-step scan (torch's cummin is slow on CUDA for a short last dim): the same values, bit for
    bit, with ties, -inf and +inf in the input."""
    g = torch.Generator().manual_seed(1000 + n)
    x = torch.randn(37, 5, n, generator=g)
    x = torch.where(torch.rand(x.shape, generator=g) < 0.2, x.round(), x)          # ties
    x = x.masked_fill(torch.rand(x.shape, generator=g) < 0.1, float("-inf"))
    x = x.masked_fill(torch.rand(x.shape, generator=g) < 0.1, float("inf"))
    got = running_min(x)
    assert torch.equal(got, torch.cummin(x, -1).values)
    assert got.shape == x.shape and got.dtype == x.dtype

