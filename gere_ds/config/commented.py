"""The resolved run config as YAML with every field's one-line doc as a comment
(`gere-ds train --config X --print-config`)."""
from __future__ import annotations

import dataclasses
from typing import Any

import yaml


def _scalar(value: Any) -> str:
    """One value in YAML flow style, on one line."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**9,
                          sort_keys=False).strip().removesuffix("\n...").removesuffix("...").strip()


def _lines(obj: Any, indent: str, first_prefix: str | None = None) -> list[str]:
    out: list[str] = []
    for i, f in enumerate(dataclasses.fields(obj)):
        prefix = first_prefix if (i == 0 and first_prefix is not None) else indent
        value = getattr(obj, f.name)
        comment = f"  # {f.metadata['doc']}" if f.metadata.get("doc") else ""
        if dataclasses.is_dataclass(value):
            out.append(f"{prefix}{f.name}:{comment}")
            out += _lines(value, indent + "  ")
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            out.append(f"{prefix}{f.name}:{comment}")
            for item in value:
                out += _lines(item, indent + "    ", first_prefix=indent + "  - ")
        else:
            out.append(f"{prefix}{f.name}: {_scalar(value)}{comment}")
    return out


def documented_yaml(cfg: Any) -> str:
    """``cfg`` (a config dataclass) as YAML that loads back to it, each key with its doc."""
    return "\n".join(_lines(cfg, "")) + "\n"
