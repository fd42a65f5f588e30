"""One job per output_dir: ``<output_dir>/run.lock`` names the job that writes the folder.

Two jobs writing one run folder would prune each other's checkpoints and interleave their logs,
so a job takes the lock before it reads or writes anything there and gives it back at exit (also
on error). Rank 0 makes the attempt; every rank gets its outcome through one broadcast, so all
ranks agree. The file (host, pid, start time) appears whole: it is written under a temporary name
and hard-linked into place, which fails if a lock is already there.

A leftover of a job that died (SIGKILL, a lost node) cannot wedge the folder: a lock of this
host whose pid is gone (or is now another process) is stale and taken over with one line. A lock
of another host cannot be checked from here: the job is refused with one line naming the holder
and how to clear the lock (``--force-unlock``, or delete the file).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from gere_ds.errors import InputError
from gere_ds.runtime import dist
from gere_ds.storage.owners import host, pid_alive

LOCK_FILE = "run.lock"


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22; the command name may hold spaces


def _holder_text() -> str:
    return json.dumps({"host": host(), "pid": os.getpid(), "proc_start": _proc_start(os.getpid()),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "started_unix": round(time.time(), 3)}) + "\n"


def read_holder(path: Path) -> dict[str, Any] | None:
    """The lock's holder, or None (no lock, or a file that is not a lock)."""
    try:
        holder = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and "host" in holder and "pid" in holder else None


def holder_alive(holder: dict[str, Any]) -> bool | None:
    """True/False for a holder on this host; None for another host (cannot be checked here)."""
    if holder.get("host") != host():
        return None
    pid = int(holder.get("pid") or 0)
    if not pid_alive(pid):
        return False
    recorded, now = holder.get("proc_start"), _proc_start(pid)
    return not (recorded and now and recorded != now)  # the pid now names another process


def describe(holder: dict[str, Any]) -> str:
    return f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('started')}"


def _create(path: Path, text: str) -> bool:
    """Create ``path`` holding ``text`` whole, only if it does not exist; False if it does."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: exclusive create, then write
            try:
                fd2 = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd2, "w") as fh:
                fh.write(text)
        return True
    finally:
        Path(tmp).unlink(missing_ok=True)


def try_lock(folder: Path, text: str, force: bool, log: Callable[[str], None]) -> str | None:
    """One process's attempt at the lock of ``folder``: None when held now, else the reason."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    for _ in range(3):
        if _create(path, text):
            return None
        holder = read_holder(path)
        if holder is None and not path.exists():
            continue  # released in between: try again
        if force:
            log(f"{path}: --force-unlock: taking the lock over from "
                f"{describe(holder) if holder else 'an unreadable lock file'}")
        elif holder is None:
            return (f"{path} is not a readable lock file; if no job writes {folder}, delete it "
                    f"or relaunch with --force-unlock")
        else:
            alive = holder_alive(holder)
            if alive:
                return (f"{folder} is in use by {describe(holder)} ({path}); wait for that job, "
                        f"or use another output_dir")
            if alive is None:
                return (f"{folder} is locked by {describe(holder)} ({path}), which cannot be "
                        f"checked from {host()}; if that job is gone, delete {path} or relaunch "
                        f"with --force-unlock")
            log(f"{path}: stale lock of {describe(holder)} (that process is gone): taken over")
        path.unlink(missing_ok=True)
    return f"{path}: another job took the lock at the same moment; relaunch later"


@dataclass
class RunLock:
    """The lock this job holds (on rank 0; other ranks hold nothing to release)."""

    path: Path
    text: str | None

    def release(self) -> None:
        """Remove the lock if it is still ours (never another job's)."""
        if self.text is None:
            return
        try:
            if self.path.read_text() == self.text:
                self.path.unlink()
        except OSError:
            pass
        self.text = None


def acquire_run_lock(folder: str | Path, force: bool = False,
                     log: Callable[[str], None] = print) -> RunLock:
    """Take the lock of ``folder`` for this job (collective: rank 0 tries, every rank gets the
    outcome); InputError with one line when another job holds it."""
    folder = Path(folder)
    reason, text = None, None
    if dist.is_main():
        text = _holder_text()
        try:
            reason = try_lock(folder, text, force, log)
        except OSError as err:
            reason = f"cannot write the lock {folder / LOCK_FILE}: {err.strerror or err}"
    reason = dist.broadcast_object(reason)
    if reason:
        raise InputError(reason, field="output_dir")
    return RunLock(folder / LOCK_FILE, text)
