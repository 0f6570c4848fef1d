"""Model specs: YAML -> pydantic (``extra="forbid"``) -> validated ``ModelSpec``.

Validation runs in stages: (1) structure, (2) each component's own params model (after plugins
load), (3) cross-component rules (head counts, backend requests, layer indices). Every problem is
reported with file:line:column, the dotted path, what was expected, and the nearest valid name.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .yamlsrc import Where, YamlSource

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}


# ---------------------------------------------------------------------------------------------
# errors
@dataclass
class SpecIssue:
    where: Where | None
    path: str
    message: str

    def __str__(self) -> str:
        loc = f"{self.where}: " if self.where else ""
        path = f"{self.path}: " if self.path else ""
        return f"{loc}{path}{self.message}"


class SpecError(ValueError):
    """A spec failed validation; ``issues`` holds every problem found at the failing stage."""

    def __init__(self, issues: list[SpecIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


# ---------------------------------------------------------------------------------------------
# schema
class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ComponentRef(Strict):
    type: str = Field(description="registered component id, 'family.name'")
    params: dict[str, Any] = Field(default_factory=dict, description="the component's params")
    backend: str | None = Field(None, description="backend for this component; default: model.backend")


class ModelConfig(Strict):
    kind: Literal["decoder", "flow"] = Field("decoder", description="decoder LM, or a flow (needs a 'flow' section)")
    vocab: int = Field(256, ge=2, description="vocabulary size (256 = bytes)")
    d_model: int = Field(128, ge=1)
    n_heads: int = Field(4, ge=1)
    n_kv_heads: int | None = Field(None, ge=1, description="GQA: key/value heads (default n_heads)")
    n_layers: int = Field(2, ge=1)
    max_seq: int = Field(1024, ge=1)
    dtype: Literal["float32", "bfloat16", "float16", "float64"] = "float32"
    device: str = Field("cpu", description="cpu, cuda, cuda:N")
    backend: str = Field("auto", description="backend for every component: auto or a backend name")
    rope: bool = True
    rope_base: float = Field(10000.0, gt=0)
    tie_embeddings: bool = True
    norm_position: Literal["pre", "post"] = Field(
        "pre", description="pre: norm before each sublayer (residual stream unnormalised); post: "
                           "h = norm(h + sublayer(h)) (found better with depth.moda)")


class DepthSpec(Strict):
    """The depth KV stream read by ``depth.moda`` layers (``Context.state["depth_kv"]``)."""

    attention_writers: bool = Field(True, description="every attention layer appends its K,V per token")
    mlp_writers: bool = Field(False, description="every MLP sublayer appends a K,V from light projections "
                                                 "of its input")


class BlockSpec(Strict):
    mixer: ComponentRef = Field(default_factory=lambda: ComponentRef(type="attention.dense"))
    normres: ComponentRef = Field(default_factory=lambda: ComponentRef(type="normres.rmsnorm"))
    mlp: ComponentRef = Field(default_factory=lambda: ComponentRef(type="mlp.swiglu"))


class LayerOverride(Strict):
    at: int | list[int] = Field(description="layer indices (negative counts from the end)")
    mixer: ComponentRef | None = None
    normres: ComponentRef | None = None
    mlp: ComponentRef | None = None


class WorkloadSpec(Strict):
    batch: int = Field(2, ge=1)
    seq: int | None = Field(None, ge=1, description="tokens per sequence (default min(128, model.max_seq))")
    steps: int = Field(3, ge=1, description="timed forward+backward steps in `blockzoo run`")
    seed: int = 0


class FlowSpec(Strict):
    dim: int = Field(64, ge=1, description="data dimensions D (inputs are [B, D])")
    base: Literal["normal"] = Field("normal", description="base distribution of the latent z")
    repeat: int = Field(1, ge=1, description="apply the layers list this many times (fresh parameters each)")
    layers: list[ComponentRef] = Field(min_length=1, description="flow.* components, data side first")


class ModelSpec(Strict):
    name: str = "unnamed"
    description: str = ""
    model: ModelConfig = Field(default_factory=ModelConfig)
    block: BlockSpec = Field(default_factory=BlockSpec)
    layers: list[LayerOverride] = Field(default_factory=list)
    workload: WorkloadSpec = Field(default_factory=WorkloadSpec)
    flow: FlowSpec | None = Field(None, description="model.kind: flow only: the flow layers")
    depth: DepthSpec | None = Field(None, description="depth KV stream options (default when a layer uses "
                                                      "depth.moda: attention writers on, MLP writers off)")
    kv: ComponentRef | None = Field(None, description="KV-cache policy for decoding (a token.* component, slot "
                                                      "'kv'); default: the full cache")

    @model_validator(mode="after")
    def _default_seq(self) -> ModelSpec:
        if self.workload.seq is None:
            self.workload.seq = min(128, self.model.max_seq)
        return self

    # -- derived ---------------------------------------------------------------------------------
    def layer_block(self, i: int) -> BlockSpec:
        """The block of layer ``i`` after overrides (later overrides win)."""
        block = self.block.model_copy(deep=True)
        n = self.model.n_layers
        for ov in self.layers:
            idx = [ov.at] if isinstance(ov.at, int) else ov.at
            if i in [j % n for j in idx]:
                for slot in ("mixer", "normres", "mlp"):
                    ref = getattr(ov, slot)
                    if ref is not None:
                        setattr(block, slot, ref.model_copy(deep=True))
        return block

    def expanded(self) -> dict[str, Any]:
        """Canonical, fully expanded form: defaults filled, params validated and filled in."""
        from ..registry import get_registry
        reg = get_registry()
        data = self.model_dump(mode="json")

        def fill(ref: dict | None) -> None:
            if ref is None:
                return
            comp = reg.components.get(ref["type"])
            if comp is not None:
                ref["params"] = comp.params(**ref["params"]).model_dump(mode="json")
        if data.get("flow") is None:
            data.pop("flow", None)  # decoder specs: canonical form (and hash) as before flows existed
        for ref in (data.get("flow") or {}).get("layers", []):
            fill(ref)
        for slot in ("mixer", "normres", "mlp"):
            fill(data["block"][slot])
            for ov in data["layers"]:
                fill(ov.get(slot))
        # depth options came later: left out at their defaults so existing specs keep their hash
        if data.get("depth") is None:
            data.pop("depth", None)
        if data.get("kv") is None:  # likewise the kv policy section
            data.pop("kv", None)
        else:
            fill(data["kv"])
        if data["model"].get("norm_position") == "pre":
            data["model"].pop("norm_position")
        return data

    def depth_slots(self, layer: int) -> int:
        """Depth slots a ``depth.moda`` layer at ``layer`` reads (cost model): one per earlier
        layer and writer kind (every earlier mixer counted as an attention writer)."""
        d = self.depth or DepthSpec()
        return layer * (int(d.attention_writers) + int(d.mlp_writers))

    def canonical_json(self) -> str:
        return json.dumps(self.expanded(), sort_keys=True, separators=(",", ":"))

    def spec_hash(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:16]

    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.model.dtype]


# ---------------------------------------------------------------------------------------------
# loading and validation
def _pydantic_issues(exc: ValidationError, src: YamlSource | None, prefix: tuple = ()) -> list[SpecIssue]:
    issues = []
    for err in exc.errors():
        loc = prefix + tuple(err["loc"])
        # pydantic puts the union member / tag name in loc for unions: drop non-data parts
        loc = tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p in ("int", "list[int]"))))
        msg = err["msg"]
        key_error = err["type"] == "extra_forbidden"
        if key_error:
            parent = loc[:-1]
            allowed = _allowed_keys(parent)
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.5)
            msg = f"unknown key {loc[-1]!r}"
            msg += f" (did you mean {close[0]!r}?)" if close else (f"; expected one of: {', '.join(allowed)}" if allowed else "")
        elif err["type"] == "missing":
            msg = "required key missing"
        else:
            got = err.get("input")
            if not isinstance(got, (dict, list)):
                msg = f"{msg} (got {got!r})"
        where = src.where(loc, key=key_error) if src else None
        issues.append(SpecIssue(where, ".".join(str(p) for p in loc), msg))
    return issues


def _model_at(path: tuple) -> type[BaseModel] | None:
    """The pydantic model that validates the mapping at ``path`` (for key suggestions)."""
    model: Any = ModelSpec
    for part in path:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        ann = field.annotation
        model = _unwrap_model(ann)
        if model is None:
            return None
    return model


def _unwrap_model(ann) -> type[BaseModel] | None:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in getattr(ann, "__args__", ()) or ():
        m = _unwrap_model(arg)
        if m is not None:
            return m
    return None


def _allowed_keys(path: tuple) -> list[str]:
    model = _model_at(path)
    return list(model.model_fields) if model is not None else []


def _component_issues(spec: ModelSpec, src: YamlSource | None) -> list[SpecIssue]:
    from ..registry import get_manager
    from ..registry.registry import suggest
    manager = get_manager()
    reg = manager.registry
    issues: list[SpecIssue] = []
    refs: list[tuple[tuple, str, ComponentRef]] = [(("block", s), s, getattr(spec.block, s))
                                                   for s in ("mixer", "normres", "mlp")]
    for i, ov in enumerate(spec.layers):
        refs += [(("layers", i, s), s, getattr(ov, s)) for s in ("mixer", "normres", "mlp") if getattr(ov, s)]
    if spec.model.kind == "flow" and spec.flow is not None:
        refs = [(("flow", "layers", i), "flow", ref) for i, ref in enumerate(spec.flow.layers)]
    if spec.kv is not None:
        refs.append((("kv",), "kv", spec.kv))

    def at(path, key=False):
        return src.where(path, key=key) if src else None
    for path, slot, ref in refs:
        comp = reg.components.get(ref.type)
        dotted = ".".join(map(str, path))
        if comp is None:
            same_slot = [c for c, v in reg.components.items() if v.slot == slot]
            msg = f"unknown component {ref.type!r}: {suggest(ref.type, tuple(same_slot) or tuple(reg.components))}"
            if manager.failures:
                msg += f" ({len(manager.failures)} plugin(s) failed to load; see `blockzoo info`)"
            issues.append(SpecIssue(at(path + ("type",)), dotted + ".type", msg))
            continue
        if comp.slot != slot:
            same_slot = sorted(c for c, v in reg.components.items() if v.slot == slot)
            issues.append(SpecIssue(at(path + ("type",)), dotted + ".type",
                                    f"{ref.type!r} is a {comp.slot} component and cannot be the {slot}; "
                                    f"{slot} components: {', '.join(same_slot)}"))
            continue
        try:
            comp.params(**ref.params)
        except ValidationError as exc:
            sub = []
            for e in _pydantic_issues(exc, src, path + ("params",)):
                if e.message.startswith("unknown key"):
                    key = e.path.rsplit(".", 1)[-1]
                    e.message = f"unknown key {key!r} for {ref.type}: {suggest(key, tuple(comp.params.model_fields))}"
                sub.append(e)
            issues.extend(sub)
        backend = ref.backend or (spec.model.backend if slot != "kv" else "reference")
        if backend != "auto" and backend not in reg.backends.get(ref.type, {}):
            where_path = path + ("backend",) if ref.backend else ("model", "backend")
            issues.append(SpecIssue(at(where_path), ".".join(map(str, where_path)),
                                    f"{ref.type} has no backend {backend!r}: "
                                    f"{suggest(backend, tuple(reg.backends.get(ref.type, {})))}"))
    return issues


def _cross_issues(spec: ModelSpec, src: YamlSource | None) -> list[SpecIssue]:
    m = spec.model
    issues = []

    def add(path, msg):
        issues.append(SpecIssue(src.where(path) if src else None, ".".join(map(str, path)), msg))
    if m.d_model % m.n_heads:
        add(("model", "n_heads"), f"d_model {m.d_model} is not divisible by n_heads {m.n_heads}")
    kv = m.n_kv_heads or m.n_heads
    if m.n_heads % kv:
        add(("model", "n_kv_heads"), f"n_heads {m.n_heads} is not a multiple of n_kv_heads {kv}")
    for i, ov in enumerate(spec.layers):
        for j in [ov.at] if isinstance(ov.at, int) else ov.at:
            if not -m.n_layers <= j < m.n_layers:
                add(("layers", i, "at"), f"layer index {j} out of range for n_layers={m.n_layers}")
    from .flow_model import flow_issues
    issues.extend(flow_issues(spec, src))
    if spec.depth is not None and not (spec.depth.attention_writers or spec.depth.mlp_writers):
        add(("depth",), "depth: attention_writers and mlp_writers are both false, so depth.moda layers "
                        "would read no depth slots; turn one on or remove the depth section")
    issues.extend(_kv_issues(spec, src))
    if spec.workload.seq > m.max_seq:
        add(("workload", "seq"), f"workload seq {spec.workload.seq} exceeds model.max_seq {m.max_seq}")
    return issues


def _kv_issues(spec: ModelSpec, src: YamlSource | None) -> list[SpecIssue]:
    """Rules for the ``kv:`` policy: decoding over the kept subset is dense attention, so every
    layer's mixer must be attention.dense (other mixers decode with the full cache only); a
    policy that needs attention probabilities must run on a backend that materialises them."""
    if spec.kv is None or spec.model.kind == "flow":
        return []
    from ..registry import get_registry
    reg = get_registry()
    issues = []

    def add(path, msg):
        issues.append(SpecIssue(src.where(path) if src else None, ".".join(map(str, path)), msg))
    for i in range(spec.model.n_layers):
        mixer = spec.layer_block(i).mixer.type
        if mixer != "attention.dense":
            add(("kv", "type"), f"KV-cache policy {spec.kv.type} needs attention.dense mixers (decoding over "
                                f"the kept subset is dense attention), but layer {i} uses {mixer}; remove "
                                "the kv section to decode that mixer with the full cache")
            break
    comp = reg.components.get(spec.kv.type)
    name = spec.kv.backend or "reference"
    if name == "auto" and reg.backends.get(spec.kv.type):
        name = max(reg.backends[spec.kv.type].values(), key=lambda b: b.priority).name
    backend = reg.backends.get(spec.kv.type, {}).get(name)
    needs = getattr(getattr(comp.module, "policy_class", None), "needs_attention", False) if comp else False
    if needs and backend is not None and not getattr(backend, "materialises_attention", False):
        add(("kv", "backend") if spec.kv.backend else ("kv", "type"),
            f"{spec.kv.type} scores tokens from attention probabilities, but its backend {name!r} never "
            f"materialises them; use a backend that does (reference)")
    return issues


def validate(data: Any, src: YamlSource | None = None) -> ModelSpec:
    if not isinstance(data, dict):
        raise SpecError([SpecIssue(src.where(()) if src else None, "",
                                   f"a spec must be a mapping, got {type(data).__name__}")])
    try:
        spec = ModelSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_pydantic_issues(exc, src)) from None
    for stage in (_component_issues, _cross_issues):
        issues = stage(spec, src)
        if issues:
            raise SpecError(issues)
    return spec


def load_spec(source: Any) -> ModelSpec:
    """Path, YAML text, dict or ModelSpec -> validated ModelSpec (raises SpecError)."""
    if isinstance(source, ModelSpec):
        return validate(source.model_dump(mode="json"))
    if isinstance(source, dict):
        return validate(copy.deepcopy(source))
    if isinstance(source, Path) or (isinstance(source, str) and "\n" not in source
                                     and source.endswith((".yaml", ".yml"))):
        path = Path(source)
        if not path.exists():
            raise SpecError([SpecIssue(None, "", f"spec file not found: {path}")])
        src = YamlSource.from_path(path)
    elif isinstance(source, str):
        src = YamlSource(source)
    else:
        raise TypeError(f"cannot load a spec from {type(source).__name__}")
    return validate(src.data, src)


def dump_yaml(spec: ModelSpec) -> str:
    return yaml.safe_dump(spec.expanded(), sort_keys=False)


def json_schema() -> dict[str, Any]:
    """JSON Schema of specs, with each registered component's params under its type."""
    from ..registry import get_registry
    schema = ModelSpec.model_json_schema()
    reg = get_registry()
    variants = []
    defs = schema.setdefault("$defs", {})
    for cid, comp in sorted(reg.components.items()):
        p = _params_schema(cid, comp.params, defs)
        variants.append({
            "type": "object", "additionalProperties": False, "required": ["type"],
            "properties": {"type": {"const": cid, "description": comp.doc},
                           "params": {**p, "title": f"{cid} params"},
                           "backend": {"type": ["string", "null"],
                                       "enum": [None, "auto", *sorted(reg.backends.get(cid, {}))]}},
        })
    defs["ComponentRef"] = {"oneOf": variants, "title": "ComponentRef"}
    return schema


def _params_schema(cid: str, model: type[BaseModel], defs: dict[str, Any]) -> dict[str, Any]:
    """A params model's schema under field names (what expanded specs hold), its aliases accepted
    too, and its own ``$defs`` moved to the root under ``<cid>.<name>`` (refs are root-relative)."""
    p = model.model_json_schema(by_alias=False)
    local = p.pop("$defs", {})
    prefix = f"{cid}."

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: (f"#/$defs/{prefix}{v.rsplit('/', 1)[-1]}" if k == "$ref" and isinstance(v, str)
                        and v.startswith("#/$defs/") else rewrite(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return node
    for name, sub in local.items():
        defs[prefix + name] = rewrite(sub)
    p = rewrite(p)
    props = p.get("properties", {})
    for name, field in model.model_fields.items():
        if field.alias and field.alias != name and name in props:
            props[field.alias] = {**props[name], "description": f"alias of {name!r}"}
    return p
