"""The backends every normres component registers: the torch reference, the Triton kernel and the
Numba kernel, with one set of capabilities. ``plugin.py`` (layernorm, rmsnorm) and
``gated_plugin.py`` (dyt, agu) each pass a table of their components."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch

from ...registry import Backend, Capabilities


class NormresBackends(NamedTuple):
    """One component's row: ``kernel(module)`` returns the backend function for ``"triton"`` or
    ``"numba"``; ``what`` ends the kernels' docs (``"one-pass <what>"``, ``"row-parallel <what>"``)."""

    cid: str
    reference: Callable
    kernel: Callable[[str], Callable]
    reference_doc: str
    what: str


def register_normres_backends(registry, rows: Iterable[NormresBackends]) -> None:
    for row in rows:
        registry.add_backend(Backend(row.cid, "reference", row.reference,
                                     Capabilities(dtypes=(torch.float16, torch.bfloat16, torch.float32,
                                                          torch.float64)),
                                     doc=row.reference_doc))
        registry.add_backend(Backend(
            row.cid, "triton", row.kernel("triton"),
            Capabilities(devices=("cuda",), dtypes=(torch.float16, torch.bfloat16, torch.float32),
                         requires=("triton>=3.6",), interpreted_on_cpu=True),
            priority=30, doc=f"one-pass {row.what}"))
        registry.add_backend(Backend(
            row.cid, "numba", row.kernel("numba"),
            Capabilities(devices=("cpu",), dtypes=(torch.float32, torch.float64), requires=("numba>=0.60",)),
            priority=20, doc=f"row-parallel {row.what}"))
