"""The synthetic tasks' data contracts (core/tasks.py)."""

from __future__ import annotations

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
