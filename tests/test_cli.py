"""The command line: exit codes and messages, never a traceback for user errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
SPECS = Path(__file__).parent / "specs"


def blockzoo(*args, env=None):
    import os
    e = {**os.environ, **(env or {})}
    e.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-m", "blockzoo.cli", *args], capture_output=True, text=True, env=e,
                          cwd=ROOT.parent)


def test_info_json_lists_baselines_with_three_backends():
    out = blockzoo("info", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    comps = {c["id"]: c for c in data["components"]}
    for cid in ("attention.dense", "normres.layernorm", "normres.rmsnorm", "mlp.swiglu", "mlp.gelu"):
        names = {b["name"]: b for b in comps[cid]["backends"]}
        assert set(names) >= {"reference", "triton", "numba"}
        if not data["device"] == "cuda":
            assert names["triton"]["available"] is False
            assert "TRITON_INTERPRET=1" in " ".join(names["triton"]["reasons"])
        assert names["numba"]["available"] and names["reference"]["available"]


def test_info_table():
    out = blockzoo("info")
    assert out.returncode == 0 and "attention.dense" in out.stdout


@pytest.mark.parametrize("name,needle", [
    ("bad_key.yaml", "bad_key.yaml:2:"),
    ("bad_component.yaml", "did you mean 'attention.dense'"),
])
def test_check_bad_spec_exits_2_without_traceback(name, needle):
    out = blockzoo("check", str(SPECS / name))
    assert out.returncode == 2
    assert needle in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


def test_check_missing_file():
    out = blockzoo("check", "no/such/spec.yaml")
    assert out.returncode == 2 and "not found" in out.stderr and "Traceback" not in out.stderr


def test_check_good_spec():
    out = blockzoo("check", str(ROOT / "examples" / "specs" / "tiny.yaml"))
    assert out.returncode == 0 and "ok" in out.stdout


def test_run_spec(tmp_path):
    out = blockzoo("run", str(ROOT / "examples" / "specs" / "tiny.yaml"), "--backend", "reference",
                   "--json", str(tmp_path / "r.json"))
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["loss"] > 0 and result["fwd_bwd_ms"] > 0
    assert {r["backend"] for r in result["backends"]} == {"reference"}


def test_run_unavailable_backend_is_a_clear_error():
    out = blockzoo("run", str(ROOT / "examples" / "specs" / "tiny.yaml"), "--backend", "triton")
    assert out.returncode == 2
    assert "TRITON_INTERPRET=1" in out.stderr and "Traceback" not in out.stderr


def test_bench_cpu_json(tmp_path):
    out = blockzoo("bench", "--component", "normres.rmsnorm", "--case", "1024x1024", "--mode", "fwd",
                   "--json", str(tmp_path / "b.json"))
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    impls = {r["impl"] for r in rows if r["ms"]}
    assert {"reference", "numba", "torch-eager", "copy"} <= impls
    ref = next(r for r in rows if r["impl"] == "numba")
    assert ref["speedup"]["reference"] > 0 and ref["unit"] == "GB/s"
