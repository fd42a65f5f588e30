"""Which checkpoint a run resumes from, the checks that it belongs to this run, and the
fallback when it cannot be loaded."""
from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from gere_ds.checkpointing.checkpoint import Checkpointer, describe
from gere_ds.checkpointing.checkpoint_lineage import newest_first
from gere_ds.config.sections import RunConfig
from gere_ds.errors import InputError
from gere_ds.runtime import dist
from gere_ds.storage.hashing import sha256_file


@dataclass
class ResumePlan:
    """What :func:`plan_resume` decided before anything was written."""

    candidates: list[Path]  # complete checkpoints to try, newest first, the first one verified
    #                         (a named path: that one only)
    entries: dict[str, Any]
    forks: Any
    named: bool  # resume names a path: no fallback
    notes: list[str] = field(default_factory=list)  # lines for the log, once writing is allowed


def plan_resume(cfg: RunConfig, ckpt: Checkpointer,
                check: Callable[[Path], None]) -> ResumePlan | None:
    """Everything about resuming that can be decided before the engine exists, with nothing
    written (a refused relaunch leaves the run folder as it was; even its log lines wait in
    ``notes``). Collective. None: a fresh start with nothing to clean up.

    auto: the complete checkpoints of the current lineage that pass their checksums, newest
    first; ``check`` (the trainer state against this job) runs on the newest, so a relaunch with
    another world size, task list or teacher is refused here. A path: that checkpoint, trusted
    and checked, or one ``error:`` line, before anything in it is unpickled.
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
        check(folder)
        return ResumePlan([folder], entries, forks, named=True)
    notes = [f"skipping checkpoint {tag}: {describe(entry)}"
             for tag, entry in sorted(entries.items(), reverse=True) if not entry.complete]
    order = [ckpt.root / entry.tag for entry in newest_first(entries, forks)]
    while order:  # checksums of the newest only; older ones are verified if it fails to load
        problem = ckpt.trusted(order[0])
        if problem is None:
            check(order[0])
            break
        notes.append(f"skipping checkpoint {order.pop(0).name}: {problem}")
    if not order:
        _refuse_foreign(ckpt, entries)
        _refuse_node_local(ckpt, entries)
    return ResumePlan(order, entries, forks, named=False, notes=notes)


def _refuse_foreign(ckpt: Checkpointer, entries: dict[str, Any]) -> None:
    """Nothing of this run to resume, but another run's checkpoints (or ones in another format)
    are there: starting from scratch would write this run's config, logs and checkpoints over
    that run's folder, so stop before anything is written."""
    foreign = sorted(t for t, e in entries.items() if not e.ours)
    if foreign:
        why = next((p.problem for p in entries[foreign[0]].parts.values() if p.problem), "")
        raise InputError(f"{ckpt.root} holds checkpoints of another run ({', '.join(foreign)}"
                         f"{': ' + why if why else ''}); this job (its model, tokenizer, seed, "
                         f"strategy or replay data) is not that run: use a new output_dir, or "
                         f"move those checkpoints away", field="output_dir")


def load_resume(plan: ResumePlan | None, ckpt: Checkpointer, log: Callable[[str], None],
                load: Callable[[Path], None]) -> Path | None:
    """Load (with ``load``, on every rank) the first candidate of ``plan`` that loads; returns its
    folder, or None for a fresh start (this run's incomplete folders are then removed, with one
    line). A candidate whose load raises is skipped with a line and the previous one is tried.
    Collective."""
    if plan is None:
        return None
    for line in plan.notes:
        log(line)
    if plan.named:
        load(plan.candidates[0])
        ckpt.continue_from(plan.candidates[0], plan.entries, plan.forks)
        return plan.candidates[0]
    tried = False
    for i, folder in enumerate(plan.candidates):
        problem = ckpt.trusted(folder) if i else None  # the first was verified by the plan
        if problem is None:
            tried = True
            problem = _load_or_why(load, folder)
        if problem is None:
            ckpt.continue_from(folder, plan.entries, plan.forks)
            return folder
        log(f"skipping checkpoint {folder.name}: {problem}")
    if tried:  # the engine may hold part of a checkpoint now: training on would be wrong
        raise InputError(f"no checkpoint in {ckpt.root} could be loaded (see the lines above); "
                         f"use a new output_dir or resume=never", field="resume")
    gone = ckpt.discard_untrusted(plan.entries)
    if plan.entries:
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


def task_data_digests(cfg: RunConfig) -> dict[str, dict[str, str]]:
    """The sha256 of every task's train and test file, by task name: recorded in each
    checkpoint, so a file edited in place under the same path is caught on resume."""
    return {task.name: {split: sha256_file(path) for split, path in
                        (("train", task.train), ("test", task.test)) if path}
            for task in cfg.tasks}


def check_task_data(recorded: dict[str, dict[str, str]], folder: Path, cfg: RunConfig,
                    now: dict[str, dict[str, str]]) -> None:
    """Tasks the checkpoint has seen must still read the same files (later tasks may change)."""
    for i, task in enumerate(cfg.tasks):
        for split, digest in recorded.get(task.name, {}).items():
            if now.get(task.name, {}).get(split) != digest:
                path = getattr(task, split)
                raise InputError(f"task {task.name}'s {split} file {path or '(none)'} differs "
                                 f"from the one checkpoint {folder} was trained and evaluated "
                                 f"with; restore it, or start a new output_dir",
                                 field=f"tasks[{i}].{split}")


def check_state(state: dict[str, Any], folder: Path, cfg: RunConfig, world: int,
                teacher_fingerprint: str | None, zero_stage: int | None = None,
                task_data: dict[str, dict[str, str]] | None = None) -> None:
    """The checkpoint's trainer state must match this job: world size, ZeRO stage, tasks and
    their files (``task_data``: :func:`task_data_digests` of this job), teacher data."""
    if state["world_size"] != world:
        raise InputError(f"checkpoint {folder} was written by {state['world_size']} ranks and "
                         f"this job has {world}; relaunch with {state['world_size']} ranks "
                         f"(the replay shards and data order depend on the world size), or "
                         f"start a new output_dir", field="resume")
    written = state["zero_stage"]
    if zero_stage is not None and written != zero_stage:
        raise InputError(f"checkpoint {folder} was written under ZeRO-{written} and this "
                         f"launch resolves `deepspeed` to ZeRO-{zero_stage}; set deepspeed to "
                         f"a ZeRO-{written} config (ds_configs/zero{written}.json) to resume",
                         field="deepspeed")
    names = [task.name for task in cfg.tasks]
    if state["task_names"] != names[:len(state["task_names"])]:
        raise InputError(f"checkpoint {folder} belongs to tasks {state['task_names']}, the "
                         f"config has {names}", field="tasks")
    if task_data is not None:
        check_task_data(state["task_data"], folder, cfg, task_data)
    if state.get("teacher_fingerprint") != teacher_fingerprint:
        raise InputError(f"checkpoint {folder} was trained against other teacher data (model, "
                         f"replay set or settings changed); use a new output_dir",
                         field="replay")
