"""Sweeps: expansion, resume after SIGKILL, crash/hang/raise isolation, reports, bad files."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blockzoo.core.report import pareto_front, render
from blockzoo.core.runner import Runner
from blockzoo.core.store import RESULTS, append_trial, done_trials, read_rows
from blockzoo.core.sweep import load_sweep

ROOT = Path(__file__).parent.parent
HELPERS = Path(__file__).parent / "helpers"
FAST = """
tasks: {mqar: {steps: 2, batch: 2, seq: 32, kv_pairs: 2, eval_batches: 1}}
measure: {correctness: false, latency: true, latency_reps: 1}
"""
BASE = ("base:\n  model: {d_model: 32, n_heads: 4, n_kv_heads: 2, n_layers: 1, max_seq: 64, backend: reference}\n"
        "  workload: {batch: 2, seq: 32}\n")


def write(tmp_path, text, name="s.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def cli(*args, env=None):
    e = {**os.environ, "PYTHONPATH": f"{HELPERS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **(env or {})}
    return subprocess.run([sys.executable, "-m", "blockzoo.cli", *args], capture_output=True, text=True, env=e)


def test_expansion_excludes_and_skips(tmp_path):
    p = write(tmp_path, "name: x\n" + BASE + """
axes:
  block.mlp.type: [mlp.swiglu, mlp.gelu]
  model.n_kv_heads: [2, 3]
exclude:
  - {block.mlp.type: mlp.gelu, model.n_kv_heads: 2}
""" + FAST)
    sweep = load_sweep(p)
    labels = [t.label for t in sweep.trials]
    assert len(labels) == 3 and "mlp=gelu, n_kv_heads=2" not in labels and "mlp=swiglu, n_kv_heads=2" in labels
    skipped = [t for t in sweep.trials if t.status == "skipped"]
    assert len(skipped) == 2 and all("n_kv_heads" in t.reason for t in skipped)  # 4 heads % 3 != 0
    assert len({t.key for t in sweep.trials}) == 3


@pytest.mark.parametrize("text,line,needle", [
    ("name: x\naxs: {}\n", 2, "did you mean 'axes'"),
    ("name: x\n" + BASE + "tasks: {mqr: {}}\n", 5, "did you mean 'mqar'"),
    ("name: x\n" + BASE + "tasks: {mqar: {stepz: 1}}\n", 5, "stepz"),
    ("name: x\nbase:\n  model: {d_modle: 3}\n", 3, "did you mean 'd_model'"),
    ("name: x\n" + BASE + "axes:\n  blok.mixer: [1]\n", 6, "did you mean 'block'"),
])
def test_malformed_sweep_exit_2_nothing_written(tmp_path, text, line, needle):
    p = write(tmp_path, text)
    out = cli("sweep", str(p), "--out", str(tmp_path / "out"))
    assert out.returncode == 2, out.stderr
    assert f"s.yaml:{line}:" in out.stderr and needle in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "out").exists()


def test_crash_hang_raise_are_failed_trials_and_the_rest_finishes(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(HELPERS))
    # the timeout must also cover a fresh worker's imports after a crash on a loaded 2-core box
    p = write(tmp_path, "name: crashy\nplugins: [crashy_plugin]\ntrial_timeout: 40\n" + BASE + """
axes:
  block.mixer: [{type: test.crash, params: {mode: abort}}, {type: test.crash, params: {mode: hang}},
                {type: test.crash, params: {mode: raise}}, {type: attention.dense}]
""" + FAST)
    counts = Runner(load_sweep(p), tmp_path / "out").run()
    done = done_trials(tmp_path / "out")
    reasons = {r["label"]: r["reason"] for r in done.values()}
    assert counts["ok"] == 1 and counts["failed"] == 3, reasons
    assert "SIGABRT" in reasons["mixer=test.crash(mode=abort)"]
    assert "timed out after 40 s" in reasons["mixer=test.crash(mode=hang)"]
    assert "raises on purpose" in reasons["mixer=test.crash(mode=raise)"]
    assert done[next(k for k, r in done.items() if r["label"] == "mixer=attention.dense")]["status"] == "ok"


def test_kill_and_resume(tmp_path):
    p = write(tmp_path, "name: resume\n" + BASE + """
axes:
  model.d_model: [16, 24, 32, 40, 48, 56]
""" + FAST.replace("steps: 2,", "steps: 40,"))
    out_dir = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "blockzoo.cli", "sweep", str(p), "--out", str(out_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(done_trials(out_dir)) < 2:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its workers, mid-run
    proc.wait()
    first = done_trials(out_dir)
    assert 2 <= len(first) < 6, len(first)
    # simulate a kill in the middle of a write: a partial trailing line
    with (out_dir / RESULTS).open("ab") as f:
        f.write(b'{"trial": "partial", "metric": "status", "val')
    out = cli("sweep", str(p), "--out", str(out_dir))
    assert out.returncode == 0, out.stderr
    final = done_trials(out_dir)
    assert len(final) == 6
    statuses = [r for r in read_rows(out_dir) if r["metric"] == "status"]
    assert len(statuses) == 6  # no trial ran twice
    for k, row in first.items():
        assert final[k]["time"] == row["time"]  # finished trials were kept, not redone
    again = cli("sweep", str(p), "--out", str(out_dir))
    assert "nothing to do" in again.stdout
    for name in ("report.md", "report.html", "pareto.png"):
        assert (out_dir / name).stat().st_size > 0


def test_store_ignores_incomplete_trials(tmp_path):
    append_trial(tmp_path, [{"trial": "a", "metric": "x", "value": 1.0}, {"trial": "a", "metric": "status",
                                                                          "value": 1.0, "status": "ok"}])
    with (tmp_path / RESULTS).open("a") as f:
        f.write(json.dumps({"trial": "b", "metric": "x", "value": 2.0}) + "\n")  # no status line: incomplete
        f.write('{"trial": "b", "met')
    assert [r["trial"] for r in read_rows(tmp_path)] == ["a", "a"]
    append_trial(tmp_path, [{"trial": "c", "metric": "status", "value": 1.0, "status": "ok"}])
    assert set(done_trials(tmp_path)) == {"a", "c"}


def test_report_command(tmp_path):
    out = cli("report", str(tmp_path))
    assert out.returncode == 2 and "not a sweep output folder" in out.stderr


def test_pareto_front():
    pts = [(1.0, 2.0), (2.0, 1.0), (2.0, 3.0), (0.5, 5.0)]
    assert sorted(pareto_front(pts, higher_better=False)) == [0, 1, 3]
    assert pareto_front(pts, higher_better=True) == [3]  # (0.5, 5.0) dominates the rest


def test_render_empty_folder(tmp_path):
    (tmp_path / RESULTS).write_text("")
    assert "report.md" in render(tmp_path)


def test_generator_of_specs(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(HELPERS))
    p = write(tmp_path, "name: gen\ngenerator: sweep_generators:widths\n" + BASE + FAST)
    sweep = load_sweep(p)
    assert [t.label for t in sweep.trials] == ["width 16", "width 32"]
    assert [t.spec["model"]["d_model"] for t in sweep.trials] == [16, 32]
    bad = write(tmp_path, "name: gen\ngenerator: sweep_generators:nope\n" + BASE + FAST, "bad.yaml")
    out = cli("sweep", str(bad), "--out", str(tmp_path / "o"))
    assert out.returncode == 2 and "bad.yaml:2:" in out.stderr and "cannot load" in out.stderr


def test_runner_overhead_counts_parallel_workers(tmp_path):
    """With 2 workers the trials' summed time exceeds the wall time; the overhead compares it with
    wall x workers (never negative), and the report says how many workers ran. An invocations
    file from before worker slots were recorded falls back to per-trial accounting."""
    p = write(tmp_path, "name: par\n" + BASE + "axes:\n  model.d_model: [16, 24]\n" + FAST)
    out = tmp_path / "out"
    counts = Runner(load_sweep(p), out, workers=2).run()
    assert counts["ok"] == 2
    inv = [json.loads(line) for line in (out / "invocations.jsonl").read_text().splitlines()]
    assert inv[-1]["slots"] == 2 and 0.0 <= inv[-1]["overhead"] < 1.0
    assert inv[-1]["overhead"] == pytest.approx(1 - inv[-1]["compute_s"] / (2 * inv[-1]["wall_s"]))
    text = (render(out)["report.md"]).read_text()
    assert "trials on 2 workers" in text and "Runner overhead" in text and "overhead (worker start, imports, " \
        "bookkeeping): -" not in text
    # an old-style record (no slots; its overhead compared wall with summed trial time)
    old = {k: v for k, v in inv[-1].items() if k != "slots"}
    old["overhead"] = -0.9
    (out / "invocations.jsonl").write_text(json.dumps(old) + "\n")
    text = (render(out)["report.md"]).read_text()
    assert "per-trial accounting" in text and "-90.0%" not in text
