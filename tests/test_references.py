"""The references themselves, against independent oracles (SDPA, torch.nn.functional), in fp64."""

import math

import pytest
import torch
import torch.nn.functional as F

from blockzoo.plugins.attention.reference import attention_flops, attention_reference
from blockzoo.plugins.mlp.reference import gelu_reference, swiglu_reference
from blockzoo.plugins.normres.reference import layernorm_reference, rmsnorm_reference


def rand(*shape):
    return torch.randn(*shape, dtype=torch.float64)


@pytest.mark.parametrize("tq,tk,hq,hk,causal", [(63, 63, 4, 2, True), (33, 33, 2, 2, False), (17, 40, 4, 1, True),
                                                (1, 9, 2, 2, True)])
def test_attention_reference_matches_sdpa(tq, tk, hq, hk, causal):
    q, k, v = rand(2, tq, hq, 40), rand(2, tk, hk, 40), rand(2, tk, hk, 40)
    ours = attention_reference(q, k, v, causal=causal)
    # SDPA's is_causal is top-left aligned; build the bottom-right mask explicitly
    mask = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq) if causal else None
    sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=mask, enable_gqa=hq != hk).transpose(1, 2)
    torch.testing.assert_close(ours, sdpa, rtol=1e-10, atol=1e-10)


def test_attention_rows_without_keys_are_zero():
    q, k, v = rand(1, 5, 2, 8), rand(1, 2, 2, 8), rand(1, 2, 2, 8)
    out = attention_reference(q, k, v, causal=True)  # queries 0..2 see no key (bottom-right)
    assert torch.all(out[:, :3] == 0) and torch.isfinite(out).all()


def test_attention_flops_counts_unmasked_pairs():
    assert attention_flops(1, 4, 4, 1, 1, causal=False) == 4 * 16
    assert attention_flops(1, 4, 4, 1, 1, causal=True) == 4 * 10
    assert attention_flops(1, 2, 4, 1, 1, causal=True) == 4 * 7  # rows see 3 and 4 keys


@pytest.mark.parametrize("shape", [(3, 40), (2, 5, 257), (4, 1)])
def test_norm_references(shape):
    x, d = rand(*shape), rand(*shape)
    w, b = rand(shape[-1]), rand(shape[-1])
    y, h = layernorm_reference(x, d, w, b, eps=1e-5)
    torch.testing.assert_close(h, x + d)
    torch.testing.assert_close(y, F.layer_norm(x + d, shape[-1:], w, b, 1e-5))
    y, h = rmsnorm_reference(x, None, w, None, eps=1e-6)
    assert h is x
    torch.testing.assert_close(y, F.rms_norm(x, shape[-1:], w, 1e-6))


def test_mlp_references():
    x, wi, wo = rand(3, 16), rand(2 * 24, 16), rand(16, 24)
    g, u = x @ wi[:24].T, x @ wi[24:].T
    torch.testing.assert_close(swiglu_reference(x, wi, wo), (g * torch.sigmoid(g) * u) @ wo.T)
    wi1 = rand(24, 16)
    a = x @ wi1.T
    torch.testing.assert_close(gelu_reference(x, wi1, wo), (0.5 * a * (1 + torch.erf(a / math.sqrt(2)))) @ wo.T)
