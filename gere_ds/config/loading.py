"""Loading a run config: YAML (with its ``base:`` chain) + overrides -> typed sections, checked.

A mistake stops the run with one line naming the file, line and field, e.g.::

    configs/x.yaml:14: replay.stratgy: unknown key (did you mean 'strategy'?)
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from gere_ds.config.checks import validate
from gere_ds.config.overrides import apply_override, parse_override
from gere_ds.config.sections import RunConfig
from gere_ds.config.source import Marks, read_yaml
from gere_ds.errors import InputError
from gere_ds.storage.atomic import write_text_atomic


def _strip_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _as_number(value: Any) -> Any:
    """PyYAML reads `3e-6` (no dot) as a string; accept it as the number it means."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _finite(value: float, path: str, marks: Marks) -> float:
    if not math.isfinite(value):  # .nan passes every `<` check; .inf overflows timeouts
        raise marks.error(path, f"must be a finite number, got {value!r}")
    return value


def _coerce(value: Any, tp: Any, path: str, marks: Marks) -> Any:
    if value is None and _strip_optional(tp) is not tp:  # an optional section left out
        return None
    tp = _strip_optional(tp)
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise marks.error(path, f"expected a mapping, got {type(value).__name__}")
        return _build(tp, value, path, marks)
    if origin is dict:  # a free mapping (replay.options): its owner checks the values
        if not isinstance(value, dict):
            raise marks.error(path, f"expected a mapping, got {type(value).__name__}")
        return dict(value)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise marks.error(path, f"expected a list, got {type(value).__name__}")
        return [_coerce(v, item_tp, f"{path}.{i}", marks) for i, v in enumerate(value)]
    if origin in (Union, types.UnionType) and int in typing.get_args(tp):  # int | str
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            value = int(value)  # a key=value override
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise marks.error(path, f"expected an integer or a word, got {value!r}")
        return value
    if origin in (Union, types.UnionType):  # float | str (replay.weight)
        value = _as_number(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return _finite(float(value), path, marks)
        if isinstance(value, str):
            return value
        raise marks.error(path, f"expected a number or a string, got {value!r}")
    if tp is bool:
        if not isinstance(value, bool):
            raise marks.error(path, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise marks.error(path, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        value = _as_number(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise marks.error(path, f"expected a number, got {value!r}")
        return _finite(float(value), path, marks)
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise marks.error(path, f"expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type, raw: dict[str, Any], path: str, marks: Marks) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            sub = f"{path}.{key}" if path else str(key)
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else \
                f" (valid keys: {', '.join(fields)})"
            raise marks.error(sub, f"unknown key{hint}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        sub = f"{path}.{name}" if path else name
        if name in raw:
            kwargs[name] = _coerce(raw[name], hints[name], sub, marks)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise marks.error(path, f"missing required key '{sub}'")
    return cls(**kwargs)


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (with its ``base:`` chain), apply ``key=value`` overrides,
    validate and return it."""
    path = str(path)
    marks = Marks(path)
    raw = read_yaml(path, marks)
    for item in overrides or []:
        keys, value = parse_override(item)
        try:
            apply_override(raw, keys, value, marks)
        except (AttributeError, TypeError):
            raise InputError("cannot set this key", file="<command line>",
                             field=".".join(keys)) from None
    try:
        cfg = _build(RunConfig, raw, "", marks)
        validate(cfg, marks)
    except InputError as err:
        if err.line == 0:  # came from an override
            raise InputError(err.detail, file="<command line>", field=err.field) from None
        raise
    return cfg


def save_resolved(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    write_text_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))

