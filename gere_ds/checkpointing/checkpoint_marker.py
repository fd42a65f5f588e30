"""A checkpoint rank's completion marker: the files that rank wrote (size and sha256), the save's
place in the run's history and the identity of the run that wrote it.

``<tag>/COMPLETE.rank00001`` (JSON, written atomically after the rank's files are fsynced)::

    {"format": 2, "run": "<run fingerprint>", "tag": "task002-step000010", "seq": 7,
     "parent": "task001-end#3", "rank": 1, "world_size": 2,
     "files": {"zero_pp_rank_1_mp_rank_00_optim_states.pt": {"size": 1234, "sha256": "..."}}}

``seq`` grows by one with every save of the run (rollbacks included), so it orders checkpoints
whatever their names; ``parent`` names the checkpoint (``tag#seq``) the saving process trained
from. Which files belong to a rank is decided by name: DeepSpeed's ``*pp_rank_<r>_*`` files and
``rng_rank<r>.pt`` are rank r's; every other file of the folder (``trainer_state.json``, ZeRO-1/2's
``mp_rank_00_model_states.pt``, ...) is rank 0's, so no file of any ZeRO layout goes unchecked.

A marker is a list of checksums, not a signature: it proves that the files are the ones a run with
this fingerprint wrote, not who wrote them (see docs/reliability.md, "Checkpoints").
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gere_ds.storage.atomic import TMP_MARK, write_text_atomic
from gere_ds.storage.hashing import sha256_file

FORMAT = 2
MARKER_PREFIX = "COMPLETE.rank"
_RANK_FILE = re.compile(r"pp_rank_(\d+)_|^rng_rank(\d+)\.pt$")


def marker_path(folder: Path, rank: int) -> Path:
    return Path(folder) / f"{MARKER_PREFIX}{rank:05d}"


def file_owner(name: str) -> int | None:
    """The rank whose marker lists ``name`` (None: not a checkpoint file, e.g. a marker)."""
    if name.startswith(MARKER_PREFIX) or TMP_MARK in name:
        return None
    m = _RANK_FILE.search(name)
    if m is None:
        return 0
    return int(m.group(1) or m.group(2))


def rank_files(folder: Path, rank: int) -> list[Path]:
    """The files of ``folder`` that ``rank``'s marker covers (present on this disk)."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and file_owner(p.name) == rank)


def run_fingerprint(model: str, tokenizer: str, seed: int, strategy: str, replay_data: str) -> str:
    """The identity a run writes into its markers and demands of what it loads. Only what a
    continued run cannot change: output_dir, lr, task list growth and the like stay free."""
    key = json.dumps({"model": model, "tokenizer": tokenizer or model, "seed": seed,
                      "strategy": strategy, "replay_data": replay_data}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def _sha256_and_fsync(path: Path) -> str:
    """sha256 of the file, then fsync it: DeepSpeed does not, and the marker must never reach
    the disk before the bytes it vouches for."""
    digest = sha256_file(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return digest


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the files themselves are synced
    finally:
        os.close(fd)


def write_marker(folder: Path, rank: int, *, run: str, tag: str, seq: int, parent: str | None,
                 world_size: int) -> None:
    """Hash and fsync ``rank``'s files in ``folder``, then write its marker (atomically)."""
    folder = Path(folder)
    files = {p.name: {"size": p.stat().st_size, "sha256": _sha256_and_fsync(p)}
             for p in rank_files(folder, rank)}
    _fsync_dir(folder)
    marker = {"format": FORMAT, "run": run, "tag": tag, "seq": seq, "parent": parent,
              "rank": rank, "world_size": world_size, "files": files}
    write_text_atomic(marker_path(folder, rank), json.dumps(marker, indent=1))


@dataclass
class Marker:
    """One rank's marker as read back."""

    rank: int
    run: str
    tag: str
    seq: int
    parent: str | None
    world_size: int
    files: dict[str, dict[str, Any]]


def read_marker(folder: Path, rank: int) -> Marker | str:
    """``rank``'s marker in ``folder``, or why there is no valid one."""
    path = marker_path(folder, rank)
    if not path.is_file():
        return "no completion marker" + (f" of rank {rank}" if rank else "")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"unreadable completion marker {path.name}"
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return f"{path.name} has no checksums (not a gere-ds marker); not trusted"
    try:
        return Marker(rank=int(data["rank"]), run=str(data["run"]), tag=str(data["tag"]),
                      seq=int(data["seq"]), parent=data.get("parent"),
                      world_size=int(data["world_size"]), files=dict(data["files"]))
    except (KeyError, TypeError, ValueError):
        return f"malformed completion marker {path.name}"


def marker_problem(folder: Path, marker: Marker, run: str | None, checksums: bool) -> str | None:
    """Why ``marker``'s part of ``folder`` cannot be trusted (None: intact). ``run`` None skips
    the identity check; ``checksums`` False checks sizes only (cheap: used to order and prune,
    never to load)."""
    folder = Path(folder)
    if run is not None and marker.run != run:
        return (f"written by another run (fingerprint {marker.run[:12]}, this run "
                f"{run[:12]}: model, tokenizer, seed, strategy or replay data differ)")
    if marker.tag != folder.name:
        return f"marker of rank {marker.rank} belongs to {marker.tag}, not {folder.name}"
    if marker.rank == 0 and "trainer_state.json" not in marker.files:
        return "trainer_state.json missing"
    for name, meta in marker.files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} missing"
        size = path.stat().st_size
        if size != meta.get("size"):
            return f"{name} truncated ({size} of {meta.get('size')} bytes)"
    if checksums:
        for name, meta in marker.files.items():
            if sha256_file(folder / name) != meta.get("sha256"):
                return f"{name} fails its checksum (corrupt)"
    return None


def rank_problem(folder: Path, rank: int, run: str | None = None,
                 checksums: bool = False) -> str | None:
    """Why ``rank``'s part of ``folder`` cannot be trusted (None: complete and intact)."""
    marker = read_marker(folder, rank)
    if isinstance(marker, str):
        return marker
    return marker_problem(folder, marker, run, checksums)
