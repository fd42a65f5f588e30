"""Clean-up of the temporary files a crashed asset preparation left behind.
Assets are written with :mod:`gere_ds.storage.atomic` (temp name in the final folder, then
os.replace)."""
from __future__ import annotations

import shutil
from pathlib import Path

from gere_ds.storage.atomic import TMP_MARK


def remove_stale_temps(root: Path) -> list[Path]:
    """Delete the temp files/folders a crashed earlier run left anywhere under ``root``."""
    stale = list(root.rglob(f".*{TMP_MARK}*")) if root.is_dir() else []
    for entry in sorted(stale, key=lambda p: len(p.parts)):
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    return stale
