"""The run folder's files: modes of atomic writes, the step log, the one-job lock, temporary
folders owned by dead processes, the digest cache of the teacher fingerprint, the evaluation's
exported folders and the ablation runner's --force."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from gere_ds.atomic import write_json_atomic, write_text_atomic


def test_atomic_writes_get_the_umask_mode_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "a.txt", "x")
        write_json_atomic(tmp_path / "b.json", {"a": 1})
    finally:
        os.umask(old)
    for name in ("a.txt", "b.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644


# ----------------------------------------------------------------------------- the step log


def _step_rows(n: int) -> str:
    return "".join(json.dumps({"global_step": i, "train/loss": 1.0 / i}) + "\n"
                   for i in range(1, n + 1))


def test_a_torn_last_step_line_is_dropped_with_one_warning_on_resume(tmp_path, capsys):
    from gere_ds.run_log import RunLogger

    (tmp_path / "train_steps.jsonl").write_text(_step_rows(3) + '{"global_step": 4, "trai')
    log = RunLogger(tmp_path, enabled=True)
    log.truncate_steps_after(2)
    log.scalars({"train/loss": 0.5}, 3)
    log.close()
    rows = [json.loads(x) for x in (tmp_path / "train_steps.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in rows] == [1, 2, 3]
    warnings = [ln for ln in capsys.readouterr().out.splitlines() if "torn" in ln]
    assert len(warnings) == 1 and "train_steps.jsonl:4:" in warnings[0]


def test_appending_after_a_torn_last_line_never_glues_rows(tmp_path):
    from gere_ds.run_log import RunLogger

    (tmp_path / "train_steps.jsonl").write_text(_step_rows(2) + '{"global_st')
    log = RunLogger(tmp_path, enabled=True)
    log.scalars({"train/loss": 0.5}, 3)
    log.close()
    rows = [json.loads(x) for x in (tmp_path / "train_steps.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in rows] == [1, 2, 3]


def test_a_torn_line_in_the_middle_is_an_error_naming_file_and_line(tmp_path):
    from gere_ds.errors import InputError
    from gere_ds.run_log import RunLogger

    (tmp_path / "train_steps.jsonl").write_text(_step_rows(2) + '{"glo\n' + _step_rows(1))
    log = RunLogger(tmp_path, enabled=True)
    with pytest.raises(InputError, match=r"train_steps.jsonl:3: unreadable step record"):
        log.truncate_steps_after(5)


def test_a_fresh_start_forgets_the_steps_of_an_attempt_without_checkpoint(tmp_path):
    from gere_ds.run_log import RunLogger

    (tmp_path / "train_steps.jsonl").write_text(_step_rows(4))
    log = RunLogger(tmp_path, enabled=True)
    log.start_fresh()
    for step in (1, 2):
        log.scalars({"train/loss": 0.5}, step)
    log.close()
    rows = [json.loads(x) for x in (tmp_path / "train_steps.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in rows] == [1, 2]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]


def test_a_logger_that_writes_nothing_leaves_the_folder_untouched(tmp_path):
    from gere_ds.run_log import RunLogger

    log = RunLogger(tmp_path / "run", enabled=True)
    log.close()
    assert not (tmp_path / "run").exists()
