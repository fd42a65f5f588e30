"""Pre-emption: SIGTERM / SIGUSR1 noted by a handler, acted on by every rank at the same point.

Slurm (``--signal=B:TERM@120``) and most schedulers warn a job before killing it. The handler only
sets a flag; the long loops (optimizer steps, the teacher pass, every evaluation batch, the
export's module gathers) call :func:`check` between units of work, which all ranks reach in the
same order. ``check`` is a collective (one tiny all-reduce) so that all ranks agree to stop at
the same unit even when the signal reached only some of them; it raises :class:`Preempted`
everywhere at once. A unit of work is one batch, so a run answers a signal within one batch's
time wherever it is.

The trainer names the work under way with :func:`doing` (``the teacher pass``, ``the evaluation
after task 1``, ``the export of task 1``); the loops deep inside it just call ``check()``, and a
pre-empted run says where it stopped. Tests inject a signal at a chosen point with
``GERE_DS_SIGNAL_AT=<what>:<n>[:<rank>]``: the n-th ``check`` during that named work on that rank
(default 0) first sends SIGTERM to its own process, as a scheduler would. They inject a crash
with ``GERE_DS_KILL_AT`` (same form): at the n-th :func:`crash_point` of that name the whole job
(the launcher and every rank: the process group) gets SIGKILL, as on a node failure. Crash points
are every ``check``, each micro-step between backward and the optimizer step (``a micro-step``)
and each checkpoint save between DeepSpeed's files and the marker (``a checkpoint save``).
``GERE_DS_NAN_AT=a micro-step:<n>[:<rank>]`` makes that micro-step's loss NaN
(gere_ds.training.step).

Before :func:`install` is called (a plain ``gere-ds evaluate``, the tests of a scorer) ``check``
does nothing and runs no collective, on every rank alike.
"""
from __future__ import annotations

import contextlib
import os
import signal
from typing import Any, Iterator

from gere_ds.runtime import dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """A stop signal arrived; every rank stopped at the same point (the message says where)."""


_installed = False
_received: int | None = None
_checks: dict[str, int] = {}
_doing = ""


@contextlib.contextmanager
def doing(what: str) -> Iterator[None]:
    """Name the work under way (for the stop message and the test hook)."""
    global _doing
    before, _doing = _doing, what
    try:
        yield
    finally:
        _doing = before


def _on_signal(signum: int, frame: Any) -> None:
    global _received
    _received = signum


def install() -> None:
    """Note SIGTERM and SIGUSR1 from now on (every rank calls this at the same point)."""
    global _installed
    for sig in SIGNALS:
        signal.signal(sig, _on_signal)
    _installed = True


def uninstall() -> None:
    """Back to the default handlers (tests; a process that trains twice)."""
    global _installed, _received
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    _installed, _received = False, None
    _checks.clear()


def received() -> int | None:
    """The signal this rank received, if any (local: no collective)."""
    return _received


def requested() -> bool:
    """Whether any rank received a stop signal (a collective once :func:`install` ran)."""
    if not _installed:
        return False
    if not dist.is_initialized():
        return _received is not None
    return dist.any_rank_host(_received is not None)  # no device copy: no drained GPU queue


def injected(variable: str, where: str) -> bool:
    """Whether the test hook in ``variable`` (``<what>:<n>[:<rank>]``) fires here and now."""
    spec = os.environ.get(variable, "")
    if not spec:
        return False
    at, n, rank = (spec.rsplit(":", 2) if spec.count(":") >= 2 else [*spec.rsplit(":", 1), "0"])
    key = f"{variable}/{where}"
    _checks[key] = _checks.get(key, 0) + 1
    here = dist.rank() if dist.is_initialized() else 0
    return at == where and _checks[key] == int(n) and here == int(rank)


def crash_point(where: str) -> None:
    """Test hook (``GERE_DS_KILL_AT``): SIGKILL the whole job here, as a node failure would."""
    if injected("GERE_DS_KILL_AT", where):
        os.killpg(os.getpgid(0), signal.SIGKILL)


def check(where: str = "") -> None:
    """Raise :class:`Preempted` on every rank if any rank received a stop signal.

    ``where`` defaults to the work named by :func:`doing`."""
    if not _installed:
        return
    where = where or _doing or "work"
    crash_point(where)
    if injected("GERE_DS_SIGNAL_AT", where):
        os.kill(os.getpid(), signal.SIGTERM)
    if requested():
        raise Preempted(f"pre-empted (signal) during {where}; nothing of it was kept; re-run "
                        f"the same command to resume")
