"""Evaluations kept and reused: the base model's across the runs of one study, and each task
end's within its run.

Every run of an ablation or benchmark starts by scoring the same base model on the same test
sets: with ``eval.reuse_base`` the first run keeps that evaluation next to its teacher cache, and
later runs with the same key read it instead of scoring again. The key covers what decides the
numbers: the model and tokenizer files, the exact test examples (their digests), the evaluation
settings, the prompt cut, the precision, the world size and the scorer's version (other shapes round
differently).

A task end's evaluation is kept in ``<output_dir>/eval_rows/`` under a key made of the same
settings and the identity of the checkpoint that holds the evaluated model (the run fingerprint
and the checkpoint's ``tag#sequence``, unique within a run folder): a run resumed from that
checkpoint, e.g. after a crash during the next task, reads the row instead of scoring again.

Rank 0 reads the file and broadcasts it, so only rank 0 needs to see the folder; a file that is
unreadable or holds another key is a miss, never an error. Written atomically by rank 0.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Callable

from gere_ds.runtime import dist
from gere_ds.evaluation.general import GeneralScore
from gere_ds.evaluation.outcomes import test_set_digests
from gere_ds.evaluation.scoring import EvalRow, TaskScore
from gere_ds.teaching.fingerprint import fingerprint
from gere_ds.storage.atomic import write_text_atomic

FOLDER = "base_eval"
# Bumped whenever the scorers change how a number is computed (row layout included: other
# shapes round differently) or what a kept row holds, so a kept evaluation is never mixed with
# new ones. 2: all choices of a question in one packed row; 3: every general set's per-example
# outcomes (rows kept before have none for MMLU and perplexity); 4: the LM head on scored
# positions only, perplexity batches planned by tokens; 5: generate mode decodes from the KV
# cache; 6: perplexity batches run without an attention mask (another attention kernel).
SCORER_VERSION = 6


TASK_END_FOLDER = "eval_rows"


def _settings(cfg: Any, suite: Any, world_size: int) -> dict[str, Any]:
    """What decides an evaluation's numbers besides the model."""
    settings = {"tests": test_set_digests(suite), "eval": dataclasses.asdict(cfg.eval),
                "max_source_len": cfg.train.max_source_len,
                "max_target_len": cfg.train.max_target_len,
                "truncate_source": cfg.train.truncate_source, "bf16": cfg.train.bf16,
                "world_size": world_size, "scorer": SCORER_VERSION,
                "tasks": [dataclasses.asdict(t) for t in cfg.tasks]}
    settings["eval"].pop("reuse_base", None)
    settings["eval"].pop("max_examples", None)  # the digests say which examples
    return settings


def base_key(cfg: Any, suite: Any, world_size: int) -> str:
    """Identity of the base evaluation of run config ``cfg`` on ``suite``."""
    return fingerprint(cfg.model, cfg.tokenizer or cfg.model, cfg.model + "/config.json",
                       _settings(cfg, suite, world_size))


def task_end_key(cfg: Any, suite: Any, world_size: int, run: str, checkpoint: str) -> str:
    """Identity of the evaluation of the model that checkpoint ``checkpoint`` (``tag#seq``) of
    the run with fingerprint ``run`` holds."""
    doc = json.dumps([_settings(cfg, suite, world_size), run, checkpoint], sort_keys=True,
                     default=str)
    return hashlib.sha256(doc.encode()).hexdigest()


def _to_json(key: str, row: EvalRow) -> dict[str, Any]:
    return {"key": key, "accuracy": row.accuracy, "general": row.general,
            "tasks": {n: dataclasses.asdict(s) for n, s in row.task_scores.items()},
            "general_scores": {n: dataclasses.asdict(s) for n, s in row.general_scores.items()}}


def _from_json(doc: dict[str, Any]) -> EvalRow:
    return EvalRow(accuracy=doc["accuracy"], general=doc["general"],
                   task_scores={n: TaskScore(**s) for n, s in doc["tasks"].items()},
                   general_scores={n: GeneralScore(**s)
                                   for n, s in doc["general_scores"].items()})


def load_kept(root: Path, key: str, folder: str = FOLDER) -> EvalRow | None:
    """The kept evaluation for ``key`` on every rank, or None on every rank."""
    doc = None
    if dist.is_main():
        path = root / folder / f"{key}.json"
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            if doc.get("key") != key:
                doc = None
        except (OSError, ValueError):
            doc = None
    if dist.is_initialized() and dist.world_size() > 1:
        doc = dist.broadcast_object(doc)
    return _from_json(doc) if doc else None


def save_kept(root: Path, key: str, row: EvalRow, folder: str = FOLDER) -> None:
    """Keep an evaluation (rank 0 only)."""
    if dist.is_main():
        write_text_atomic(root / folder / f"{key}.json", json.dumps(_to_json(key, row)) + "\n")


def evaluate_base(cfg: Any, suite: Any, world_size: int, root: Path,
                  evaluate: Callable[[], EvalRow], log: Callable[[str], None]) -> EvalRow:
    """The base model's EvalRow: kept from an earlier run when ``eval.reuse_base`` allows."""
    if not cfg.eval.reuse_base:
        return evaluate()
    key = base_key(cfg, suite, world_size)
    row = load_kept(root, key)
    if row is not None:
        log(f"base model: reusing the evaluation kept in {root / FOLDER / key}.json")
        return row
    row = evaluate()
    save_kept(root, key, row)
    return row


def evaluate_task_end(cfg: Any, suite: Any, world_size: int, out: Path, run: str,
                      checkpoint: str, evaluate: Callable[[], EvalRow],
                      log: Callable[[str], None]) -> EvalRow:
    """A task end's EvalRow: kept in the run folder, keyed by the checkpoint it scored (none
    kept or read without a checkpoint identity)."""
    if not checkpoint:
        return evaluate()
    key = task_end_key(cfg, suite, world_size, run, checkpoint)
    row = load_kept(out, key, TASK_END_FOLDER)
    if row is not None:
        log(f"{checkpoint.split('#')[0]}: reusing the evaluation kept in "
            f"{out / TASK_END_FOLDER / key}.json")
        return row
    row = evaluate()
    save_kept(out, key, row, TASK_END_FOLDER)
    return row
