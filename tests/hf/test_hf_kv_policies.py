"""blockzoo KV-cache policies through the transformers cache API (``compat.hf.make_cache``), on
the tiny randomly initialised Llama of test_hf_adapter.py (nothing downloaded).

- budget 1.0 evicts nothing: ``generate`` gives the tokens and logits of the model without a
  policy, for every policy;
- StreamingLLM at budget 0.5: every cached decoding step's logits equal a full forward of the
  final sequence (no cache) under an explicit mask that shows each query exactly the sinks, the
  most recent tokens of its budget and itself -- an oracle that shares no code with the cache;
- H2O and SnapKV at budget 0.5: layer 0's kept positions (layer 0's keys do not depend on
  eviction) equal those of an independent simulation of the policy from the full sequence's
  layer-0 attention probabilities;
- the cache holds exactly the budget after every forward, protected tokens included, positions
  continue from the tokens seen (RoPE), and the refusals say why.
"""

import math

import pytest

transformers = pytest.importorskip("transformers", minversion="4.56")

import torch  # noqa: E402

from blockzoo.compat.hf import make_cache, use_blockzoo_attention  # noqa: E402
from blockzoo.core.spec import ComponentRef  # noqa: E402
from blockzoo.registry import Backend, RegistryError, get_registry  # noqa: E402

VOCAB = 97


# the model and helpers of test_hf_adapter.py (pytest runs with --import-mode=importlib, so test
# modules do not import each other)
def tiny_llama(seed=0, dtype=torch.float32, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               attention_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).to(dtype).eval()
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    return model


def prompt(b=2, t=19, seed=1):
    return torch.randint(3, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def with_impl(model, impl):
    model.set_attn_implementation(impl)
    assert model.config._attn_implementation == impl
    return model


@torch.no_grad()
def greedy(model, ids, new=8, cache=None):
    out = model.generate(ids, max_new_tokens=new, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, past_key_values=cache)
    assert out.sequences.shape == (ids.shape[0], ids.shape[1] + new)
    return out.sequences, torch.stack(out.logits, dim=1)  # [B, new, V]


NEEDS_PROBS = ("token.h2o", "token.snapkv")
POLICIES = ("token.streaming",) + NEEDS_PROBS


def keep(seen, budget=0.5, sinks=4, recent=8):
    return min(seen, max(math.ceil(round(seen * budget, 9)), sinks + recent))


@pytest.mark.parametrize("cid,impl", [("token.streaming", "sdpa"), ("token.streaming", "eager"),
                                      ("token.h2o", "eager"), ("token.snapkv", "eager")])
@torch.no_grad()
def test_full_budget_generates_what_the_model_does_without_a_policy(cid, impl):
    ids = prompt(t=31)
    ref_seq, ref_logits = greedy(with_impl(tiny_llama(), impl), ids, new=12)
    model = with_impl(tiny_llama(), impl)
    cache = make_cache(cid, model, budget=1.0)
    seq, logits = greedy(model, ids, new=12, cache=cache)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert cache.kept_tokens() == cache.full_tokens() == 2 * (31 + 11)
    # the same policy at half the budget changes the logits: the cache is really in the loop
    model = with_impl(tiny_llama(), impl)
    half_logits = greedy(model, ids, new=12, cache=make_cache(cid, model, budget=0.5))[1]
    assert (half_logits[:, 1:] - ref_logits[:, 1:]).abs().max() > 1e-3
    torch.testing.assert_close(half_logits[:, 0], ref_logits[:, 0], rtol=1e-5, atol=1e-5)  # prefill: whole prompt


def streaming_mask(total, prompt_len, budget, sinks, recent, dtype):
    """Additive [1, 1, T, T] mask: prompt rows causal; a decoded row p sees the tokens a
    StreamingLLM cache keeps after p tokens (sinks + the most recent) and itself."""
    allowed = torch.zeros(total, total, dtype=torch.bool)
    for p in range(total):
        if p < prompt_len:
            allowed[p, :p + 1] = True
            continue
        k = keep(p, budget, sinks, recent)
        allowed[p, :sinks] = True
        allowed[p, p - (k - sinks):p + 1] = True
    return torch.zeros(1, 1, total, total, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@torch.no_grad()
def test_streaming_steps_equal_full_forward_under_the_kept_mask(impl):
    ids = prompt(t=37, seed=4)
    model = with_impl(tiny_llama(seed=2), impl)
    budget, sinks, recent = 0.5, 3, 5
    seq, logits = greedy(model, ids, new=14, cache=make_cache("token.streaming", model, budget=budget,
                                                             sinks=sinks, recent=recent))
    ref = with_impl(tiny_llama(seed=2), "eager")
    mask = streaming_mask(seq.shape[1], ids.shape[1], budget, sinks, recent, torch.float32)
    full = ref(seq, attention_mask=mask.expand(seq.shape[0], 1, -1, -1), use_cache=False).logits
    torch.testing.assert_close(logits, full[:, ids.shape[1] - 1:-1], rtol=1e-4, atol=1e-4)
    causal = ref(seq, use_cache=False).logits[:, ids.shape[1] - 1:-1]
    assert (causal - logits).abs().max() > 1e-3  # the mask matters (eviction happened)


def _evict(kept, seen, score, budget, sinks, recent):
    k = keep(seen, budget, sinks, recent)
    prot = [j for j in kept if j < sinks or j >= seen - recent]
    rest = sorted((j for j in kept if j not in prot), key=lambda j: (-score[j], j))
    return sorted(prot + rest[:k - len(prot)])


def simulate_layer0(cid, probs, prompt_len, budget, sinks, recent, window=8, pool=5):
    """Kept positions per (batch, kv head) of layer 0, simulated from the full causal attention
    probabilities [B, Hq, T, T] of layer 0 (a step's attention over a subset is the full row
    renormalised on the subset). Ties broken towards the older token, as the selector does."""
    b, hq, total, _ = probs.shape
    hk = 2
    grp = hq // hk
    out = {}
    for bi in range(b):
        for h in range(hk):
            heads = range(h * grp, (h + 1) * grp)
            p0 = probs[bi, :, :prompt_len, :prompt_len]
            if cid == "token.h2o":
                score = {j: float(sum(p0[qh, :, j].sum() for qh in heads)) for j in range(prompt_len)}
            else:  # snapkv: window queries summed, max-pooled per query head, summed over the group
                w = min(window, prompt_len)
                per_head = [p0[qh, -w:, :].sum(0) for qh in heads]
                pooled = [torch.nn.functional.max_pool1d(r[None, None], pool, 1, pool // 2)[0, 0] for r in per_head]
                score = {j: float(sum(r[j] for r in pooled)) for j in range(prompt_len)}

            kept = _evict(list(range(prompt_len)), prompt_len, score, budget, sinks, recent)
            for p in range(prompt_len, total - 1):  # the last token is generated, never fed
                keys = kept + [p]
                if cid == "token.h2o":
                    score[p] = 0.0
                    for qh in heads:
                        row = probs[bi, qh, p, keys]
                        for j, v in zip(keys, (row / row.sum()).tolist(), strict=True):
                            score[j] += v
                    kept = _evict(keys, p + 1, score, budget, sinks, recent)
                else:
                    kept = keys  # snapkv: compress the prompt only
            out[bi, h] = kept
    return out


@pytest.mark.parametrize("cid", NEEDS_PROBS)
@torch.no_grad()
def test_h2o_and_snapkv_keep_what_the_policy_selects(cid):
    ids = prompt(t=33, seed=6)
    budget, sinks, recent = 0.5, 2, 4
    model = with_impl(tiny_llama(seed=3, dtype=torch.float64), "eager")
    cache = make_cache(cid, model, budget=budget, sinks=sinks, recent=recent)
    seq, _ = greedy(model, ids, new=9, cache=cache)
    ref = with_impl(tiny_llama(seed=3, dtype=torch.float64), "eager")
    probs = ref(seq, use_cache=False, output_attentions=True).attentions[0]
    want = simulate_layer0(cid, probs, ids.shape[1], budget, sinks, recent)
    got = cache.layers[0].pos
    for (bi, h), kept in want.items():
        assert got[bi, h].tolist() == kept, (bi, h)
    # the test can fail: the policy keeps middle tokens that StreamingLLM would have evicted
    seen, plen = seq.shape[1] - 1, ids.shape[1]
    if cid == "token.h2o":
        size = keep(seen, budget, sinks, recent)
        first_recent = seen - (size - sinks)
    else:  # snapkv compresses the prompt, then appends
        size = keep(plen, budget, sinks, recent) + seen - plen
        first_recent = plen - (keep(plen, budget, sinks, recent) - sinks)
    assert all(len(kept) == size for kept in want.values())
    assert any(sinks <= j < first_recent for kept in want.values() for j in kept)


@pytest.mark.parametrize("cid,impl", [("token.streaming", "sdpa"), ("token.h2o", "eager"), ("token.snapkv", "eager")])
@torch.no_grad()
def test_cache_holds_exactly_the_budget_with_protected_tokens(cid, impl):
    model = with_impl(tiny_llama(), impl)
    sinks, recent = 4, 8
    cache = make_cache(cid, model, budget=0.5, sinks=sinks, recent=recent)
    ids = prompt(t=40)
    prompt_kept = keep(40)
    logits = model(ids, past_key_values=cache, use_cache=True).logits
    for step in range(10):
        seen = 40 + step
        for layer in cache.layers:
            want = keep(seen) if cid != "token.snapkv" else prompt_kept + step
            assert layer.size == layer.keys.shape[2] == layer.values.shape[2] == want
            assert layer.get_seq_length() == seen
            pos = layer.pos
            assert pos.shape == (2, 2, want)
            assert bool((pos.diff(dim=-1) > 0).all())          # time order, no duplicates
            for j in list(range(sinks)) + list(range(seen - recent, seen)):
                assert bool((pos == j).any(-1).all()), f"protected position {j} evicted"
        assert cache.get_seq_length() == seen
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        logits = model(nxt, past_key_values=cache, use_cache=True).logits
    assert cache.kept_tokens() < cache.full_tokens()


@torch.no_grad()
def test_budget_tokens_component_ref_and_dict_forms_agree():
    ids = prompt(t=29)
    outs = []
    for pol, params in ((ComponentRef(type="token.streaming", params={"budget_tokens": 16}), {}),
                        ({"type": "token.streaming", "params": {"budget_tokens": 16}}, {}),
                        ("token.streaming", {"budget_tokens": 16}),
                        (ComponentRef(type="token.streaming", params={"budget_tokens": 99}), {"budget_tokens": 16})):
        model = with_impl(tiny_llama(), "sdpa")
        cache = make_cache(pol, model, **params)
        outs.append(greedy(model, ids, new=6, cache=cache)[1])
        assert [layer.size for layer in cache.layers] == [16, 16]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=0, atol=0)


@torch.no_grad()
def test_blockzoo_dense_attention_decodes_with_a_policy():
    ids = prompt(t=30)
    ref = with_impl(tiny_llama(), "sdpa")
    want = greedy(ref, ids, new=8, cache=make_cache("token.streaming", ref, budget=0.5))[1]
    model = tiny_llama()
    use_blockzoo_attention(model, "attention.dense", backend="reference")
    got = greedy(model, ids, new=8, cache=make_cache("token.streaming", model, budget=0.5))[1]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cid", NEEDS_PROBS)
@pytest.mark.parametrize("impl", ["sdpa", "blockzoo"])
def test_policies_needing_probabilities_are_refused_without_them(cid, impl):
    model = tiny_llama()
    if impl == "sdpa":
        with_impl(model, "sdpa")
    else:
        impl = use_blockzoo_attention(model, "attention.dense", backend="reference")
    with pytest.raises(ValueError, match=f"{cid} scores tokens from attention probabilities, but the model's "
                                         f"attention implementation '{impl}' never materialises them.*'eager'"):
        make_cache(cid, model)
    assert model.config._attn_implementation == impl  # refused before touching the model
    make_cache("token.streaming", model)  # needs no probabilities: fine


@pytest.mark.parametrize("cid", NEEDS_PROBS)
def test_scorer_backend_that_never_materialises_is_refused(cid):
    reg = get_registry()
    b = Backend(cid, "flashlike", reg.backend(cid, "reference").fn)
    b.materialises_attention = False
    reg.add_backend(b)
    try:
        with pytest.raises(ValueError, match="its backend 'flashlike' never materialises them"):
            make_cache(cid, with_impl(tiny_llama(), "eager"), backend="flashlike")
    finally:
        del reg.backends[cid]["flashlike"]


def test_other_refusals_are_clear():
    model = with_impl(tiny_llama(), "eager")
    with pytest.raises(ValueError, match="needs the model itself"):
        make_cache("token.h2o")
    with pytest.raises(ValueError, match="needs the model itself"):
        make_cache("token.h2o", model.config)
    with pytest.raises(ValueError, match="'attention.dense' is not a KV-cache policy.*token.h2o"):
        make_cache("attention.dense", model)
    with pytest.raises(RegistryError, match="did you mean 'token.h2o'"):
        make_cache("token.h2oo", model)
    with pytest.raises(Exception, match="budgett"):
        make_cache("token.h2o", model, budgett=0.5)
    with pytest.raises(ValueError, match="dense cache takes no params"):
        make_cache("dense", model, budget=0.5)
    moc = tiny_llama()
    use_blockzoo_attention(moc, "context.moc", backend="reference", chunk_size=4, top_k=1)
    with pytest.raises(ValueError, match="needs dense attention over the kept tokens.*context.moc"):
        make_cache("token.streaming", moc)
    with pytest.raises(ValueError, match="full-attention layers only"):
        make_cache("token.streaming", with_impl(tiny_llama(layer_types=["sliding_attention", "full_attention"],
                                                           sliding_window=8), "sdpa"))


@torch.no_grad()
def test_padded_batch_and_changed_attention_are_refused():
    model = with_impl(tiny_llama(), "eager")
    ids = prompt(t=20)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="padded batch"):
        model.generate(ids, attention_mask=mask, max_new_tokens=3, past_key_values=make_cache("token.h2o", model))
    cache = make_cache("token.streaming", model, budget=0.5)
    model(ids, past_key_values=cache, use_cache=True)
    model.set_attn_implementation("sdpa")  # the cache no longer sees the attention
    with pytest.raises(RuntimeError, match="never reported to the blockzoo KV cache"):
        model(ids[:, :1], past_key_values=cache, use_cache=True)


@torch.no_grad()
def test_dense_generation_unaffected_by_the_installed_observer():
    """After make_cache installed the observing attention, a plain DynamicCache run is unchanged."""
    ids = prompt(t=15)
    ref_seq, ref_logits = greedy(with_impl(tiny_llama(), "eager"), ids, new=6)
    model = with_impl(tiny_llama(), "eager")
    make_cache("token.h2o", model)
    assert model.config._attn_implementation == "blockzoo-kv-eager"
    seq, logits = greedy(model, ids, new=6, cache=make_cache("dense", model))
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)


@torch.no_grad()
def test_beam_search_reorders_the_policy_state():
    ids = prompt(t=20)
    ref = with_impl(tiny_llama(), "eager").generate(ids, max_new_tokens=5, num_beams=3, do_sample=False)
    model = with_impl(tiny_llama(), "eager")
    got = model.generate(ids, max_new_tokens=5, num_beams=3, do_sample=False,
                         past_key_values=make_cache("token.h2o", model, budget=1.0))
    assert torch.equal(got, ref)


@pytest.mark.parametrize("cid,reason", [("token.mixeddim", "rewrites the cached tokens themselves"),
                                        ("token.evict", "binds parts learned for a blockzoo model")])
def test_policies_beyond_keep_or_drop_are_refused(cid, reason):
    if cid not in get_registry().components:
        pytest.skip(f"{cid} is not registered in this checkout")
    with pytest.raises(ValueError, match=reason):
        make_cache(cid, with_impl(tiny_llama(), "eager"))


@pytest.mark.parametrize("backend", ["numba"])
@torch.no_grad()
def test_other_scorer_backends_give_the_reference_kept_set(backend):
    cid = "token.h2o"
    if backend not in get_registry().backends.get(cid, {}):
        pytest.skip(f"{cid} has no {backend} backend in this checkout")
    ids = prompt(t=30)
    kept = []
    for b in ("reference", backend):
        model = with_impl(tiny_llama(), "eager")
        cache = make_cache(cid, model, budget=0.5, backend=b)
        greedy(model, ids, new=5, cache=cache)
        kept.append([layer.pos for layer in cache.layers])
    for a, b in zip(*kept, strict=True):
        assert torch.equal(a, b)
