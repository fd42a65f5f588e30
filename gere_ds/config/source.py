"""YAML run configs as raw mappings, with the file and line of every key.

:class:`Marks` records where each dotted key came from (a key may come from a ``base:`` file),
so that a mistake found later names its file and line. A key given twice in one mapping is an
error here, not silently the last one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from gere_ds.errors import InputError


class Marks:
    """Line numbers of YAML keys, by dotted path (e.g. 'replay.strategy', 'tasks.0.name'), and
    the file each came from (a key may come from a `base:` file)."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.lines: dict[str, int] = {}
        self.files: dict[str, str] = {}

    def _found(self, path: str) -> str | None:
        while path:
            if path in self.lines:
                return path
            path = path.rpartition(".")[0]
        return None

    def line(self, path: str) -> int | None:
        found = self._found(path)
        return self.lines[found] if found is not None else None

    def error(self, path: str, message: str) -> InputError:
        found = self._found(path)
        file = self.files.get(found, self.file) if found is not None else self.file
        return InputError(message, file=file, line=self.line(path), field=path or None)


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: str, line: int, first: int) -> None:
        super().__init__(f"duplicate key {key!r} (first on line {first})")
        self.key, self.line, self.first = key, line, first


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error (PyYAML keeps the
    last one silently, so a pasted block would override an earlier setting unseen)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise _DuplicateKey(str(key), line, seen[key])
            seen.setdefault(key, line) if isinstance(key, (str, int, float, bool)) else None
        return super().construct_mapping(node, deep=deep)


def record_marks(node: yaml.Node, path: str, marks: Marks, file: str | None = None) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            sub = f"{path}.{key_node.value}" if path else str(key_node.value)
            marks.lines[sub] = key_node.start_mark.line + 1
            marks.files[sub] = file or marks.file
            record_marks(value_node, sub, marks, file)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            sub = f"{path}.{i}" if path else str(i)
            marks.lines[sub] = item.start_mark.line + 1
            marks.files[sub] = file or marks.file
            record_marks(item, sub, marks, file)


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: mappings merge key by key, anything else (lists too) is
    replaced."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str, marks: Marks, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """One YAML file as a mapping, its ``base:`` (relative to it) merged underneath."""
    if not Path(path).is_file():
        raise InputError("config file not found", file=path)
    text = Path(path).read_text()
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except _DuplicateKey as err:
        record_marks(node, "", marks, path)  # the dotted name of the key, from its first line
        dotted = [k for k, ln in marks.lines.items()
                  if ln in (err.first, err.line) and k.rpartition(".")[2] == err.key]
        raise InputError(str(err), file=path, line=err.line,
                         field=dotted[0] if dotted else err.key) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise InputError(f"invalid YAML: {getattr(err, 'problem', err)}", file=path,
                         line=mark.line + 1 if mark else None) from None
    raw = raw or {}
    if not isinstance(raw, dict):
        raise InputError("the config must be a mapping of keys", file=path)
    base = raw.pop("base", None)
    merged: dict[str, Any] = {}
    if base is not None:
        line = next((k.start_mark.line + 1 for k, _ in node.value if k.value == "base"), None)
        if not isinstance(base, str) or not base:
            raise InputError("must name a config file", file=path, line=line, field="base")
        base_path = Path(path).parent / base
        here = (*chain, Path(path).resolve())
        if base_path.resolve() in here:
            cycle = " -> ".join(str(p) for p in (*here, base_path.resolve()))
            raise InputError(f"configs include each other: {cycle}", file=path, line=line,
                             field="base")
        if not base_path.is_file():
            raise InputError(f"base config {base_path} not found", file=path, line=line,
                             field="base")
        merged = read_yaml(str(base_path), marks, here)
    if node is not None:
        record_marks(node, "", marks, path)
    return merge(merged, raw)


