"""Which checkpoint a resume trusts: complete markers and recorded sizes (one process)."""
from __future__ import annotations

import json
from pathlib import Path

from gere_ds.checkpoint import (candidate_tags, find_resume_checkpoint, prune_checkpoints,
                                tag_order)


def _fake(root: Path, tag: str, complete: bool = True, truncate: bool = False) -> None:
    folder = root / tag
    folder.mkdir(parents=True)
    files = {"zero_pp_rank_0_mp_rank_00_model_states.pt": b"x" * 100,
             "zero_pp_rank_0_mp_rank_00_optim_states.pt": b"y" * 200,
             "rng_rank00000.pt": b"r", "trainer_state.json": b"{}"}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    if complete:
        (folder / "COMPLETE.rank00000").write_text(json.dumps({n: len(d) for n, d in
                                                               files.items()}))
    if truncate:
        (folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"y" * 50)


def test_order_of_tags():
    tags = ["task001-end", "task002-step000003", "task002-end", "task001-step000010"]
    assert sorted(tags, key=tag_order) == ["task001-step000010", "task001-end",
                                           "task002-step000003", "task002-end"]


def test_incomplete_and_truncated_checkpoints_are_skipped(tmp_path):
    _fake(tmp_path, "task001-end")
    _fake(tmp_path, "task002-step000002", truncate=True)
    _fake(tmp_path, "task002-step000004", complete=False)
    lines: list[str] = []
    assert find_resume_checkpoint(tmp_path, lines.append) == "task001-end"
    assert "task002-step000004: no completion marker" in lines[0]
    assert "task002-step000002: zero_pp_rank_0_mp_rank_00_optim_states.pt truncated" in lines[1]


def test_no_checkpoint_means_fresh_start(tmp_path):
    assert find_resume_checkpoint(tmp_path / "none", print) is None


def test_retention_keeps_task_ends_and_newest_steps(tmp_path):
    for tag in ("task001-step000001", "task001-step000002", "task001-end",
                "task002-step000001", "task002-step000002"):
        _fake(tmp_path, tag)
    prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(candidate_tags(tmp_path)) == ["task001-end", "task002-step000001",
                                                "task002-step000002"]


def test_retention_of_task_ends(tmp_path):
    for tag in ("task001-end", "task002-step000001", "task002-end", "task003-step000001",
                "task003-end"):
        _fake(tmp_path, tag)
    prune_checkpoints(tmp_path, keep_last=5, keep_task_ends=0)  # 0: every task end is kept
    assert len(candidate_tags(tmp_path)) == 5
    prune_checkpoints(tmp_path, keep_last=1, keep_task_ends=1)
    assert candidate_tags(tmp_path) == ["task003-end", "task003-step000001"]


def test_checkpointer_verify_task_ends_and_one_tag_format(tmp_path):
    """The Checkpointer reads what the trainer writes: its tags (any task count) and every
    rank's markers; the old single ``COMPLETE`` file is not a marker."""
    from gere_ds.checkpoint import Checkpointer, step_tag, task_tag

    ckpt = Checkpointer(tmp_path, keep_last=1, keep_task_ends=0)
    for tag in (task_tag(0), step_tag(1, 3), task_tag(1), task_tag(1233)):
        _fake(tmp_path, tag)
    (tmp_path / "task1234-end.tmp").mkdir()  # not a tag
    assert ckpt.task_ends() == ["task001-end", "task002-end", "task1234-end"]
    assert ckpt.tags()[0] == "task1234-end"
    assert ckpt.verify("task002-end") is None
    (tmp_path / "task002-end" / "COMPLETE.rank00000").rename(tmp_path / "task002-end" / "COMPLETE")
    assert ckpt.verify("task002-end") == "incomplete: no COMPLETE marker"
    _fake(tmp_path, "task003-end", truncate=True)
    assert "truncated" in ckpt.verify("task003-end")
    ckpt.prune()  # keep_task_ends=0 keeps every task end; keep_last=1 the newest step
    assert set(ckpt.tags()) == {"task001-end", "task002-step000003", "task002-end",
                                "task003-end", "task1234-end"}
