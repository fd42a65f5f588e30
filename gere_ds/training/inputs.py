"""Every input of a run read from disk and checked before any work starts."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gere_ds.config.sections import RunConfig
from gere_ds.data.replay import check_replay_inputs
from gere_ds.data.tasks import Example, load_examples
from gere_ds.data.encode import encode_target
from gere_ds.model.engine import check_model_folder, load_tokenizer, resolve_ds_config
from gere_ds.errors import InputError
from gere_ds.evaluation.scoring import EvalSuite
from gere_ds.model.lora import check_targets
from gere_ds.strategies import make_term
from gere_ds.monitoring.wandb_sink import check_report_to


@dataclass
class Inputs:
    """Everything read from disk and validated before any work starts."""

    train_sets: list[list[Example]]
    replay_texts: list[str]
    eval_suite: EvalSuite | None = None


def check_label_tokens(cfg: RunConfig, tokenizer: Any) -> None:
    """Every task's labels must stay distinct as the trainer encodes them (cut to
    ``train.max_target_len`` with the eos): two labels with one target could not be told apart
    by training or by rank-mode scoring."""
    n = cfg.train.max_target_len
    for i, task in enumerate(cfg.tasks):
        seen: dict[tuple[int, ...], str] = {}
        for label in task.labels:
            target = tuple(encode_target(tokenizer, label, n))
            if target in seen:
                raise InputError(f"labels {seen[target]!r} and {label!r} are the same "
                                 f"{len(target)} tokens once cut to train.max_target_len={n} "
                                 f"(label tokens + eos); raise max_target_len or rename them",
                                 field=f"tasks.{i}.labels")
            seen[target] = label


def check_output_dir(output_dir: str) -> None:
    """``output_dir`` must be a folder or creatable as one: not a file, nor below a file."""
    path = Path(output_dir)
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                what = "is a file" if part == path else f"is below a file ({part})"
                raise InputError(f"{output_dir} {what}; output_dir must be a folder",
                                 field="output_dir")
            return


def validate_inputs(cfg: RunConfig, world_size: int) -> Inputs:
    """Read and check every input; raises InputError with file, line and field."""
    check_output_dir(cfg.output_dir)
    check_model_folder(cfg)
    resolve_ds_config(cfg, world_size)
    check_report_to(cfg.report_to)
    term = make_term(cfg)
    train_sets = [load_examples(task, "train") for task in cfg.tasks]
    replay = check_replay_inputs(cfg, world_size) if term.uses_replay else []
    # before the model is loaded: one clear line
    vocab = json.loads((Path(cfg.model) / "config.json").read_text()).get("vocab_size")
    if vocab:
        term.check_model(int(vocab), cfg.model)
    check_label_tokens(cfg, load_tokenizer(cfg, lambda line: None))
    if cfg.train.lora is not None:
        check_targets(cfg)
    suite = None
    if cfg.eval.enabled:
        suite = EvalSuite(cfg.tasks, cfg.eval, seed=cfg.eval.sample_seed,
                          max_source_len=cfg.train.max_source_len,
                          max_target_len=cfg.train.max_target_len,
                          truncate_source=cfg.train.truncate_source)
    return Inputs(train_sets, replay, suite)
