"""The sweep runner: which trials to run, resume, and the results store; executors run them.

The runner expands nothing itself (``sweep.py`` does): it skips trials already complete in the
output folder, records invalid combinations as skipped, hands the rest to an executor
(``executors.py``: ``local`` worker processes by default, or ``ray``), and appends each result to
the store as it comes back (see ``store.py``), so a killed sweep resumes where it stopped when run
again with the same output folder, whichever executor ran it.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .executors import Executor, LocalExecutor, Worker, _worker_main  # noqa: F401 - re-exported
from .store import append_trial, done_trials
from .sweep import Sweep, Trial


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
                 on_event: Callable[[str, Trial, dict[str, Any]], None] | None = None,
                 executor: Executor | None = None) -> None:
        """executor: where the trials run (default: ``LocalExecutor(workers)``, worker processes here)."""
        self.sweep, self.out_dir, self.n_workers = sweep, Path(out_dir), max(1, workers)
        self.on_event = on_event or (lambda *a: None)
        self.executor = executor if executor is not None else LocalExecutor(self.n_workers)
        self.versions = versions()

    # -- bookkeeping ---------------------------------------------------------------------------
    def _record(self, trial: Trial, result: dict[str, Any], wall_s: float) -> None:
        common = {"sweep": self.sweep.file.name, "trial": trial.key, "label": trial.label, "axes": trial.axes,
                  "spec_hash": trial.spec_hash, "device": (trial.spec or {}).get("model", {}).get("device", ""),
                  "backends": result.get("backends", ""), "versions": self.versions,
                  "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
        rows = [{**common, "metric": k, "value": v} for k, v in sorted(result.get("metrics", {}).items())]
        rows.append({**common, "metric": "status", "value": wall_s, "status": result["status"],
                     "reason": result.get("reason", ""), "compute_s": result.get("compute_s"),
                     **{k: result[k] for k in ("attempts", "node") if k in result}})
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

        def start(trial: Trial) -> None:
            self._save_spec(trial)
            self.on_event("start", trial, {})

        def finish(trial: Trial, result: dict[str, Any], wall_s: float) -> None:
            nonlocal compute
            counts[result["status"]] = counts.get(result["status"], 0) + 1
            compute += result.get("compute_s") or 0.0
            self._record(trial, result, wall_s)

        self.executor.run(todo, self._job, self.sweep.file.plugins, self.sweep.file.trial_timeout, start, finish)
        wall = time.perf_counter() - t_start
        counts["wall_s"], counts["compute_s"] = wall, compute
        desc = self.executor.describe()
        # trials run side by side on `slots` workers: the time they had is wall x slots (idle
        # workers at the end count as overhead); unknown (a cluster): no invocation figure
        slots = min(int(desc["workers"]), len(todo)) if desc.get("workers") else None
        avail = wall * slots if slots else 0.0
        with (self.out_dir / "invocations.jsonl").open("a") as f:
            f.write(json.dumps({"time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                                "trials_run": len(todo), "wall_s": wall, "compute_s": compute, **desc,
                                "slots": slots, "overhead": (avail - compute) / avail if avail else None})
                    + "\n")
        return counts

    def _job(self, trial: Trial) -> dict[str, Any]:
        return {"spec": trial.spec, "tasks": self.sweep.file.tasks, "measure": self.sweep.file.measure.model_dump()}
