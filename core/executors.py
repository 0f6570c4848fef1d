"""Sweep executors: where the trials of a sweep run.

The runner (``runner.py``) decides which trials to run, and records each result in the
append-only store on the driver; an executor only runs them and hands each result back:

- ``local`` (the default): long-lived worker processes on this machine, spawned once and reused,
  one trial at a time each. A trial that crashes its worker (segfault, abort, out of memory) or
  outlives ``trial_timeout`` is failed with the reason, the worker is replaced, the sweep goes on.
- ``ray`` (``pip install 'blockzoo[ray]'``): one Ray task per trial with its resource request
  (CPUs, a GPU or a fraction of one) on an existing Ray cluster. Inside the task the trial runs in
  the same kind of worker process as locally (kept alive across the tasks that the same Ray
  worker runs), so a crash, a hang or an out-of-memory kill of the trial is a failed trial with
  the same reason as locally. A Ray worker or node lost under a trial (the machine went away, its
  raylet died) is not the trial's fault: the trial is submitted again, once, and failed if it is
  lost a second time.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .sweep import Trial

Job = Callable[[Trial], dict[str, Any]]
Start = Callable[[Trial], None]
Finish = Callable[[Trial, dict[str, Any], float], None]

EXECUTORS = ("local", "ray")


# -------------------------------------------------------------------------------------------------
# worker processes (used by the local executor, and inside each Ray task)
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


#: set in a worker's environment from its start (unless already set here): OpenMP runtime settings
#: that libgomp reads once, when torch loads it, too early for ``_worker_main`` to set them.
#: PASSIVE: OpenMP threads sleep between parallel regions instead of spinning; torch and numba's
#: omp threading layer share libgomp, and the threads that one leaves spinning after each kernel
#: take the cores from the other's next op (a tiny model's training step, numba norms and MLPs
#: between torch ops, ran 3-6x slower on a loaded 2-core machine).
WORKER_START_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def worker_threads(workers: int) -> int:
    """Threads per worker (torch and numba): the cores shared out among the workers, at most
    ``OMP_NUM_THREADS`` where that is set."""
    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    cap = os.environ.get("OMP_NUM_THREADS", "").strip()
    if cap.isdigit() and int(cap) > 0:
        threads = min(threads, int(cap))
    return threads


def start_worker(ctx, plugins: list[str], env: dict[str, str]) -> Worker:
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_worker_main, args=(child, plugins, env), daemon=True)
    added = [k for k in WORKER_START_ENV if k not in os.environ and not (
        k == "OMP_WAIT_POLICY" and "GOMP_SPINCOUNT" in os.environ)]
    os.environ.update({k: WORKER_START_ENV[k] for k in added})  # inherited by the spawned child
    try:
        proc.start()
    finally:
        for k in added:
            os.environ.pop(k, None)
    child.close()
    return Worker(proc, parent)


def stop_worker(w: Worker, kill: bool = False) -> None:
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


def worker_ready(w: Worker, timeout: float = 120) -> bool:
    if w.ready:
        return True
    try:
        if w.conn.poll(timeout):
            w.ready = bool(w.conn.recv().get("ready"))
            return w.ready
    except (EOFError, OSError):
        return False
    return False


def died(w: Worker) -> dict[str, Any]:
    code = w.proc.exitcode
    how = f"signal {-code} ({signal.Signals(-code).name})" if code and code < 0 else f"exit code {code}"
    return {"status": "failed", "reason": f"worker process died ({how}) while running the trial", "metrics": {}}


def timed_out(timeout: float) -> dict[str, Any]:
    return {"status": "failed", "reason": f"timed out after {timeout:g} s (trial_timeout)", "metrics": {}}


# -------------------------------------------------------------------------------------------------
class Executor:
    """Runs trials and hands each result back; knows nothing of the store."""

    name = "executor"

    def run(self, trials: Sequence[Trial], job: Job, plugins: list[str], timeout: float,
            start: Start, finish: Finish) -> None:
        """Run every trial. ``job(trial)`` is what ``trial.run_trial`` takes; ``start(trial)`` when a
        trial is handed to a worker; ``finish(trial, result, wall_s)`` once per trial, with
        result = {"status": ok|skipped|failed, "reason", "metrics", ...}."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"executor": self.name}


class LocalExecutor(Executor):
    """Worker processes on this machine (``workers`` of them, trials in parallel)."""

    name = "local"

    def __init__(self, workers: int = 1) -> None:
        self.n_workers = max(1, workers)
        self.ctx = mp.get_context("spawn")
        threads = worker_threads(self.n_workers)
        self.env = {"BLOCKZOO_WORKER_THREADS": str(threads)}
        if "NUMBA_NUM_THREADS" not in os.environ:  # numba reads it on import, in the worker
            self.env["NUMBA_NUM_THREADS"] = str(threads)

    def describe(self) -> dict[str, Any]:
        return {"executor": self.name, "workers": self.n_workers}

    def run(self, trials: Sequence[Trial], job: Job, plugins: list[str], timeout: float,
            start: Start, finish: Finish) -> None:
        workers: list[Worker] = []
        try:
            for _ in range(min(self.n_workers, len(trials))):
                workers.append(start_worker(self.ctx, plugins, self.env))
            queue = list(trials)
            while queue or any(w.trial for w in workers):
                for i, w in enumerate(workers):
                    if w.trial is None and queue:
                        if not worker_ready(w):
                            stop_worker(w, kill=True)
                            workers[i] = w = start_worker(self.ctx, plugins, self.env)
                            if not worker_ready(w):
                                raise RuntimeError("a sweep worker process failed to start")
                        w.trial = queue.pop(0)
                        start(w.trial)
                        w.started = time.perf_counter()
                        w.conn.send(job(w.trial))
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
                        result = died(w)
                        stop_worker(w, kill=True)
                        workers[i] = start_worker(self.ctx, plugins, self.env)
                    elif result is None and elapsed > timeout:
                        result = timed_out(timeout)
                        stop_worker(w, kill=True)
                        workers[i] = start_worker(self.ctx, plugins, self.env)
                    if result is not None:
                        trial = w.trial
                        workers[i].trial = None
                        finish(trial, result, time.perf_counter() - w.started)
                        progressed = True
                if not progressed:
                    time.sleep(0.01)
        finally:
            for w in workers:
                stop_worker(w, kill=w.trial is not None)


# -------------------------------------------------------------------------------------------------
# Ray
_RAY_WORKER: dict[str, Any] = {}  # inside a Ray worker process: its trial worker, reused across tasks


def blockzoo_trial(job: dict[str, Any], plugins: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    """The Ray task: run one trial in this Ray worker's trial process (started on first use)."""
    t0 = time.perf_counter()
    key = repr((plugins, sorted(env.items()), os.environ.get("CUDA_VISIBLE_DEVICES")))
    w = _RAY_WORKER.get("worker")
    if w is not None and (_RAY_WORKER.get("key") != key or not w.proc.is_alive()):
        stop_worker(w, kill=not w.proc.is_alive())
        w = None
    if w is None:
        w = start_worker(mp.get_context("spawn"), plugins, env)
        _RAY_WORKER.update(worker=w, key=key)
    where = socket.gethostname()
    if not worker_ready(w):
        _RAY_WORKER.clear()
        stop_worker(w, kill=True)
        result = {"status": "failed", "metrics": {},
                  "reason": f"the trial worker process failed to start on {where} (exit code {w.proc.exitcode}; "
                            "are blockzoo and the sweep's plugins installed there?)"}
    else:
        started = time.perf_counter()
        result = None
        try:
            w.conn.send(job)
        except (BrokenPipeError, OSError):  # the trial process died while idle: no result will come
            w.proc.join(timeout=5)
        while result is None:
            try:
                if w.conn.poll(0.05):
                    result = w.conn.recv()
                    break
            except (EOFError, OSError):
                time.sleep(0.01)  # the pipe is closed: the process is exiting
            if not w.proc.is_alive():
                result = died(w)
            elif time.perf_counter() - started > timeout:
                result = timed_out(timeout)
            if result is not None:
                _RAY_WORKER.clear()
                stop_worker(w, kill=True)
    result["wall_s"] = time.perf_counter() - t0
    result["node"] = where
    return result


class RayExecutor(Executor):
    """One Ray task per trial on a Ray cluster; results come back to the driver's store.

    address: as for ``ray.init`` (None: $RAY_ADDRESS, else a Ray started on this machine for the
    sweep; "auto": the cluster this machine belongs to; "HOST:PORT"; "ray://HOST:10001" with Ray
    Client). cpus, gpus: the resource request of each trial (gpus=1: one trial per GPU; a fraction
    packs several trials on one GPU). retries: how often a trial whose Ray worker or node was lost
    is submitted again before it is failed.
    """

    name = "ray"

    def __init__(self, address: str | None = None, cpus: float = 1.0, gpus: float = 0.0, retries: int = 1) -> None:
        import importlib.util
        if importlib.util.find_spec("ray") is None:
            raise RuntimeError("--executor ray needs Ray on this machine and on every node of the cluster: "
                               "pip install 'blockzoo[ray]'")
        if cpus <= 0:
            raise ValueError(f"cpus per trial must be > 0, got {cpus}")
        if gpus < 0:
            raise ValueError(f"gpus per trial must be >= 0, got {gpus}")
        if gpus > 1 and gpus != int(gpus):
            raise ValueError(f"gpus per trial above 1 must be a whole number, got {gpus}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.address, self.cpus, self.gpus, self.retries = address, float(cpus), float(gpus), retries
        _check_reachable(address)
        threads = max(1, int(self.cpus))
        self.env = {"BLOCKZOO_WORKER_THREADS": str(threads)}

    def describe(self) -> dict[str, Any]:
        return {"executor": self.name, "address": self.address, "cpus_per_trial": self.cpus,
                "gpus_per_trial": self.gpus}

    def _connect(self):
        import logging

        import ray
        if ray.is_initialized():
            return ray, False
        try:
            ray.init(address=self.address, logging_level=logging.WARNING, log_to_driver=False,
                     configure_logging=True)
        except (ConnectionError, TimeoutError) as exc:
            raise RuntimeError(f"cannot connect to the Ray cluster at {self.address or 'the default address'}: "
                               f"{exc}") from None
        return ray, True

    def run(self, trials: Sequence[Trial], job: Job, plugins: list[str], timeout: float,
            start: Start, finish: Finish) -> None:
        ray, owned = self._connect()
        from ray import exceptions as rx
        # a lost Ray worker or node: the trial is not at fault, so it is submitted again
        lost = tuple(getattr(rx, n) for n in ("WorkerCrashedError", "NodeDiedError", "LocalRayletDiedError",
                                              "ObjectLostError", "RaySystemError") if hasattr(rx, n))
        oom = getattr(rx, "OutOfMemoryError", ())
        remote = ray.remote(blockzoo_trial).options(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=0)
        pending: dict[Any, tuple[Trial, int, list[str]]] = {}

        def submit(trial: Trial, attempt: int, losses: list[str]) -> None:
            pending[remote.remote(job(trial), list(plugins), self.env, timeout)] = (trial, attempt, losses)

        try:
            for t in trials:
                start(t)
                submit(t, 1, [])
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                for ref in ready:
                    trial, attempt, losses = pending.pop(ref)
                    t_get = time.perf_counter()
                    try:
                        result = ray.get(ref)
                    except oom as exc:
                        result = {"status": "failed", "metrics": {},
                                  "reason": f"out of memory: Ray's memory monitor killed the trial's worker ({_first(exc)})"}
                    except rx.RayTaskError as exc:  # the task wrapper itself raised (the trial's errors are results)
                        result = {"status": "failed", "metrics": {}, "reason": f"the Ray task raised: {exc}"}
                    except lost as exc:
                        losses = [*losses, f"{type(exc).__name__}: {_first(exc)}"]
                        if attempt <= self.retries:
                            submit(trial, attempt + 1, losses)
                            continue
                        result = {"status": "failed", "metrics": {},
                                  "reason": f"Ray worker lost {attempt} times under the trial, gave up after "
                                            f"{self.retries} {'retry' if self.retries == 1 else 'retries'}: "
                                            + " | ".join(losses)}
                    except rx.RayError as exc:
                        result = {"status": "failed", "metrics": {}, "reason": f"{type(exc).__name__}: {_first(exc)}"}
                    result["attempts"] = attempt
                    if losses and result["status"] != "failed":
                        result["reason"] = "retried after: " + " | ".join(losses)
                    finish(trial, result, result.get("wall_s", time.perf_counter() - t_get))
        finally:
            for ref in pending:
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # noqa: BLE001 - best effort on the way out
                    pass
            if owned:
                ray.shutdown()


def _check_reachable(address: str | None, timeout: float = 5.0) -> None:
    """Fail fast on a HOST:PORT or ray://HOST:PORT nobody listens on (``ray.init`` retries for minutes)."""
    if not address or address == "auto":
        return
    hostport = address.removeprefix("ray://")
    if address.startswith("ray://") and not hostport.rpartition(":")[2].isdigit():
        hostport += ":10001"  # Ray Client's default port
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--address {address!r}: expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise RuntimeError(f"cannot reach the Ray cluster at --address {address}: {exc}") from None


def _first(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def make_executor(name: str, workers: int = 1, address: str | None = None, cpus: float = 1.0,
                  gpus: float = 0.0) -> Executor:
    if name == "local":
        if address is not None:
            raise ValueError("--address is for --executor ray; the local executor runs on this machine")
        return LocalExecutor(workers)
    if name == "ray":
        return RayExecutor(address=address, cpus=cpus, gpus=gpus)
    raise ValueError(f"unknown executor {name!r}: choose one of {', '.join(EXECUTORS)}")
