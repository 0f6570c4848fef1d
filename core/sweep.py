"""Sweep files: a base spec, axes over dotted spec paths, excludes or a Python generator, tasks.

```yaml
name: norms-and-mlps
base: examples/specs/tiny.yaml         # a path (relative to this file) or an inline spec
axes:                                   # dotted path -> list of values (a value may be a list)
  block.normres.type: [normres.rmsnorm, normres.layernorm]
  block.mlp: [{type: mlp.swiglu}, {type: mlp.gelu}]
exclude:                                # drop trials matching every entry of one item
  - {block.normres.type: normres.layernorm, block.mlp.type: mlp.gelu}
generator: mypkg.sweeps:specs           # optional: yields (label, spec dict) pairs
tasks: {mqar: {steps: 200}, bytes_lm: {steps: 200}}
measure: {correctness: true, latency: true}
trial_timeout: 600                      # seconds; a trial over it is killed and marked failed
plugins: []                             # extra plugin modules to register (also in workers)
```
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .spec import SpecError, SpecIssue, _pydantic_issues, load_spec, validate
from .yamlsrc import YamlSource

DEFAULT_SWEEP = Path(__file__).parent / "data" / "default_sweep.yaml"


class MeasureConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    correctness: bool = Field(True, description="compare the chosen backends with the reference backend")
    latency: bool = Field(True, description="time forward and forward+backward on the spec's workload")
    latency_reps: int = Field(5, ge=1)


class SweepFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "sweep"
    description: str = ""
    base: dict[str, Any] | str = Field(default_factory=dict)
    axes: dict[str, list[Any]] = Field(default_factory=dict)
    exclude: list[dict[str, Any]] = Field(default_factory=list)
    generator: str | None = Field(None, description="'module:function' yielding (label, spec dict)")
    tasks: dict[str, dict[str, Any]] = Field(default_factory=dict)
    measure: MeasureConfig = Field(default_factory=MeasureConfig)
    trial_timeout: float = Field(900, gt=0)
    plugins: list[str] = Field(default_factory=list)


@dataclass
class Trial:
    key: str
    label: str
    axes: dict[str, Any]
    spec: dict[str, Any] | None  # expanded spec, None when invalid
    status: str = "pending"  # pending | skipped
    reason: str = ""
    spec_hash: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Sweep:
    file: SweepFile
    trials: list[Trial]
    source: str


def _get(d: Any, path: str) -> Any:
    for part in path.split("."):
        if isinstance(d, dict) and part in d:
            d = d[part]
        elif isinstance(d, list) and part.lstrip("-").isdigit() and -len(d) <= int(part) < len(d):
            d = d[int(part)]
        else:
            return _MISSING
    return d


_MISSING = object()


def _set(d: dict, path: str, value: Any) -> None:
    parts = path.split(".")
    for part in parts[:-1]:
        if isinstance(d, list):
            d = d[int(part)]
            continue
        if not isinstance(d.get(part), dict):
            d[part] = {}
        d = d[part]
    if isinstance(d, list):
        d[int(parts[-1])] = copy.deepcopy(value)
    else:
        d[parts[-1]] = copy.deepcopy(value)


def _short(value: Any) -> str:
    if isinstance(value, dict) and "type" in value:
        extra = ",".join(f"{k}={v}" for k, v in sorted((value.get("params") or {}).items()))
        return value["type"] + (f"({extra})" if extra else "")
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return str(value)


def _label(axis: str, value: Any) -> str:
    """'block.mlp.type', 'mlp.gelu' -> 'mlp=gelu'; 'model.d_model', 64 -> 'd_model=64'."""
    parts = axis.split(".")
    key = parts[-2] if parts[-1] == "type" and len(parts) > 1 else parts[-1]
    text = _short(value)
    return f"{key}={text.removeprefix(key + '.')}"


def trial_key(spec: dict[str, Any], tasks: dict, measure: dict, device: str | None) -> str:
    payload = json.dumps({"spec": spec, "tasks": tasks, "measure": measure, "device": device},
                         sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def load_sweep(path: str | Path | None, device: str | None = None) -> Sweep:
    """Parse, validate and expand a sweep file (None = the bundled default). Raises SpecError."""
    path = Path(path) if path is not None else DEFAULT_SWEEP
    if not path.exists():
        raise SpecError([SpecIssue(None, "", f"sweep file not found: {path}")])
    src = YamlSource.from_path(path)
    try:
        sf = SweepFile.model_validate(src.data if isinstance(src.data, dict) else {"_": src.data})
    except ValidationError as exc:
        issues = _pydantic_issues(exc, src)
        for i in issues:  # key suggestions against the sweep schema, not the spec schema
            if i.message.startswith("unknown key"):
                from ..registry.registry import suggest
                key = i.path.rsplit(".", 1)[-1]
                i.message = f"unknown key {key!r}: {suggest(key, tuple(SweepFile.model_fields))}"
        raise SpecError(issues) from None
    from ..registry import get_manager
    for mod in sf.plugins:
        register_plugin_module(mod)
    unknown_tasks = [t for t in sf.tasks if t not in get_manager().registry.tasks]
    if unknown_tasks:
        from ..registry.registry import suggest
        t = unknown_tasks[0]
        raise SpecError([SpecIssue(src.where(("tasks", t), key=True), f"tasks.{t}",
                                   f"unknown task {t!r}: {suggest(t, tuple(get_manager().registry.tasks))}")])
    for name, cfg in sf.tasks.items():
        params = get_manager().registry.tasks[name].params
        if params is not None:
            try:
                params(**cfg)
            except ValidationError as exc:
                raise SpecError(_pydantic_issues(exc, src, ("tasks", name))) from None

    # base spec: must be valid on its own (errors point into the base's file)
    if isinstance(sf.base, str):
        base_path = (path.parent / sf.base) if not Path(sf.base).is_absolute() else Path(sf.base)
        if not base_path.exists():
            base_path = Path(sf.base)
        base_src = YamlSource.from_path(base_path)
        base = base_src.data
        validate(copy.deepcopy(base), base_src)
    else:
        base = sf.base
        shifted = _SubSource(src, ("base",))
        validate(copy.deepcopy(base), shifted)
    for axis, values in sf.axes.items():
        if not values:
            raise SpecError([SpecIssue(src.where(("axes", axis)), f"axes.{axis}", "an axis needs at least one value")])
        head = axis.split(".")[0]
        from .spec import ModelSpec
        if head not in ModelSpec.model_fields:
            from ..registry.registry import suggest
            raise SpecError([SpecIssue(src.where(("axes", axis), key=True), f"axes.{axis}",
                                       f"unknown spec section {head!r}: {suggest(head, tuple(ModelSpec.model_fields))}")])

    measure = sf.measure.model_dump()
    trials: list[Trial] = []
    combos: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
    names = list(sf.axes)
    grid = itertools.product(*(sf.axes[a] for a in names)) if (names or not sf.generator) else []
    for values in grid:
        chosen = dict(zip(names, values, strict=True))
        spec = copy.deepcopy(base)
        for a, v in chosen.items():
            _set(spec, a, v)
        if any(all(_get(spec, k) == v for k, v in ex.items()) for ex in sf.exclude):
            continue
        label = ", ".join(_label(a, v) for a, v in chosen.items()) or sf.name
        combos.append((label, chosen, spec))
    if sf.generator:
        mod, _, fn = sf.generator.partition(":")
        try:
            gen = getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as exc:
            raise SpecError([SpecIssue(src.where(("generator",)), "generator", f"cannot load {sf.generator!r}: {exc}")]) from None
        for label, spec in gen(copy.deepcopy(base)):
            combos.append((str(label), {"generator": str(label)}, spec))
    seen = set()
    for label, chosen, spec in combos:
        if device:
            spec.setdefault("model", {})["device"] = device
        try:
            ms = load_spec(spec)
            expanded = ms.expanded()
            key = trial_key(expanded, sf.tasks, measure, device)
            trial = Trial(key, label, chosen, expanded, spec_hash=ms.spec_hash())
        except SpecError as exc:
            key = trial_key(spec, sf.tasks, measure, device)
            trial = Trial(key, label, chosen, None, status="skipped",
                          reason="; ".join(f"{i.path}: {i.message}" for i in exc.issues))
        if key in seen:
            continue
        seen.add(key)
        trials.append(trial)
    return Sweep(sf, trials, str(path))


class _SubSource:
    """A YamlSource view rooted at ``prefix`` (for errors inside an inline base spec)."""

    def __init__(self, src: YamlSource, prefix: tuple) -> None:
        self.src, self.prefix, self.file = src, prefix, src.file

    def where(self, path: tuple, key: bool = False):
        return self.src.where(self.prefix + tuple(path), key=key)


def register_plugin_module(name: str) -> None:
    from ..registry import get_manager
    manager = get_manager()
    module = importlib.import_module(name)
    if not manager.pm.is_registered(module):
        manager.register(module, name=name)
