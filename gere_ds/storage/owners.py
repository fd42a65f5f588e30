"""Who owns a temporary file or folder: names that carry their owner (pid and host), whether
that owner is still alive, and so whether a leftover may be removed.

Two jobs may share a folder (a teacher cache of a study, a TMPDIR); each removes only what a
dead process of its own host left behind, never a live job's work in progress.
"""
from __future__ import annotations

import os
import re
import socket
from pathlib import Path

_OWNER = re.compile(r"(\d+)@([A-Za-z0-9.\-]+)")  # <pid>@<host>, right after the prefix


def host() -> str:
    return socket.gethostname()


def owner_tag() -> str:
    """``<pid>@<host>`` of this process, for a temporary name."""
    return f"{os.getpid()}@{host()}"


def pid_alive(pid: int) -> bool:
    """Whether a process of this host has this pid (another user's process counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale(name: str, prefix: str) -> bool:
    """True if ``name`` (``prefix`` + owner tag + anything) was left by a dead process of this
    host; names of other hosts, of live processes or without an owner are never stale."""
    if not name.startswith(prefix):
        return False
    rest = name[len(prefix):]
    m = _OWNER.match(rest)
    return bool(m) and m.group(2) == host() and not pid_alive(int(m.group(1)))


def stale_entries(folder: Path, prefix: str) -> list[Path]:
    """The entries of ``folder`` named ``prefix``... that a dead process of this host left."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if stale(p.name, prefix))
