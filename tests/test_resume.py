"""Fault tolerance: SIGKILL mid-task and re-run == uninterrupted; SIGTERM checkpoints and exits;
incomplete or truncated checkpoints are skipped; another world size is refused."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO, VENV_BIN, ds_env, free_port, run_deepspeed, step_losses

pytestmark = pytest.mark.slow


def _three_tasks(tiny_config, tiny_paths, name):
    third = {"name": "sentiment_again", "train": tiny_paths["sentiment_test"],
             "test": tiny_paths["sentiment_test"],
             "instruction": "Is the review positive or negative? Choose one from the option.",
             "labels": ["positive", "negative"]}
    from gere_assets.tiny import tiny_config_dict

    tasks = tiny_config_dict(tiny_paths, "x")["tasks"] + [third]
    return tiny_config("tm", name=name, tasks=tasks, replay={"per_batch": 2},
                       train={"max_steps_per_task": 4, "epochs": 3},
                       checkpoint={"every_steps": 1, "keep_last": 2})


def _start(cfg: Path) -> subprocess.Popen:
    cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(REPO / "launch/train.py"), "--config", str(cfg)]
    return subprocess.Popen(cmd, cwd=REPO, env=ds_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for_step(run_dir: Path, proc: subprocess.Popen, task: int, step: int) -> None:
    deadline = time.time() + 400
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        path = run_dir / "train_steps.jsonl"
        if path.exists():
            rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            if any(r["task"] == task and r["step_in_task"] >= step for r in rows):
                return
        time.sleep(0.2)
    raise AssertionError("run did not reach the step in time")


def _ranks(proc: subprocess.Popen) -> list[psutil.Process]:
    kids = psutil.Process(proc.pid).children(recursive=True)
    return [k for k in kids if "--local_rank" in " ".join(k.cmdline())]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_paths):
    """The uninterrupted 3-task run."""
    import yaml

    from gere_assets.tiny import tiny_config_dict

    d = tmp_path_factory.mktemp("reference")
    cfg = tiny_config_dict(tiny_paths, str(d / "run_ref"), "tm")
    cfg["tasks"].append({"name": "sentiment_again", "train": tiny_paths["sentiment_test"],
                         "test": tiny_paths["sentiment_test"],
                         "instruction": "Is the review positive or negative? Choose one from "
                                        "the option.",
                         "labels": ["positive", "negative"]})
    cfg["replay"]["per_batch"] = 2
    cfg["train"].update(max_steps_per_task=4, epochs=3)
    cfg["checkpoint"] = {"every_steps": 1, "keep_last": 2}
    path = d / "ref.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = run_deepspeed(REPO / "launch/train.py", ["--config", str(path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return d / "run_ref"


def test_sigkill_mid_task_then_rerun_equals_uninterrupted(reference, tiny_config, tiny_paths):
    cfg = _three_tasks(tiny_config, tiny_paths, "killed")
    run_dir = cfg.parent / "run_killed"
    proc = _start(cfg)
    _wait_for_step(run_dir, proc, task=1, step=2)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job, launcher and ranks, no warning
    proc.wait()
    again = run_deepspeed(REPO / "launch/train.py", ["--config", str(cfg)])
    assert again.returncode == 0, again.stderr[-3000:]
    log = (run_dir / "train.log").read_text()
    assert "resumed from" in log
    assert step_losses(run_dir) == step_losses(reference)  # bitwise: fp32 on CPU
    ours = json.loads((run_dir / "metrics.json").read_text())
    ref = json.loads((reference / "metrics.json").read_text())
    assert ours["matrix"] == ref["matrix"] and len(ours["matrix"]) == 4
    # retention: only the newest 2 mid-task checkpoints are left, task ends are all kept
    tags = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())
    assert [t for t in tags if t.endswith("-end")] == ["task001-end", "task002-end",
                                                      "task003-end"]
    assert len([t for t in tags if "-step" in t]) == 2


def test_sigterm_checkpoints_exits_zero_and_resumes(reference, tiny_config, tiny_paths):
    cfg = _three_tasks(tiny_config, tiny_paths, "termed")
    run_dir = cfg.parent / "run_termed"
    proc = _start(cfg)
    _wait_for_step(run_dir, proc, task=0, step=2)
    for rank in _ranks(proc):  # what Slurm does to every task of the job step
        rank.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "pre-empted" in (run_dir / "train.log").read_text()
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest.startswith("task001-step")
    assert (run_dir / "checkpoints" / latest / "COMPLETE.rank00001").is_file()
    again = run_deepspeed(REPO / "launch/train.py", ["--config", str(cfg)])
    assert again.returncode == 0, again.stderr[-3000:]
    assert step_losses(run_dir) == step_losses(reference)


def test_other_world_size_is_refused_with_one_line(reference):
    proc = run_deepspeed(REPO / "launch/train.py",
                         ["--config", str(reference.parent / "ref.yaml")], nproc=1)
    assert proc.returncode != 0
    assert "was written by 2 ranks and this job has 1" in proc.stderr


def test_a_checkpoint_of_another_zero_stage_is_refused_in_one_line(tiny_config, tmp_path):
    """`deepspeed: auto` picks the stage by memory, so a relaunch elsewhere could resolve to
    another stage than the checkpoint's: one line naming both, before anything is loaded."""
    from gere_ds.checkpointing.resume import check_state
    from gere_ds.config.loading import load_config
    from gere_ds.errors import InputError

    cfg = load_config(tiny_config("tm"))
    state = {"world_size": 2, "zero_stage": 3, "task_names": [t.name for t in cfg.tasks],
             "teacher_fingerprint": "fp"}
    check_state(state, tmp_path, cfg, 2, "fp", zero_stage=3)
    with pytest.raises(InputError, match=r"written under ZeRO-3 and this launch resolves "
                                         r"`deepspeed` to ZeRO-2.*ds_configs/zero3.json"):
        check_state(state, tmp_path, cfg, 2, "fp", zero_stage=2)


def test_a_task_file_changed_in_place_is_refused_on_resume_in_one_line(tiny_config, tmp_path):
    """A checkpoint records the sha256 of the task files it depends on: a file edited under
    the same path is refused naming the task, the file and the field; a file it does not depend
    on (here: the second task's, as if recorded during task 1 before any test file) may change."""
    from gere_ds.checkpointing.resume import check_state, task_data_digests
    from gere_ds.config.loading import load_config
    from gere_ds.errors import InputError

    cfg = load_config(tiny_config("tm"))
    state = {"world_size": 2, "zero_stage": 3, "task_names": [cfg.tasks[0].name],
             "teacher_fingerprint": "fp",
             "task_data": {cfg.tasks[0].name: task_data_digests(cfg)[cfg.tasks[0].name]}}
    check_state(state, tmp_path, cfg, 2, "fp", task_data=task_data_digests(cfg))

    def edit_test_file(task) -> None:
        edited = tmp_path / f"{task.name}_test.jsonl"
        edited.write_text(Path(task.test).read_text().replace("a", "b", 1))
        task.test = str(edited)

    edit_test_file(cfg.tasks[1])  # not recorded: still accepted
    check_state(state, tmp_path, cfg, 2, "fp", task_data=task_data_digests(cfg))
    edit_test_file(cfg.tasks[0])
    with pytest.raises(InputError, match=r"task sentiment's test file .*differs from the one "
                                         r"checkpoint") as err:
        check_state(state, tmp_path, cfg, 2, "fp", task_data=task_data_digests(cfg))
    assert err.value.field == "tasks[0].test"
