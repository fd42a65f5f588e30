"""Checkpoints: the ZeRO engine state + the trainer state, with a completion marker.

Layout::

    <output_dir>/checkpoints/<tag>/           DeepSpeed's per-rank files (model + optimizer shards)
    <output_dir>/checkpoints/<tag>/trainer_state.json
    <output_dir>/checkpoints/<tag>/COMPLETE   written after every rank finished saving
    <output_dir>/checkpoints/latest           the tag of the newest complete checkpoint (atomic)

A checkpoint without COMPLETE is never loaded; `latest` is written last.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from gere_ds import dist

COMPLETE = "COMPLETE"


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def task_tag(task_index: int) -> str:
    """Tag of the checkpoint at the end of task ``task_index`` (0-based)."""
    return f"task{task_index + 1:03d}-end"


def save_checkpoint(engine: Any, root: Path, tag: str, trainer_state: dict[str, Any]) -> Path:
    """Save on ALL ranks (a collective); rank 0 writes the trainer state and markers last."""
    root = Path(root)
    folder = root / tag
    if dist.is_main() and (folder / COMPLETE).exists():
        (folder / COMPLETE).unlink()  # re-saving a tag: it is incomplete until done again
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    dist.barrier()
    if dist.is_main():
        atomic_write_text(folder / "trainer_state.json", json.dumps(trainer_state, indent=1))
        atomic_write_text(folder / COMPLETE, "ok\n")
        atomic_write_text(root / "latest", tag + "\n")
    dist.barrier()
    return folder


def is_complete(folder: Path) -> bool:
    return (Path(folder) / COMPLETE).is_file() and (Path(folder) / "trainer_state.json").is_file()
