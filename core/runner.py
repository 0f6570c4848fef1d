"""The sweep runner: worker processes, per-trial timeout, crash isolation, resume.

Trials run in long-lived worker processes (spawned once, reused across trials, so the import
cost is paid once per worker, not per trial). A trial that crashes its worker (segfault, abort,
out of memory) or outlives ``trial_timeout`` is recorded as failed with the reason, the worker is
replaced, and the sweep goes on. Results are appended per trial (see ``store.py``), so a killed
sweep resumes where it stopped when run again with the same output folder.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .store import append_trial, done_trials
from .sweep import Sweep, Trial


def _worker_main(conn, plugins: list[str], env: dict[str, str]) -> None:  # runs in the child
    os.environ.update(env)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    import torch

    torch.set_num_threads(int(env.get("BLOCKZOO_WORKER_THREADS", torch.get_num_threads())))
    from .sweep import register_plugin_module
    from .trial import run_trial
    for mod in plugins:
        register_plugin_module(mod)
    conn.send({"ready": True})
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        conn.send(run_trial(job))


@dataclass
class Worker:
    proc: Any
    conn: Any
    trial: Trial | None = None
    started: float = 0.0
    ready: bool = False


def versions() -> dict[str, str | None]:
    import importlib.metadata as md
    import platform
    out = {"python": platform.python_version()}
    for pkg in ("blockzoo", "torch", "triton", "numba"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


class Runner:
    def __init__(self, sweep: Sweep, out_dir: Path, workers: int = 1,
                 on_event: Callable[[str, Trial, dict[str, Any]], None] | None = None) -> None:
        self.sweep, self.out_dir, self.n_workers = sweep, Path(out_dir), max(1, workers)
        self.on_event = on_event or (lambda *a: None)
        self.ctx = mp.get_context("spawn")
        self.versions = versions()
        threads = max(1, (os.cpu_count() or 1) // self.n_workers)
        self.env = {"BLOCKZOO_WORKER_THREADS": str(threads)}

    # -- workers -------------------------------------------------------------------------------
    def _start_worker(self) -> Worker:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=_worker_main, args=(child, self.sweep.file.plugins, self.env), daemon=True)
        proc.start()
        child.close()
        return Worker(proc, parent)

    def _stop(self, w: Worker, kill: bool = False) -> None:
        try:
            if kill:
                w.proc.kill()
            else:
                w.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        w.proc.join(timeout=5)
        if w.proc.is_alive():
            w.proc.kill()
            w.proc.join()

    # -- bookkeeping ---------------------------------------------------------------------------
    def _record(self, trial: Trial, result: dict[str, Any], wall_s: float) -> None:
        common = {"sweep": self.sweep.file.name, "trial": trial.key, "label": trial.label, "axes": trial.axes,
                  "spec_hash": trial.spec_hash, "device": (trial.spec or {}).get("model", {}).get("device", ""),
                  "backends": result.get("backends", ""), "versions": self.versions,
                  "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
        rows = [{**common, "metric": k, "value": v} for k, v in sorted(result.get("metrics", {}).items())]
        rows.append({**common, "metric": "status", "value": wall_s, "status": result["status"],
                     "reason": result.get("reason", ""), "compute_s": result.get("compute_s")})
        append_trial(self.out_dir, rows)
        self.on_event(result["status"], trial, result)

    def _save_spec(self, trial: Trial) -> None:
        if trial.spec is None:
            return
        import yaml
        d = self.out_dir / "specs"
        d.mkdir(exist_ok=True)
        (d / f"{trial.key}.yaml").write_text(yaml.safe_dump(trial.spec, sort_keys=False))

    # -- main loop -----------------------------------------------------------------------------
    def run(self) -> dict[str, int]:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        done = done_trials(self.out_dir)
        counts = {"ok": 0, "skipped": 0, "failed": 0, "already_done": 0}
        todo: list[Trial] = []
        for t in self.sweep.trials:
            if t.key in done:
                counts["already_done"] += 1
                self.on_event("already_done", t, done[t.key])
            elif t.status == "skipped":
                self._record(t, {"status": "skipped", "reason": t.reason}, 0.0)
                counts["skipped"] += 1
            else:
                todo.append(t)
        if not todo:
            return counts
        t_start = time.perf_counter()
        compute = 0.0
        timeout = self.sweep.file.trial_timeout
        workers: list[Worker] = []
        try:
            for _ in range(min(self.n_workers, len(todo))):
                workers.append(self._start_worker())
            queue = list(todo)
            while queue or any(w.trial for w in workers):
                for i, w in enumerate(workers):
                    if w.trial is None and queue:
                        if not self._ready(w):
                            self._stop(w, kill=True)
                            workers[i] = w = self._start_worker()
                            if not self._ready(w):
                                raise RuntimeError("a sweep worker process failed to start")
                        w.trial = queue.pop(0)
                        self._save_spec(w.trial)
                        self.on_event("start", w.trial, {})
                        w.started = time.perf_counter()
                        w.conn.send({"spec": w.trial.spec, "tasks": self.sweep.file.tasks,
                                     "measure": self.sweep.file.measure.model_dump()})
                progressed = False
                for i, w in enumerate(workers):
                    if w.trial is None:
                        continue
                    elapsed = time.perf_counter() - w.started
                    result = None
                    try:
                        if w.conn.poll(0.05):
                            result = w.conn.recv()
                    except (EOFError, OSError):
                        result = None
                    if result is None and not w.proc.is_alive():
                        code = w.proc.exitcode
                        how = f"signal {-code} ({signal.Signals(-code).name})" if code and code < 0 else f"exit code {code}"
                        result = {"status": "failed", "reason": f"worker process died ({how}) while running the trial",
                                  "metrics": {}}
                        self._stop(w, kill=True)
                        workers[i] = self._start_worker()
                    elif result is None and elapsed > timeout:
                        result = {"status": "failed", "reason": f"timed out after {timeout:g} s (trial_timeout)",
                                  "metrics": {}}
                        self._stop(w, kill=True)
                        workers[i] = self._start_worker()
                    if result is not None:
                        trial = w.trial
                        workers[i].trial = None
                        counts[result["status"]] = counts.get(result["status"], 0) + 1
                        compute += result.get("compute_s") or 0.0
                        self._record(trial, result, time.perf_counter() - w.started)
                        progressed = True
                if not progressed:
                    time.sleep(0.01)
        finally:
            for w in workers:
                self._stop(w, kill=w.trial is not None)
        wall = time.perf_counter() - t_start
        counts["wall_s"], counts["compute_s"] = wall, compute
        with (self.out_dir / "invocations.jsonl").open("a") as f:
            f.write(json.dumps({"time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                                "trials_run": len(todo), "wall_s": wall, "compute_s": compute,
                                "workers": self.n_workers, "overhead": (wall - compute) / wall if wall else None})
                    + "\n")
        return counts

    def _ready(self, w: Worker) -> bool:
        if w.ready:
            return True
        try:
            if w.conn.poll(120):
                w.ready = bool(w.conn.recv().get("ready"))
                return w.ready
        except (EOFError, OSError):
            return False
        return False
