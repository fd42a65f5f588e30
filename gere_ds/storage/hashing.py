"""File hashing, one way: whole files in chunks; one list of weight-file suffixes. (Digests of
big files kept between launches: gere_ds.storage.digest_cache.)"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_CHUNK = 1 << 22


def is_weight_file(path: Path) -> bool:
    return Path(path).suffix in WEIGHT_SUFFIXES


def update_with_file(digest: Any, path: Path) -> None:
    """Feed ``path`` into ``digest``: its name and size, then all its bytes."""
    path = Path(path)
    size = path.stat().st_size
    digest.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            digest.update(block)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks (weights and caches are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def file_fingerprint(path: str | Path, content_limit: int) -> str:
    """A short identity of a file to compare copies across nodes: the sha256 of its bytes
    (first 16 hex digits) up to ``content_limit`` bytes, beyond that its size only."""
    size = Path(path).stat().st_size
    if size > content_limit:
        return f"size {size}"
    return sha256_file(path)[:16]
