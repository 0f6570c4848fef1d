"""``blockzoo run SPEC``: build, run forward and forward+backward on the spec's workload."""

from __future__ import annotations

import time
from typing import Any

import torch

from .composer import build
from .spec import load_spec
from .timing import median_ms, peak_memory


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters()), torch.float32)


def run_spec(source: Any, device: str | None = None, backend: str | None = None, dtype: str | None = None,
             steps: int | None = None) -> dict[str, Any]:
    spec = load_spec(source)
    model = build(spec, device=device, backend=backend, dtype=dtype)
    spec = model.spec
    wl = spec.workload
    dev = spec.model.device
    gen = torch.Generator().manual_seed(wl.seed)
    if spec.model.kind == "flow":   # a flow maps [batch, dim] data; its loss is the NLL
        tokens = torch.randn(wl.batch, spec.flow.dim, generator=gen).to(dev, model_dtype(model))
        inputs = tokens
    else:
        tokens = torch.randint(0, spec.model.vocab, (wl.batch, wl.seq + 1), generator=gen).to(dev)
        inputs = tokens[:, :-1]

    def fwd():
        with torch.no_grad():
            return model(inputs)

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        loss = model.loss(tokens)
        loss.backward()
        return loss
    t0 = time.perf_counter()
    loss = float(fwd_bwd().detach())
    first = time.perf_counter() - t0
    n = steps or wl.steps
    fwd_ms = median_ms(fwd, dev, rep_ms=50, min_reps=n, max_reps=max(n, 3))
    step_ms = median_ms(fwd_bwd, dev, rep_ms=50, min_reps=n, max_reps=max(n, 3))
    return {
        "spec": spec.name, "hash": spec.spec_hash(), "device": dev, "dtype": spec.model.dtype,
        "params": sum(p.numel() for p in model.parameters()), "batch": wl.batch,
        "seq": None if spec.model.kind == "flow" else wl.seq,
        "loss": loss, "first_step_s": first, "forward_ms": fwd_ms, "fwd_bwd_ms": step_ms,
        "tokens_per_s": wl.batch * (1 if spec.model.kind == "flow" else wl.seq) / (step_ms / 1e3),
        "peak_memory_mb":
            (lambda b: None if b is None else b / 2**20)(peak_memory(fwd_bwd, dev)),
        "backends": model.backends(),
    }
