"""Spec round trip for one component: the part of the conformance kit that checks a component
works in specs, not only as an op.

For each params set (the defaults, plus the params of each of the component's cases):

1. a tiny spec with the component in its slot validates (``load_spec``);
2. its expanded form lists the params the component's model fills in, and dumping it to YAML
   and loading it back gives the same expanded spec and the same spec hash;
3. the expanded spec is valid against ``blockzoo schema`` (the JSON Schema built after plugins
   load), when ``jsonschema`` is installed;
4. the composer builds it (when the component has a module factory), the forward pass gives
   finite logits of the right shape, and the backward pass finite gradients for the trainable
   parameters of the component's module (at least one must receive a gradient).
"""

from __future__ import annotations

from typing import Any

import torch

SLOTS = ("mixer", "normres", "mlp")


def tiny_spec(component_id: str, params: dict[str, Any] | None = None, backend: str | None = None) -> dict:
    """A 2-layer spec using ``component_id`` in its slot of layer 1 (layer 0 keeps the defaults, so
    the component sees a real residual stream). The other components run their reference backend
    (no kernels of other packages to compile); this one runs ``backend`` (default ``auto``: its
    preferred backend here)."""
    from ..registry import get_registry
    comp = get_registry().component(component_id)
    if comp.slot not in SLOTS:
        raise ValueError(f"{component_id} has slot {comp.slot!r}: specs have slots {SLOTS}")
    ref: dict[str, Any] = {"type": component_id, "params": dict(params or {}), "backend": backend or "auto"}
    return {"name": f"roundtrip-{component_id}",
            "model": {"vocab": 61, "d_model": 32, "n_heads": 2, "n_kv_heads": 1, "n_layers": 2, "max_seq": 64,
                      "backend": "reference"},
            "layers": [{"at": [1], comp.slot: ref}],
            "workload": {"batch": 2, "seq": 37, "steps": 1}}


def params_sets(component_id: str) -> list[tuple[str, dict[str, Any]]]:
    """(label, params) to round-trip: the defaults and each case's params (deduplicated)."""
    from ..registry import get_registry
    comp = get_registry().component(component_id)
    out: list[tuple[str, dict[str, Any]]] = [("defaults", {})]
    seen = [{}]
    for case in (comp.cases() if comp.cases else []):
        p = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in case.params.items()}
        if p not in seen:
            seen.append(p)
            out.append((case.id, p))
    return out


def _schema_validate(expanded: dict) -> None:
    import jsonschema

    from ..core.spec import json_schema
    schema = json_schema()
    jsonschema.validators.validator_for(schema).check_schema(schema)
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(expanded), key=lambda e: list(e.path))
    if errors:
        raise AssertionError("the expanded spec is not valid against `blockzoo schema`:\n" + "\n".join(
            f"  {'.'.join(map(str, e.path)) or '<root>'}: {e.message[:300]}" for e in errors[:5]))


def spec_round_trip(component_id: str, params: dict[str, Any] | None = None, *, build: bool = True,
                    schema: bool | None = None, seed: int = 0, backend: str | None = None) -> dict[str, Any]:
    """Run the checks above for one params set; raises AssertionError (or the spec's own
    SpecError) naming what failed. ``schema=None`` validates against the JSON Schema only when
    ``jsonschema`` is importable; ``backend`` pins the component's backend in the spec (default:
    auto). Returns the expanded spec."""
    from ..core.composer import build as build_model
    from ..core.spec import dump_yaml, load_spec
    from ..registry import get_registry
    comp = get_registry().component(component_id)
    data = tiny_spec(component_id, params, backend)
    spec = load_spec(data)
    expanded = spec.expanded()
    ref = expanded["layers"][0][comp.slot]
    want = comp.params(**(params or {})).model_dump(mode="json")
    if ref["params"] != want:
        raise AssertionError(f"{component_id}: expanded params {ref['params']} != the params model's {want}")
    again = load_spec(dump_yaml(spec))
    if again.expanded() != expanded or again.spec_hash() != spec.spec_hash():
        raise AssertionError(f"{component_id}: the spec changes in a YAML round trip:\n{dump_yaml(spec)}\n"
                             f"--- reloaded ---\n{dump_yaml(again)}")
    if load_spec(expanded).spec_hash() != spec.spec_hash():
        raise AssertionError(f"{component_id}: loading the expanded spec changes its hash")
    if schema is None:
        try:
            import jsonschema  # noqa: F401
            schema = True
        except ImportError:
            schema = False
    if schema:
        _schema_validate(expanded)
    if build and comp.module is not None:
        torch.manual_seed(seed)
        model = build_model(spec)
        mod = model.blocks[1]
        part = getattr(mod, comp.slot if comp.slot != "normres" else "norm1")
        if getattr(part, "component_id", None) != component_id:
            raise AssertionError(f"{component_id}: layer 1's {comp.slot} is {getattr(part, 'component_id', '?')}")
        tokens = torch.randint(0, spec.model.vocab, (spec.workload.batch, spec.workload.seq),
                               generator=torch.Generator().manual_seed(seed))
        logits = model(tokens)
        if logits.shape != (*tokens.shape, spec.model.vocab):
            raise AssertionError(f"{component_id}: logits shape {tuple(logits.shape)}")
        if not torch.isfinite(logits).all():
            raise AssertionError(f"{component_id}: non-finite logits from a model using it")
        model.loss(tokens).backward()
        trainable = [(name, p) for name, p in part.named_parameters() if p.requires_grad]
        for name, p in trainable:
            if p.grad is not None and not torch.isfinite(p.grad).all():
                raise AssertionError(f"{component_id}: parameter {name!r} of its module has a non-finite gradient")
        # a parameter unused under these params may have no gradient, but not all of them
        if trainable and all(p.grad is None for _, p in trainable):
            raise AssertionError(f"{component_id}: no parameter of its module received a gradient "
                                 f"({', '.join(n for n, _ in trainable)})")
    return expanded
