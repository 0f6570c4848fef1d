"""Failure isolation with real (deliberately broken) plugin packages: tests/plugins_broken holds
three packages with ``*.dist-info`` entry points, put on ``sys.path`` without pip.

`blockzoo info` names each failure with its package and version, everything else keeps working
(built-in components, specs, ops, the schema), and ``BLOCKZOO_PLUGINS_STRICT=1`` re-raises.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import blockzoo
from blockzoo.cli import main
from blockzoo.registry import RegistryError, get_manager, reset_manager

BROKEN = Path(__file__).parent / "plugins_broken"
TINY = Path(__file__).parents[1] / "examples" / "specs" / "tiny.yaml"
ENTRY_POINTS = ("broken_import", "misspelled", "duplicate")
EXPECTED = [  # (entry point, dist, version, stage, text in the error)
    ("broken_import", "bz-broken-import", "0.3.1", "import",
     "ModuleNotFoundError: No module named 'blockzoo_dependency_that_does_not_exist'"),
    ("misspelled", "bz-misspelled-hook", "1.0.0", "register", "unknown hook 'blockzoo_register_component'"),
    ("duplicate", "bz-duplicate-id", "2.1.0", "blockzoo_register_components",
     "duplicate component id 'attention.dense': registered by blockzoo.plugins.attention.plugin and by "
     "bz-duplicate-id 2.1.0"),
    ("duplicate", "bz-duplicate-id", "2.1.0", "blockzoo_register_backends",
     "duplicate backend 'attention.dense:reference'"),
]


@pytest.fixture
def broken(monkeypatch):
    for var in ("BLOCKZOO_PLUGINS_STRICT", "BLOCKZOO_DISABLE_PLUGIN_AUTOLOAD", "BLOCKZOO_BLOCK_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.syspath_prepend(str(BROKEN))
    reset_manager()
    yield
    reset_manager()


def test_each_failure_is_recorded_with_package_and_version(broken):
    got = [(f.plugin, f.dist, f.version, f.stage, f.error) for f in get_manager().failures]
    assert len(got) == len(EXPECTED), got
    for (ep, dist, version, stage, needle), (p, d, v, s, err) in zip(EXPECTED, got, strict=True):
        assert (p, d, v, s) == (ep, dist, version, stage)
        assert needle in err
    assert all(f.traceback.strip() for f in get_manager().failures)
    assert set(ENTRY_POINTS) - {"duplicate"} & set(get_manager().plugins) == set()


def test_the_rest_works(broken):
    reg = blockzoo.get_registry()
    dense = reg.component("attention.dense")
    assert dense.owner == "blockzoo.plugins.attention.plugin"  # not replaced by the duplicate
    assert {"attention.dense", "context.moc", "normres.rmsnorm", "mlp.swiglu"} <= set(reg.components)
    q = torch.randn(1, 9, 2, 16)
    ref = blockzoo.op("attention.dense", "reference")
    torch.testing.assert_close(blockzoo.op("attention.dense", "numba")(q, q, q), ref(q, q, q))
    model = blockzoo.build(TINY)
    assert torch.isfinite(model.loss(torch.randint(0, 256, (2, 17)))).all()


def test_info_shows_every_failure_and_the_components(broken, capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"{len(EXPECTED)} plugin failure(s)" in out
    for ep, dist, version, stage, needle in EXPECTED:
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(f"{ep} ({dist} {version}) at {stage}:"))
        assert needle in line
    assert "attention.dense" in out and "context.moc" in out


def test_info_json_and_schema_still_work(broken, capsys):
    assert main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(f["dist"], f["version"], f["stage"]) for f in data["plugin_failures"]] == \
        [(d, v, s) for _, d, v, s, _ in EXPECTED]
    assert "attention.dense" in {c["id"] for c in data["components"]}
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    ids = [v["properties"]["type"]["const"] for v in schema["$defs"]["ComponentRef"]["oneOf"]]
    assert ids.count("attention.dense") == 1
    assert main(["check", str(TINY)]) == 0


def test_unknown_component_error_points_at_plugin_failures(broken):
    from blockzoo.core.spec import SpecError
    with pytest.raises(SpecError, match=r"4 plugin\(s\) failed to load; see `blockzoo info`"):
        blockzoo.load_spec({"block": {"mixer": {"type": "broken.thing"}}})


@pytest.mark.parametrize("ep,raises,needle", [
    ("broken_import", ModuleNotFoundError, "blockzoo_dependency_that_does_not_exist"),
    ("misspelled", Exception, "unknown hook 'blockzoo_register_component'"),
    ("duplicate", RegistryError, "duplicate component id 'attention.dense'"),
])
def test_strict_mode_reraises(broken, monkeypatch, ep, raises, needle):
    monkeypatch.setenv("BLOCKZOO_PLUGINS_STRICT", "1")
    monkeypatch.setenv("BLOCKZOO_BLOCK_PLUGINS", ",".join(e for e in ENTRY_POINTS if e != ep))
    with pytest.raises(raises, match=needle):
        blockzoo.components()
    # blocking the broken one as well: strict mode loads cleanly
    monkeypatch.setenv("BLOCKZOO_BLOCK_PLUGINS", ",".join(ENTRY_POINTS))
    reset_manager()
    assert "attention.dense" in blockzoo.components() and get_manager().failures == []


def test_cli_end_to_end(tmp_path):
    """The installed command in a fresh process: failures listed, exit 0; strict: exit != 0."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BROKEN), os.environ.get("PYTHONPATH", "")])}
    for var in ("BLOCKZOO_PLUGINS_STRICT", "BLOCKZOO_DISABLE_PLUGIN_AUTOLOAD", "BLOCKZOO_BLOCK_PLUGINS"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "blockzoo.cli", "info"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "(bz-broken-import 0.3.1) at import" in out.stdout
    assert "(bz-misspelled-hook 1.0.0) at register" in out.stdout
    assert "(bz-duplicate-id 2.1.0) at blockzoo_register_components" in out.stdout
    strict = subprocess.run(cmd, env={**env, "BLOCKZOO_PLUGINS_STRICT": "1"}, capture_output=True, text=True,
                            cwd=tmp_path, timeout=300)
    assert strict.returncode != 0
    assert "blockzoo_dependency_that_does_not_exist" in strict.stderr  # the first failure, re-raised
