"""Output allocation shared by every kernel wrapper, with NaN-poisoning for tests.

Kernels allocate outputs through :func:`empty` / :func:`empty_like`. Inside
``with poisoned():`` (or with ``BLOCKZOO_POISON=1``) new buffers are filled with NaN (integer
buffers with their minimum), so an element a kernel forgets to write shows up as NaN instead of
silently holding stale memory.
"""

from __future__ import annotations

import contextlib
import os
import threading

import torch

_state = threading.local()


def poison_enabled() -> bool:
    return getattr(_state, "on", False) or os.environ.get("BLOCKZOO_POISON", "0") not in ("", "0")


@contextlib.contextmanager
def poisoned(on: bool = True):
    old = getattr(_state, "on", False)
    _state.on = on
    try:
        yield
    finally:
        _state.on = old


def _fill(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        t.fill_(float("nan"))
    elif t.dtype != torch.bool:
        t.fill_(torch.iinfo(t.dtype).min)
    return t


def empty(*shape, dtype=None, device=None) -> torch.Tensor:
    t = torch.empty(*shape, dtype=dtype, device=device)
    return _fill(t) if poison_enabled() else t


def empty_like(x: torch.Tensor, dtype=None) -> torch.Tensor:
    t = torch.empty_like(x, dtype=dtype, memory_format=torch.contiguous_format)
    return _fill(t) if poison_enabled() else t
