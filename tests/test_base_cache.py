"""A kept base-model evaluation (gere_ds.evaluation.base_cache): reused only under the same key."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

from gere_ds.config.loading import load_config
from gere_ds.evaluation import base_cache as BC
from gere_ds.evaluation.general import GeneralScore
from gere_ds.evaluation.scoring import EvalRow, EvalSuite, TaskScore


def _row(acc: float) -> EvalRow:
    return EvalRow(accuracy={"t": acc}, general={"piqa": 55.0},
                   task_scores={"t": TaskScore("t", "rank", acc, 2, ["a", "b"], [True, False])},
                   general_scores={"piqa": GeneralScore("piqa", "cloze", 55.0, 2,
                                                        {"correct": [1, 0], "correct_norm": [1, 1]})})


def _setup(tiny_config, tmp_path, **eval_edits):
    cfg = load_config(tiny_config("tm"))
    cfg.eval = dataclasses.replace(cfg.eval, reuse_base=True, **eval_edits)
    suite = EvalSuite(cfg.tasks, cfg.eval, seed=cfg.eval.sample_seed)
    return cfg, suite


def test_first_run_scores_later_runs_reuse(tiny_config, tmp_path):
    cfg, suite = _setup(tiny_config, tmp_path)
    calls, logs = [], []
    score = lambda: calls.append(1) or _row(50.0)  # noqa: E731
    first = BC.evaluate_base(cfg, suite, 2, tmp_path, score, logs.append)
    again = BC.evaluate_base(cfg, suite, 2, tmp_path, score, logs.append)
    assert len(calls) == 1 and "reusing" in logs[-1]
    assert again == first  # every field round-trips, per-example outcomes included
    # another world size (other batch shapes) or another test sample: scored afresh
    BC.evaluate_base(cfg, suite, 1, tmp_path, score, logs.append)
    cfg2, suite2 = _setup(tiny_config, tmp_path, max_examples=3)
    BC.evaluate_base(cfg2, suite2, 2, tmp_path, score, logs.append)
    assert len(calls) == 3


def test_off_by_default_and_damaged_file_is_a_miss(tiny_config, tmp_path):
    cfg, suite = _setup(tiny_config, tmp_path)
    key = BC.base_key(cfg, suite, 2)
    (tmp_path / BC.FOLDER).mkdir()
    (tmp_path / BC.FOLDER / f"{key}.json").write_text("{not json")
    assert BC.load_kept(tmp_path, key) is None
    off = SimpleNamespace(**{**vars(cfg), "eval": dataclasses.replace(cfg.eval, reuse_base=False)})
    calls = []
    BC.evaluate_base(off, suite, 2, tmp_path, lambda: calls.append(1) or _row(1.0), print)
    BC.evaluate_base(off, suite, 2, tmp_path, lambda: calls.append(1) or _row(1.0), print)
    assert len(calls) == 2  # scored both times
    assert [p.name for p in (tmp_path / BC.FOLDER).iterdir()] == [f"{key}.json"]  # nothing kept


def test_a_task_end_evaluation_is_reused_only_for_the_same_checkpoint(tiny_config, tmp_path):
    cfg, suite = _setup(tiny_config, tmp_path)
    calls, logs = [], []
    score = lambda: calls.append(1) or _row(float(len(calls)))  # noqa: E731

    def at(run: str, checkpoint: str) -> EvalRow:
        return BC.evaluate_task_end(cfg, suite, 2, tmp_path, run, checkpoint, score, logs.append)

    first = at("runA", "task001-end#3")
    assert at("runA", "task001-end#3") == first and len(calls) == 1
    assert logs[-1].startswith("task001-end: reusing the evaluation kept in")
    at("runA", "task001-end#7")  # the same tag saved again (after a rollback): another model
    at("runB", "task001-end#3")  # another run's checkpoint in this folder
    assert len(calls) == 3
    cfg2, suite2 = _setup(tiny_config, tmp_path, max_examples=3)  # other test examples
    BC.evaluate_task_end(cfg2, suite2, 2, tmp_path, "runA", "task001-end#3", score, print)
    assert len(calls) == 4
    kept = len(list((tmp_path / BC.TASK_END_FOLDER).iterdir()))
    at("runA", "")  # no checkpoint identity: scored, nothing kept or read
    at("runA", "")
    assert len(calls) == 6 and len(list((tmp_path / BC.TASK_END_FOLDER).iterdir())) == kept
