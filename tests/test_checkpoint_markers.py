"""Which checkpoint a resume trusts and which ones pruning keeps: markers with sizes, sha256,
the save's sequence number and the run's fingerprint (one process, fake checkpoint folders)."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from gere_ds.checkpointing.checkpoint import (Checkpointer, all_ranks_problem, step_tag, tag_order,
                                              task_tag)
from gere_ds.checkpointing.checkpoint_lineage import add_fork, read_forks
from gere_ds.checkpointing.checkpoint_marker import file_owner, rank_files, write_marker
from gere_ds.checkpointing.resume import load_resume, plan_resume
from gere_ds.errors import InputError

RUN = "f" * 32
ZERO3 = {"zero_pp_rank_0_mp_rank_00_model_states.pt": b"x" * 100,
         "zero_pp_rank_0_mp_rank_00_optim_states.pt": b"y" * 200,
         "rng_rank00000.pt": b"r", "trainer_state.json": b"{}"}
ZERO2 = {"mp_rank_00_model_states.pt": b"m" * 300,  # ZeRO-1/2: rank 0 alone writes the model
         "zero_pp_rank_0_mp_rank_00_optim_states.pt": b"y" * 200,
         "zero_pp_rank_1_mp_rank_00_optim_states.pt": b"z" * 200,
         "rng_rank00000.pt": b"r", "rng_rank00001.pt": b"s", "trainer_state.json": b"{}"}


def _fake(root: Path, tag: str, seq: int, complete: bool = True, files: dict | None = None,
          run: str = RUN, world: int = 1) -> Path:
    folder = root / tag
    folder.mkdir(parents=True)
    for name, data in (files or ZERO3).items():
        (folder / name).write_bytes(data)
    if complete:
        for rank in range(world):
            write_marker(folder, rank, run=run, tag=tag, seq=seq, parent=None, world_size=world)
    return folder


def _plan_and_load(cfg, ckpt: Checkpointer, log, load) -> Path | None:
    return load_resume(plan_resume(cfg, ckpt, lambda folder: None), ckpt, log, load)


def _resume(root: Path, mode: str = "auto", fail: set[str] = frozenset()
            ) -> tuple[Path | None, list[str], list[str]]:
    """A resume, as training runs it, on a fake folder: (the folder loaded, log lines, every
    folder tried)."""
    lines: list[str] = []
    tried: list[str] = []

    def load(folder: Path) -> None:
        tried.append(folder.name)
        if folder.name in fail:
            raise RuntimeError("PytorchStreamReader failed reading zip archive\nmore")

    cfg = SimpleNamespace(resume=mode)
    got = _plan_and_load(cfg, Checkpointer(root, keep_last=2, run=RUN), lines.append, load)
    return got, lines, tried


def test_order_of_tag_names():
    tags = ["task001-end", "task002-step000003", "task002-end", "task001-step000010"]
    assert sorted(tags, key=tag_order) == ["task001-step000010", "task001-end",
                                           "task002-step000003", "task002-end"]


def test_incomplete_truncated_and_corrupt_checkpoints_are_skipped(tmp_path):
    _fake(tmp_path, "task001-end", seq=1)
    _fake(tmp_path, "task002-step000002", seq=2)
    (tmp_path / "task002-step000002" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(
        b"y" * 50)
    corrupt = _fake(tmp_path, "task002-step000003", seq=3)
    (corrupt / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"Y" * 200)  # same size
    _fake(tmp_path, "task002-step000004", seq=4, complete=False)
    got, lines, tried = _resume(tmp_path)
    assert got == tmp_path / "task001-end" and tried == ["task001-end"]
    assert lines[0] == "skipping checkpoint task002-step000004: incomplete: no COMPLETE marker"
    assert lines[1] == ("skipping checkpoint task002-step000002: "
                        "zero_pp_rank_0_mp_rank_00_optim_states.pt truncated (50 of 200 bytes)")
    assert lines[2] == ("skipping checkpoint task002-step000003: "
                        "zero_pp_rank_0_mp_rank_00_optim_states.pt fails its checksum (corrupt)")


def test_a_checkpoint_whose_load_raises_falls_back_to_the_previous(tmp_path):
    _fake(tmp_path, "task001-end", seq=1)
    _fake(tmp_path, "task002-step000001", seq=2)
    got, lines, tried = _resume(tmp_path, fail={"task002-step000001"})
    assert got == tmp_path / "task001-end"
    assert tried == ["task002-step000001", "task001-end"]
    assert lines == ["skipping checkpoint task002-step000001: loading failed: RuntimeError: "
                     "PytorchStreamReader failed reading zip archive"]
    # the branch after task001-end is abandoned: a later resume never goes back to it
    assert read_forks(tmp_path) == [(1, 2)]
    assert _resume(tmp_path)[0] == tmp_path / "task001-end"


def test_zero2_model_states_are_covered(tmp_path):
    """ZeRO-1/2 write the model once, as mp_rank_00_model_states.pt (rank 0's part)."""
    assert file_owner("mp_rank_00_model_states.pt") == 0
    assert file_owner("bf16_zero_pp_rank_3_mp_rank_00_optim_states.pt") == 3
    assert file_owner("COMPLETE.rank00001") is None
    folder = _fake(tmp_path, "task001-end", seq=1, files=ZERO2, world=2)
    assert [p.name for p in rank_files(folder, 1)] == ["rng_rank00001.pt",
                                                       "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert all_ranks_problem(folder, RUN, checksums=True) is None
    (folder / "mp_rank_00_model_states.pt").write_bytes(b"M" * 300)
    assert all_ranks_problem(folder, RUN, checksums=True) == \
        "mp_rank_00_model_states.pt fails its checksum (corrupt)"


def test_no_checkpoint_means_fresh_start(tmp_path):
    got, lines, _ = _resume(tmp_path / "none")
    assert got is None and lines == []


def test_only_incomplete_checkpoints_start_from_scratch_in_one_line(tmp_path):
    """A crash during the first save leaves one incomplete folder: auto starts over, removes it,
    and says so (never a dead end between resume=auto and resume=never)."""
    _fake(tmp_path, "task001-end", seq=1, complete=False)
    got, lines, tried = _resume(tmp_path)
    assert got is None and tried == []
    assert lines[-1] == (f"no complete checkpoint in {tmp_path}: starting from scratch "
                         f"(removed the incomplete task001-end)")
    assert not (tmp_path / "task001-end").exists()


def test_foreign_checkpoints_are_refused_before_loading(tmp_path):
    other = "0" * 32
    _fake(tmp_path, "task001-end", seq=1, run=other)
    tried: list[str] = []
    with pytest.raises(InputError) as err:  # auto: refused, not a fresh start over that run
        _plan_and_load(SimpleNamespace(resume="auto"),
                       Checkpointer(tmp_path, keep_last=2, run=RUN), lambda line: None,
                       tried.append)
    assert "holds checkpoints of another run (task001-end: written by another run" in str(err.value)
    assert tried == [] and (tmp_path / "task001-end").is_dir()  # nothing unpickled or deleted
    with pytest.raises(InputError) as err:
        _resume(tmp_path, mode=str(tmp_path / "task001-end"))
    assert "refusing to load this checkpoint: written by another run" in str(err.value)
    # an older marker without checksums is not trusted either
    legacy = tmp_path / "legacy" / "task001-end"
    legacy.mkdir(parents=True)
    (legacy / "trainer_state.json").write_text("{}")
    (legacy / "COMPLETE.rank00000").write_text(json.dumps({"trainer_state.json": 2}))
    with pytest.raises(InputError, match="has no checksums"):
        _resume(tmp_path, mode=str(legacy))


def test_keep_last_never_removes_the_newest_checkpoint(tmp_path):
    _fake(tmp_path, "task001-step000001", seq=1)
    _fake(tmp_path, "task001-step000002", seq=2)
    Checkpointer(tmp_path, keep_last=0).prune()  # refused by the config; pruning keeps it anyway
    assert Checkpointer(tmp_path).tags() == ["task001-step000002"]


def test_rollback_orders_by_sequence_and_abandons_the_later_branch(tmp_path):
    """Rolled back to task001-end: the new task002-step000010 is newer than the abandoned
    task002-step000030/40 although its name sorts first."""
    _fake(tmp_path, "task001-end", seq=3)
    _fake(tmp_path, "task002-step000030", seq=5)
    _fake(tmp_path, "task002-step000040", seq=6)
    got, _, _ = _resume(tmp_path, mode=str(tmp_path / "task001-end"))
    assert got == tmp_path / "task001-end" and read_forks(tmp_path) == [(3, 6)]
    assert (tmp_path / "latest").read_text() == "task001-end\n"
    # a crash before the first new save: auto goes back to the rollback point, not the branch
    assert _resume(tmp_path)[0] == tmp_path / "task001-end"
    _fake(tmp_path, "task002-step000010", seq=7)
    Checkpointer(tmp_path, keep_last=2).prune()
    assert Checkpointer(tmp_path, run=RUN).tags() == ["task002-step000010", "task001-end"]
    assert _resume(tmp_path)[0] == tmp_path / "task002-step000010"


def test_only_complete_checkpoints_count_toward_retention(tmp_path):
    _fake(tmp_path, "task001-end", seq=1)
    _fake(tmp_path, "task002-step000001", seq=2)
    _fake(tmp_path, "task002-end", seq=3)
    _fake(tmp_path, "task003-end", seq=4, complete=False)  # never finished saving
    Checkpointer(tmp_path, keep_last=1, keep_task_ends=1).prune()
    assert Checkpointer(tmp_path).tags() == ["task002-end", "task002-step000001"]


def test_retention_of_task_ends_and_newest_steps(tmp_path):
    for seq, tag in enumerate(("task001-step000001", "task001-step000002", "task001-end",
                               "task002-step000001", "task002-step000002"), start=1):
        _fake(tmp_path, tag, seq)
    Checkpointer(tmp_path, keep_last=2).prune()
    assert sorted(Checkpointer(tmp_path).tags()) == ["task001-end", "task002-step000001",
                                                     "task002-step000002"]
    _fake(tmp_path, "task002-end", seq=6)
    _fake(tmp_path, "task003-end", seq=7)
    Checkpointer(tmp_path, keep_last=5, keep_task_ends=0).prune()  # 0: every task end is kept
    assert len(Checkpointer(tmp_path).tags()) == 5
    Checkpointer(tmp_path, keep_last=1, keep_task_ends=1).prune()
    assert Checkpointer(tmp_path).tags() == ["task003-end", "task002-step000002"]


def test_pruning_leaves_other_runs_alone(tmp_path):
    _fake(tmp_path, "task001-step000001", seq=9, run="0" * 32)
    _fake(tmp_path, "task001-step000002", seq=1)
    _fake(tmp_path, "task001-step000003", seq=2)
    Checkpointer(tmp_path, keep_last=1, run=RUN).prune()
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
        "task001-step000001", "task001-step000003"]


def test_checkpointer_verify_task_ends_and_one_tag_format(tmp_path):
    """The Checkpointer reads what the trainer writes: its tags (any task count) and every
    rank's markers; the old single ``COMPLETE`` file is not a marker."""
    ckpt = Checkpointer(tmp_path, keep_last=1, keep_task_ends=0, run=RUN)
    for seq, tag in enumerate((task_tag(0), step_tag(1, 3), task_tag(1), task_tag(1233)), 1):
        _fake(tmp_path, tag, seq)
    (tmp_path / "task1234-end.tmp").mkdir()  # not a tag
    assert ckpt.task_ends() == ["task001-end", "task002-end", "task1234-end"]
    assert ckpt.tags()[0] == "task1234-end"
    assert ckpt.verify("task002-end") is None
    (tmp_path / "task002-end" / "COMPLETE.rank00000").rename(tmp_path / "task002-end" / "COMPLETE")
    assert ckpt.verify("task002-end") == "incomplete: no COMPLETE marker"
    (tmp_path / "task002-end" / "COMPLETE").rename(tmp_path / "task002-end" / "COMPLETE.rank00000")
    add_fork(tmp_path, [], 1, 3)  # a rollback to task001-end abandoned task002-*
    assert ckpt.task_ends() == ["task001-end", "task1234-end"]
