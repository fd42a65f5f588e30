"""Recovery from what crashes and people leave in a run's checkpoints folder (2-rank runs, ZeRO-2,
so the layout with a single mp_rank_00_model_states.pt is covered): a rollback's new branch is
kept and resumed, an interrupted first save restarts from scratch, a corrupt checkpoint of the
same size falls back to the previous one, and another run's checkpoint is refused before
anything in it is unpickled."""
from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, run_deepspeed
from test_resume import _ranks, _start, _wait_for_step

pytestmark = pytest.mark.slow
STEPS = 6  # per task; periodic checkpoints at steps 1..5, keep_last 2 keeps steps 4 and 5


@pytest.fixture(scope="module")
def finished(tiny_paths, tmp_path_factory) -> Path:
    """A finished 2-task ZeRO-2 run with a checkpoint at every step."""
    from gere_assets.tiny import tiny_config_dict

    base = tmp_path_factory.mktemp("recovery")
    cfg = tiny_config_dict(tiny_paths, str(base / "run"), "replay")
    cfg["deepspeed"] = str(REPO / "ds_configs" / "zero2.json")
    cfg["train"].update(max_steps_per_task=STEPS, epochs=3)
    cfg["eval"] = {"enabled": False}
    cfg["checkpoint"] = {"every_steps": 1, "keep_last": 2}
    path = base / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    proc = run_deepspeed(REPO / "launch/train.py", ["--config", str(path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    tags = sorted(p.name for p in (base / "run" / "checkpoints").iterdir() if p.is_dir())
    assert tags == ["task001-end", "task002-end", "task002-step000004", "task002-step000005"]
    return base / "run"


def _copy(finished: Path, dest: Path, **changes) -> tuple[Path, Path]:
    """A copy of the finished run and a config naming it (with ``changes`` at the top level)."""
    run = dest / "run"
    shutil.copytree(finished, run, ignore=shutil.ignore_patterns("tensorboard"))
    cfg = yaml.safe_load((finished.parent / "cfg.yaml").read_text())
    cfg.update(output_dir=str(run), **changes)
    path = dest / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return run, path


def _tags(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())


def _train(cfg: Path, *overrides: str):
    return run_deepspeed(REPO / "launch/train.py", ["--config", str(cfg), *overrides])


def test_rollback_branch_is_kept_and_resumed(finished, tmp_path):
    """Rolled back to task001-end, the new task002-step00000N is newer than the abandoned
    task002-step000004/5 and task002-end although its name sorts first: it is not pruned, and
    resume=auto continues from it, never from the abandoned branch."""
    run, cfg = _copy(finished, tmp_path, resume=str(tmp_path / "run" / "checkpoints" /
                                                    "task001-end"))
    steps = run / "train_steps.jsonl"  # the rolled-back task's rows: only the new run's count
    steps.write_text("".join(ln + "\n" for ln in steps.read_text().splitlines()
                             if json.loads(ln)["task"] == 0))
    proc = _start(cfg)
    _wait_for_step(run, proc, task=1, step=1)
    for rank in _ranks(proc):
        rank.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    new = (run / "checkpoints" / "latest").read_text().strip()
    assert new.startswith("task002-step") and new < "task002-step000004", new
    # the new checkpoints are kept (keep_last 2), the abandoned branch is pruned
    assert new in _tags(run) and not {"task002-step000004", "task002-step000005",
                                      "task002-end"} & set(_tags(run)), _tags(run)
    assert (run / "checkpoints" / new / "COMPLETE.rank00001").is_file()
    again = _train(cfg, "resume=auto")
    assert again.returncode == 0, again.stderr[-3000:]
    log = (run / "train.log").read_text()
    assert f"resumed from {run / 'checkpoints' / new}:" in log, log[-3000:]
    assert _tags(run) == ["task001-end", "task002-end", "task002-step000004",
                          "task002-step000005"]


def test_interrupted_first_save_restarts_from_scratch(finished, tmp_path):
    """A SIGKILL during the first save (every_steps 0) leaves one incomplete task001-end: the
    same command (resume=auto) starts over, says so in one line and finishes."""
    run, cfg = _copy(finished, tmp_path)
    ckpts = run / "checkpoints"
    for p in ckpts.iterdir():
        if p.name != "task001-end":
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    for marker in (ckpts / "task001-end").glob("COMPLETE.rank*"):
        marker.unlink()
    proc = _train(cfg, "checkpoint.every_steps=0", "train.max_steps_per_task=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (run / "train.log").read_text()
    assert (f"no complete checkpoint in {ckpts}: starting from scratch (removed the incomplete "
            f"task001-end)") in log, log[-3000:]
    assert (ckpts / "task002-end" / "COMPLETE.rank00001").is_file()


def test_same_size_corruption_falls_back_to_the_previous_checkpoint(finished, tmp_path):
    """ZeRO-2's model file, corrupted without changing its size, fails its checksum: the run
    says so in one line, resumes from the previous complete checkpoint and finishes."""
    run, cfg = _copy(finished, tmp_path)
    model = run / "checkpoints" / "task002-end" / "mp_rank_00_model_states.pt"
    data = bytearray(model.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    model.write_bytes(bytes(data))
    proc = _train(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (run / "train.log").read_text()
    assert ("skipping checkpoint task002-end: mp_rank_00_model_states.pt fails its checksum "
            "(corrupt)") in log, log[-3000:]
    assert f"resumed from {run / 'checkpoints' / 'task002-step000005'}:" in log


class _Payload:
    """What a hostile checkpoint file can do when unpickled: here, create a file."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("markers", ["other_run", "older_format"])
def test_foreign_checkpoint_is_refused_before_unpickling(finished, tmp_path, markers):
    """A checkpoint folder from elsewhere holding a pickle that runs code, with complete markers
    of another run (or of an older format, sizes only): refused in one line before DeepSpeed
    reads anything."""
    from gere_ds.checkpointing.checkpoint_marker import rank_files, write_marker

    foreign = tmp_path / "downloaded" / "task001-end"
    shutil.copytree(finished / "checkpoints" / "task001-end", foreign)
    sentinel = tmp_path / "code_ran"
    torch.save({"module": _Payload(sentinel)}, foreign / "mp_rank_00_model_states.pt")
    for rank in (0, 1):
        if markers == "other_run":
            write_marker(foreign, rank, run="0" * 32, tag=foreign.name, seq=1, parent=None,
                         world_size=2)
        else:
            sizes = {p.name: p.stat().st_size for p in rank_files(foreign, rank)
                     if "pp_rank" in p.name or p.name.startswith(("rng", "trainer"))}
            (foreign / f"COMPLETE.rank{rank:05d}").write_text(json.dumps(sizes))
    cfg = yaml.safe_load((finished.parent / "cfg.yaml").read_text())
    cfg.update(output_dir=str(tmp_path / "run"), resume=str(foreign))
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    proc = _train(path)
    assert not sentinel.exists()
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error")]
    why = "written by another run" if markers == "other_run" else "has no checksums"
    assert len(errors) == 1 and "refusing to load this checkpoint" in errors[0] \
        and why in errors[0], proc.stderr[-3000:]


def test_missing_export_of_a_finished_task_is_redone(finished, tmp_path):
    """The run stopped after task 2's checkpoint but before its Hugging Face export: the same
    command resumes at the end of task 2 and writes the export."""
    from gere_ds.model.export import verify_export

    run, cfg = _copy(finished, tmp_path)
    proc = _train(cfg, "checkpoint.export_hf=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / 'task002-end'}:" in (run / "train.log").read_text()
    verify_export(run / "hf" / "task002-end")
