"""The example plugin beyond the conformance kit: its spec, its task, the schema, the guide."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import blockzoo
from blockzoo.registry import get_manager

HERE = Path(__file__).resolve().parents[1]
GUIDE = HERE.parents[1] / "docs" / "plugins.md"


def test_installed_through_the_entry_point():
    info = get_manager().plugins["example"]
    assert (info.dist, info.builtin) == ("blockzoo-example-plugin", False)
    assert "example.shortconv" in blockzoo.components()
    assert blockzoo.backends("example.shortconv") == ["numba", "reference"]
    assert "example_lag" in blockzoo.get_registry().tasks


def test_spec_builds_and_trains():
    model = blockzoo.build(HERE / "specs" / "shortconv-tiny.yaml")
    rows = {(r["layer"], r["slot"]): r for r in model.backends()}
    assert rows[("1", "mixer")]["component"] == "example.shortconv"
    assert rows[("1", "mixer")]["backend"] == "numba"  # auto picks the higher-priority backend
    tokens = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))
    loss = model.loss(tokens)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.blocks[1].mixer.weight.grad.abs().sum() > 0


def test_numba_and_reference_models_agree():
    tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    outs = []
    for backend in ("reference", "numba"):
        torch.manual_seed(0)
        model = blockzoo.build(HERE / "specs" / "shortconv-tiny.yaml", backend=backend)
        outs.append(model(tokens))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)


def test_lag_task_learns_with_the_short_conv():
    import yaml

    from blockzoo.core.tasks import run_task
    data = yaml.safe_load((HERE / "specs" / "shortconv-tiny.yaml").read_text())
    data["model"]["vocab"] = 16
    data["model"]["backend"] = "reference"  # the task is under test here, not the kernels
    data["block"]["mixer"] = {"type": "example.shortconv", "params": {"kernel_size": 4}}
    data["layers"] = []
    spec = blockzoo.load_spec(data)
    cfg = {"lag": 2, "steps": 80, "batch": 16, "seq": 24, "lr": 1e-2}
    untrained = run_task("example_lag", lambda: blockzoo.build(spec), 16, {**cfg, "steps": 0}, "cpu")
    trained = run_task("example_lag", lambda: blockzoo.build(spec), 16, cfg, "cpu")
    assert untrained["lag_accuracy"] < 0.2  # chance is 1/16
    assert trained["lag_accuracy"] > 0.8, trained


def test_sweep_file_validates():
    from blockzoo.core.sweep import load_sweep
    sweep = load_sweep(HERE / "sweeps" / "shortconv-lag.yaml")
    assert len(sweep.trials) == 2 and all(t.status == "pending" for t in sweep.trials)


def test_schema_includes_the_plugin():
    out = subprocess.run([sys.executable, "-m", "blockzoo.cli", "schema"], capture_output=True, text=True,
                         check=True)
    schema = json.loads(out.stdout)
    variants = {v["properties"]["type"]["const"]: v for v in schema["$defs"]["ComponentRef"]["oneOf"]}
    params = variants["example.shortconv"]["properties"]["params"]["properties"]
    assert set(params) == {"kernel_size", "activation"}
    assert params["activation"]["enum"] == ["none", "silu"]
    assert variants["example.shortconv"]["properties"]["backend"]["enum"] == [None, "auto", "numba", "reference"]


def test_bad_params_name_the_nearest_field():
    from blockzoo.core.spec import SpecError
    with pytest.raises(SpecError, match="did you mean 'kernel_size'"):
        blockzoo.load_spec({"block": {"mixer": {"type": "example.shortconv", "params": {"kernel": 3}}}})


@pytest.mark.skipif(not GUIDE.exists(), reason="docs/plugins.md is not next to this checkout")
def test_guide_shows_the_example_files_verbatim():
    """Every code block in docs/plugins.md titled with a file of this package is that file."""
    blocks = re.findall(r'```(?:python|toml|yaml) title="([^"]+)"\n(.*?)```', GUIDE.read_text(), re.S)
    titled = {t: body for t, body in blocks}
    for name in ("pyproject.toml", "blockzoo_example/plugin.py", "tests/test_conformance.py"):
        assert name in titled, f"docs/plugins.md does not show {name}"
    for name, body in titled.items():
        assert body == (HERE / name).read_text(), f"docs/plugins.md's copy of {name} is out of date"
