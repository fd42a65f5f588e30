"""The strategies across ranks and the ablation presets: every preset row completes a 2-rank
tiny run; the ablation runner; kl_topk larger than the vocabulary stops before training. Real DeepSpeed launches (slow), except the
check that the preset files are the base plus their row's overrides."""
from __future__ import annotations

import glob
import importlib.util
import json
from pathlib import Path

import pytest

from conftest import REPO, free_port, run_deepspeed, run_python

ABLATION = REPO / "configs" / "ablation"


def _ablation_module():
    spec = importlib.util.spec_from_file_location("run_ablation",
                                                  REPO / "launch" / "run_ablation.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _steps(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_steps.jsonl").read_text().splitlines()]


def test_presets_are_the_base_plus_their_row(monkeypatch):
    """configs/ablation/<row>.yaml == base.yaml + the row's overrides (regenerate them with
    `python launch/run_ablation.py --write-presets configs/ablation` after editing the base)."""
    from gere_ds.config.loading import load_config
    from gere_ds.strategies import STRATEGIES, term_strategies

    monkeypatch.chdir(REPO)
    rows = _ablation_module().ROWS
    assert {p.stem for p in ABLATION.glob("*.yaml")} == set(rows) | {"base"}
    # each strategy without a term once, each with a term at three weights (the registry's)
    plain = [name for name, cls in STRATEGIES.items() if not cls.has_term]
    assert plain and len(rows) == len(plain) + 3 * len(term_strategies())
    for row, overrides in rows.items():
        preset = load_config(ABLATION / f"{row}.yaml")
        want = load_config(ABLATION / "base.yaml",
                           overrides + [f"output_dir=runs/ablation/{row}"])
        assert preset.to_dict() == want.to_dict(), row
        assert preset.model == "assets/models/smollm2-135m-instruct"
        assert all(t.train.startswith("assets/data/") for t in preset.tasks)
        assert preset.replay.teacher_cache == "runs/ablation/teacher"
    strategies = {(load_config(ABLATION / f"{r}.yaml").replay.strategy,
                   load_config(ABLATION / f"{r}.yaml").replay.weight) for r in rows}
    assert {(s, 100.0) for s in plain} <= strategies
    for s in term_strategies():
        assert {(s, 1.0), (s, 100.0), (s, "dy")} <= strategies


def test_runner_dry_run_prints_one_command_per_row():
    proc = run_python(["launch/run_ablation.py", "--dry-run", "--num_gpus", "4",
                       "--rows", "none,replay_kl_w100", "train.max_steps_per_task=3"])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2
    assert "--num_gpus 4" in lines[1] and "launch/train.py --config configs/ablation/base.yaml" \
        in lines[1]
    assert lines[1].endswith("replay.strategy=kl replay.weight=100 "
                             "output_dir=runs/ablation/replay_kl_w100 "
                             "replay.teacher_cache=runs/ablation/teacher "
                             "train.max_steps_per_task=3")
    bad = run_python(["launch/run_ablation.py", "--rows", "replay_kl_w7"])
    assert bad.returncode != 0 and "unknown row(s) replay_kl_w7" in bad.stderr


@pytest.mark.slow
def test_every_ablation_row_completes_a_two_rank_tiny_run(tiny_config, tmp_path):
    """Every row, each the tiny config with the preset's strategy and weight (the presets
    themselves point at the demo model), 2 optimizer steps per task, one launch."""
    from gere_ds.config.loading import load_config

    rows = list(_ablation_module().ROWS)
    results = tmp_path / "ablation"
    cfg = tiny_config("tm", name="abl")
    proc = run_deepspeed(REPO / "tests/dist_scripts/ablation_rows.py",
                         ["--config", str(cfg), "--results", str(results), "--rows",
                          ",".join(rows), "train.max_steps_per_task=2", "eval.enabled=false"],
                         nproc=2, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for row in rows:
        assert f"ROW {row} rc=0" in proc.stdout
        preset = load_config(ABLATION / f"{row}.yaml").replay
        run = results / row
        assert (run / "checkpoints" / "latest").read_text().strip() == "task002-end", row
        steps = _steps(run)
        assert len(steps) == 4, row
        resolved = load_config(run / "config.yaml").replay
        s = preset.strategy
        assert resolved.strategy == s, row
        if s in ("kl", "l1", "l2", "tm"):  # none / replay have no weighted term
            assert resolved.weight == preset.weight, row
        if s in ("kl", "l1", "l2", "tm"):
            assert all(f"train/{s}" in st for st in steps), row
            # a dy weight is logged only where a replay row had a non-zero term
            assert all(f"train/{s}_weight" in st for st in steps if st[f"train/{s}"] > 0), row
            assert any(st[f"train/{s}"] > 0 for st in steps[1:]), row
            if preset.weight != "dy":  # a fixed weight on every step that had replay rows
                assert all(st.get(f"train/{s}_weight") == preset.weight for st in steps
                           if st["train/replay_ce"] > 0), row
        if s == "none":
            assert all(st["train/replay_ce"] == 0 for st in steps)
        log = (run / "train.log").read_text()
        if s in ("kl", "l1", "l2", "tm"):
            # the w = 1 row computes the teacher data; w = 100 and dy reuse it
            want = "teacher pass: computing" if row.endswith("_w1") else "teacher cache reused"
            assert want in log, (row, log[-2000:])
    # one teacher folder per strategy (l1 and l2 keep the same features under their own
    # fingerprints), each with one folder per rank
    folders = sorted((results / "teacher").glob("*/rank*-of-00002"))
    assert len(folders) == 8
    kinds = sorted(json.loads((f / "manifest.json").read_text())["kind"] for f in folders)
    assert kinds == ["features"] * 4 + ["states"] * 2 + ["topk"] * 2


@pytest.mark.slow
def test_run_ablation_runs_rows_into_one_folder_and_skips_done_rows(tiny_config, tmp_path):
    results = tmp_path / "results"
    cfg = tiny_config("tm", name="runner")
    port = free_port()
    args = ["launch/run_ablation.py", "--base", str(cfg), "--results", str(results),
            "--num_gpus", "2", "--launcher-args", f"--master_port {port}",
            "--rows", "replay_l2_wdy", "train.max_steps_per_task=2"]
    try:
        proc = run_python(args, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        status = json.loads((results / "ablation.json").read_text())
        assert status["replay_l2_wdy"]["status"] == "done"
        run = results / "replay_l2_wdy"
        assert (run / "metrics.json").is_file()  # the run evaluated (tiny config: eval on)
        assert (results / "compare.md").is_file()  # every selected row has metrics
        assert any("train/l2_weight" in st for st in _steps(run))  # dy: where the term is > 0
        assert (results / "replay_l2_wdy.launch.log").is_file()
        again = run_python(args, timeout=300)
        assert again.returncode == 0 and "done before, skipped" in again.stdout
    finally:
        for f in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"):  # ours only
            Path(f).unlink(missing_ok=True)


def test_kl_topk_larger_than_the_vocabulary_stops_before_training(tiny_config, tmp_path):
    cfg = tiny_config("kl", name="bigk")  # checked from config.json, before the model loads
    proc = run_python(["launch/train.py", "--config", str(cfg), "replay.kl_topk=60000"])
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "replay.kl_topk: kl_topk=60000 is larger than the model's vocabulary" in lines[0]
    run = tmp_path / "run_bigk"
    assert not (run / "checkpoints").exists() and not (run / "teacher").exists()
