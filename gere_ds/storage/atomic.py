"""Atomic file writes (file checksums: gere_ds.storage.hashing.sha256_file, re-exported here).

A write goes to a unique temporary name in the destination folder, is flushed to disk, then
``os.replace``-d into place: a crash never leaves a half-written file that a later run would
trust, and several nodes writing the same file on a shared disk never share a temporary name
(mkstemp, not the pid: container pids repeat across nodes)."""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gere_ds.storage.hashing import sha256_file  # noqa: F401  (re-exported)

TMP_MARK = ".tmp-"  # part of every temporary name, so stale ones can be found and removed


def _file_mode() -> int:
    """The mode an ordinary ``open(path, "w")`` gives (0666 less the umask, e.g. 0644): mkstemp
    makes 0600, which would hide configs and metrics from the rest of a group."""
    try:  # Linux: read without changing the umask (os.umask is process-wide, not thread-safe)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (parents created) via a temp file + fsync + os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARK}", dir=path.parent)
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj: Any, indent: int = 2) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write one JSON object per line; returns the number of rows written."""
    lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    write_text_atomic(path, "".join(line + "\n" for line in lines))
    return len(lines)
