"""``blockzoo bench``: ops x backends x shapes, median times, TFLOP/s or GB/s, and the speedup
over baselines (SDPA flash / cuDNN / efficient on GPU, the reference and torch on CPU) measured in
the same run. Shapes, costs and baselines come from each component's registration."""

from __future__ import annotations

import datetime
import math
import platform
from collections.abc import Callable
from typing import Any

import torch

from ..registry import Inputs, get_registry
from ..registry.registry import Case
from .ops import op_kwargs
from .timing import median_ms


def environment(device: str) -> dict[str, Any]:
    import importlib.metadata as md
    env = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
           "python": platform.python_version(), "torch": torch.__version__, "host": platform.node(),
           "cpu": platform.processor() or platform.machine()}
    for pkg in ("triton", "numba", "blockzoo"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = None
    if device.startswith("cuda"):
        env["device"] = torch.cuda.get_device_name()
        env["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        env["cuda"] = torch.version.cuda
    else:
        import os
        env["device"] = f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    return env


def _inputs(case: Case, dtype: torch.dtype, device: str, grad: bool, seed: int) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = {}
    for name, shape in case.shapes.items():
        if shape is None:
            out[name] = None
            continue
        t = torch.randn(shape, generator=gen, dtype=torch.float32)
        t = (t * case.scale.get(name, 1.0) + case.offset.get(name, 0.0)).to(device=device, dtype=dtype)
        out[name] = t.requires_grad_(grad)
    return out


def _runner(fn: Callable, tensors: dict, kwargs: dict, mode: str) -> Callable[[], Any]:
    if hasattr(fn, "prepare"):  # a baseline that takes its inputs in its own layout
        tensors = fn.prepare(tensors)
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(**tensors, **kwargs)
        return run
    outs = fn(**tensors, **kwargs)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    cots = [torch.randn_like(o) for o in outs]
    leaves = [t for t in tensors.values() if t is not None and t.requires_grad]

    def run():
        o = fn(**tensors, **kwargs)
        o = o if isinstance(o, (tuple, list)) else (o,)
        torch.autograd.grad(o, leaves, cots, allow_unused=True)
    return run


def run_bench(components=None, backends=None, device: str = "cpu", dtypes=None, modes=("fwd", "fwd+bwd"),
              baselines: bool = True, case_filter: str | None = None, progress=None) -> list[dict[str, Any]]:
    reg = get_registry()
    dev_type = torch.device(device).type
    dtypes = dtypes or ([torch.bfloat16] if dev_type == "cuda" else [torch.float32])
    rows: list[dict[str, Any]] = []
    work = []
    for cid in components or sorted(reg.components):
        comp = reg.component(cid)
        if comp.bench_cases is None:
            continue
        for case in comp.bench_cases(dev_type):
            if case_filter and case_filter not in case.id:
                continue
            for dtype in dtypes:
                for mode in modes:
                    work.append((comp, case, dtype, mode))
    for i, (comp, case, dtype, mode) in enumerate(work):
        if progress:
            progress(i, len(work), f"{comp.id} {case.id} {mode}")
        params = comp.params(**case.params)
        kwargs = op_kwargs(comp, params)
        shapes = {k: v for k, v in case.shapes.items() if v}
        cost = comp.cost(shapes, params, mode) if comp.cost else {}
        elt = torch.empty((), dtype=dtype).element_size()
        impls: list[tuple[str, str, Callable]] = []
        for be in reg.backends_for(comp.id):
            if backends and be.name not in backends:
                continue
            probe = Inputs(device=dev_type, dtype=dtype, requires_grad=mode != "fwd", head_dim=case.head_dim,
                           shapes=tuple(shapes.items()))
            reasons = be.not_supported_reasons(probe)
            if be.capabilities.interpreted_on_cpu and dev_type == "cpu":
                reasons = reasons or ["interpreted Triton is not benchmarked"]
            if reasons:
                rows.append(_row(comp.id, case, dtype, mode, be.name, "backend", None, cost, elt,
                                 error="; ".join(reasons)))
                continue
            impls.append((be.name, "backend", be.fn))
        if baselines and comp.baselines:
            for name, fn in comp.baselines(dev_type).items():
                if name == "copy" and mode != "fwd":
                    continue
                impls.append((name, "baseline", fn))
        for name, kind, fn in impls:
            try:
                tensors = _inputs(case, dtype, device, mode != "fwd" and name != "copy", seed=i)
                ms = median_ms(_runner(fn, tensors, kwargs, mode), device)
                this_cost = {"bytes": 2 * math.prod(shapes["x"])} if name == "copy" else cost
                rows.append(_row(comp.id, case, dtype, mode, name, kind, ms, this_cost, elt))
                if comp.accuracy is not None and mode == "fwd" and kind == "backend":
                    with torch.no_grad():
                        rows[-1]["accuracy"] = comp.accuracy(fn, tensors, kwargs)
            except Exception as exc:  # noqa: BLE001 - one failing impl must not end the bench
                rows.append(_row(comp.id, case, dtype, mode, name, kind, None, cost, elt,
                                 error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))
            finally:
                if dev_type == "cuda":
                    torch.cuda.empty_cache()
    _add_ratios(rows)
    return rows


def _row(cid, case, dtype, mode, impl, kind, ms, cost, elt, error=None) -> dict[str, Any]:
    row = {"component": cid, "case": case.id, "dtype": str(dtype).removeprefix("torch."), "mode": mode,
           "impl": impl, "kind": kind, "ms": ms, "error": error}
    if ms:
        if "flops" in cost:
            row["rate"], row["unit"] = cost["flops"] / ms / 1e9, "TFLOP/s"
        elif "bytes" in cost:
            row["rate"], row["unit"] = cost["bytes"] * elt / ms / 1e6, "GB/s"
    return row


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """speedup[b] = baseline b's time / this time, within one (component, case, dtype, mode);
    for byte-bound ops also pct_of_copy = this GB/s / copy GB/s."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["component"], r["case"], r["dtype"], r["mode"]), []).append(r)
    for group in groups.values():
        base = {r["impl"]: r for r in group if r["ms"] and (r["kind"] == "baseline" or r["impl"] == "reference")}
        copy = next((r for r in rows if r["impl"] == "copy" and r["ms"] and
                     (r["component"], r["case"], r["dtype"]) == (group[0]["component"], group[0]["case"],
                                                                 group[0]["dtype"])), None)
        for r in group:
            if not r["ms"]:
                continue
            r["speedup"] = {name: b["ms"] / r["ms"] for name, b in base.items() if name not in (r["impl"], "copy")}
            if copy and r.get("unit") == "GB/s" and r["impl"] != "copy":
                r["pct_of_copy"] = 100.0 * r["rate"] / copy["rate"]
