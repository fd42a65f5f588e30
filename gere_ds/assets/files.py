"""Checksums and clean-up of the temporary files a crashed asset preparation left behind.
Assets are written with :mod:`gere_ds.atomic` (temp name in the final folder, then os.replace)."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from gere_ds.atomic import TMP_MARK


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (model weights are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def remove_stale_temps(root: Path) -> list[Path]:
    """Delete the temp files/folders a crashed earlier run left anywhere under ``root``."""
    stale = list(root.rglob(f".*{TMP_MARK}*")) if root.is_dir() else []
    for entry in sorted(stale, key=lambda p: len(p.parts)):
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    return stale
