"""Pre-emption during the long work between optimizer steps (teacher pass, evaluations): a signal
on one rank stops every rank within one batch, exit 0, and the re-run finishes with the numbers of
an uninterrupted run. Plus the stop module's own rules in one process."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_deepspeed
from gere_ds.runtime import stop


def _config(tiny_paths, out: Path, export: bool = False) -> Path:
    from gere_assets.tiny import tiny_config_dict

    cfg = tiny_config_dict(tiny_paths, str(out), "tm")
    cfg["train"].update(max_steps_per_task=2, epochs=1)
    if export:
        cfg["checkpoint"] = {"export_hf": True}
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _train(cfg: Path):
    return run_deepspeed(REPO / "launch/train.py", ["--config", str(cfg)])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_paths) -> dict:
    d = tmp_path_factory.mktemp("preempt_ref")
    proc = _train(_config(tiny_paths, d / "run"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((d / "run" / "metrics.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("what,n,rank", [("the teacher pass", 2, 1),
                                         ("the base model's evaluation", 2, 0),
                                         ("the evaluation after task 1", 1, 1),
                                         ("the export of task 1", 3, 1)])
def test_a_signal_on_one_rank_during_long_work_stops_all_and_the_rerun_matches(
        what, n, rank, reference, tiny_paths, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = _config(tiny_paths, out, export=what.startswith("the export"))
    monkeypatch.setenv("GERE_DS_SIGNAL_AT", f"{what}:{n}:{rank}")
    cut = _train(cfg)
    assert cut.returncode == 0, cut.stderr[-3000:]  # pre-empted runs exit 0 (Slurm requeue)
    log = (out / "train.log").read_text()
    assert f"pre-empted (signal) during {what}" in log
    after_task = what in ("the evaluation after task 1", "the export of task 1")
    assert (out / "metrics.json").exists() == after_task
    if after_task:
        done = json.loads((out / "metrics.json").read_text())
        assert len(done["matrix"]) == 1  # the interrupted row was not written
        hf = out / "hf"
        assert not hf.exists() or not any(hf.iterdir())  # no export, not even a temp folder
    monkeypatch.delenv("GERE_DS_SIGNAL_AT")
    again = _train(cfg)
    assert again.returncode == 0, again.stderr[-3000:]
    ours = json.loads((out / "metrics.json").read_text())
    assert ours["matrix"] == reference["matrix"] and len(ours["matrix"]) == 3
    assert ours["general"] == reference["general"]
    if what.startswith("the export"):
        assert (out / "hf" / "task002-end" / "config.json").is_file()


def test_check_without_install_does_nothing_and_runs_no_collective(monkeypatch):
    """Under a process group, with the hook armed for this very check: nothing is sent and no
    collective runs until install(); after it the same check sends and asks the ranks."""
    sent: list[int] = []
    asked: list[bool] = []
    monkeypatch.setattr(stop.os, "kill", lambda pid, sig: sent.append(sig))
    monkeypatch.setattr(stop.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(stop.dist, "rank", lambda: 0)
    for collective in ("any_rank", "any_rank_host"):  # whichever agreement the module uses
        if hasattr(stop.dist, collective):
            monkeypatch.setattr(stop.dist, collective, lambda flag: asked.append(flag) or flag)
    monkeypatch.delenv("GERE_DS_KILL_AT", raising=False)
    monkeypatch.setenv("GERE_DS_SIGNAL_AT", "work:1")
    stop.uninstall()
    with stop.doing("work"):
        stop.check()
    assert sent == [] and asked == []
    monkeypatch.setattr(stop.signal, "signal", lambda sig, handler: None)  # keep pytest's own
    stop.install()
    try:
        with stop.doing("work"):
            stop.check()  # the patched kill delivers nothing: no rank received, no stop
    finally:
        stop.uninstall()
    assert sent == [signal.SIGTERM] and asked == [False]


def test_a_received_signal_is_raised_at_the_next_check_with_the_work_named(monkeypatch):
    monkeypatch.delenv("GERE_DS_SIGNAL_AT", raising=False)
    stop.install()
    try:
        with stop.doing("the evaluation after task 2"):
            stop.check()
            signal.raise_signal(signal.SIGUSR1)
            assert stop.received() == signal.SIGUSR1
            with pytest.raises(stop.Preempted, match="during the evaluation after task 2"):
                stop.check()
    finally:
        stop.uninstall()


def test_the_injection_hook_fires_on_the_named_check_only(monkeypatch):
    monkeypatch.setenv("GERE_DS_SIGNAL_AT", "the teacher pass:3")
    stop.install()
    try:
        with stop.doing("the teacher pass"):
            stop.check()
            stop.check()
            with pytest.raises(stop.Preempted):
                stop.check()
    finally:
        stop.uninstall()


def test_a_crash_point_kills_only_when_named_counted_and_on_its_rank(monkeypatch):
    killed: list[tuple[int, int]] = []
    monkeypatch.setattr(stop.os, "killpg", lambda pgid, sig: killed.append((pgid, sig)))
    monkeypatch.setenv("GERE_DS_KILL_AT", "a micro-step:2")
    stop.uninstall()
    try:
        stop.crash_point("a checkpoint save")
        stop.crash_point("a micro-step")
        assert killed == []
        stop.crash_point("a micro-step")
        assert killed == [(os.getpgid(0), signal.SIGKILL)]
        monkeypatch.setenv("GERE_DS_KILL_AT", "a micro-step:1:1")  # rank 1 only; this is rank 0
        stop.uninstall()
        stop.crash_point("a micro-step")
        assert len(killed) == 1
    finally:
        stop.uninstall()
