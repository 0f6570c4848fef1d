"""YAML loading that remembers where every value came from (file, line, column)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class Where:
    file: str
    line: int  # 1-based
    column: int  # 1-based

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


class YamlSource:
    """Parsed YAML data plus a map from dotted paths ("block.mixer.type", "layers.0.at") to
    positions."""

    def __init__(self, text: str, file: str = "<string>") -> None:
        self.file = file
        self.text = text
        self.positions: dict[tuple, Where] = {}
        self.key_positions: dict[tuple, Where] = {}
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = Where(file, mark.line + 1, mark.column + 1) if mark else Where(file, 1, 1)
            problem = getattr(exc, "problem", None) or str(exc)
            from .spec import SpecError, SpecIssue
            raise SpecError([SpecIssue(where, "", f"YAML syntax error: {problem}")]) from None
        self.data = self._walk(node, ()) if node is not None else {}

    @classmethod
    def from_path(cls, path: str | Path) -> YamlSource:
        p = Path(path)
        return cls(p.read_text(encoding="utf-8"), str(path))

    def _mark(self, node) -> Where:
        return Where(self.file, node.start_mark.line + 1, node.start_mark.column + 1)

    def _walk(self, node, path: tuple) -> Any:
        self.positions[path] = self._mark(node)
        if isinstance(node, yaml.MappingNode):
            out = {}
            for key_node, value_node in node.value:
                key = _scalar(key_node) if isinstance(key_node, yaml.ScalarNode) else str(key_node.value)
                self.key_positions[path + (key,)] = self._mark(key_node)
                out[key] = self._walk(value_node, path + (key,))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self._walk(item, path + (i,)) for i, item in enumerate(node.value)]
        return _scalar(node)

    def where(self, path: tuple, key: bool = False) -> Where:
        """Closest known position for ``path`` (walks up to the parent when unknown)."""
        path = tuple(path)
        while True:
            table = self.key_positions if key else self.positions
            if path in table:
                return table[path]
            if path in self.positions:
                return self.positions[path]
            if not path:
                return Where(self.file, 1, 1)
            path = path[:-1]


def _scalar(node: yaml.ScalarNode) -> Any:
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    finally:
        loader.dispose()
