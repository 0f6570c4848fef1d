"""Composer: build from specs, per-layer overrides, GQA, post-norm, backends resolved at build,
and tiny-model convergence with and without the kernels."""

import pytest
import torch

import blockzoo
from blockzoo.core.context import Context
from blockzoo.registry import BackendUnavailable
from blockzoo.testing.training import assert_model_learns

TINY = """
name: t
model: {d_model: 32, n_heads: 4, n_kv_heads: 2, n_layers: 2, max_seq: 64}
block:
  mixer: {type: attention.dense}
  normres: {type: normres.rmsnorm}
  mlp: {type: mlp.swiglu}
layers:
  - {at: -1, mlp: {type: mlp.gelu}, normres: {type: normres.layernorm, params: {position: post}}}
"""


def test_build_forward_backward():
    model = blockzoo.build(TINY, backend="reference")
    tokens = torch.randint(0, 256, (2, 17))
    logits = model(tokens)
    assert logits.shape == (2, 17, 256)
    model.loss(tokens).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    comps = [(r["slot"], r["component"]) for r in model.backends() if r["layer"] == "1"]
    assert ("mlp", "mlp.gelu") in comps and ("norm1", "normres.layernorm") in comps
    assert model.blocks[1].norm1.position == "post"


def test_auto_resolves_numba_on_cpu_fp32_and_reference_for_bf16():
    model = blockzoo.build(TINY)
    assert {r["backend"] for r in model.backends()} == {"numba"}
    model = blockzoo.build(TINY, dtype="bfloat16")
    assert {r["backend"] for r in model.backends()} == {"reference"}


def test_explicit_unavailable_backend_fails_at_build():
    with pytest.raises(BackendUnavailable, match="dtype bfloat16"):
        blockzoo.build(TINY, backend="numba", dtype="bfloat16")


def test_backends_agree_on_the_model():
    torch.manual_seed(0)
    ref = blockzoo.build(TINY, backend="reference")
    fast = blockzoo.build(TINY, backend="numba")
    fast.load_state_dict(ref.state_dict())
    tokens = torch.randint(0, 256, (2, 33))
    lr, lf = ref.loss(tokens), fast.loss(tokens)
    lr.backward()
    lf.backward()
    assert abs(lr.item() - lf.item()) < 1e-5
    for (name, a), (_, b) in zip(ref.named_parameters(), fast.named_parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_context_positions_are_used():
    model = blockzoo.build(TINY, backend="reference")
    tokens = torch.randint(0, 256, (1, 8))
    a = model(tokens, Context(positions=torch.arange(8)))
    b = model(tokens, Context(positions=torch.arange(8) + 5))
    assert not torch.allclose(a, b)  # RoPE makes absolute offsets visible through the norms/MLP path


@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_tiny_model_learns_a_repeating_pattern(backend):
    torch.manual_seed(1)
    model = blockzoo.build(TINY, backend=backend)
    assert_model_learns(model)


def test_dyt_agu_alpha_init_per_position():
    """alpha_init_mixer / _mlp / _final set the learned alpha of the norm before the mixer, before
    the MLP and before the head; unset positions keep alpha_init."""
    spec = """
name: alpha-positions
model: {d_model: 32, n_heads: 4, n_layers: 2, max_seq: 64, backend: reference}
block:
  mixer: {type: attention.dense}
  normres: {type: %s, params: {alpha_init: 3.0, alpha_init_mixer: 20.0, alpha_init_final: 1.5}}
  mlp: {type: mlp.swiglu}
"""
    for comp in ("normres.dyt", "normres.agu"):
        model = blockzoo.build(spec % comp)
        alphas = {n: p.item() for n, p in model.named_parameters() if n.endswith("alpha")}
        assert alphas == {"blocks.0.norm1.alpha": 20.0, "blocks.0.norm2.alpha": 3.0,
                          "blocks.1.norm1.alpha": 20.0, "blocks.1.norm2.alpha": 3.0,
                          "final_norm.alpha": 1.5}, (comp, alphas)
