"""The order of a run's checkpoints: by the save sequence recorded in their markers, never by name,
and which of them a rollback abandoned. Pure functions over what the ranks saw on their disks.

A rollback (resuming from a checkpoint older than the newest one) appends a *fork* to
``<checkpoints>/lineage.json``: ``{"forks": [[3, 6]]}`` abandons every checkpoint whose sequence
number lies in (3, 6], the branch written after seq 3 that the run walked away from. Saves after
the rollback get sequence numbers above 6, so they are never inside an earlier fork. The fork is
written before training goes on, so a crash before the first new save cannot resurrect the branch.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from gere_ds.storage.atomic import write_text_atomic

LINEAGE_FILE = "lineage.json"


@dataclass
class PartView:
    """What one node knows of one rank's part of one checkpoint folder."""

    tag: str
    rank: int | None  # None: the folder exists on this node but holds no marker
    seq: int | None = None
    world_size: int | None = None
    ours: bool = True  # the marker's run fingerprint is this run's (or unknown)
    problem: str | None = None  # why this part cannot be trusted (cheap check)


@dataclass
class Entry:
    """One checkpoint tag, every rank's part merged."""

    tag: str
    seq: int | None = None
    complete: bool = False
    ours: bool = True
    problem: str | None = None
    parts: dict[int, PartView] = field(default_factory=dict)

    @property
    def is_task_end(self) -> bool:
        return self.tag.endswith("-end")


def merge(views: list[PartView]) -> dict[str, Entry]:
    """Every tag's parts (from every node) as one entry; complete = every rank of the recorded
    world size has an intact part and they agree on the sequence number."""
    entries: dict[str, Entry] = {}
    for v in views:
        e = entries.setdefault(v.tag, Entry(v.tag))
        if v.rank is not None and (v.rank not in e.parts or e.parts[v.rank].problem):
            e.parts[v.rank] = v
    for e in entries.values():
        e.ours = all(p.ours for p in e.parts.values())
        seqs = {p.seq for p in e.parts.values() if p.seq is not None}
        worlds = {p.world_size for p in e.parts.values() if p.world_size}
        e.seq = max(seqs) if seqs else None
        bad = [p.problem for _, p in sorted(e.parts.items()) if p.problem]
        if bad:
            e.problem = bad[0]
        elif not e.parts:
            e.problem = "no completion marker"
        elif len(seqs) > 1 or len(worlds) != 1:
            e.problem = "the ranks' completion markers disagree (parts of different saves)"
        else:
            missing = [r for r in range(worlds.pop()) if r not in e.parts]
            if missing:
                e.problem = "no completion marker" + (f" of rank {missing[0]}" if missing[0]
                                                      else "")
        e.complete = e.problem is None
    return entries


def read_forks(root: Path) -> list[tuple[int, int]]:
    path = Path(root) / LINEAGE_FILE
    if not path.is_file():
        return []
    try:
        return [(int(lo), int(hi)) for lo, hi in json.loads(path.read_text())["forks"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []  # unreadable: nothing abandoned (the safe reading for pruning)


def add_fork(root: Path, forks: list[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    """Record that the checkpoints with lo < seq <= hi are abandoned; returns the new list."""
    new = sorted(set(forks) | {(lo, hi)})
    write_text_atomic(Path(root) / LINEAGE_FILE, json.dumps({"forks": new}))
    return new


def abandoned(seq: int | None, forks: list[tuple[int, int]]) -> bool:
    return seq is not None and any(lo < seq <= hi for lo, hi in forks)


def newest_first(entries: dict[str, Entry], forks: list[tuple[int, int]]) -> list[Entry]:
    """This run's complete checkpoints of the current lineage, by sequence number, newest first."""
    live = [e for e in entries.values() if e.complete and e.ours and not abandoned(e.seq, forks)]
    return sorted(live, key=lambda e: e.seq, reverse=True)


def max_seq(entries: dict[str, Entry], forks: list[tuple[int, int]]) -> int:
    """The highest sequence number any marker or fork has used (0: none)."""
    seqs = [p.seq for e in entries.values() for p in e.parts.values() if p.seq is not None]
    return max(seqs + [hi for _, hi in forks] + [0])


def doomed(entries: dict[str, Entry], forks: list[tuple[int, int]], keep_last: int,
           keep_task_ends: int, just_written: str | None) -> list[str]:
    """Tags pruning removes: the abandoned branch, this run's incomplete or broken folders, and
    complete ones beyond ``keep_last`` mid-task / ``keep_task_ends`` task-end checkpoints
    (0 keeps every task end). Never the newest complete checkpoint nor ``just_written``; another
    run's checkpoints are never touched."""
    live = newest_first(entries, forks)
    keep = {e.tag for e in live[:1]} | ({just_written} if just_written else set())
    keep |= {e.tag for e in [e for e in live if not e.is_task_end][:max(keep_last, 1)]}
    ends = [e for e in live if e.is_task_end]
    keep |= {e.tag for e in (ends[:keep_task_ends] if keep_task_ends > 0 else ends)}
    return sorted(e.tag for e in entries.values() if e.ours and e.tag not in keep)
