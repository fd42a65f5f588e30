"""The run folder under real 2-rank launches: a dead job's lock and an attempt that saved no
checkpoint (torn step log) are cleaned up; a refused relaunch changes nothing in the run folder;
a lock of another host refuses the job with one line."""
from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_deepspeed

pytestmark = pytest.mark.slow


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _snapshot(run: Path) -> dict[str, str]:
    """Every file and folder of the run folder with a digest of its bytes."""
    return {str(p.relative_to(run)): (hashlib.sha256(p.read_bytes()).hexdigest()
                                      if p.is_file() else "dir")
            for p in sorted(run.rglob("*"))}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_paths):
    """A 2-task tm run started over a dead job's lock and a step log of an earlier attempt that
    saved no checkpoint (three steps and a torn last line)."""
    from gere_assets.tiny import tiny_config_dict

    d = tmp_path_factory.mktemp("runfolder")
    run = d / "run"
    cfg = tiny_config_dict(tiny_paths, str(run), "tm")
    cfg["train"].update(max_steps_per_task=2, epochs=1)
    cfg["eval"] = {"enabled": False}
    path = d / "run.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    run.mkdir()
    (run / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(),
                                              "started": "earlier"}))
    (run / "train_steps.jsonl").write_text(
        "".join(json.dumps({"global_step": s, "train/loss": 9.0}) + "\n" for s in (1, 2, 3))
        + '{"global_step": 4, "train/lo')
    proc = run_deepspeed(REPO / "launch/train.py", ["--config", str(path)])
    return {"dir": d, "run": run, "config": path, "proc": proc}


def test_a_dead_jobs_lock_and_an_attempt_without_checkpoint_are_cleaned_up(finished):
    proc, run = finished["proc"], finished["run"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert out.count("stale lock") == 1 and "taken over" in out
    assert not (run / "run.lock").exists()  # released at exit
    rows = [json.loads(x) for x in (run / "train_steps.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in rows] == [1, 2, 3, 4]  # no step of the attempt is left
    assert all(r["train/loss"] != 9.0 for r in rows)
    log = (run / "train.log").read_text()
    assert log.count("torn last line") == 1


def test_a_refused_relaunch_leaves_the_run_folder_as_it_was(finished):
    run, d = finished["run"], finished["dir"]
    other = d / "other_model"  # another model: the teacher fingerprint check refuses it
    shutil.copytree(yaml.safe_load(finished["config"].read_text())["model"], other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "_copy": "another model"}))
    before = _snapshot(run)
    proc = run_deepspeed(REPO / "launch/train.py",
                         ["--config", str(finished["config"]), f"model={other}"])
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "holds checkpoints of another run" in proc.stderr
    assert _snapshot(run) == before  # config.yaml, logs, teacher cache, lock: all as they were


def test_a_lock_of_another_host_refuses_the_job_with_one_line(finished):
    run = finished["run"]
    (run / "run.lock").write_text(json.dumps({"host": "node-elsewhere-9", "pid": 77,
                                              "started": "2024-05-01 08:00:00"}))
    before = _snapshot(run)
    try:
        proc = run_deepspeed(REPO / "launch/train.py", ["--config", str(finished["config"])])
        assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error")]
        assert len(errors) == 1, proc.stderr[-3000:]
        assert "pid 77 on host node-elsewhere-9" in errors[0] and "--force-unlock" in errors[0]
        assert _snapshot(run) == before
    finally:
        (run / "run.lock").unlink()
