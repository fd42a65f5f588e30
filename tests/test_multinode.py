"""Two nodes train the same model as one: the tiny 2-task TM job run as
(a) one launcher with 2 ranks and (b) two launchers (`--no_ssh --num_nodes 2 --num_gpus 1
--node_rank 0/1`) rendezvousing over the loopback interface, started concurrently.
Per-step losses (train_steps.jsonl, written by rank 0) and metrics.json must be identical.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from dist_scripts.launchers import REPO, run_nodes, run_one

TRAIN = REPO / "launch" / "train.py"
# wall-clock rates differ between runs; everything else must match exactly
TIMING_KEYS = ("train/tokens_per_s",)


def _steps(run_dir: Path) -> list[dict]:
    rows = [json.loads(ln) for ln in (run_dir / "train_steps.jsonl").read_text().splitlines()
            if ln.strip()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


@pytest.mark.slow
def test_two_nodes_train_like_one(tiny_config, tmp_path):
    cfg = tiny_config("tm", name="mn", train={"max_steps_per_task": 3},
                      replay={"per_batch": 2})
    one, two = tmp_path / "one_launcher", tmp_path / "two_launchers"

    t0 = time.monotonic()
    a = run_one(TRAIN, ["--config", str(cfg), f"output_dir={one}"], nproc=2, timeout=900)
    t_one = time.monotonic() - t0
    assert a.returncode == 0, a.output[-4000:]

    t0 = time.monotonic()
    nodes = run_nodes(TRAIN, [["--config", str(cfg), f"output_dir={two}"]] * 2, tmp_path,
                      gpus_per_node=1, timeout=900)
    t_two = time.monotonic() - t0
    for node in nodes:
        assert node.returncode == 0, f"node {node.node_rank}:\n{node.output[-4000:]}"
    # the two launchers really formed one 2-rank world across 2 "nodes"
    assert "nnodes=2, num_local_procs=1, node_rank=1" in nodes[1].output

    steps_one, steps_two = _steps(one), _steps(two)
    assert len(steps_one) == 2 * 3  # 2 tasks x max_steps_per_task
    assert steps_one == steps_two  # losses, TM terms, grad norms, lr: bit-identical
    assert any(r["train/replay_ce"] > 0 for r in steps_one)  # replay rows were in the batches
    assert any(r["train/tm"] > 0 for r in steps_one)

    metrics_one, metrics_two = one / "metrics.json", two / "metrics.json"
    assert metrics_one.is_file() == metrics_two.is_file()
    if metrics_one.is_file():
        assert json.loads(metrics_one.read_text()) == json.loads(metrics_two.read_text())
    print(f"\none launcher x 2 ranks: {t_one:.1f} s; two launchers x 1 rank: {t_two:.1f} s; "
          f"{len(steps_one)} steps equal; metrics.json "
          f"{'equal' if metrics_one.is_file() else 'not written'}")
