"""Which checkpoint a run resumes from, the checks that it belongs to this run, and the
fallback when it cannot be loaded."""
from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, Callable

from gere_ds import dist
from gere_ds.checkpoint import Checkpointer, describe
from gere_ds.checkpoint_lineage import newest_first
from gere_ds.config import RunConfig
from gere_ds.errors import InputError


def resume_run(cfg: RunConfig, ckpt: Checkpointer, log: Callable[[str], None],
               load: Callable[[Path], None]) -> Path | None:
    """Load (with ``load``, on every rank) the checkpoint ``resume`` names; returns its folder,
    or None for a fresh start. Collective.

    auto: the newest complete checkpoint of the current lineage that passes its checksums and
    loads; one that fails is skipped with a line and the previous one is tried. With none, the
    run starts from scratch (this run's incomplete folders are removed) and says so. A path: that
    checkpoint or one ``error:`` line, checked before anything in it is unpickled.
    """
    if cfg.resume == "never":
        if dist.any_rank(any(ckpt.root.glob("task*"))):
            raise InputError(f"{ckpt.root} already holds checkpoints and resume=never; "
                             f"use a new output_dir or resume=auto", field="resume")
        return None
    entries, forks = ckpt.survey()
    if cfg.resume != "auto":
        folder = Path(cfg.resume)
        problem = ckpt.trusted(folder)
        if problem:
            raise InputError(f"refusing to load this checkpoint: {problem}", file=cfg.resume,
                             field="resume")
        load(folder)
        ckpt.continue_from(folder, entries, forks)
        return folder
    for tag, entry in sorted(entries.items(), reverse=True):
        if not entry.complete:
            log(f"skipping checkpoint {tag}: {describe(entry)}")
    tried = False
    for entry in newest_first(entries, forks):
        folder = ckpt.root / entry.tag
        problem = ckpt.trusted(folder)
        if problem is None:
            tried = True
            problem = _load_or_why(load, folder)
        if problem is None:
            ckpt.continue_from(folder, entries, forks)
            return folder
        log(f"skipping checkpoint {entry.tag}: {problem}")
    if tried:  # the engine may hold part of a checkpoint now: training on would be wrong
        raise InputError(f"no checkpoint in {ckpt.root} could be loaded (see the lines above); "
                         f"use a new output_dir or resume=never", field="resume")
    _refuse_node_local(ckpt, entries)
    gone = ckpt.discard_untrusted(entries)
    if entries:
        log(f"no complete checkpoint in {ckpt.root}: starting from scratch"
            + (f" (removed the incomplete {', '.join(gone)})" if gone else ""))
    return None


def _load_or_why(load: Callable[[Path], None], folder: Path) -> str | None:
    """``load(folder)`` on every rank; None if it worked on all of them, else the first error
    as one line. InputError (the checkpoint belongs to another job) is not a fallback case."""
    error = None
    try:
        load(folder)
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - any rank's failure: try the previous checkpoint
        first = str(err).splitlines()[0] if str(err) else ""
        error = f"loading failed: {type(err).__name__}: {first}"
    errors = [e for e in dist.all_gather_object(error) if e]
    return errors[0] if errors else None


def _refuse_node_local(ckpt: Checkpointer, entries: dict[str, Any]) -> None:
    """Some nodes hold intact parts of checkpoints and others hold nothing: the output_dir is
    node-local and the job moved. Starting over would silently drop the run, so stop."""
    seen = dist.all_gather_object((socket.gethostname(), any(ckpt.root.glob("task*"))))
    lack = sorted({h for h, has in seen if not has})
    intact = any(p.problem is None for e in entries.values() for p in e.parts.values())
    if lack and intact:
        have = sorted({h for h, has in seen if has})
        raise InputError(f"checkpoints exist on {', '.join(have)} but none is complete on every "
                         f"rank (none on {', '.join(lack)}); the output_dir looks node-local: "
                         f"copy {ckpt.root} to every node, or set resume=never with a new "
                         f"output_dir", field="resume")


def check_state(state: dict[str, Any], folder: Path, cfg: RunConfig, world: int,
                teacher_fingerprint: str | None) -> None:
    """The checkpoint's trainer state must match this job: world size, tasks, teacher data."""
    if state["world_size"] != world:
        raise InputError(f"checkpoint {folder} was written by {state['world_size']} ranks and "
                         f"this job has {world}; relaunch with {state['world_size']} ranks "
                         f"(the replay shards and data order depend on the world size), or "
                         f"start a new output_dir", field="resume")
    names = [task.name for task in cfg.tasks]
    if state["task_names"] != names[:len(state["task_names"])]:
        raise InputError(f"checkpoint {folder} belongs to tasks {state['task_names']}, the "
                         f"config has {names}", field="tasks")
    if state.get("teacher_fingerprint") != teacher_fingerprint:
        raise InputError(f"checkpoint {folder} was trained against other teacher data (model, "
                         f"replay set or settings changed); use a new output_dir",
                         field="replay")
