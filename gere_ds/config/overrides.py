"""Dotted ``key=value`` overrides from the command line, applied to a raw config mapping."""
from __future__ import annotations

from typing import Any

import yaml

from gere_ds.config.source import Marks
from gere_ds.errors import InputError


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], the value read as YAML, else the text itself)."""
    if "=" not in item:
        raise InputError(f"override {item!r} is not key=value", file="<command line>")
    key, _, text = item.partition("=")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key.strip().split("."), value


def apply_override(raw: dict[str, Any], keys: list[str], value: Any, marks: Marks) -> None:
    """Set ``keys`` (list items by index) in ``raw``; the key is marked as from no file line."""
    node: Any = raw
    for i, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise InputError(f"no list item {key}", file="<command line>",
                                 field=".".join(keys))
            node = node[int(key)]
        else:
            node = node.setdefault(key, {})
    last = keys[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise InputError(f"no list item {last}", file="<command line>", field=".".join(keys))
        node[int(last)] = value
    else:
        node[last] = value
    marks.lines[".".join(keys)] = 0  # overrides carry no YAML line

