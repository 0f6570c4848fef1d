"""The docs pages generated from the registry (docs/gen/pages.py) cover every component, and a
runtime-registered plugin component shows up in them (no mkdocs needed here; `tox -e docs`
builds the site)."""

import importlib.util
from pathlib import Path

import pytest

import blockzoo
from blockzoo.registry import get_manager, reset_manager

PAGES = Path(__file__).parents[1] / "docs" / "gen" / "pages.py"


@pytest.fixture
def pages():
    spec = importlib.util.spec_from_file_location("blockzoo_docs_pages", PAGES)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_component_is_documented(pages):
    generated = pages.generated_pages()
    caps, spec_ref, index = (generated[p] for p in
                             ("reference/capabilities.md", "reference/spec.md", "components/index.md"))
    reg = blockzoo.get_registry()
    for cid, comp in reg.components.items():
        page = pages.page_name(cid)
        assert page in generated or (pages.DOCS / page).exists(), cid
        assert f"[{cid}](../{page})" in caps and f"[{cid}](../{page})" in index
        assert f"#### `{cid}`" in spec_ref
        for field in comp.params.model_fields:
            assert f"| `{field}`" in spec_ref.split(f"#### `{cid}`", 1)[1], (cid, field)
        for be in reg.backends[cid]:
            assert f"| {be} |" in caps.split(f"### {cid}\n", 1)[1].split("\n### ", 1)[0], (cid, be)
    for task in reg.tasks:
        assert f"### `{task}`" in spec_ref
    nav = pages.component_nav()
    assert [next(iter(e)) for e in nav[1:]] == sorted(reg.components)


def test_plugin_component_gets_a_generated_page(pages, monkeypatch):
    from pydantic import BaseModel, ConfigDict, Field

    from blockzoo.registry import Backend, Component, Inputs, hookimpl

    class P(BaseModel):
        model_config = ConfigDict(extra="forbid")
        gain: float = Field(1.5, description="output gain")

    class Plugin:
        @hookimpl
        def blockzoo_register_components(self, registry):
            registry.add_component(Component(id="docdemo.gain", slot="mlp", params=P, doc="multiplies by gain",
                                             describe=lambda x, params=None: Inputs.from_tensors({"x": x})))

        @hookimpl
        def blockzoo_register_backends(self, registry):
            registry.add_backend(Backend("docdemo.gain", "reference", lambda x, gain=1.5: x * gain))
    reset_manager()
    try:
        get_manager().register(Plugin(), name="docdemo")
        generated = pages.generated_pages()
        page = generated["components/docdemo.gain.md"]
        assert "# docdemo.gain" in page and "multiplies by gain" in page
        assert "| `gain` | number | `1.5` | output gain |" in page
        assert "generated from the registry" in page
    finally:
        reset_manager()
