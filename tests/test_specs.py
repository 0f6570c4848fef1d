"""Spec loading and validation: every error names file:line, the dotted path and a suggestion."""

from pathlib import Path

import pytest

import blockzoo
from blockzoo.core.spec import SpecError, json_schema, load_spec

HERE = Path(__file__).parent / "specs"
EXAMPLES = sorted((Path(__file__).parent.parent / "examples" / "specs").glob("*.yaml"))
SWEEPS = sorted((Path(__file__).parent.parent / "examples" / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("name,line,path,needle", [
    ("bad_key.yaml", 2, "model.n_layres", "did you mean 'n_layers'?"),
    ("bad_component.yaml", 4, "block.mixer.type", "did you mean 'attention.dense'?"),
    ("bad_param.yaml", 6, "block.mixer.params.casual", "did you mean 'causal'?"),
    ("bad_slot.yaml", 3, "block.mixer.type", "mixer components: attention.dense"),
    ("bad_heads.yaml", 2, "model.n_kv_heads", "not a multiple of n_kv_heads 3"),
    ("bad_backend.yaml", 3, "block.normres.backend", "did you mean 'triton'?"),
])
def test_bad_specs_report_file_line_path_and_suggestion(name, line, path, needle):
    with pytest.raises(SpecError) as err:
        load_spec(HERE / name)
    issue = err.value.issues[0]
    assert issue.where.file.endswith(name) and issue.where.line == line, str(issue)
    assert issue.path == path
    assert needle in issue.message


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_specs_are_valid(path):
    spec = load_spec(path)
    assert spec.name


@pytest.mark.parametrize("path", SWEEPS, ids=[p.name for p in SWEEPS])
def test_example_sweeps_are_valid(path):
    """Every bundled sweep file parses, validates and expands to at least one trial."""
    from blockzoo.core.sweep import load_sweep
    sw = load_sweep(path)
    assert sw.trials


def test_yaml_syntax_error_has_position():
    with pytest.raises(SpecError, match=r"<string>:2:1: YAML syntax error: expected .,. or .\]."):
        load_spec("model: [1, 2\n")


def test_non_mapping_and_wrong_types():
    with pytest.raises(SpecError, match="must be a mapping"):
        load_spec("- 1\n- 2\n")
    with pytest.raises(SpecError, match=r"model.d_model: .*got 'big'"):
        load_spec("model: {d_model: big}\n")


def test_hash_is_canonical():
    a = load_spec("name: a\nmodel: {d_model: 64}\n")
    b = load_spec({"name": "a", "model": {"d_model": 64, "n_heads": 4},
                   "block": {"mixer": {"type": "attention.dense", "params": {"causal": True}}}})
    assert a.spec_hash() == b.spec_hash()
    c = load_spec("name: a\nmodel: {d_model: 64}\nblock: {mixer: {type: attention.dense, params: {causal: false}}}\n")
    assert c.spec_hash() != a.spec_hash()
    assert a.expanded()["block"]["mixer"]["params"] == {"causal": True, "scale": None}


def test_layer_overrides():
    spec = load_spec("model: {n_layers: 3}\nlayers:\n  - {at: [0, -1], mlp: {type: mlp.gelu}}\n")
    assert [spec.layer_block(i).mlp.type for i in range(3)] == ["mlp.gelu", "mlp.swiglu", "mlp.gelu"]
    with pytest.raises(SpecError, match="layers.0.at: layer index 5 out of range"):
        load_spec("model: {n_layers: 3}\nlayers:\n  - {at: 5, mlp: {type: mlp.gelu}}\n")


def test_schema_lists_components_with_params():
    schema = json_schema()
    variants = schema["$defs"]["ComponentRef"]["oneOf"]
    ids = {v["properties"]["type"]["const"] for v in variants}
    assert set(blockzoo.components()) <= ids
    dense = next(v for v in variants if v["properties"]["type"]["const"] == "attention.dense")
    assert "causal" in dense["properties"]["params"]["properties"]
