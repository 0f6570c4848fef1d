"""Documentation pages generated from the loaded registry (so plugins show up too).

Pure functions returning Markdown; ``docs/gen/hooks.py`` adds them to the mkdocs build, and
``python docs/gen/pages.py OUT_DIR`` writes them to a folder (to read them without mkdocs).

- ``reference/capabilities.md``: component x backend matrix with each backend's declared
  capabilities (devices, dtypes, head dims, gradients, packages, priority, owner) and whether it
  runs on the machine that built the docs;
- ``reference/spec.md``: every spec key (walked from the pydantic models), each component's params
  and each evaluation task's config;
- ``components/index.md`` and a generated page for each component that has no hand-written page.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

DOCS = Path(__file__).resolve().parents[1]


# -- helpers ----------------------------------------------------------------------------------
def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _dtypes(ds) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in ds)


def _type(node: dict, defs: dict) -> str:
    """A JSON-schema node as a short type string: ``integer ≥ 1``, ``"a" | "b"``, ``X | null``."""
    if "$ref" in node:
        return node["$ref"].rsplit("/", 1)[-1]
    if "const" in node:
        return f"`{node['const']!r}`"
    if "enum" in node:
        return " \\| ".join(f"`{v!r}`" if v is not None else "null" for v in node["enum"])
    for key in ("anyOf", "oneOf"):
        if key in node:
            return " \\| ".join(_type(n, defs) for n in node[key])
    t = node.get("type", "any")
    if isinstance(t, list):
        return " \\| ".join(t)
    if t == "array":
        if "prefixItems" in node:
            return "[" + ", ".join(_type(n, defs) for n in node["prefixItems"]) + "]"
        return f"list of {_type(node.get('items', {}), defs)}"
    if t == "object" and "additionalProperties" in node and isinstance(node["additionalProperties"], dict):
        return f"mapping to {_type(node['additionalProperties'], defs)}"
    bounds = [f"{s} {node[k]}" for k, s in (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"),
                                           ("exclusiveMaximum", "<")) if k in node]
    return t + (" " + ", ".join(bounds) if bounds else "")


def _default(node: dict) -> str:
    if "default" not in node:
        return "required"
    d = node["default"]
    return "`null`" if d is None else f"`{d!r}`" if not isinstance(d, bool) else f"`{str(d).lower()}`"


def _params_table(model, cid: str | None = None) -> str:
    schema = model.model_json_schema(by_alias=False)
    defs = schema.get("$defs", {})
    props = schema.get("properties", {})
    if not props:
        return "No params.\n"
    rows = ["| name | type | default | meaning |", "| --- | --- | --- | --- |"]
    for name, node in props.items():
        field = model.model_fields.get(name)
        alias = f" (alias `{field.alias}`)" if field is not None and field.alias and field.alias != name else ""
        rows.append(f"| `{name}`{alias} | {_type(node, defs)} | {_default(node)} | "
                    f"{_cell(node.get('description', ''))} |")
    return "\n".join(rows) + "\n"


def _registry():
    from blockzoo.registry import get_manager
    return get_manager()


def page_name(cid: str) -> str:
    """The page of a component: ``components/<name>.md`` when hand-written, else generated as
    ``components/<family>.<name>.md``."""
    name = cid.split(".", 1)[1]
    if (DOCS / "components" / f"{name}.md").exists():
        return f"components/{name}.md"
    return f"components/{cid}.md"


# -- pages ------------------------------------------------------------------------------------
def capabilities_page() -> str:
    from blockzoo.cli import info_data
    manager = _registry()
    reg = manager.registry
    data = {c["id"]: c for c in info_data()["components"]}
    names = sorted({b for t in reg.backends.values() for b in t},
                   key=lambda n: (("reference", "triton", "numba").index(n) if n in ("reference", "triton", "numba")
                                  else 9, n))
    out = ["# Capability matrix", "",
           "Generated from the registry when the docs were built (built-ins and every installed plugin). "
           "A cell names the devices a backend declares; `—` means the component has no such backend. "
           "`blockzoo info` prints the same matrix for your machine, with the reason for every unavailable "
           "backend.", "",
           "| component | slot | " + " | ".join(names) + " |", "| --- | --- | " + " | ".join("---" for _ in names) + " |"]
    for cid in sorted(reg.components):
        comp = reg.components[cid]
        cells = []
        for n in names:
            be = reg.backends[cid].get(n)
            cells.append("—" if be is None else ", ".join(be.capabilities.devices))
        out.append(f"| [{cid}](../{page_name(cid)}) | {comp.slot} | " + " | ".join(cells) + " |")
    out += ["", "## Backends in detail", ""]
    for cid in sorted(reg.components):
        out += [f"### {cid}", "", _cell(reg.components[cid].doc), "",
                "| backend | priority | devices | dtypes | head dims | grad | requires | min CC | "
                "built here | owner |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        rows = {b["name"]: b for b in data[cid]["backends"]}
        for be in reg.backends_for(cid):
            cap = be.capabilities
            hd = cap.head_dims
            hd = "any" if hd is None else (f"{hd.start}..{hd.stop - 1}" if isinstance(hd, range) else
                                           ", ".join(map(str, hd)))
            cc = "" if not cap.min_compute_capability else ".".join(map(str, cap.min_compute_capability))
            here = rows.get(be.name, {})
            status = "yes" if here.get("runs_on_this_device") else ("available" if here.get("available") else
                                                                    "no: " + "; ".join(here.get("reasons", [])))
            out.append(f"| {be.name} | {be.priority} | {', '.join(cap.devices)} | {_dtypes(cap.dtypes)} | {hd} | "
                       f"{'yes' if cap.grad else 'no'} | {', '.join(cap.requires) or '—'} | {cc or '—'} | "
                       f"{_cell(status)} | {_cell(be.owner)} |")
        out.append("")
    if manager.failures:
        out += ["## Plugin failures at build time", ""]
        out += [f"- {f.plugin} ({f.dist} {f.version}) at {f.stage}: {_cell(f.error)}" for f in manager.failures]
        out.append("")
    out += [f"*Built with torch {torch.__version__} on {'cuda' if torch.cuda.is_available() else 'cpu'}.*", ""]
    return "\n".join(out)


def _model_fields_table(model, prefix: str, seen: set) -> list[str]:
    from pydantic import BaseModel
    schema = model.model_json_schema()
    defs = schema.get("$defs", {})
    props = schema.get("properties", {})
    doc = (model.__doc__ or "").strip().split("\n\n")[0] if model.__doc__ != BaseModel.__doc__ else ""
    out = [f"### `{prefix or '(top level)'}`", ""] + ([_cell(doc), ""] if doc else []) + [
        "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    nested = []
    for name, field in model.model_fields.items():
        node = props.get(field.alias or name, {})
        default = _default(node) if field.is_required() or "default" in node else _factory_default(field)
        out.append(f"| `{name}` | {_type(node, defs)} | {default} | {_cell(field.description or '')} |")
        for sub in _models_in(field.annotation):
            if issubclass(sub, BaseModel) and sub.__name__ != "ComponentRef" and sub not in seen:
                seen.add(sub)
                nested.append((sub, f"{prefix}.{name}" if prefix else name))
    out.append("")
    for sub, path in nested:
        out += _model_fields_table(sub, path, seen)
    return out


def _factory_default(field) -> str:
    from pydantic import BaseModel
    try:
        value = field.default_factory()
    except Exception:  # noqa: BLE001 - factories needing arguments
        return "(see its keys)"
    if isinstance(value, BaseModel):
        if "type" in type(value).model_fields:
            return f"`{{type: {value.type}}}`"
        return "(see its keys)"
    return f"`{value!r}`"


def _models_in(ann) -> list:
    from pydantic import BaseModel
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return [ann]
    found = []
    for arg in getattr(ann, "__args__", ()) or ():
        found += _models_in(arg)
    return found


def spec_page() -> str:
    from blockzoo.core.spec import ComponentRef, ModelSpec
    reg = _registry().registry
    out = ["# Spec reference", "",
           "Generated from the spec models and the registry when the docs were built. Every mapping is "
           "strict: an unknown key is an error naming the nearest valid one. `blockzoo schema` prints the "
           "same as a JSON Schema (see [editor completion](../plugins.md#editor-completion-for-specs)).", "",
           "## Spec keys", ""]
    out += _model_fields_table(ModelSpec, "", {ModelSpec})
    out += ["### Component references", "",
            "`block.mixer`, `block.normres`, `block.mlp` and the same keys of a `layers` entry take:", "",
            "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    node = ComponentRef.model_json_schema()
    for name, field in ComponentRef.model_fields.items():
        out.append(f"| `{name}` | {_type(node['properties'][name], {})} | {_default(node['properties'][name])} | "
                   f"{_cell(field.description or '')} |")
    out += ["", "## Components and their params", ""]
    for slot in sorted({c.slot for c in reg.components.values()}):
        out += [f"### Slot `{slot}`", ""]
        for cid in sorted(c for c, v in reg.components.items() if v.slot == slot):
            comp = reg.components[cid]
            backends = ", ".join(f"`{b.name}`" for b in reg.backends_for(cid))
            out += [f"#### `{cid}`", "", f"{_cell(comp.doc)} Backends: {backends}. "
                    f"[Component page](../{page_name(cid)}).", "", _params_table(comp.params, cid)]
    out += ["## Evaluation tasks", "", "Used under `tasks:` in sweep files.", ""]
    for name in sorted(reg.tasks):
        task = reg.tasks[name]
        out += [f"### `{name}`", "", f"{_cell(task.doc)} Registered by {_cell(task.owner)}.", ""]
        out += [_params_table(task.params) if task.params is not None else "No config.\n"]
    return "\n".join(out)


def component_page(cid: str) -> str:
    reg = _registry().registry
    comp = reg.components[cid]
    out = [f"# {cid}", "", _cell(comp.doc), "",
           f"Source: {_cell(comp.source or 'not given')}. Registered by {_cell(comp.owner)}.", "",
           "*This page is generated from the registry: the component has no hand-written page yet.*", "",
           "## Params", "", _params_table(comp.params, cid), "## Backends", "",
           "| backend | priority | devices | dtypes | grad | notes |", "| --- | --- | --- | --- | --- | --- |"]
    for be in reg.backends_for(cid):
        cap = be.capabilities
        out.append(f"| {be.name} | {be.priority} | {', '.join(cap.devices)} | {_dtypes(cap.dtypes)} | "
                   f"{'yes' if cap.grad else 'no'} | {_cell(be.doc)} |")
    cases = comp.cases() if comp.cases else []
    out += ["", f"## Test cases ({len(cases)})", "",
            "Every backend runs each case against the reference (outputs and gradients) in the generated matrix.",
            ""] + [f"- `{c.id}`" for c in cases]
    return "\n".join(out) + "\n"


def components_index() -> str:
    reg = _registry().registry
    out = ["# Components", "", "Every registered component (generated from the registry).", "",
           "| component | slot | backends | summary |", "| --- | --- | --- | --- |"]
    for cid in sorted(reg.components):
        comp = reg.components[cid]
        out.append(f"| [{cid}](../{page_name(cid)}) | {comp.slot} | "
                   f"{', '.join(b.name for b in reg.backends_for(cid))} | {_cell(comp.doc)} |")
    return "\n".join(out) + "\n"


def generated_pages() -> dict[str, str]:
    """path under docs/ -> Markdown, for every generated page."""
    reg = _registry().registry
    pages = {"reference/capabilities.md": capabilities_page(), "reference/spec.md": spec_page(),
             "components/index.md": components_index()}
    for cid in sorted(reg.components):
        path = page_name(cid)
        if not (DOCS / path).exists():
            pages[path] = component_page(cid)
    return pages


def component_nav() -> list[dict[str, str]]:
    reg = _registry().registry
    return [{"Overview": "components/index.md"}] + [{cid: page_name(cid)} for cid in sorted(reg.components)]


def notes_nav() -> list[dict[str, str]]:
    """docs/notes/*.md, titled by their first heading."""
    out = []
    for path in sorted((DOCS / "notes").glob("*.md")):
        first = next((ln for ln in path.read_text().splitlines() if ln.startswith("# ")), path.stem)
        out.append({first.removeprefix("# ").strip(): f"notes/{path.name}"})
    return out


if __name__ == "__main__":
    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "docs-generated")
    for rel, text in generated_pages().items():
        (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (out_dir / rel).write_text(text)
        print(out_dir / rel)
