"""Checkpoints: the ZeRO engine state + the trainer state, with completion markers.

Layout::

    <output_dir>/checkpoints/<tag>/               DeepSpeed's per-rank files (model + optimizer)
    <output_dir>/checkpoints/<tag>/trainer_state.json
    <output_dir>/checkpoints/<tag>/rng_rank00001.pt   each rank's RNG states
    <output_dir>/checkpoints/<tag>/COMPLETE.rank00001 each rank's files and their sizes, written
                                                      after that rank's files are on disk
    <output_dir>/checkpoints/latest                the newest complete tag (written last, atomic)

Tags: ``task002-end`` (end of task 2, kept for export and evaluation) and
``task002-step000040`` (mid-task, the newest ``keep_last`` are kept). ``Checkpointer`` owns the
folder: the tag format, the markers, saving, finding the latest complete checkpoint, pruning and
the offline check of every rank's files (export, evaluation).

No shared filesystem is assumed: every rank writes and checks only its own files and markers, and
the decision "is this checkpoint complete" is taken collectively (any rank missing -> skipped).
A checkpoint whose marker is missing or whose files do not have the recorded sizes (truncated) is
never loaded; the previous complete one is used instead, with a log line.
"""
from __future__ import annotations

import json
import random
import re
import shutil
import socket
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from gere_ds import dist
from gere_ds.atomic import write_text_atomic
from gere_ds.errors import InputError

_TAG = re.compile(r"^task(\d{3,})-(end|step(\d{6,}))$")  # what task_tag / step_tag write


def task_tag(task_index: int) -> str:
    """Tag of the checkpoint at the end of task ``task_index`` (0-based)."""
    return f"task{task_index + 1:03d}-end"


def step_tag(task_index: int, step_in_task: int) -> str:
    return f"task{task_index + 1:03d}-step{step_in_task:06d}"


def tag_order(tag: str) -> tuple[int, int]:
    """Sort key: (task number, step; end = after every step)."""
    m = _TAG.match(tag)
    if not m:
        return (-1, -1)
    return (int(m.group(1)), 10**9 if m.group(2) == "end" else int(m.group(3)))


def _marker(folder: Path, rank: int) -> Path:
    return folder / f"COMPLETE.rank{rank:05d}"


def _own_files(folder: Path, rank: int) -> list[Path]:
    """The files this rank wrote into a checkpoint folder (DeepSpeed names them by rank)."""
    def mine(name: str) -> bool:
        m = re.search(r"pp_rank_(\d+)_", name)  # zero_pp_rank_<r>_mp_rank_00_*.pt
        return (m is not None and int(m.group(1)) == rank) or name == f"rng_rank{rank:05d}.pt"

    own = [p for p in folder.iterdir() if p.is_file() and mine(p.name)]
    if rank == 0:
        own += [p for p in (folder / "trainer_state.json",) if p.exists()]
    return sorted(own)


def rng_state() -> dict[str, Any]:
    """RNG states as tensors and lists only, so they load with ``weights_only=True``."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_py = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": [version, list(internal), gauss_py]}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_py = state["python"]
    random.setstate((version, tuple(internal), gauss_py))


def save_checkpoint(engine: Any, root: Path, tag: str, trainer_state: dict[str, Any],
                    exclude_frozen: bool = False) -> Path:
    """Save on ALL ranks (a collective). Markers are written after the files, `latest` last.
    ``exclude_frozen``: only trainable parameters and their optimizer state (LoRA: the frozen
    base is not saved; gere_ds/lora.py restores it)."""
    root = Path(root)
    folder = root / tag
    me = dist.rank()
    if _marker(folder, me).exists():
        _marker(folder, me).unlink()  # re-saving a tag: incomplete until done again
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tag, save_latest=False,
                           exclude_frozen_parameters=exclude_frozen)
    torch.save(rng_state(), folder / f"rng_rank{me:05d}.pt")
    if me == 0:
        write_text_atomic(folder / "trainer_state.json", json.dumps(trainer_state, indent=1))
    sizes = {p.name: p.stat().st_size for p in _own_files(folder, me)}
    write_text_atomic(_marker(folder, me), json.dumps(sizes))
    dist.barrier()
    if dist.local_rank() == 0:  # one writer per node: works with or without a shared disk
        write_text_atomic(root / "latest", tag + "\n")
    dist.barrier()
    return folder


def rank_problem(folder: Path, rank: int) -> str | None:
    """Why ``rank``'s part of ``folder`` cannot be trusted (None: complete and intact)."""
    folder = Path(folder)
    marker = _marker(folder, rank)
    if not marker.is_file():
        return "no completion marker" + (f" of rank {rank}" if rank else "")
    try:
        sizes = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return f"unreadable completion marker {marker.name}"
    for name, size in sizes.items():
        path = folder / name
        if not path.is_file():
            return f"{name} missing"
        if path.stat().st_size != size:
            return f"{name} truncated ({path.stat().st_size} of {size} bytes)"
    if rank == 0 and "trainer_state.json" not in sizes:
        return "trainer_state.json missing"
    return None


def local_problem(folder: Path) -> str | None:
    """Why this rank cannot trust ``folder`` (None if its part is complete and intact)."""
    return rank_problem(folder, dist.rank())


def candidate_tags(root: Path) -> list[str]:
    """Checkpoint tags present on this node, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if p.is_dir() and _TAG.match(p.name)]
    return sorted(tags, key=tag_order, reverse=True)


def find_resume_checkpoint(root: Path, log: Callable[[str], None]) -> str | None:
    """The newest tag that is complete on EVERY rank (collective); incomplete ones are logged.

    If some rank holds checkpoints but none is complete everywhere (node-local output dirs after
    a requeue onto other nodes), stop with one line instead of silently starting over.
    """
    seen = dist.all_gather_object((socket.gethostname(), candidate_tags(root)))
    tags = sorted({t for _, ts in seen for t in ts}, key=tag_order, reverse=True)
    for tag in tags:
        problem = local_problem(Path(root) / tag)
        problems = [p for p in dist.all_gather_object(problem) if p]
        if not problems:
            return tag
        log(f"skipping checkpoint {tag}: {problems[0]}")
    if tags:
        have = sorted({h for h, ts in seen if ts})
        lack = sorted({h for h, ts in seen if not ts})
        raise InputError(f"checkpoints exist on {', '.join(have)} but none is complete on every "
                         f"rank{' (none on ' + ', '.join(lack) + ')' if lack else ''}; the "
                         f"output_dir looks node-local: copy {root} to every node, or set "
                         f"resume=never to start over", field="resume")
    return None


def load_trainer_state(folder: Path) -> dict[str, Any]:
    """Rank 0's trainer state, broadcast to every rank (no shared disk needed)."""
    state = json.loads((Path(folder) / "trainer_state.json").read_text()) if dist.is_main() \
        else None
    return dist.broadcast_object(state)


def load_rng(folder: Path) -> None:
    path = Path(folder) / f"rng_rank{dist.rank():05d}.pt"
    if path.is_file():
        set_rng_state(torch.load(path, weights_only=True))


def prune_checkpoints(root: Path, keep_last: int, keep_task_ends: int = 0) -> None:
    """Remove the oldest mid-task checkpoints beyond ``keep_last`` and, when ``keep_task_ends``
    > 0, the oldest task-end ones beyond it (0 keeps every task end).

    Called after a newer checkpoint is complete, so a crash here never leaves nothing.
    """
    tags = candidate_tags(root)  # newest first
    doomed = [t for t in tags if not t.endswith("-end")][keep_last:]
    if keep_task_ends > 0:
        doomed += [t for t in tags if t.endswith("-end")][keep_task_ends:]
    for tag in doomed:
        shutil.rmtree(Path(root) / tag, ignore_errors=True)


def all_ranks_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be read offline by one process (None: complete and intact for EVERY
    rank). The rank count comes from rank 0's ``trainer_state.json``."""
    folder = Path(folder)
    state_path = folder / "trainer_state.json"
    if not state_path.is_file():
        return "incomplete: no trainer_state.json"
    markers = list(folder.glob("COMPLETE.rank*"))
    if not markers:
        return "incomplete: no COMPLETE marker"
    try:
        world = int(json.loads(state_path.read_text()).get("world_size") or len(markers))
    except (json.JSONDecodeError, ValueError, TypeError, AttributeError):
        return "unreadable trainer_state.json"
    for r in range(world):
        problem = rank_problem(folder, r)
        if problem and problem.startswith("no completion marker"):
            return (f"incomplete: no COMPLETE marker of rank {r} of {world} (without a shared "
                    f"disk, copy every node's files of this checkpoint into one folder first)")
        if problem:
            return problem if "truncated" in problem else f"incomplete: {problem}"
    return None


class Checkpointer:
    """The checkpoints folder of a run: save (then prune), the latest complete checkpoint,
    pruning and verification. ``save`` and ``latest_complete`` are collectives; ``verify`` and
    ``task_ends`` read one folder in one process."""

    def __init__(self, root: Path, keep_last: int = 2, keep_task_ends: int = 0,
                 exclude_frozen: bool = False) -> None:
        self.root = Path(root)
        self.exclude_frozen = exclude_frozen
        self.keep_last = keep_last
        self.keep_task_ends = keep_task_ends

    def tags(self) -> list[str]:
        """Checkpoint tags present on this node, newest first."""
        return candidate_tags(self.root)

    def task_ends(self) -> list[str]:
        """End-of-task tags present here, oldest first."""
        return sorted((t for t in self.tags() if t.endswith("-end")), key=tag_order)

    def save(self, engine: Any, tag: str, trainer_state: dict[str, Any]) -> Path:
        """Save on ALL ranks, then prune the old ones (after the new one is complete)."""
        folder = save_checkpoint(engine, self.root, tag, trainer_state, self.exclude_frozen)
        if dist.local_rank() == 0:
            self.prune()
        dist.barrier()
        return folder

    def prune(self) -> None:
        prune_checkpoints(self.root, self.keep_last, self.keep_task_ends)

    def latest_complete(self, log: Callable[[str], None]) -> str | None:
        """The newest tag complete on every rank (collective); see find_resume_checkpoint."""
        return find_resume_checkpoint(self.root, log)

    def verify(self, tag: str) -> str | None:
        """Why ``tag`` cannot be read offline (None: every rank's part is complete)."""
        return all_ranks_problem(self.root / tag)
