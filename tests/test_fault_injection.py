"""Fault injection: a 2-rank run is killed (SIGKILL of the whole job, as a node failure) at
randomly drawn points, several times in a row: during the teacher pass, during the base model's
evaluation, between a micro-step's backward and the optimizer step, between a checkpoint's files
and its marker, and during an evaluation after a task. Each attempt re-runs the same command.
The run that finally finishes has the losses of every step and the metrics of an uninterrupted
run, bit for bit (fp32 on CPU).

The points are drawn from a seed printed with any failure; ``GERE_FAULT_SEED=<n>`` replays one."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, run_deepspeed, step_losses

pytestmark = pytest.mark.slow


def _config(tiny_config, name: str) -> Path:
    return tiny_config("tm", name=name, replay={"per_batch": 2},
                       train={"max_steps_per_task": 4, "epochs": 3},
                       checkpoint={"every_steps": 1, "keep_last": 2})


def _launch(cfg: Path, kill_at: str = "") -> subprocess.CompletedProcess:
    return run_deepspeed(REPO / "launch/train.py", ["--config", str(cfg)],
                         env={"GERE_DS_KILL_AT": kill_at})  # "": no crash


def _draw(rng: random.Random) -> list[str]:
    """One crash per kind, in an order in which each is sure to be reached by its attempt.
    Tiny run: 2 tasks x 4 steps x 2 micro-steps; 2-3 teacher batches and >= 2 evaluation
    batches per rank; a checkpoint after every step."""
    rank = lambda: rng.randint(0, 1)  # noqa: E731
    return [f"the teacher pass:{rng.randint(1, 2)}:{rank()}",
            f"the base model's evaluation:{rng.randint(1, 2)}:{rank()}",
            f"a micro-step:{rng.randint(1, 6)}:{rank()}",  # task 1, at most its step 3
            f"a checkpoint save:{rng.randint(1, 2)}:{rank()}",  # task 1, its end at the latest
            f"the evaluation after task 1:{rng.randint(1, 2)}:{rank()}"]


@pytest.fixture
def ref_dir(tiny_config) -> Path:
    """The uninterrupted run."""
    reference = _config(tiny_config, "reference")
    done = _launch(reference)
    assert done.returncode == 0, done.stderr[-3000:]
    return reference.parent / "run_reference"


def test_repeated_crashes_at_random_points_end_with_the_uninterrupted_numbers(tiny_config,
                                                                              ref_dir):
    seed = int(os.environ.get("GERE_FAULT_SEED") or random.SystemRandom().randrange(1 << 30))
    faults = _draw(random.Random(seed))
    cfg = _config(tiny_config, "faulty")
    run_dir = cfg.parent / "run_faulty"
    for fault in faults:
        cut = _launch(cfg, kill_at=fault)
        why = f"seed {seed}, crash at {fault!r}: {cut.stderr[-3000:]}"
        assert cut.returncode == -signal.SIGKILL, why  # the crash point was reached
        assert not (run_dir / "metrics.json").exists() or len(
            json.loads((run_dir / "metrics.json").read_text())["matrix"]) < 3, why
    last = _launch(cfg)
    assert last.returncode == 0, f"seed {seed}, faults {faults}: {last.stderr[-3000:]}"
    assert "resumed from" in (run_dir / "train.log").read_text()
    assert step_losses(run_dir) == step_losses(ref_dir), f"seed {seed}, faults {faults}"
    ours = json.loads((run_dir / "metrics.json").read_text())
    ref = json.loads((ref_dir / "metrics.json").read_text())
    assert ours["matrix"] == ref["matrix"] and len(ours["matrix"]) == 3, f"seed {seed}"
    assert ours["general"] == ref["general"], f"seed {seed}"
    for tag in ("task001-end", "task002-end"):  # both task ends complete, by every rank
        assert {p.name for p in (run_dir / "checkpoints" / tag).glob("COMPLETE.rank*")} == {
            "COMPLETE.rank00000", "COMPLETE.rank00001"}


def test_a_crash_in_the_next_task_reuses_the_kept_evaluation_of_the_task_end(tiny_config,
                                                                             ref_dir):
    """Without mid-task checkpoints a crash during task 2 resumes from task 1's end, whose
    evaluation already ran: it is read back (kept by checkpoint identity), not scored again."""
    cfg = tiny_config("tm", name="next", replay={"per_batch": 2},
                      train={"max_steps_per_task": 4, "epochs": 3},
                      checkpoint={"every_steps": 0, "keep_last": 1})
    run_dir = cfg.parent / "run_next"
    cut = _launch(cfg, kill_at="a micro-step:10")  # task 1: 4 steps x 2 micro-steps
    assert cut.returncode == -signal.SIGKILL, cut.stderr[-3000:]
    assert not (run_dir / "checkpoints" / "task002-end").exists()
    last = _launch(cfg)
    assert last.returncode == 0, last.stderr[-3000:]
    log = (run_dir / "train.log").read_text()
    assert "resumed from" in log and "task001-end: reusing the evaluation kept in" in log
    assert log.count("evaluating the model after task 1") == 2  # asked twice, scored once
    assert step_losses(run_dir) == step_losses(ref_dir)
    ours = json.loads((run_dir / "metrics.json").read_text())
    ref = json.loads((ref_dir / "metrics.json").read_text())
    assert ours["matrix"] == ref["matrix"] and ours["general"] == ref["general"]
