"""Reading our YAML files (the config, the model catalog) safely, with the line of every key for error messages."""

from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any

import yaml

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 60, 60  # bounded even for YAML alias bombs


class YamlError(Exception):
    """The file cannot be read or is not well-formed YAML; the message names the file, line and column."""


def read_yaml(path: Path, what: str) -> tuple[Any, dict[str, int]]:
    """The document in `path` (yaml.safe_load) and the 1-based line of every mapping key and list item by path
    (`model.n_ctx`, `models.x.files[0].size`). `what` names the file in messages ("config file", "catalog")."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise YamlError(f"{path}: cannot read the {what}: {exc}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        message = f"{path}: malformed YAML at {_mark(exc.problem_mark)}: {exc.problem or exc.context}"
        if exc.context and exc.context_mark and exc.problem:
            message += f" ({exc.context} at {_mark(exc.context_mark)})"
        raise YamlError(message) from None
    except (yaml.YAMLError, RecursionError, ValueError) as exc:
        raise YamlError(f"{path}: malformed YAML: {exc}") from None
    lines: dict[str, int] = {}
    _index_lines(node, "", lines, set())
    return data, lines


def show(value: Any) -> str:
    """A value for an error message: short, bounded, with its type."""
    text = _REPR.repr(value)
    return f"{text if len(text) <= 60 else text[:57] + '...'} ({type(value).__name__})"


def _mark(mark: yaml.Mark | None) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark else "an unknown position"


def _index_lines(node: yaml.Node | None, path: str, lines: dict[str, int], seen: set[int]) -> None:
    """Record lines by path; an aliased node is walked only once (no alias bomb)."""
    if node is None or id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            sub = f"{path}.{key.value}" if path else str(key.value)
            lines.setdefault(sub, key.start_mark.line + 1)
            _index_lines(value, sub, lines, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            sub = f"{path}[{i}]"
            lines.setdefault(sub, item.start_mark.line + 1)
            _index_lines(item, sub, lines, seen)
