"""The run folder's files: modes of atomic writes, the step log, the one-job lock, temporary
folders owned by dead processes, the digest cache of the teacher fingerprint, the evaluation's
exported folders and the ablation runner's --force."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from gere_ds.storage.atomic import write_json_atomic, write_text_atomic


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
    from gere_ds.monitoring.run_log import RunLogger

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
    from gere_ds.monitoring.run_log import RunLogger

    (tmp_path / "train_steps.jsonl").write_text(_step_rows(2) + '{"global_st')
    log = RunLogger(tmp_path, enabled=True)
    log.scalars({"train/loss": 0.5}, 3)
    log.close()
    rows = [json.loads(x) for x in (tmp_path / "train_steps.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in rows] == [1, 2, 3]


def test_a_torn_line_in_the_middle_is_an_error_naming_file_and_line(tmp_path):
    from gere_ds.errors import InputError
    from gere_ds.monitoring.run_log import RunLogger

    (tmp_path / "train_steps.jsonl").write_text(_step_rows(2) + '{"glo\n' + _step_rows(1))
    log = RunLogger(tmp_path, enabled=True)
    with pytest.raises(InputError, match=r"train_steps.jsonl:3: unreadable step record"):
        log.truncate_steps_after(5)


def test_a_fresh_start_forgets_the_steps_of_an_attempt_without_checkpoint(tmp_path):
    from gere_ds.monitoring.run_log import RunLogger

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
    from gere_ds.monitoring.run_log import RunLogger

    log = RunLogger(tmp_path / "run", enabled=True)
    log.close()
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- one job per folder


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_run_lock_admits_one_job_and_is_released(tmp_path):
    from gere_ds.checkpointing.run_lock import LOCK_FILE, acquire_run_lock
    from gere_ds.errors import InputError

    lock = acquire_run_lock(tmp_path / "run")
    holder = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["host"]
    with pytest.raises(InputError, match=rf"output_dir: .*run is in use by pid {os.getpid()}"):
        acquire_run_lock(tmp_path / "run")
    lock.release()
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    acquire_run_lock(tmp_path / "run").release()


def test_a_dead_jobs_lock_is_taken_over_with_one_line(tmp_path, capsys):
    import socket

    from gere_ds.checkpointing.run_lock import LOCK_FILE, acquire_run_lock

    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(),
                                                  "pid": _dead_pid(), "started": "earlier"}))
    lock = acquire_run_lock(tmp_path)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert len(lines) == 1 and "stale lock" in lines[0] and "taken over" in lines[0]
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_another_hosts_lock_is_refused_naming_holder_and_the_way_out(tmp_path):
    from gere_ds.checkpointing.run_lock import LOCK_FILE, acquire_run_lock
    from gere_ds.errors import InputError

    other = {"host": "node-elsewhere-3", "pid": 4242, "started": "2024-01-01 10:00:00"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(other))
    with pytest.raises(InputError) as err:
        acquire_run_lock(tmp_path)
    line = str(err.value)
    assert "\n" not in line and "pid 4242 on host node-elsewhere-3" in line
    assert "--force-unlock" in line and f"delete {tmp_path / LOCK_FILE}" in line
    lock = acquire_run_lock(tmp_path, force=True)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    (tmp_path / LOCK_FILE).write_text(json.dumps(other))  # someone else's now
    lock.release()
    assert (tmp_path / LOCK_FILE).is_file()  # release never removes another job's lock


# ----------------------------------------------------------------------------- evaluation's folders


def _fake_run(run: Path) -> Path:
    folder = run / "checkpoints" / "task001-end"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text('{"world_size": 1}')
    (folder / "COMPLETE.rank00000").write_text('{"trainer_state.json": 17}')
    return folder


def test_an_export_is_reused_only_if_it_records_this_checkpoint(tmp_path, monkeypatch):
    import gere_ds.model.export as E
    from gere_ds.commands import evaluate as ev
    from gere_ds.config.sections import RunConfig, TaskConfig

    calls: list[Path] = []

    def fake_export(run_dir, target, tag, force, log):
        calls.append(Path(target))
        Path(target).mkdir(parents=True, exist_ok=True)
        (Path(target) / "config.json").write_text("{}")

    monkeypatch.setattr(E, "export_checkpoint", fake_export)
    monkeypatch.setattr(E, "checkpoint_problem", lambda folder: None)
    cfg = RunConfig(model="base", output_dir="x", tasks=[TaskConfig(name="a", train="a.jsonl",
                                                                    labels=["y", "n"])])
    run, out = tmp_path / "run", tmp_path / "eval"
    folder = _fake_run(run)
    # a folder another run left in --out (a config.json, no record of its source)
    (out / "hf" / "task001-end").mkdir(parents=True)
    (out / "hf" / "task001-end" / "config.json").write_text('{"other": 1}')
    ev.run_models(cfg, run, out)
    assert len(calls) == 1  # not reused: it records no source
    ev.run_models(cfg, run, out)
    assert len(calls) == 1  # the same checkpoint: reused
    marker = folder / "COMPLETE.rank00000"
    st = marker.stat()
    marker.write_text('{"trainer_state.json": 17}')  # the tag saved again
    os.utime(marker, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    ev.run_models(cfg, run, out)
    assert len(calls) == 2
    other = tmp_path / "other_run"
    _fake_run(other)
    ev.run_models(cfg, other, out)  # another run's checkpoint of the same tag
    assert len(calls) == 3


def test_evaluate_refuses_an_out_that_is_a_run_folder(tiny_config, tmp_path, capsys):
    from gere_ds.commands import evaluate as ev

    cfg = tiny_config("tm", name="ev")
    run = tmp_path / "run"
    _fake_run(run)
    (run / "metrics.json").write_text('{"matrix": "the run\'s own"}')
    (run / "train.log").write_text("")
    for argv in (["--run", str(run), "--out", str(run)],
                 ["--model", str(tmp_path / "m"), "--out", str(run)]):
        assert ev.main(["--config", str(cfg), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is a run folder" in err[0] and "--out" in err[0]
    assert json.loads((run / "metrics.json").read_text()) == {"matrix": "the run's own"}


# ----------------------------------------------------------------------------- the ablation runner


def _ablation():
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("run_ablation",
                                                  REPO / "launch" / "run_ablation.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ablation_force_reruns_a_finished_row_from_scratch(tiny_config, tmp_path, monkeypatch):
    mod = _ablation()
    results = tmp_path / "results"
    row = results / "none"
    (row / "checkpoints" / "task002-end").mkdir(parents=True)
    (results / "teacher").mkdir()
    (results / "ablation.json").write_text(json.dumps({"none": {"status": "done"}}))
    seen: list[bool] = []

    def fake_run_row(cmd, log_path):
        seen.append((row / "checkpoints").exists())  # what the relaunched row would resume
        return 0

    monkeypatch.setattr(mod, "run_row", fake_run_row)
    args = ["--base", str(tiny_config("none", name="abl")), "--results", str(results),
            "--rows", "none"]
    assert mod.main(args) == 0 and seen == []  # done before: skipped
    assert mod.main([*args, "--force"]) == 0
    assert seen == [False]  # the finished run was removed: the row trains from scratch
    assert (results / "teacher").is_dir()  # the shared teacher cache is kept


def test_ablation_force_leaves_a_row_a_live_job_holds(tiny_config, tmp_path, monkeypatch):
    mod = _ablation()
    results = tmp_path / "results"
    from gere_ds.checkpointing.run_lock import acquire_run_lock

    lock = acquire_run_lock(results / "none")
    (results / "ablation.json").write_text(json.dumps({"none": {"status": "done"}}))
    monkeypatch.setattr(mod, "run_row", lambda cmd, log_path: 0)
    args = ["--base", str(tiny_config("none", name="abl")), "--results", str(results),
            "--rows", "none", "--force"]
    try:
        assert mod.main(args) == 1
        assert (results / "none" / "run.lock").is_file()
    finally:
        lock.release()
