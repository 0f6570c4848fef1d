"""Plugin loading: entry points, failure isolation, env switches, strict mode, duplicates."""

import subprocess
import sys
import textwrap

import pytest
import torch

import blockzoo
from blockzoo.registry import BackendUnavailable, get_manager, reset_manager

GOOD = """
import torch
from pydantic import BaseModel, ConfigDict
from blockzoo.registry import Backend, Capabilities, Case, Component, Inputs, hookimpl

class P(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alpha: float = 2.0

def describe(x, params=None):
    return Inputs.from_tensors({"x": x})

def ref(x, alpha=2.0):
    return x * alpha

def cases():
    return [Case("n5", {"x": (3, 5)})]

@hookimpl
def blockzoo_register_components(registry):
    registry.add_component(Component(id="demo.scale", slot="mixer", params=P, describe=describe, cases=cases))

@hookimpl
def blockzoo_register_backends(registry):
    registry.add_backend(Backend("demo.scale", "reference", ref))
    registry.add_backend(Backend("demo.scale", "wrong", lambda x, alpha=2.0: x * alpha * 1.01,
                                 Capabilities(devices=("cpu",)), priority=5))
    def unwritten(x, alpha=2.0):
        from blockzoo.kernels._alloc import empty_like
        out = empty_like(x)
        out[:, :-1] = (x * alpha)[:, :-1]   # forgets the last column
        return out
    registry.add_backend(Backend("demo.scale", "unwritten", unwritten,
                                 Capabilities(devices=("cpu",), grad=False), priority=1))
"""

BROKEN_IMPORT = "raise ImportError('this plugin is broken on purpose')\n"

MISSPELLED = """
from blockzoo.registry import hookimpl

@hookimpl
def blockzoo_register_component(registry):   # missing 's'
    pass
"""

DUPLICATE = """
from pydantic import BaseModel
from blockzoo.registry import Component, Inputs, hookimpl

class P(BaseModel):
    pass

@hookimpl
def blockzoo_register_components(registry):
    registry.add_component(Component(id="attention.dense", slot="mixer", params=P,
                                     describe=lambda q, params=None: None))
"""


def install_fake_dist(tmp_path, monkeypatch, dist, version, plugins: dict[str, str]):
    """Put a minimal distribution with ``blockzoo`` entry points on sys.path."""
    info = tmp_path / f"{dist}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = ["[blockzoo]"]
    for ep_name, source in plugins.items():
        unique = "".join(ch if ch.isalnum() else "_" for ch in tmp_path.name)
        mod = f"{dist.replace('-', '_')}_{ep_name}_{unique}"  # fresh module per test
        (tmp_path / f"{mod}.py").write_text(textwrap.dedent(source))
        lines.append(f"{ep_name} = {mod}")
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))


@pytest.fixture(autouse=True)
def fresh_manager(monkeypatch):
    for var in ("BLOCKZOO_PLUGINS_STRICT", "BLOCKZOO_DISABLE_PLUGIN_AUTOLOAD", "BLOCKZOO_BLOCK_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    reset_manager()
    yield
    reset_manager()


def test_third_party_plugin_registers_and_runs(tmp_path, monkeypatch):
    install_fake_dist(tmp_path, monkeypatch, "demo-plugin", "1.2.3", {"demo": GOOD})
    assert "demo.scale" in blockzoo.components()
    x = torch.randn(3, 5)
    torch.testing.assert_close(blockzoo.op("demo.scale", "reference")(x, alpha=3.0), 3 * x)
    owner = blockzoo.get_registry().component("demo.scale").owner
    assert "demo-plugin 1.2.3" in owner
    assert get_manager().failures == []


def test_conformance_catches_wrong_and_unwritten_backends(tmp_path, monkeypatch):
    from blockzoo.testing import check, matrix
    install_fake_dist(tmp_path, monkeypatch, "demo-plugin", "1.2.3", {"demo": GOOD})
    cases = {c.backend: c for c in matrix(["demo.scale"], backends=["reference", "wrong", "unwritten"],
                                          dtypes=[torch.float32])}
    assert set(cases) == {"reference", "wrong", "unwritten"}
    check(cases["reference"])
    with pytest.raises(AssertionError, match="MISMATCH"):
        check(cases["wrong"])
    with pytest.raises(AssertionError, match="NaN"):
        check(cases["unwritten"])


@pytest.mark.parametrize("source,stage,needle", [
    (BROKEN_IMPORT, "import", "broken on purpose"),
    (MISSPELLED, "register", "blockzoo_register_component"),
    (DUPLICATE, "blockzoo_register_components", "duplicate component id 'attention.dense'"),
])
def test_broken_plugin_is_recorded_and_the_rest_works(tmp_path, monkeypatch, source, stage, needle):
    install_fake_dist(tmp_path, monkeypatch, "bad-plugin", "0.0.1", {"bad": source})
    assert "attention.dense" in blockzoo.components()  # built-ins still load
    failures = get_manager().failures
    assert len(failures) == 1, failures
    f = failures[0]
    assert (f.dist, f.version, f.stage) == ("bad-plugin", "0.0.1", stage)
    assert needle in f.error
    if "duplicate" in needle:  # the message names both packages
        assert "blockzoo.plugins.attention.plugin" in f.error and "bad-plugin 0.0.1" in f.error
    q = torch.randn(1, 4, 2, 8)
    assert blockzoo.op("attention.dense", "reference")(q, q, q).shape == q.shape


def test_info_shows_plugin_failures(tmp_path, monkeypatch):
    from blockzoo.cli import info_data
    install_fake_dist(tmp_path, monkeypatch, "bad-plugin", "0.0.1", {"bad": BROKEN_IMPORT})
    data = info_data()
    assert data["plugin_failures"][0]["dist"] == "bad-plugin"
    assert "broken on purpose" in data["plugin_failures"][0]["error"]


def test_strict_mode_reraises(tmp_path, monkeypatch):
    install_fake_dist(tmp_path, monkeypatch, "bad-plugin", "0.0.1", {"bad": BROKEN_IMPORT})
    monkeypatch.setenv("BLOCKZOO_PLUGINS_STRICT", "1")
    with pytest.raises(ImportError, match="broken on purpose"):
        blockzoo.components()


def test_disable_autoload_and_block(tmp_path, monkeypatch):
    install_fake_dist(tmp_path, monkeypatch, "demo-plugin", "1.2.3", {"demo": GOOD})
    monkeypatch.setenv("BLOCKZOO_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert "demo.scale" not in blockzoo.components()
    monkeypatch.delenv("BLOCKZOO_DISABLE_PLUGIN_AUTOLOAD")
    monkeypatch.setenv("BLOCKZOO_BLOCK_PLUGINS", "demo,mlp")
    reset_manager()
    names = blockzoo.components()
    assert "demo.scale" not in names and "mlp.swiglu" not in names and "attention.dense" in names


def test_policy_hook_selects_backend(tmp_path, monkeypatch):
    install_fake_dist(tmp_path, monkeypatch, "demo-plugin", "1.2.3", {"demo": GOOD})

    class Policy:
        @blockzoo.registry.hookimpl
        def blockzoo_select_backend(self, op, inputs, candidates):
            return "reference" if op == "demo.scale" else None
    get_manager().register(Policy(), name="policy")
    assert blockzoo.op("demo.scale").resolve(torch.randn(2, 2)).name == "reference"
    reset_manager()
    # without the policy, priority wins ("wrong" has priority 5 > reference 0)
    assert blockzoo.op("demo.scale").resolve(torch.randn(2, 2)).name == "wrong"


def test_plugins_load_lazily():
    code = ("import blockzoo, blockzoo.registry.manager as m; assert m._MANAGER is None; "
            "blockzoo.components(); assert m._MANAGER is not None; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_dispatch_reasons():
    q = torch.randn(1, 4, 2, 8, dtype=torch.bfloat16)
    with pytest.raises(BackendUnavailable, match="dtype bfloat16 not in"):
        blockzoo.op("attention.dense", "numba")(q, q, q)
    # auto falls back to the reference for bf16 on the CPU
    assert blockzoo.op("attention.dense").resolve(q, q, q).name == "reference"
    with pytest.raises(blockzoo.registry.RegistryError, match="did you mean 'numba'"):
        blockzoo.op("attention.dense", "nunba")
    with pytest.raises(blockzoo.registry.RegistryError, match="did you mean 'attention.dense'"):
        blockzoo.op("attention.dence")
    k = torch.randn(1, 4, 3, 8)
    with pytest.raises(BackendUnavailable, match="not a multiple of kv heads") as err:
        blockzoo.op("attention.dense")(torch.randn(1, 4, 4, 8), k, k)
    assert "reference" in str(err.value) and "numba" in str(err.value)  # every candidate listed


def test_reference_fallback_logged_once(caplog):
    import logging
    caplog.set_level(logging.INFO, logger="blockzoo")
    q = torch.randn(1, 4, 2, 8, dtype=torch.bfloat16)
    for _ in range(3):
        blockzoo.op("attention.dense")(q, q, q)
    msgs = [r for r in caplog.records if "falls back to the reference" in r.getMessage()]
    assert len(msgs) == 1


def test_op_keyword_errors():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(TypeError, match="did you mean 'causal'"):
        blockzoo.op("attention.dense")(q, q, q, casual=False)
    with pytest.raises(TypeError, match="invalid params"):
        blockzoo.op("attention.dense")(q, q, q, scale=-1.0)


NO_REFERENCE = """
from pydantic import BaseModel
from blockzoo.registry import Backend, Component, Inputs, hookimpl

class P(BaseModel):
    pass

@hookimpl
def blockzoo_register_components(registry):
    registry.add_component(Component(id="demo.noref", slot="mixer", params=P,
                                     describe=lambda x, params=None: Inputs.from_tensors({"x": x})))

@hookimpl
def blockzoo_register_backends(registry):
    registry.add_backend(Backend("demo.noref", "fast", lambda x: x))
"""


def test_component_without_reference_is_reported(tmp_path, monkeypatch):
    install_fake_dist(tmp_path, monkeypatch, "noref-plugin", "0.1", {"noref": NO_REFERENCE})
    blockzoo.components()
    failures = get_manager().failures
    assert len(failures) == 1 and failures[0].stage == "validate"
    assert "has no 'reference' backend" in failures[0].error and "noref-plugin 0.1" in failures[0].error
