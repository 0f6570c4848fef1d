"""The Ray executor on a real local Ray cluster (tox -e ray; needs ``blockzoo[ray]``).

A head node with no CPUs (so every trial runs on a worker node) and one worker node with one CPU,
all on this machine, each started with ``ray start --block`` in a session of its own so that the
test can kill a node outright and tears everything down even when a test fails. The sweeps run
through the ``blockzoo sweep`` command, as a user would run them.
"""

import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

if not os.environ.get("BLOCKZOO_REQUIRE_RAY"):  # in tox -e ray a missing Ray is an error, not a skip
    pytest.importorskip("ray")

from blockzoo.core.store import read_rows, wide  # noqa: E402

HERE = Path(__file__).parent
SWEEP = HERE / "tiny_sweep.yaml"
RAY = str(Path(sys.executable).parent / "ray")
OBJECT_STORE = str(80 * 2**20)  # the smallest Ray accepts is 75 MiB
# latencies (median of warmed-up repetitions) are compared within noise; training wall times
# (`*_train_s`) include one-off warm-up in the first trial of each worker process, so they are only
# checked to be there; every other metric (quality, cost, parameters) must be identical
LATENCIES = ("forward_ms", "fwd_bwd_ms", "tokens_per_s", "peak_memory_mb")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A Ray cluster of processes on this machine (the driver reaches its head on 127.0.0.1)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="bzray-"))  # short: Ray's socket paths must fit in 107 bytes
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.gate = self.root / "gate"
        # Ray on Linux will not give a node of a multi-node cluster a loopback address (it swaps
        # 127.0.0.1 for the machine's own), so the nodes advertise this machine's address; token
        # authentication, with a token only this test knows, keeps anyone else off the cluster
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                    "RAY_USAGE_STATS_ENABLED": "0",
                    "PYTHONPATH": os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p),
                    "BLOCKZOO_RAY_TEST_GATE": str(self.gate)}
        self.nodes: list[tuple[subprocess.Popen, Path]] = []

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = self.root / f"{name}.log"
        with log.open("w") as f:
            proc = subprocess.Popen([RAY, "start", "--block", "--object-store-memory", OBJECT_STORE, "--disable-usage-stats", *args],
                                    stdout=f, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.nodes.append((proc, log))
        deadline = time.time() + 120
        while "Ray runtime started" not in log.read_text():
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray start {name} failed:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        return proc

    def start_head(self) -> None:
        self._start("head", ["--head", "--port", str(self.port), "--num-cpus", "0", "--include-dashboard=false",
                             "--ray-client-server-port", str(free_port()), "--temp-dir", str(self.root / "t")])

    def add_worker(self) -> subprocess.Popen:
        return self._start(f"worker{len(self.nodes)}", ["--address", self.address, "--num-cpus", "1"])

    @staticmethod
    def group(sid: int) -> list[tuple[int, str]]:
        """(pid, command line) of every live process of a session (a node: `ray start`, its raylet,
        agents, Ray workers, each in a process group of its own, and their trial processes)."""
        out = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                stat = (d / "stat").read_text()
                fields = stat[stat.rindex(")") + 2:].split()
                if int(fields[3]) == sid and fields[0] != "Z":
                    out.append((int(d.name), (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()))
            except (OSError, ValueError):
                continue
        return out

    def kill(self, proc: subprocess.Popen, sig: int = signal.SIGKILL, wait: float = 30) -> None:
        """Kill a node: its `ray start`, raylet, Ray workers and their trial processes."""
        self._signal(proc.pid, sig)
        deadline = time.time() + wait
        while self.group(proc.pid) and time.time() < deadline:
            time.sleep(0.1)
        while self.group(proc.pid) and time.time() < deadline + 10:
            self._signal(proc.pid, signal.SIGKILL)
            time.sleep(0.1)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def _signal(self, sid: int, sig: int) -> None:
        for pid, _ in self.group(sid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def shutdown(self) -> None:
        for proc, _ in reversed(self.nodes):  # workers first, then the head; SIGTERM lets Ray clean up
            self.kill(proc, signal.SIGTERM, wait=5)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    try:
        c.start_head()
        c.add_worker()
        yield c
    finally:
        c.shutdown()
    for proc, _ in c.nodes:
        assert not c.group(proc.pid), f"processes of a Ray node outlived the test: {c.group(proc.pid)}"


def sweep_cmd(sweep: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "blockzoo.cli", "sweep", str(sweep), "--out", str(out), *extra]


def cli(cluster: Cluster, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(sweep_cmd(*args), capture_output=True, text=True, env=cluster.env, timeout=timeout)


def status_rows(out: Path) -> list[dict]:
    return [r for r in read_rows(out) if r["metric"] == "status"]


def by_label(out: Path) -> dict[str, dict]:
    return {r["label"]: r for r in status_rows(out)}


def test_crash_hang_raise_and_lost_worker_are_failed_trials(cluster, tmp_path):
    sweep = tmp_path / "failing.yaml"
    sweep.write_text("""name: ray-failing
plugins: [ray_crashy_plugin]
trial_timeout: 8
base:
  model: {d_model: 32, n_heads: 4, n_kv_heads: 2, n_layers: 1, max_seq: 64, backend: reference}
  workload: {batch: 2, seq: 32}
axes:
  block.mixer.params.mode: [abort, hang, raise, kill_ray_worker, fine]
  block.mixer.type: [test.raycrash]
tasks: {mqar: {steps: 2, batch: 2, seq: 32, kv_pairs: 2, eval_batches: 1}}
measure: {correctness: false, latency: true, latency_reps: 1}
""")
    out = tmp_path / "out"
    run = cli(cluster, sweep, out, "--executor", "ray", "--address", cluster.address)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 ok, 0 skipped, 4 failed" in run.stdout, run.stdout
    rows = {r["label"].split(",")[0]: r for r in status_rows(out)}
    assert len(status_rows(out)) == 5  # one status line per trial: the retry did not write twice
    assert rows["mode=fine"]["status"] == "ok" and rows["mode=fine"]["attempts"] == 1
    assert "worker process died (signal 6 (SIGABRT))" in rows["mode=abort"]["reason"]
    assert "timed out after 8 s (trial_timeout)" in rows["mode=hang"]["reason"]
    assert "RuntimeError: this kernel raises on purpose" in rows["mode=raise"]["reason"]
    for mode in ("abort", "hang", "raise"):  # the trial's own failures are not retried
        assert rows[f"mode={mode}"]["status"] == "failed" and rows[f"mode={mode}"]["attempts"] == 1, mode
    lost = rows["mode=kill_ray_worker"]
    assert lost["status"] == "failed" and lost["attempts"] == 2, lost
    assert "Ray worker lost 2 times" in lost["reason"] and "WorkerCrashedError" in lost["reason"], lost["reason"]


def wait_for(what, driver: subprocess.Popen, log: Path, limit: float = 240) -> None:
    deadline = time.time() + limit
    while not what():
        assert driver.poll() is None, f"the driver exited ({driver.returncode}):\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"timed out waiting:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


def test_killed_driver_and_lost_node_give_the_local_table(cluster, tmp_path):
    out, local = tmp_path / "ray", tmp_path / "local"
    ray_sweep = sweep_cmd(SWEEP, out, "--executor", "ray", "--address", cluster.address)
    # 1. kill the driver mid-sweep (gate open: no trial is held)
    cluster.gate.touch()
    log = tmp_path / "driver1.log"
    with log.open("w") as f:
        driver = subprocess.Popen(ray_sweep, stdout=f, stderr=subprocess.STDOUT, env=cluster.env, start_new_session=True)
    try:
        wait_for(lambda: len(status_rows(out)) >= 2, driver, log)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    first = {r["trial"]: r for r in status_rows(out)}
    assert 2 <= len(first) < 6, len(first)
    assert sum("mode=gate" in r["label"] for r in first.values()) < 3  # a gate trial is left for step 2
    # 2. resume, and kill the worker node while a gate trial is held on it (1 CPU: it runs alone there)
    cluster.gate.unlink()
    waiting = Path(f"{cluster.gate}.waiting")
    waiting.unlink(missing_ok=True)
    node = cluster.nodes[-1][0]
    log = tmp_path / "driver2.log"
    with log.open("w") as f:
        driver = subprocess.Popen(ray_sweep, stdout=f, stderr=subprocess.STDOUT, env=cluster.env, start_new_session=True)
    try:
        wait_for(waiting.exists, driver, log)
        assert any("ray::blockzoo_trial" in cmd for _, cmd in cluster.group(node.pid))  # held on that node
        cluster.kill(node)
        assert not cluster.group(node.pid)
        cluster.add_worker()  # the lost trial is submitted again and lands here
        cluster.gate.touch()
        assert driver.wait(timeout=240) == 0, log.read_text()
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    assert f"{len(first)} already done" in log.read_text(), log.read_text()
    final = status_rows(out)
    assert len(final) == 6 and len({r["trial"] for r in final}) == 6  # append-only, no trial twice
    for r in final:
        if r["trial"] in first:
            assert r == first[r["trial"]]  # the first run's trials were kept, not redone
    assert all(r["status"] == "ok" for r in final), [(r["label"], r["reason"]) for r in final]
    retried = [r for r in final if r["attempts"] == 2]
    assert len(retried) == 1 and "mode=gate" in retried[0]["label"], [(r["label"], r["attempts"]) for r in final]
    assert retried[0]["reason"].startswith(("retried after: NodeDiedError", "retried after: WorkerCrashedError")), \
        retried[0]["reason"]
    assert "nothing to do" in cli(cluster, SWEEP, out, "--executor", "ray", "--address", cluster.address).stdout
    # 3. the same sweep with the local executor (one thread per trial, as each Ray task has one CPU)
    loc = cli(cluster, SWEEP, local, "--workers", str(os.cpu_count() or 1))
    assert loc.returncode == 0, loc.stdout + loc.stderr
    ray_t = {t["trial"]: t for t in wide(read_rows(out))}
    loc_t = {t["trial"]: t for t in wide(read_rows(local))}
    assert set(ray_t) == set(loc_t) and len(ray_t) == 6  # same trials: same spec hash keys
    skip = {"trial", "wall_s", "reason", "axes"}
    for key, a in ray_t.items():
        b = loc_t[key]
        assert set(a) == set(b), (a["label"], set(a) ^ set(b))
        for name in sorted(set(a) - skip):
            x, y = a[name], b[name]
            if name in LATENCIES or name.endswith("_train_s"):
                assert isinstance(x, float) and x > 0 and math.isfinite(x), (a["label"], name, x)
                if name in LATENCIES:  # within noise on a busy shared machine
                    assert 1 / 20 < x / y < 20, (a["label"], name, x, y)
            else:
                assert x == y, (a["label"], name, x, y)  # quality, cost, params, labels: identical
