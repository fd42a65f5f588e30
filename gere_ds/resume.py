"""Which checkpoint a run resumes from, and the checks that it belongs to this run."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from gere_ds import dist
from gere_ds.checkpoint import Checkpointer, local_problem
from gere_ds.config import RunConfig
from gere_ds.errors import InputError


def resume_target(cfg: RunConfig, ckpt: Checkpointer, log: Callable[[str], None]
                  ) -> tuple[Path, str] | None:
    """(root, tag) to load as ``resume`` names it (auto: the newest complete one), or None for
    a fresh start. Collective."""
    mode = cfg.resume
    if mode == "never":
        if dist.any_rank(any(ckpt.root.glob("task*"))):
            raise InputError(f"{ckpt.root} already holds checkpoints and resume=never; "
                             f"use a new output_dir or resume=auto", field="resume")
        return None
    if mode == "auto":
        tag = ckpt.latest_complete(log)
        return None if tag is None else (ckpt.root, tag)
    problems = [x for x in dist.all_gather_object(local_problem(Path(mode))) if x]
    if problems:
        raise InputError(f"not a complete checkpoint: {problems[0]}", file=mode, field="resume")
    return Path(mode).parent, Path(mode).name


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
