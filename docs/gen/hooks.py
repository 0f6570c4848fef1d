"""mkdocs hooks (``hooks:`` in mkdocs.yml): add the pages generated from the registry.

``on_config`` puts every registered component in the nav (hand-written page or generated one);
``on_files`` adds the generated Markdown as in-memory files. Nothing is written into docs/.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mkdocs.structure.files import File

sys.path.insert(0, str(Path(__file__).parent))
import pages  # noqa: E402

_GENERATED: dict[str, str] = {}


def on_config(config):
    _GENERATED.clear()
    _GENERATED.update(pages.generated_pages())
    nav = []
    for entry in config.get("nav") or []:
        if isinstance(entry, dict) and entry.get("Components") == "GENERATED":
            entry = {"Components": pages.component_nav()}
        elif isinstance(entry, dict) and entry.get("Kernel notes") == "GENERATED":
            entry = {"Kernel notes": pages.notes_nav()}
        nav.append(entry)
    config["nav"] = nav
    return config


def on_files(files, config):
    for rel, text in _GENERATED.items():
        if files.get_file_from_path(rel) is None:
            files.append(File.generated(config, rel, content=text))
    return files
