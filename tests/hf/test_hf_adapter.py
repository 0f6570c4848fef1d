"""The Hugging Face adapter on a tiny, randomly initialised Llama built here (nothing downloaded).

- dense: the blockzoo op as the model's attention gives the logits of the model's own (SDPA and
  eager) attention, for the prompt and at every cached decoding step of ``generate``;
- context.moc: ``generate`` with a DynamicCache works, and every cached decoding step matches a
  full forward of the final sequence without cache (MoC routing of a decoding row equals that row's
  routing in the full sequence); with top_k covering every chunk it equals dense attention;
- precision.int8 and depth.moda plug in by id when registered (skipped with the reason otherwise).
"""

import pytest

transformers = pytest.importorskip("transformers", minversion="4.56")

import torch  # noqa: E402

import blockzoo  # noqa: E402
from blockzoo.compat.hf import (  # noqa: E402
    BlockzooAttention,
    attention_name,
    make_cache,
    register_attention,
    use_blockzoo_attention,
)
from blockzoo.registry import RegistryError  # noqa: E402

VOCAB = 97


def tiny_llama(seed=0, dtype=torch.float32, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               attention_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg.update(overrides)
    torch.manual_seed(seed)
    config = LlamaConfig(**cfg)
    model = LlamaForCausalLM(config).to(dtype).eval()
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


@pytest.mark.parametrize("backend", ["auto", "reference", "numba"])
@pytest.mark.parametrize("own", ["sdpa", "eager"])
@torch.no_grad()
def test_dense_matches_own_attention(backend, own):
    ids = prompt()
    model = tiny_llama()
    want = with_impl(model, own)(ids).logits
    name = use_blockzoo_attention(model, "attention.dense", backend=backend)
    assert model.config._attn_implementation == name
    got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.equal(got, with_impl(tiny_llama(seed=5), own)(ids).logits)  # logits depend on weights


@torch.no_grad()
def test_dense_generate_matches_own_attention_at_every_step():
    ids = prompt(t=11)
    ref_seq, ref_logits = greedy(with_impl(tiny_llama(), "sdpa"), ids, new=10)
    model = tiny_llama()
    use_blockzoo_attention(model, "attention.dense")
    seq, logits = greedy(model, ids, new=10, cache=make_cache("dense", model.config))
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(seq, ref_seq)


@torch.no_grad()
def test_dense_gqa_numba_backend_is_what_runs():
    """The adapter dispatches through the registry: the numba backend really is called."""
    model = tiny_llama()
    use_blockzoo_attention(model, "attention.dense", backend="numba")
    calls = []
    backend = blockzoo.get_registry().backend("attention.dense", "numba")
    real = backend.fn
    backend.fn = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        model(prompt())
    finally:
        backend.fn = real
    assert len(calls) == model.config.num_hidden_layers


# the other components run their reference backend: the adapter path is the same for every
# backend (tested with dense above), and compiling more Numba kernels would only slow CI down
MOC = dict(chunk_size=4, top_k=1)


@torch.no_grad()
def test_moc_generate_matches_full_forward():
    ids = prompt(t=13)
    model = tiny_llama()
    use_blockzoo_attention(model, "context.moc", backend="reference", **MOC)
    seq, logits = greedy(model, ids, new=12)
    full = model(seq, use_cache=False).logits[:, ids.shape[1] - 1:-1]
    torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-4)
    # routing matters: top_k=1 over 4-token chunks is not dense attention on 25 tokens
    dense = with_impl(tiny_llama(), "sdpa")(seq).logits[:, ids.shape[1] - 1:-1]
    assert (full - dense).abs().max() > 1e-3


@torch.no_grad()
def test_moc_with_every_chunk_selected_is_dense():
    ids = prompt(t=23)
    want = with_impl(tiny_llama(), "sdpa")(ids).logits
    model = tiny_llama()
    use_blockzoo_attention(model, "context.moc", backend="reference", chunk_size=4, top_k=64)
    torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cid,params", [("precision.int8", {}), ("depth.moda", {})])
@torch.no_grad()
def test_other_attention_components_by_id(cid, params):
    if cid not in blockzoo.components():
        pytest.skip(f"{cid} is not registered in this install")
    comp = blockzoo.get_registry().component(cid)
    from blockzoo.core.ops import _tensor_names
    if comp.slot != "mixer" or _tensor_names(comp) != ("q", "k", "v"):
        with pytest.raises(ValueError, match="not attention-shaped"):
            BlockzooAttention(cid)
        return
    ids = prompt(t=13)
    model = tiny_llama()
    use_blockzoo_attention(model, cid, backend="reference", **params)
    seq, logits = greedy(model, ids, new=6)
    assert torch.isfinite(logits).all()
    # cached decoding agrees with a full forward of the final sequence (loose: quantisers may
    # round per block, and the blocks differ between a decoding step and the full sequence)
    full = model(seq, use_cache=False).logits[:, ids.shape[1] - 1:-1]
    assert (logits - full).abs().max() <= 0.05 * full.abs().max()


def test_padding_mask_is_refused():
    model = tiny_llama()
    use_blockzoo_attention(model, "attention.dense")
    ids = prompt()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="no padding mask"):
        model(ids, attention_mask=mask)
    model(ids, attention_mask=torch.ones_like(ids))  # an all-ones mask is fine


def test_dropout_in_training_is_refused():
    model = tiny_llama(attention_dropout=0.1)
    use_blockzoo_attention(model, "attention.dense")
    model.train()
    with pytest.raises(ValueError, match="attention dropout"):
        model(prompt())


def test_bad_arguments_are_clear():
    with pytest.raises(RegistryError, match="did you mean 'context.moc'"):
        register_attention("context.mok")
    with pytest.raises(ValueError, match="not attention-shaped"):
        register_attention("normres.rmsnorm")
    with pytest.raises(ValueError, match="'causal' is set by the transformers model"):
        register_attention("attention.dense", causal=False)
    with pytest.raises(Exception, match="top_kk"):
        register_attention("context.moc", top_kk=3)
    with pytest.raises(RegistryError, match="no backend 'nunba'"):
        register_attention("attention.dense", backend="nunba")
    with pytest.raises(ValueError, match="needs the model itself"):  # policies: tests/hf/test_hf_kv_policies.py
        make_cache("token.snapkv")


def test_names_are_stable_and_distinct():
    assert attention_name("context.moc", top_k=2) == attention_name("context.moc", top_k=2)
    assert attention_name("context.moc", top_k=2) != attention_name("context.moc", top_k=3)
    assert attention_name("attention.dense") == "blockzoo-attention.dense-auto"


def test_backward_through_the_adapter():
    model = tiny_llama()
    model.train()
    use_blockzoo_attention(model, "attention.dense", backend="numba")
    ids = prompt()
    loss = model(ids, labels=ids).loss
    loss.backward()
    got = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    ref = tiny_llama()
    ref.train()
    with_impl(ref, "sdpa")
    ref(ids, labels=ids).loss.backward()
    torch.testing.assert_close(got, ref.model.layers[0].self_attn.q_proj.weight.grad, rtol=1e-3, atol=1e-5)


def test_explicit_4d_masks():
    """Models that pass a materialised 4-D mask: the plain causal pattern (bool or additive) is
    accepted, a padded one refused."""
    fn = BlockzooAttention("attention.dense", backend="reference")
    module = torch.nn.Module()
    module.is_causal = True
    q = torch.randn(2, 4, 6, 16)
    k = v = torch.randn(2, 2, 9, 16)
    want = fn(module, q, k, v, None)[0]
    i, j = torch.arange(6)[:, None], torch.arange(9)[None, :]
    allowed = (j <= i + 3).expand(2, 1, 6, 9)
    additive = torch.zeros(2, 1, 6, 9).masked_fill(~allowed, torch.finfo(torch.float32).min)
    for mask in (allowed, additive):
        torch.testing.assert_close(fn(module, q, k, v, mask)[0], want)
    padded = allowed.clone()
    padded[0, :, :, 0] = False
    with pytest.raises(ValueError, match="no padding mask"):
        fn(module, q, k, v, padded)
    with pytest.raises(ValueError, match="no padding mask"):
        fn(module, q, k, v, torch.ones(2, 1, 6, 9, dtype=torch.bool))  # full mask on a causal module
