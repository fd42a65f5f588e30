"""Digests of big files, kept between launches: (path, size, mtime_ns, inode) -> sha256.

The teacher fingerprint hashes every weight file whole (a model changed in place must not keep
stale teacher data), and re-reading multi-GB weights at every launch would cost minutes, so the
digest of a file is reused while its path, size, modification time (ns) and inode are all
unchanged. Residual risk: a file rewritten in place that keeps its size, inode and mtime_ns
(e.g. its mtime set back on purpose) keeps its old digest.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from gere_ds.storage.atomic import write_json_atomic
from gere_ds.storage.hashing import sha256_file

DIGESTS_FILE = "file_digests.json"


def _stamp(path: Path) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ino]


class DigestCache:
    """A small JSON file of digests. ``save`` writes it (atomically) only when an entry changed,
    so an unchanged model writes nothing; the caller saves once its checks have passed (a
    refused job writes nothing)."""

    def __init__(self, file: str | Path | None) -> None:
        self.file = Path(file) if file else None  # None: in memory only
        try:
            loaded = json.loads(self.file.read_text()) if self.file else {}
            self._entries: dict[str, dict] = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            self._entries = {}  # missing or damaged: rehash everything
        self.hashed: list[str] = []  # paths read in full by this object (tests, logs)

    def digest(self, path: str | Path) -> str:
        """sha256 of the file's bytes, from the cache while size, mtime_ns and inode match."""
        key = str(Path(path).resolve())
        stamp = _stamp(Path(key))
        entry = self._entries.get(key)
        if isinstance(entry, dict) and entry.get("stamp") == stamp and entry.get("sha256"):
            return str(entry["sha256"])
        value = sha256_file(key)
        if _stamp(Path(key)) != stamp:  # changed while being read: never cache a mixed digest
            return value
        self._entries[key] = {"stamp": stamp, "sha256": value}
        self.hashed.append(key)
        return value

    def save(self) -> None:
        """Keep the digests computed since loading (nothing to do when none was)."""
        if self.file is None or not self.hashed:
            return
        try:
            write_json_atomic(self.file, self._entries, indent=1)
        except OSError:
            pass  # a read-only cache folder: correct, only slower next time
