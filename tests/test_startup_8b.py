"""Startup and disk work that grows with the model: weights hashed once per node, the teacher's
scratch need compared per node, the recipe's retention of task-end checkpoints, and lm-eval
loading an export in its own dtype."""
from __future__ import annotations

import json
import shutil

import pytest
import yaml

from conftest import REPO, run_deepspeed
from gere_ds.teaching.teacher import scratch_problems

GIB = 2 ** 30


def test_scratch_need_adds_up_over_the_ranks_of_a_node():
    # two ranks of one node, 6 GiB each, 10 GiB free: each alone fits, together they do not
    node = [("n1", "/tmp", 6 * GIB, 10 * GIB), ("n1", "/tmp", 6 * GIB, 10 * GIB)]
    problems = scratch_problems(node)
    assert len(problems) == 1 and "12.00 GiB" in problems[0] and "on n1" in problems[0]
    # the same ranks on two nodes: each disk holds its own rank's
    assert scratch_problems([("n1", "/tmp", 6 * GIB, 10 * GIB),
                             ("n2", "/tmp", 6 * GIB, 10 * GIB)]) == []


@pytest.mark.slow
def test_weights_are_hashed_once_per_node(tiny_config, tmp_path):
    cfg = tiny_config("tm", name="hash_once")
    out = tmp_path / "hash"
    proc = run_deepspeed(REPO / "tests/dist_scripts/fingerprint_once.py",
                         ["--config", str(cfg), "--out", str(out)], nproc=2, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert got[0]["hashed"] >= 1 and got[1]["hashed"] == 0  # local rank 0 reads the weights
    assert got[0]["fingerprint"] == got[1]["fingerprint"]


def test_the_8b_recipe_keeps_few_task_end_checkpoints():
    """15 task ends of ~100 GB each (weights, fp32 master, Adam moments) would be 1.5 TB."""
    recipe = yaml.safe_load((REPO / "configs/llama3.1-8b-long15.yaml").read_text())
    keep = recipe.get("checkpoint", {}).get("keep_task_ends", 0)
    assert 1 <= keep <= 2, keep


@pytest.mark.parametrize("declared, want", [(None, "float32"), ("bfloat16", "bfloat16"),
                                            ("float32", "float32")])
def test_lm_eval_loads_an_export_in_its_dtype(tiny_paths, tmp_path, declared, want):
    from gere_ds.commands.lm_eval import export_dtype

    folder = tmp_path / "export"
    shutil.copytree(tiny_paths["model"], folder)
    conf = json.loads((folder / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):
        conf.pop(key, None)
    if declared:
        conf["dtype"] = declared
    (folder / "config.json").write_text(json.dumps(conf))
    assert export_dtype(str(folder)) == want
