"""One sweep trial, run inside a worker process: build, check, time, cost, evaluate."""

from __future__ import annotations

import copy
import time
import traceback
from typing import Any

import torch

from ..registry import BackendUnavailable, Inputs, get_registry
from .composer import build
from .context import BuildContext
from .spec import ModelSpec, load_spec
from .tasks import run_task
from .timing import median_ms, peak_memory


def _ctx(spec: ModelSpec, layer: int) -> BuildContext:
    m = spec.model
    return BuildContext(d_model=m.d_model, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads or m.n_heads,
                        max_seq=m.max_seq, layer=layer, n_layers=m.n_layers, dtype=spec.torch_dtype())


def attention_cost(spec: ModelSpec, seq: int) -> dict[str, float]:
    """Analytic forward attention FLOPs and decode KV bytes for one sequence of ``seq`` tokens,
    and the same for the dense model of the same size."""
    reg = get_registry()
    dense = reg.component("attention.dense")
    elt = torch.empty((), dtype=spec.torch_dtype()).element_size()
    flops = dense_flops = kv = dense_kv = 0.0
    for i in range(spec.model.n_layers):
        ctx = _ctx(spec, i)
        ref = spec.layer_block(i).mixer
        comp = reg.component(ref.type)
        params = comp.params(**ref.params)
        shapes = (("q", (1, seq, ctx.n_heads, ctx.head_dim)), ("k", (1, seq, ctx.n_kv_heads, ctx.head_dim)),
                  ("v", (1, seq, ctx.n_kv_heads, ctx.head_dim)))
        inputs = Inputs(device="cpu", dtype=ctx.dtype, head_dim=ctx.head_dim, shapes=shapes,
                        extras=(("depth_slots", spec.depth_slots(i)),))  # read by depth.moda
        d = dense.flops(inputs, dense.params(causal=True))
        dense_flops += d
        flops += comp.flops(inputs, params) if comp.flops else d
        dkv = 2.0 * seq * ctx.n_kv_heads * ctx.head_dim * elt
        dense_kv += dkv
        kv += comp.kv_bytes(ctx, params, seq) if comp.kv_bytes else dkv
    if spec.kv is not None:  # a token.* policy: the cache it keeps after a seq-token prefill
        pol = reg.component(spec.kv.type)
        kv *= pol.params(**spec.kv.params).keep(seq) / seq
    return {"attn_flops": flops, "attn_flops_dense": dense_flops, "rel_attn_flops": flops / dense_flops,
            "kv_bytes": kv, "kv_bytes_dense": dense_kv, "rel_kv_bytes": kv / dense_kv}


def correctness(spec: ModelSpec, model: torch.nn.Module, tokens: torch.Tensor) -> dict[str, float]:
    """The model with its chosen backends vs the same weights on the reference backend."""
    ref = build(spec, backend="reference")
    ref.load_state_dict(model.state_dict())
    out = {}
    losses = []
    for m in (model, ref):
        m.zero_grad(set_to_none=True)
        loss = m.loss(tokens)
        loss.backward()
        losses.append(loss.detach())
    with torch.no_grad():
        a, b = model(tokens[:, :-1]).float(), ref(tokens[:, :-1]).float()
    out["logits_max_rel_err"] = float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
    worst = 0.0
    for (_, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        if p.grad is not None and q.grad is not None:
            worst = max(worst, float((p.grad - q.grad).norm() / q.grad.norm().clamp_min(1e-30)))
    out["grad_max_rel_err"] = worst
    out["loss_abs_err"] = float((losses[0] - losses[1]).abs())
    return out


def run_trial(job: dict[str, Any]) -> dict[str, Any]:
    """-> {"status": ok|skipped|failed, "reason", "metrics", "backends", "compute_s"}."""
    t0 = time.perf_counter()
    metrics: dict[str, float] = {}
    try:
        spec = load_spec(copy.deepcopy(job["spec"]))
        torch.manual_seed(spec.workload.seed)  # a sweep axis workload.seed: [0, 1, 2] gives seeds
        try:
            model = build(spec)
        except BackendUnavailable as exc:
            return {"status": "skipped", "reason": str(exc), "metrics": {}, "backends": "",
                    "compute_s": time.perf_counter() - t0}
        if spec.model.kind == "flow":  # flows: their own measurements (core/flow_model.py)
            from .flow_model import run_flow_trial
            return run_flow_trial(spec, model, job, t0)
        backends = sorted({f"{r['component']}:{r['backend']}" for r in model.backends()})
        dev = spec.model.device
        wl = spec.workload
        metrics["params"] = float(sum(p.numel() for p in model.parameters()))
        metrics.update(attention_cost(spec, wl.seq))
        gen = torch.Generator().manual_seed(wl.seed)
        tokens = torch.randint(0, spec.model.vocab, (wl.batch, wl.seq + 1), generator=gen).to(dev)
        measure = job.get("measure", {})
        if measure.get("correctness", True):
            metrics.update(correctness(spec, model, tokens))
        if measure.get("latency", True):
            reps = measure.get("latency_reps", 5)

            def fwd():
                with torch.no_grad():
                    return model(tokens[:, :-1])

            def step():
                model.zero_grad(set_to_none=True)
                model.loss(tokens).backward()
            metrics["forward_ms"] = median_ms(fwd, dev, rep_ms=0, min_reps=reps, max_reps=reps)
            metrics["fwd_bwd_ms"] = median_ms(step, dev, rep_ms=0, min_reps=reps, max_reps=reps)
            metrics["tokens_per_s"] = wl.batch * wl.seq / (metrics["fwd_bwd_ms"] / 1e3)
            mem = peak_memory(step, dev)
            if mem is not None:
                metrics["peak_memory_mb"] = mem / 2**20
        for name, cfg in job.get("tasks", {}).items():
            t_task = time.perf_counter()
            params = get_registry().tasks[name].params
            if spec.workload.seed and "seed" not in cfg and params is not None and "seed" in params.model_fields:
                cfg = {**cfg, "seed": spec.workload.seed}  # the task's data follow workload.seed unless set
            metrics.update(run_task(name, lambda: build(spec), spec.model.vocab, cfg, dev))
            metrics[f"{name}_train_s"] = time.perf_counter() - t_task
        return {"status": "ok", "reason": "", "metrics": metrics, "backends": " ".join(backends),
                "compute_s": time.perf_counter() - t0}
    except Exception as exc:  # noqa: BLE001 - one trial's error is a failed trial, not a lost sweep
        tb = traceback.format_exc(limit=6)
        return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}\n{tb}", "metrics": metrics,
                "backends": "", "compute_s": time.perf_counter() - t0}
