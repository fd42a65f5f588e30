"""The run config's value checks: what types alone cannot express (each names its key)."""
from __future__ import annotations

import difflib

from gere_ds.config.sections import (LORA_CONTINUAL, REDUCTIONS, ReplayConfig, RunConfig,
                                     TrainConfig)
from gere_ds.config.source import Marks
from gere_ds.constants import EVAL_MODES, TRUNCATE_SOURCE
from gere_ds.errors import InputError


def _validate_tasks(cfg: RunConfig, marks: Marks) -> None:
    if not cfg.tasks:
        raise marks.error("tasks", "at least one task is required")
    names = [task.name for task in cfg.tasks]
    for i, task in enumerate(cfg.tasks):
        if not task.name:
            raise marks.error(f"tasks.{i}.name", "empty task name")
        if names.count(task.name) > 1:
            raise marks.error(f"tasks.{i}.name", f"duplicate task name {task.name!r}")
        if not task.labels:
            raise marks.error(f"tasks.{i}.labels", "a task needs its label set")
        if len(set(task.labels)) != len(task.labels):
            raise marks.error(f"tasks.{i}.labels", "labels must be distinct")
        if task.text_field == task.label_field:
            raise marks.error(f"tasks.{i}.label_field", f"the same column as text_field "
                                                        f"({task.text_field!r}): the label would "
                                                        f"be the input")
        both = [x for x in task.test_only_labels if x in task.labels]
        if both:
            raise marks.error(f"tasks.{i}.test_only_labels", f"{both[0]!r} is already in labels")


def _validate_replay(r: ReplayConfig, bf16: bool, marks: Marks) -> None:
    """The section's common keys here; the strategy name and each strategy's own keys by the
    strategy registry (every strategy checks its settings itself)."""
    # lazy: the launcher-side checks and the CLI load configs without torch until here
    from gere_ds.strategies import check_replay

    if isinstance(r.weight, str) and r.weight != "dy":
        raise marks.error("replay.weight", f"must be a number or 'dy', got {r.weight!r}")
    if isinstance(r.weight, float) and (r.weight < 0 or r.weight != r.weight):
        raise marks.error("replay.weight", f"must be >= 0, got {r.weight!r}")
    if r.reduction not in REDUCTIONS:
        close = difflib.get_close_matches(r.reduction, REDUCTIONS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise marks.error("replay.reduction", f"unknown reduction {r.reduction!r}{hint}; one of "
                                              f"{', '.join(REDUCTIONS)}")
    for key in ("num_samples", "max_len", "teacher_batch_size"):
        if getattr(r, key) < 1:
            raise marks.error(f"replay.{key}", "must be >= 1")
    if r.per_batch < 0:
        raise marks.error("replay.per_batch", "must be >= 0")
    try:
        check_replay(r, bf16)
    except InputError as err:
        raise marks.error(err.field or "replay", err.detail) from None


def validate(cfg: RunConfig, marks: Marks | None = None) -> None:
    """Value checks that types alone cannot express."""
    marks = marks or Marks("<config>")
    t = cfg.train
    _validate_tasks(cfg, marks)
    _validate_replay(cfg.replay, t.bf16, marks)
    if isinstance(t.micro_batch_size, str) and t.micro_batch_size != "auto":
        raise marks.error("train.micro_batch_size", f"{t.micro_batch_size!r}: a number of rows "
                                                    f"or auto")
    for key in ("epochs", "micro_batch_size", "grad_accum", "max_source_len", "max_target_len",
                "log_every"):
        if getattr(t, key) != "auto" and getattr(t, key) < 1:
            raise marks.error(f"train.{key}", "must be >= 1")
    if t.lr <= 0:
        raise marks.error("train.lr", "must be > 0")
    if not cfg.output_dir.strip():
        raise marks.error("output_dir", "empty (it would be the current directory); name the "
                                        "run's folder")
    for key, low in (("max_bad_steps", 1), ("warmup_steps", 0), ("max_steps_per_task", 0)):
        if getattr(t, key) < low:
            raise marks.error(f"train.{key}", f"must be >= {low}")
    for key in ("min_lr_ratio", "grad_clip", "weight_decay"):
        if getattr(t, key) < 0:
            raise marks.error(f"train.{key}", "must be >= 0")
    if t.min_lr_ratio > 1:
        raise marks.error("train.min_lr_ratio", "must be at most 1")
    if not t.collective_timeout_s > 0:
        raise marks.error("train.collective_timeout_s", "must be > 0 (seconds)")
    for key, low in (("batch_size", 1), ("max_new_tokens", 1), ("max_examples", 0)):
        if getattr(cfg.eval, key) < low:
            raise marks.error(f"eval.{key}", f"must be >= {low}")
    for i, g in enumerate(cfg.eval.general):
        for key in ("shots", "max_examples"):
            if getattr(g, key) < 0:
                raise marks.error(f"eval.general.{i}.{key}", "must be >= 0")
    if t.truncate_source not in TRUNCATE_SOURCE:
        close = difflib.get_close_matches(t.truncate_source, TRUNCATE_SOURCE, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise marks.error("train.truncate_source", f"unknown value {t.truncate_source!r}{hint}; "
                                                   f"one of {', '.join(TRUNCATE_SOURCE)}")
    _validate_packing(cfg, marks)
    if cfg.eval.mode not in EVAL_MODES:
        raise marks.error("eval.mode", f"must be one of {', '.join(EVAL_MODES)}")
    if cfg.resume not in ("auto", "never") and not cfg.resume:
        raise marks.error("resume", "auto | never | a checkpoint path")
    for key in ("every_steps", "keep_task_ends"):
        if getattr(cfg.checkpoint, key) < 0:
            raise marks.error(f"checkpoint.{key}", "must be >= 0")
    if cfg.checkpoint.keep_last < 1:  # 0 would prune the checkpoint just written
        raise marks.error("checkpoint.keep_last", "must be >= 1 (the newest checkpoint is what a "
                                                  "resume loads)")
    for i, name in enumerate(cfg.report_to):
        if name not in ("tensorboard", "wandb"):
            raise marks.error(f"report_to.{i}", f"unknown reporter {name!r}; one of "
                                                f"tensorboard, wandb")
    if t.lora is not None:
        _validate_lora(t, marks)


def _validate_packing(cfg: RunConfig, marks: Marks) -> None:
    t = cfg.train
    if t.pack_length < 0:
        raise marks.error("train.pack_length", "must be >= 0 (0 = the model's context length)")
    longest = max(t.max_source_len + t.max_target_len, cfg.replay.max_len)
    if t.packing and t.pack_length and t.pack_length < longest:
        raise marks.error("train.pack_length", f"{t.pack_length} is shorter than a row may be "
                          f"({longest} tokens: train.max_source_len + train.max_target_len, or "
                          f"replay.max_len); rows are packed whole, never cut")


def _validate_lora(t: TrainConfig, marks: Marks) -> None:
    lora = t.lora
    if lora.r <= 0:
        raise marks.error("train.lora.r", f"must be > 0, got {lora.r}")
    if not lora.alpha > 0:
        raise marks.error("train.lora.alpha", f"must be > 0, got {lora.alpha!r}")
    if not 0 <= lora.dropout < 1:
        raise marks.error("train.lora.dropout", f"must be in [0, 1), got {lora.dropout!r}")
    if not lora.target_modules or any(not name for name in lora.target_modules):
        raise marks.error("train.lora.target_modules", "name at least one linear layer, e.g. "
                                                       "[q_proj, v_proj]")
    if lora.continual not in LORA_CONTINUAL:
        raise marks.error("train.lora.continual",
                          f"choose carry (one adapter through the sequence) or merge (merged "
                          f"into the base after each task), got {lora.continual!r}; "
                          f"see docs/lora.md")
    if lora.continual == "merge" and not t.reset_optimizer_per_task:
        raise marks.error("train.reset_optimizer_per_task",
                          "lora.continual=merge starts a fresh adapter at every task, so the "
                          "Adam moments of the merged one belong to nothing: set it to true")
