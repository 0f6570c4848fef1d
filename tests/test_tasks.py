"""The synthetic tasks' data contracts (core/tasks.py)."""

from __future__ import annotations

import math

import pytest
import torch

from blockzoo.core.tasks import mqar_batch


@pytest.mark.parametrize("batch,seq,pairs,vocab", [(7, 64, 4, 256), (3, 33, 8, 40), (5, 16, 1, 8)])
def test_mqar_batch_layout(batch, seq, pairs, vocab):
    x, y = mqar_batch(torch.Generator().manual_seed(batch + seq), batch, seq, pairs, vocab)
    assert x.shape == y.shape == (batch, seq) and x.dtype == y.dtype == torch.long
    half = vocab // 2
    keys, vals = x[:, 0:2 * pairs:2], x[:, 1:2 * pairs:2]
    assert ((keys >= 1) & (keys < half)).all() and ((vals >= half) & (vals < vocab)).all()
    assert (y[:, :2 * pairs] == -100).all()  # no target inside the pairs
    for b in range(batch):
        assert len(set(keys[b].tolist())) == pairs  # distinct keys per row
        q = (y[b] != -100).nonzero().flatten()
        assert len(q) == pairs  # each key queried exactly once, after the pairs
        pair_of = dict(zip(keys[b].tolist(), vals[b].tolist(), strict=True))
        assert sorted(x[b, q].tolist()) == sorted(pair_of)
        for t in q.tolist():
            assert y[b, t] == pair_of[int(x[b, t])]  # the target is the queried key's value
        rest = torch.ones(seq, dtype=torch.bool)
        rest[:2 * pairs] = False
        rest[q] = False
        assert (x[b, rest] == 0).all()  # filler elsewhere


def test_mqar_batch_seeded_and_varied():
    a = mqar_batch(torch.Generator().manual_seed(3), 16, 64, 4, 256)
    b = mqar_batch(torch.Generator().manual_seed(3), 16, 64, 4, 256)
    c = mqar_batch(torch.Generator().manual_seed(4), 16, 64, 4, 256)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    # query positions vary across rows (not one fixed layout)
    assert len({tuple((a[1][r] != -100).nonzero().flatten().tolist()) for r in range(16)}) > 8


def test_mqar_batch_rejects_short_sequences():
    with pytest.raises(ValueError, match="too short"):
        mqar_batch(torch.Generator(), 2, 15, 4, 256)


def test_lr_schedules():
    from blockzoo.core.tasks import TrainConfig, _lr_factor
    cos, const = TrainConfig(steps=100), TrainConfig(steps=100, schedule="constant")
    assert _lr_factor(cos, 0) == pytest.approx(0.1 * 0.5 * (1 + math.cos(0.0)))
    assert _lr_factor(cos, 9) == pytest.approx(0.5 * (1 + math.cos(0.09 * math.pi)))
    assert _lr_factor(const, 0) == 0.1 and _lr_factor(const, 9) == 1.0 and _lr_factor(const, 99) == 1.0
    assert _lr_factor(cos, 99) < 0.001  # cosine ends near 0
    with pytest.raises(ValueError):
        TrainConfig(schedule="linear")


def _tiny_model(seed: int):
    from blockzoo.core.composer import build
    from blockzoo.core.spec import load_spec
    torch.manual_seed(seed)
    return build(load_spec({
        "name": "tiny", "model": {"vocab": 16, "d_model": 16, "n_heads": 2, "n_layers": 1, "max_seq": 32,
                                  "backend": "reference"},
        "block": {"mixer": {"type": "attention.dense"}, "normres": {"type": "normres.rmsnorm"},
                  "mlp": {"type": "mlp.swiglu"}}}))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA graphs need a GPU"))])
def test_cuda_graph_training_equals_eager(device):
    """cuda_graph replays the same steps (batches, rates, clipping, AdamW) as the eager loop: the
    trained weights agree to rounding (on the CPU the option has no effect: bit-equal)."""
    from blockzoo.core.tasks import TrainConfig, _train_steps
    cfg = dict(steps=12, batch=4, seq=16, lr=1e-2, weight_decay=0.01)
    sample = lambda g: mqar_batch(g, 4, 16, 2, 16)  # noqa: E731
    a, b = _tiny_model(0).to(device), _tiny_model(0).to(device)
    la = _train_steps(a, sample, TrainConfig(**cfg), device)
    lb = _train_steps(b, sample, TrainConfig(**cfg, cuda_graph=True), device)
    assert abs(la - lb) <= 1e-4 * max(1.0, abs(la))
    moved = 0.0
    for (n, pa), pb, p0 in zip(a.state_dict().items(), b.state_dict().values(), _tiny_model(0).state_dict().values(),
                               strict=True):
        torch.testing.assert_close(pb, pa, rtol=1e-4, atol=1e-5, msg=n)
        moved = max(moved, float((pa.cpu() - p0).abs().max()))
    assert moved > 1e-3  # the steps trained (not a comparison of two untouched models)
