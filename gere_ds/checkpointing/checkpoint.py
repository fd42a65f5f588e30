"""Checkpoints: the ZeRO engine state + the trainer state, with completion markers.

Layout::

    <output_dir>/checkpoints/<tag>/               DeepSpeed's per-rank files (model + optimizer)
    <output_dir>/checkpoints/<tag>/trainer_state.json
    <output_dir>/checkpoints/<tag>/rng_rank00001.pt   each rank's RNG states
    <output_dir>/checkpoints/<tag>/COMPLETE.rank00001 each rank's files (size, sha256), the save's
                                                      sequence number and the run's fingerprint,
                                                      written after the files are fsynced
                                                      (checkpoint_marker.py)
    <output_dir>/checkpoints/lineage.json          the sequence ranges a rollback abandoned
    <output_dir>/checkpoints/latest                the newest complete tag (written last, atomic)

Tags: ``task002-end`` (end of task 2, kept for export and evaluation) and
``task002-step000040`` (mid-task, the newest ``keep_last`` are kept). Names are for people: order
comes from the sequence number in the markers (checkpoint_lineage.py), so a rollback's new
checkpoints are newer than the abandoned ones whatever their names. ``Checkpointer`` owns the
folder: the tag format, saving, the trusted checkpoints newest first, rollbacks, pruning and the
offline check of every rank's files (export, evaluation).

No shared filesystem is assumed: every rank writes and checks only its own files and markers, and
the decision "is this checkpoint complete" is taken on every node's view merged. Nothing is loaded
from a folder before every rank's part passed its checksums and carries this run's fingerprint.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gere_ds.runtime import dist, stop
from gere_ds.checkpointing.checkpoint_lineage import (Entry, PartView, abandoned, add_fork, doomed,
                                                      max_seq, merge, read_forks)
from gere_ds.checkpointing.checkpoint_marker import (MARKER_PREFIX, Marker, marker_problem,
                                                     read_marker, rank_problem, run_fingerprint,
                                                     write_marker)
from gere_ds.storage.atomic import write_text_atomic

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



def run_identity(cfg: Any) -> str:
    """The run fingerprint of a RunConfig (see checkpoint_marker.run_fingerprint)."""
    return run_fingerprint(cfg.model, cfg.tokenizer, cfg.train.seed, cfg.replay.strategy,
                           cfg.replay.data)


def local_views(root: Path, run: str | None, only: str | None = None) -> list[PartView]:
    """What this node's disk holds: every marker of every tag folder (``only``: one tag), checked
    cheaply (identity and sizes; checksums are for loading)."""
    root = Path(root)
    if not root.is_dir():
        return []
    views: list[PartView] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and _TAG.match(p.name)):
        if only is not None and folder.name != only:
            continue
        ranks = sorted(int(m.name[len(MARKER_PREFIX):]) for m in folder.glob(MARKER_PREFIX + "*")
                       if m.name[len(MARKER_PREFIX):].isdigit())
        if not ranks:
            views.append(PartView(folder.name, None))
        for rank in ranks:
            marker = read_marker(folder, rank)
            if isinstance(marker, str):  # another format or unreadable: provenance unknown
                views.append(PartView(folder.name, rank, ours=False, problem=marker))
                continue
            views.append(PartView(folder.name, rank, marker.seq, marker.world_size,
                                  ours=run is None or marker.run == run,
                                  problem=marker_problem(folder, marker, run, checksums=False)))
    return views


def describe(entry: Entry) -> str:
    """One line: why ``entry`` cannot be used (offline readers name the missing rank's fix)."""
    problem = entry.problem or ""
    if not entry.parts:
        return "incomplete: no COMPLETE marker"
    if problem.startswith("no completion marker of rank"):
        world = max((p.world_size or 0) for p in entry.parts.values())
        rank = problem.rsplit(" ", 1)[-1]
        return (f"incomplete: no COMPLETE marker of rank {rank} of {world} (without a shared "
                f"disk, copy every node's files of this checkpoint into one folder first)")
    return problem


def all_ranks_problem(folder: Path, run: str | None = None, checksums: bool = False
                      ) -> str | None:
    """Why ``folder`` cannot be read offline by one process (None: every rank's part is complete
    and intact). ``run``: demand that run fingerprint; ``checksums``: hash every file (do so
    before anything is loaded from it)."""
    folder = Path(folder)
    entry = merge(local_views(folder.parent, run, only=folder.name)).get(folder.name)
    if entry is None:
        return "incomplete: no COMPLETE marker"
    if not entry.complete:
        return describe(entry)
    if checksums:
        for rank in sorted(entry.parts):
            problem = rank_problem(folder, rank, run, checksums=True)
            if problem:
                return problem
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


class Checkpointer:
    """The checkpoints folder of a run: save (then prune), the trusted checkpoints newest first,
    rollbacks, pruning and verification. ``save``, ``survey``, ``prune``, ``trusted`` and
    ``continue_from`` are collectives; ``verify``, ``tags`` and ``task_ends`` read this disk in one
    process. ``run`` is the run fingerprint written into markers and demanded of checkpoints."""

    def __init__(self, root: Path, keep_last: int = 2, keep_task_ends: int = 0,
                 run: str | None = None, exclude_frozen: bool = False) -> None:
        self.root = Path(root)
        self.exclude_frozen = exclude_frozen
        self.keep_last = keep_last
        self.keep_task_ends = keep_task_ends
        self.run = run
        self.parent: str | None = None  # "tag#seq" of the checkpoint this process trains from

    # ------------------------------------------------------------------ reading
    def survey(self) -> tuple[dict[str, Entry], list[tuple[int, int]]]:
        """Every node's view merged: the entries by tag, and the recorded forks."""
        seen = dist.all_gather_object((local_views(self.root, self.run), read_forks(self.root)))
        views = [v for vs, _ in seen for v in vs]
        return merge(views), sorted({f for _, fs in seen for f in fs})

    def tags(self) -> list[str]:
        """Checkpoint tags present on this disk, newest first (by sequence number; folders
        without a readable one last)."""
        entries = merge(local_views(self.root, self.run))
        return sorted(entries, key=lambda t: (entries[t].seq or -1, tag_order(t)), reverse=True)

    def task_ends(self) -> list[str]:
        """End-of-task tags present here, oldest first, without a rollback's abandoned ones."""
        entries, forks = merge(local_views(self.root, self.run)), read_forks(self.root)
        return [t for t in reversed(self.tags())
                if t.endswith("-end") and not abandoned(entries[t].seq, forks)]

    def verify(self, tag: str) -> str | None:
        """Why ``tag`` cannot be loaded offline (None: every rank's part is complete, this run's
        and passes its checksums)."""
        return all_ranks_problem(self.root / tag, self.run, checksums=True)

    def trusted(self, folder: Path) -> str | None:
        """Collective: why ``folder`` must not be loaded (None: every rank's own part is this
        run's, complete and passes its checksums). Nothing of the folder is unpickled."""
        problem = rank_problem(Path(folder), dist.rank(), self.run, checksums=True)
        problems = [p for p in dist.all_gather_object(problem) if p]
        return problems[0] if problems else None

    # ------------------------------------------------------------------ writing
    def save(self, engine: Any, tag: str, trainer_state: dict[str, Any]) -> Path:
        """Save on ALL ranks: files, fsync, checksummed markers, `latest`; then prune.
        ``engine``: the run's gere_ds.model.engine.Engine."""
        entries, forks = self.survey()
        seq = max_seq(entries, forks) + 1
        folder = self.root / tag
        me = dist.rank()
        if dist.local_rank() == 0 and folder.exists():
            shutil.rmtree(folder)  # an abandoned or broken folder of this name: never mix files
        dist.barrier()
        engine.save_checkpoint(self.root, tag, self.exclude_frozen)
        torch.save(rng_state(), folder / f"rng_rank{me:05d}.pt")
        if me == 0:
            write_text_atomic(folder / "trainer_state.json", json.dumps(trainer_state, indent=1))
        stop.crash_point("a checkpoint save")  # test hook: files written, marker not yet
        write_marker(folder, me, run=self.run or "", tag=tag, seq=seq, parent=self.parent,
                     world_size=dist.world_size())
        dist.barrier()
        if dist.local_rank() == 0:  # one writer per node: works with or without a shared disk
            write_text_atomic(self.root / "latest", tag + "\n")
        self.parent = f"{tag}#{seq}"
        self.prune(just_written=tag)
        return folder

    def prune(self, just_written: str | None = None) -> None:
        """Collective: remove what ``doomed`` names (after a newer checkpoint is complete, so a
        crash here never leaves nothing)."""
        entries, forks = self.survey()
        gone = doomed(entries, forks, self.keep_last, self.keep_task_ends, just_written)
        if dist.local_rank() == 0:
            for tag in gone:
                shutil.rmtree(self.root / tag, ignore_errors=True)
        dist.barrier()

    def continue_from(self, folder: Path, entries: dict[str, Entry],
                      forks: list[tuple[int, int]]) -> None:
        """Collective: train on from ``folder``. Resuming from anything older than the newest
        save abandons the later branch (a fork, recorded before any new save) for good."""
        folder = Path(folder)
        mine = folder.parent.resolve() == self.root.resolve()
        entry = entries.get(folder.name) if mine else None
        seq = entry.seq if entry is not None and entry.seq is not None else 0
        newest = max_seq(entries, forks)
        if newest > seq:
            if dist.local_rank() == 0:
                add_fork(self.root, forks, seq, newest)
                if mine:  # `latest` (DeepSpeed's zero_to_fp32.py reads it) leaves the branch too
                    write_text_atomic(self.root / "latest", folder.name + "\n")
            dist.barrier()
        marker = read_marker(folder, 0) if dist.is_main() else None
        seq_there = dist.broadcast_object(marker.seq if isinstance(marker, Marker) else seq)
        self.parent = f"{folder.name}#{seq_there}" if mine else f"{folder}#{seq_there}"

    def discard_untrusted(self, entries: dict[str, Entry]) -> list[str]:
        """Collective: remove this run's folders that were never complete or fail their checks
        (another run's or another format's are left alone); returns their tags."""
        gone = sorted(t for t, e in entries.items() if e.ours)
        if dist.local_rank() == 0:
            for tag in gone:
                shutil.rmtree(self.root / tag, ignore_errors=True)
        dist.barrier()
        return gone
