"""`gere-ds lm-eval`: lm-evaluation-harness on an exported (tiny) model with a local task file,
offline; the shipped task YAMLs name existing general-suite files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def test_shipped_task_yamls_point_at_the_general_suite():
    files = sorted((REPO / "eval" / "lm_eval_tasks").glob("*.yaml"))
    assert len(files) == 5
    for path in files:
        task = yaml.safe_load(path.read_text())
        assert task["task"] == path.stem and task["output_type"] == "multiple_choice"
        data = task["dataset_kwargs"]["data_files"]["test"]
        assert data.startswith("assets/data/general_suite/") and data.endswith(".jsonl")


@pytest.mark.slow
def test_lm_eval_scores_the_tiny_model_on_a_local_task(tiny_paths, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from gere_ds.commands.lm_eval import RESULTS, main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rows = [{"context": f"Question: is {w} a colour?\nAnswer:", "choices": ["yes", "no"],
             "gold": int(w not in ("red", "blue"))} for w in ("red", "stone", "blue", "tree")]
    data = tmp_path / "tiny_cloze.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    spec = yaml.safe_load((REPO / "eval" / "lm_eval_tasks" / "gere_piqa.yaml").read_text())
    spec["task"] = "gere_tiny"
    spec["dataset_kwargs"]["data_files"]["test"] = str(data)
    (tasks / "gere_tiny.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    assert main(["--model", tiny_paths["model"], "--tasks", "gere_tiny", "--include-path",
                 str(tasks), "--out", str(out), "--batch-size", "2"]) == 0
    results = json.loads((out / RESULTS).read_text())
    metrics = results["model"]["results"]["gere_tiny"]
    assert 0.0 <= metrics["acc,none"] <= 1.0 and "acc_norm,none" in metrics
