"""assets/manifest.json: what each step produced, from which settings, with checksums.

A step is up to date when its recorded settings equal the requested ones and every file
it recorded still exists with the recorded sha256; otherwise it is rebuilt. The manifest
is rewritten atomically after each step, so an interrupted run keeps finished steps.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gere_ds.storage.atomic import sha256_file, write_json_atomic

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class FileRecord:
    sha256: str
    bytes: int
    rows: int | None = None  # JSON-lines row count, None for other files

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sha256": self.sha256, "bytes": self.bytes}
        if self.rows is not None:
            out["rows"] = self.rows
        return out


def record_file(path: Path, rows: int | None = None) -> FileRecord:
    return FileRecord(sha256_file(path), path.stat().st_size, rows)


class Manifest:
    """The manifest of one asset folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / MANIFEST_NAME
        self.data: dict[str, Any] = {"format": FORMAT_VERSION, "steps": {}}
        self.unreadable = False
        if self.path.exists():
            try:
                loaded = json.loads(self.path.read_text(encoding="utf-8"))
                if loaded.get("format") == FORMAT_VERSION and isinstance(loaded.get("steps"), dict):
                    self.data = loaded
                else:
                    self.unreadable = True
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                self.unreadable = True  # every step is rebuilt; nothing on disk is trusted

    def step(self, name: str) -> dict[str, Any] | None:
        return self.data["steps"].get(name)

    def stale_reason(self, name: str, settings: dict[str, Any]) -> str | None:
        """Why step ``name`` must be rebuilt, or None when it is up to date."""
        entry = self.step(name)
        if entry is None:
            return "not built yet"
        if entry.get("settings") != settings:
            return "settings changed"
        for rel, record in sorted(entry.get("files", {}).items()):
            path = self.root / rel
            if not path.is_file():
                return f"{rel} is missing"
            if path.stat().st_size != record.get("bytes") or sha256_file(path) != record.get("sha256"):
                return f"{rel} checksum mismatch"
        return None

    def set_step(self, name: str, entry: dict[str, Any]) -> None:
        self.data["steps"][name] = entry
        self.save()

    def save(self) -> None:
        write_json_atomic(self.path, self.data)
