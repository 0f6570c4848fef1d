"""Tiny-model training checks: does a model built from a spec learn at all with a backend?

The probe is a repeating random pattern of ``period`` tokens (drawn from torch's global RNG, so
``torch.manual_seed`` before building the model fixes both the init and the pattern): a model
whose mixer, norms and MLP pass gradients correctly drives its loss far below the first step's
within a few dozen AdamW steps, one that is silently broken stays on the unigram plateau.
"""

from __future__ import annotations

import torch


def train_on_pattern(model: torch.nn.Module, steps: int = 40, lr: float = 3e-3, period: int = 8,
                     length: int = 32, batch: int = 4) -> tuple[float, float]:
    """Train ``model`` (anything with ``loss(tokens)`` and ``parameters()``) on the pattern;
    returns ``(first loss, last loss)``."""
    pattern = torch.randint(0, 256, (1, period))
    tokens = pattern.repeat(batch, -(-length // period))[:, :length]
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    first = loss = None
    for _ in range(steps):
        loss = model.loss(tokens)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    return first, loss.item()


def assert_model_learns(model: torch.nn.Module, factor: float = 0.25, **kwargs) -> tuple[float, float]:
    """:func:`train_on_pattern`, then assert the last loss is below ``factor`` x the first."""
    first, last = train_on_pattern(model, **kwargs)
    assert last < factor * first, f"loss {first:.3f} -> {last:.3f}, wanted below {factor} x the first"
    return first, last
