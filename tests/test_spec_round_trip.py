"""The conformance kit's spec round trip (blockzoo.testing.spec_check) for every registered
component that fits a spec slot, with the reference backend: spec -> YAML -> spec (same hash),
valid against `blockzoo schema`, built, forward and backward finite."""

import pytest

import blockzoo
from blockzoo.testing.spec_check import SLOTS, params_sets, spec_round_trip

REG = blockzoo.get_registry()
CASES = [(cid, label, p) for cid in sorted(REG.components) if REG.components[cid].slot in SLOTS
         for label, p in params_sets(cid)]


@pytest.mark.parametrize("cid,label,params", CASES, ids=[f"{c}-{lbl}" for c, lbl, _ in CASES])
def test_spec_round_trip(cid, label, params):
    pytest.importorskip("jsonschema")
    spec_round_trip(cid, params, backend="reference", schema=True)


def test_schema_accepts_aliases_and_rejects_typos():
    jsonschema = pytest.importorskip("jsonschema")
    from blockzoo.core.spec import json_schema
    schema = json_schema()
    ok = {"block": {"mixer": {"type": "context.moc", "params": {"chunk": 32, "top_k": 2}}}}
    jsonschema.validate(ok, schema)  # the alias the spec loader accepts
    blockzoo.load_spec(ok)
    bad = {"block": {"mixer": {"type": "context.moc", "params": {"chunk_sz": 32}}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_round_trip_catches_a_params_model_that_does_not_round_trip(monkeypatch):
    """A params model that is not idempotent (loading its own dump changes it) fails."""
    from pydantic import BaseModel, ConfigDict, Field, field_validator

    from blockzoo.registry import Backend, Component, Inputs, get_manager, hookimpl, reset_manager

    class Lossy(BaseModel):
        model_config = ConfigDict(extra="forbid")
        width: int = Field(4, ge=1)

        @field_validator("width")
        @classmethod
        def _double(cls, v):  # a unit conversion applied on every load, as a buggy model would
            return 2 * v

    class Plugin:
        @hookimpl
        def blockzoo_register_components(self, registry):
            registry.add_component(Component(id="rt.lossy", slot="mlp", params=Lossy,
                                             describe=lambda x, params=None: Inputs.from_tensors({"x": x})))

        @hookimpl
        def blockzoo_register_backends(self, registry):
            registry.add_backend(Backend("rt.lossy", "reference", lambda x, width=4: x))
    reset_manager()
    try:
        get_manager().register(Plugin(), name="rt")
        with pytest.raises(AssertionError, match="changes in a YAML round trip"):
            spec_round_trip("rt.lossy", {"width": 3}, build=False, schema=False)
    finally:
        reset_manager()
