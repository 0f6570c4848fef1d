"""The ``blockzoo`` command: info, check, run, bench, sweep, report, kv, schema.

Errors a user can fix (bad specs, unknown names, unavailable backends) print a clear message and
exit 2, never a traceback (``BLOCKZOO_DEBUG=1`` shows one for bug reports).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

EXIT_USAGE = 2


def _console():
    from rich.console import Console
    return Console(stderr=False, highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 220)


# -------------------------------------------------------------------------------------------------
# info
def info_data() -> dict[str, Any]:
    import torch

    from .registry import Inputs, get_manager
    manager = get_manager()
    reg = manager.registry
    device = "cuda" if torch.cuda.is_available() else "cpu"
    components = []
    for cid, comp in sorted(reg.components.items()):
        backends = []
        for be in reg.backends_for(cid):
            env = be.capabilities.environment_reasons()
            probe = Inputs(device=device, dtype=be.capabilities.dtypes[0], requires_grad=False)
            runs_here = not env and not be.not_supported_reasons(probe)
            backends.append({
                "name": be.name, "available": not env, "runs_on_this_device": runs_here, "reasons": env,
                "devices": list(be.capabilities.devices),
                "dtypes": [str(d).removeprefix("torch.") for d in be.capabilities.dtypes],
                "grad": be.capabilities.grad, "priority": be.priority, "owner": be.owner, "doc": be.doc})
        components.append({"id": cid, "slot": comp.slot, "owner": comp.owner, "doc": comp.doc,
                           "source": comp.source, "params": comp.params.model_json_schema().get("properties", {}),
                           "backends": backends})
    return {"version": _version(), "device": device, "components": components,
            "tasks": sorted(reg.tasks),
            "plugins": [p.__dict__ for p in manager.plugins.values()],
            "plugin_failures": [f.as_dict() for f in manager.failures]}


def _version() -> str:
    from . import __version__
    return __version__


def cmd_info(args) -> int:
    data = info_data()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    from rich.table import Table
    con = _console()
    con.print(f"[bold]blockzoo {data['version']}[/bold] — device: {data['device']}")
    table = Table(title="components x backends", show_lines=False)
    table.add_column("component")
    table.add_column("slot")
    names = sorted({b["name"] for c in data["components"] for b in c["backends"]},
                   key=lambda n: ("reference", "triton", "numba").index(n) if n in ("reference", "triton", "numba") else 9)
    for n in names:
        table.add_column(n)
    for c in data["components"]:
        by = {b["name"]: b for b in c["backends"]}
        cells = []
        for n in names:
            b = by.get(n)
            if b is None:
                cells.append("—")
            elif not b["available"]:
                cells.append("[red]unavailable[/red]")
            elif b["runs_on_this_device"]:
                cells.append("[green]yes[/green]")
            else:
                cells.append("[yellow]other device[/yellow]")
        table.add_row(c["id"], c["slot"], *cells)
    con.print(table)
    reasons = {(b["name"], "; ".join(b["reasons"])) for c in data["components"] for b in c["backends"] if b["reasons"]}
    for name, why in sorted(reasons):
        con.print(f"[red]{name}[/red] unavailable: {why}")
    if data["plugin_failures"]:
        con.print(f"[bold red]{len(data['plugin_failures'])} plugin failure(s):[/bold red]")
        for f in data["plugin_failures"]:
            con.print(f"  {f['plugin']} ({f['dist']} {f['version']}) at {f['stage']}: {f['error']}")
    else:
        con.print("plugins: " + ", ".join(p["name"] for p in data["plugins"]))
    return 0


# -------------------------------------------------------------------------------------------------
# check / run / schema
def cmd_check(args) -> int:
    from .core.spec import load_spec
    spec = load_spec(Path(args.spec))
    print(f"{args.spec}: ok ({spec.name}, {spec.model.n_layers} layers, hash {spec.spec_hash()})")
    if args.expanded:
        from .core.spec import dump_yaml
        print(dump_yaml(spec))
    return 0


def cmd_schema(args) -> int:
    from .core.spec import json_schema
    print(json.dumps(json_schema(), indent=2))
    return 0


def cmd_run(args) -> int:
    from .core.run import run_spec
    result = run_spec(args.spec, device=args.device, backend=args.backend, dtype=args.dtype,
                      steps=args.steps)
    from rich.table import Table
    con = _console()
    t = Table(title=f"{result['spec']} on {result['device']} ({result['dtype']})")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k in ("params", "batch", "seq", "loss", "forward_ms", "fwd_bwd_ms", "tokens_per_s", "peak_memory_mb"):
        v = result.get(k)
        t.add_row(k, "—" if v is None else (f"{v:,.3f}" if isinstance(v, float) else f"{v:,}"))
    con.print(t)
    bt = Table(title="backends (resolved at build)")
    for col in ("layer", "slot", "component", "backend"):
        bt.add_column(col)
    for row in result["backends"]:
        bt.add_row(row["layer"], row["slot"], row["component"], row["backend"])
    con.print(bt)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


# -------------------------------------------------------------------------------------------------
# bench
def cmd_bench(args) -> int:
    import torch
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .core.bench import environment, run_bench
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = [getattr(torch, d) for d in args.dtype] if args.dtype else None
    modes = tuple(args.mode) if args.mode else ("fwd", "fwd+bwd")
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), transient=True, disable=not sys.stdout.isatty()) as bar:
        task = bar.add_task("bench", total=None)

        def progress(i, n, what):
            bar.update(task, total=n, completed=i, description=what)
        rows = run_bench(args.component or None, args.backend or None, device, dtypes, modes,
                         baselines=not args.no_baselines, case_filter=args.case, progress=progress)
    env = environment(device)
    from rich.table import Table
    con = _console()
    t = Table(title=f"blockzoo bench — {env['device']} — torch {env['torch']} triton {env['triton']} — {env['date']}")
    for col in ("component", "case", "dtype", "mode", "impl", "ms", "rate", "vs baselines"):
        t.add_column(col, justify="right" if col in ("ms", "rate") else "left")
    for r in rows:
        rate = f"{r['rate']:.4g} {r['unit']}" if r.get("rate") else ""
        if r.get("pct_of_copy") is not None:
            rate += f" ({r['pct_of_copy']:.0f}% copy)"
        sp = ", ".join(f"{k} {v:.2f}x" for k, v in (r.get("speedup") or {}).items())
        if r.get("accuracy"):
            sp += ("; " if sp else "") + ", ".join(f"{k} {v:.4g}" for k, v in r["accuracy"].items())
        ms = f"{r['ms']:.3f}" if r["ms"] else f"[dim]{(r['error'] or '')[:60]}[/dim]"
        t.add_row(r["component"], r["case"], r["dtype"], r["mode"], r["impl"], ms, rate, sp)
    con.print(t)
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "rows": rows}, indent=2))
        con.print(f"wrote {args.json}")
    return 0


# -------------------------------------------------------------------------------------------------
# sweep / report
def cmd_sweep(args) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .core.executors import make_executor
    from .core.report import render
    from .core.runner import Runner
    from .core.sweep import load_sweep
    sweep = load_sweep(args.sweep, device=args.device)  # raises SpecError before anything is written
    executor = make_executor(args.executor, workers=args.workers, address=args.address,
                             cpus=args.cpus_per_trial, gpus=args.gpus_per_trial)
    out = Path(args.out or Path("runs") / sweep.file.name)
    con = _console()
    con.print(f"sweep [bold]{sweep.file.name}[/bold]: {len(sweep.trials)} trials -> {out}"
              + (f" (executor {executor.name})" if executor.name != "local" else ""))
    tally = {"ok": 0, "skipped": 0, "failed": 0, "already_done": 0}
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("[green]{task.fields[ok]} done[/green] [yellow]{task.fields[skipped]} skipped[/yellow] "
                             "[red]{task.fields[failed]} failed[/red] {task.fields[cached]} cached"),
                  TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=con) as bar:
        task = bar.add_task("trials", total=len(sweep.trials), ok=0, skipped=0, failed=0, cached=0)

        def on_event(kind, trial, result):
            if kind == "start":
                bar.update(task, description=trial.label[:50])
                return
            tally[kind] = tally.get(kind, 0) + 1
            bar.update(task, advance=1, ok=tally["ok"], skipped=tally["skipped"], failed=tally["failed"],
                       cached=tally["already_done"])
            if kind == "failed":
                first = (result.get("reason") or "").strip().splitlines()
                bar.console.print(f"[red]failed[/red] {trial.label}: {first[0] if first else ''}")
        counts = Runner(sweep, out, workers=args.workers, on_event=on_event, executor=executor).run()
    ran = counts["ok"] + counts["failed"] + counts["skipped"]
    if ran == 0:
        con.print(f"nothing to do: all {counts['already_done']} trials are already in {out}")
    else:
        con.print(f"{counts['ok']} ok, {counts['skipped']} skipped, {counts['failed']} failed, "
                  f"{counts['already_done']} already done")
    files = render(out)
    con.print("report: " + ", ".join(str(p) for p in files.values()))
    return 0


def cmd_report(args) -> int:
    from .core.report import render
    from .core.store import RESULTS
    out = Path(args.dir)
    if not (out / RESULTS).exists():
        raise FileNotFoundError(f"{out / RESULTS} not found: not a sweep output folder")
    files = render(out)
    print("wrote " + ", ".join(str(p) for p in files.values()))
    return 0


# -------------------------------------------------------------------------------------------------
# kv
def cmd_kv_distill(args) -> int:
    """Train token.evict retention gates for a spec's model by distillation on bytes_lm."""
    import torch

    from .core.composer import build
    from .core.spec import load_spec
    from .plugins.token.evict import bytes_lm_sampler, distill
    from .plugins.token.params import EvictParams
    spec = load_spec(Path(args.spec))
    base = spec.kv.params if spec.kv is not None and spec.kv.type == "token.evict" else {}
    params = EvictParams(**{**base, "budget": args.budget, "gate_path": None})
    torch.manual_seed(args.seed)
    model = build(spec)
    if args.weights:
        model.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
    if args.train_steps:
        from .core.tasks import BytesLMConfig, _train_steps
        windows = bytes_lm_sampler(args.seq + 1, args.batch)

        def sample(g):
            w = windows(g)[0]
            return w[:, :-1], w[:, 1:]
        _train_steps(model, sample, BytesLMConfig(steps=args.train_steps, seq=args.seq, batch=args.batch,
                                                  seed=args.seed), "cpu")
    con = _console()

    def log(step, rec):
        if args.log_every and (step % args.log_every == 0 or step == args.steps - 1):
            con.print(f"step {step}: kl {rec['kl']:.4f}  penalty {rec['penalty']:.4f}  retention {rec['retention']:.3f}")
    gates = distill(model, args.steps, params=params, hidden=params.hidden, lr=args.lr or params.distill_lr,
                    penalty=params.distill_penalty if args.penalty is None else args.penalty,
                    sample=bytes_lm_sampler(args.seq, args.batch), seed=args.seed, log=log)
    last = gates.history[-1] if gates.history else {}
    gates.save(args.out, budget=args.budget, steps=args.steps, spec=spec.name, spec_hash=spec.spec_hash(),
               weights=args.weights, train_steps=args.train_steps, final=last)
    con.print(f"wrote {args.out}: token.evict gates for {spec.name} at budget {args.budget} after {args.steps} steps"
              + (f" (kl {last['kl']:.4f}, soft retention {last['retention']:.3f})" if last else ""))
    return 0


# -------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blockzoo", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"blockzoo {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="components x backends with availability, reasons, plugin failures")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("check", help="validate a spec: exit 0 if valid, 2 with the errors")
    s.add_argument("spec")
    s.add_argument("--expanded", action="store_true", help="print the fully expanded spec")
    s.set_defaults(fn=cmd_check)

    s = sub.add_parser("run", help="build a spec and time forward/backward on its workload")
    s.add_argument("spec")
    s.add_argument("--device")
    s.add_argument("--backend", help="override model.backend (auto, reference, triton, numba, ...)")
    s.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"])
    s.add_argument("--steps", type=int)
    s.add_argument("--json", help="also write the result as JSON to this file")
    s.set_defaults(fn=cmd_run)

    s = sub.add_parser("bench", help="time ops x backends x shapes against baselines")
    s.add_argument("--component", action="append", help="component id (repeatable; default all)")
    s.add_argument("--backend", action="append", help="backend name (repeatable; default all)")
    s.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    s.add_argument("--dtype", action="append", choices=["float32", "bfloat16", "float16"])
    s.add_argument("--mode", action="append", choices=["fwd", "fwd+bwd"])
    s.add_argument("--case", help="only cases whose id contains this text")
    s.add_argument("--no-baselines", action="store_true")
    s.add_argument("--json", help="write rows and environment to this JSON file")
    s.set_defaults(fn=cmd_bench)

    s = sub.add_parser("sweep", help="run a sweep file (default: the bundled default sweep); resumable")
    s.add_argument("sweep", nargs="?", help="sweep YAML (omit for the bundled default sweep)")
    s.add_argument("--out", help="output folder (default runs/<sweep name>); rerunning resumes")
    s.add_argument("--device", help="run every trial on this device (cpu, cuda)")
    s.add_argument("--workers", type=int, default=1,
                   help="worker processes (trials in parallel) of the local executor; with --executor ray, "
                        "Ray's free resources decide")
    s.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="where trials run: worker processes here (default) or one Ray task per trial")
    s.add_argument("--address", help="Ray cluster address (--executor ray): auto, HOST:PORT or ray://HOST:PORT; "
                                     "default $RAY_ADDRESS, else a Ray started here")
    s.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs each Ray task asks for (default 1)")
    s.add_argument("--gpus-per-trial", type=float, default=0.0,
                   help="GPUs each Ray task asks for: 1 = one trial per GPU, 0.5 = two per GPU (default 0)")
    s.set_defaults(fn=cmd_sweep)

    s = sub.add_parser("report", help="re-render report.md, report.html and pareto.png of a sweep folder")
    s.add_argument("dir")
    s.set_defaults(fn=cmd_report)

    s = sub.add_parser("kv", help="KV-cache policy tools (kv distill: train token.evict gates)")
    kv = s.add_subparsers(dest="kv_command", required=True)
    s = kv.add_parser("distill", help="train token.evict retention gates by distillation against the dense "
                                      "model on bytes_lm, with a budget penalty")
    s.add_argument("spec", help="model spec (its kv: section, if token.evict, gives the other policy params)")
    s.add_argument("--budget", type=float, default=0.25, help="kept fraction the gates are trained for")
    s.add_argument("--steps", type=int, default=200, help="distillation steps")
    s.add_argument("--out", required=True, help="gate file to write (token.evict params.gate_path)")
    s.add_argument("--weights", help="model state dict (torch.save) to load before distilling")
    s.add_argument("--train-steps", type=int, default=0, help="first train the model on bytes_lm this many steps")
    s.add_argument("--seq", type=int, default=128)
    s.add_argument("--batch", type=int, default=8)
    s.add_argument("--lr", type=float)
    s.add_argument("--penalty", type=float, help="budget penalty weight (default: the params' distill_penalty)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--log-every", type=int, default=0, help="print the losses every N steps")
    s.set_defaults(fn=cmd_kv_distill)

    s = sub.add_parser("schema", help="print the JSON Schema of specs (after plugins load)")
    s.set_defaults(fn=cmd_schema)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .core.spec import SpecError
    from .registry import RegistryError
    try:
        return int(args.fn(args) or 0)
    except SpecError as exc:
        print(f"error: invalid spec\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    except (RegistryError, FileNotFoundError, ValueError, TypeError, RuntimeError) as exc:
        if os.environ.get("BLOCKZOO_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, (RegistryError, FileNotFoundError)) else 1


if __name__ == "__main__":
    sys.exit(main())
