"""Real multi-rank DeepSpeed runs on CPU (gloo): distributed maths and the training entry point."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_deepspeed, run_python

pytestmark = pytest.mark.slow


def _steps(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_steps.jsonl").read_text().splitlines()]


def close_fp32(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    """Equal up to fp32 reduction order: the largest difference is a small fraction of the
    tensor's scale (an element-wise rtol fails on elements that are sums cancelling to ~0)."""
    scale = float(b.abs().max())
    return float((a - b).abs().max()) <= rel * max(scale, 1e-30)


def test_two_ranks_equal_one_process_on_the_global_batch(tiny_config, tmp_path):
    """Teacher thresholds, then for tm / kl / l1 / l2 under the per-row reduction (tm also under
    the global-micro-batch one), w = 100 and dy: one optimizer step of 2 micro-steps, its logged
    values and every parameter gradient, 2 ranks x 2 rows == 1 process x 4 rows (fp32), with the
    rows padded or packed (train.packing), the LM head whole or in chunks (train.chunked_ce)."""
    results = {}
    # (ranks, variant): packed rows (train.packing) and the chunked head (train.chunked_ce)
    # must give the plain path's numbers too
    layouts = ((2, ""), (1, ""), (2, "packing"), (2, "chunked_ce"))
    for n, variant in layouts:
        name = f"eq{n}{'_' + variant if variant else ''}"
        cfg = tiny_config("tm", name=name, train={variant: True} if variant else {})
        out = tmp_path / f"{name}.pt"
        proc = run_deepspeed(REPO / "tests/dist_scripts/equivalence.py",
                             ["--config", str(cfg), "--out", str(out)], nproc=n)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[n, variant] = torch.load(out, weights_only=True)
    one = results[1, ""]
    flags = ("thresholds", "packed", "chunked")
    modes = [k for k in one if k not in flags]
    assert len(modes) == 10
    assert [(bool(results[k]["packed"]), bool(results[k]["chunked"])) for k in layouts] == \
        [(False, False), (False, False), (True, False), (False, True)]
    for two in (results[2, ""], results[2, "packing"], results[2, "chunked_ce"]):
        # replay count 9 is not divisible by 2: shards of 5 and 4, padded with a dummy forward
        assert torch.allclose(two["thresholds"], one["thresholds"], rtol=1e-5, atol=1e-6)
        assert set(modes) == {k for k in two if k not in flags}
        for mode in modes:
            a, b = two[mode], one[mode]
            assert float(b["reg"]) > 0.05, mode  # far from the trivial zero
            for key in ("loss", "task_ce", "replay_ce", "reg", "reg_weight"):
                assert close_fp32(a[key], b[key]), (mode, key, a[key], b[key])
            for name, grad in b["grads"].items():
                assert grad.abs().max() > 0, (mode, name)
                assert close_fp32(a["grads"][name], grad), (mode, name)
    # the reductions differ: per row, TM weighs 1/8 per replay row; over the global micro-batch
    # it is one ratio per micro-step
    assert not close_fp32(one["tm/row/100.0"]["loss"], one["tm/global_micro_batch/100.0"]["loss"],
                          rel=1e-3)


@pytest.mark.parametrize("strategy", ["none", "replay", "tm"])
def test_train_entry_point_two_tasks(tiny_config, strategy):
    # the replay run keeps only its newest task-end checkpoint (checkpoint.keep_task_ends)
    keep_ends = {"keep_task_ends": 1} if strategy == "replay" else {}
    cfg = tiny_config(strategy, name=strategy, replay={"per_batch": 2},
                      train={"max_steps_per_task": 6, "epochs": 3}, checkpoint=keep_ends)
    proc = run_deepspeed(REPO / "launch/train.py", ["--config", str(cfg)], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = cfg.parent / f"run_{strategy}"
    steps = _steps(run_dir)
    assert len(steps) == 12
    first_task = [s["train/loss"] for s in steps if s["task"] == 0]
    assert first_task[-1] < first_task[0]  # training loss falls
    if strategy == "tm":
        assert steps[0]["train/tm"] == 0.0 and steps[0]["train/replay_ce"] > 0
        assert any(s["train/tm"] > 0 for s in steps[1:])
        for key in ("train/tm_violation_frac", "train/tm_weight"):
            assert key in steps[0]
    if strategy == "none":
        assert all(s["train/replay_ce"] == 0 for s in steps)
    else:
        assert all(s["train/replay_ce"] > 0 for s in steps)  # per_batch=2: replay every step
    for tag in ("task001-end", "task002-end"):
        for rank in (0, 1):
            kept = tag == "task002-end" or not keep_ends
            assert (run_dir / "checkpoints" / tag / f"COMPLETE.rank{rank:05d}").is_file() == kept
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "task002-end"
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "config.yaml").is_file()
    log = (run_dir / "train.log").read_text()
    assert "no pad token: using eos" in log
    # evaluation: base model + after each task -> a 3 x 2 matrix, files and TensorBoard
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert len(metrics["matrix"]) == 3 and all(len(r) == 2 for r in metrics["matrix"])
    assert metrics["tasks"] == ["sentiment", "topic"]
    assert "| base |" in (run_dir / "metrics.md").read_text().replace("**", "")
    assert (run_dir / "accuracy_matrix.png").stat().st_size > 1000
    if strategy == "tm":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(run_dir / "tensorboard"))
        acc.Reload()
        tags = set(acc.Tags()["scalars"])
        assert {"eval/sentiment/acc", "eval/topic/acc", "eval/AP", "train/tm",
                "train/tm_violation_frac", "train/tm_weight", "train/grad_norm"} <= tags
        # the finished run's checkpoints, re-evaluated by eval/evaluate.py in one process,
        # give the matrix the run computed under ZeRO-3 on 2 ranks
        proc = run_python(["eval/evaluate.py", "--config", str(run_dir / "config.yaml"),
                           "--run", str(run_dir), "--out", str(run_dir / "re_eval")])
        assert proc.returncode == 0, proc.stderr[-3000:]
        again = json.loads((run_dir / "re_eval" / "metrics.json").read_text())
        assert again["matrix"] == metrics["matrix"]


@pytest.mark.parametrize("ds_json, mode", [("zero3.json", "rank"), ("zero2.json", "rank"),
                                           ("zero3.json", "generate"), ("zero2.json", "generate")])
def test_two_rank_evaluation_equals_one_process(tiny_config, tiny_paths, tmp_path, ds_json, mode):
    """Multi-rank evaluation under either stage of the training config, with a global batch
    that the evaluation's rank count does not give (scoring has no optimizer step); generate
    mode's ranks stop decoding together."""
    cfg = tiny_config("tm", name="evalonly", deepspeed=str(REPO / "ds_configs" / ds_json),
                      train={"global_batch": 12}, eval={"mode": mode, "max_new_tokens": 4})
    args = ["--config", str(cfg), "--model", tiny_paths["model"]]
    one = run_python(["eval/evaluate.py", *args, "--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_deepspeed(REPO / "eval/evaluate.py", [*args, "--out", str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "metrics.json").read_text())
    b = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert a["matrix"] == b["matrix"] and len(a["matrix"]) == 1


def test_non_finite_loss_skips_steps_then_aborts(tiny_config):
    cfg = tiny_config("tm", name="nan", replay={"per_batch": 2}, eval={"enabled": False},
                      train={"lr": 1e12, "warmup_steps": 0, "max_bad_steps": 2,
                             "max_steps_per_task": 8})
    proc = run_deepspeed(REPO / "launch/train.py", ["--config", str(cfg)])
    assert proc.returncode == 1
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "loss non-finite for 2 steps in a row" in errors[0]
    run_dir = cfg.parent / "run_nan"
    steps = _steps(run_dir)
    assert steps[0]["train/loss"] == steps[0]["train/loss"]  # first step finite
    assert any(s["train/loss"] != s["train/loss"] for s in steps)  # then NaN, counted
    assert "optimizer step skipped (1 in a row" in (run_dir / "train.log").read_text()


def _bad(tmp_path: Path, tiny_config, what: str) -> tuple[Path, list[str], str]:
    """A config with one bad input; returns (config, overrides, expected message part)."""
    bad = tmp_path / "bad.jsonl"
    if what == "malformed":
        bad.write_text('{"sentence": "a", "label": "positive"}\n{"sentence": oops}\n')
        return tiny_config(name=what), [f"tasks.1.train={bad}"], f"{bad}:2: invalid JSON"
    if what == "missing_field":
        bad.write_text('{"sentence": "a", "label": "positive"}\n{"label": "positive"}\n')
        return tiny_config(name=what), [f"tasks.0.train={bad}"], f"{bad}:2: sentence: missing"
    if what == "bad_label":
        bad.write_text('{"sentence": "a", "label": "neutral"}\n')
        return (tiny_config(name=what), [f"tasks.0.train={bad}"],
                f"{bad}:1: label: label 'neutral' is not one of")
    if what == "empty_task":
        bad.write_text("")
        return tiny_config(name=what), [f"tasks.0.train={bad}"], "empty sentiment train file"
    if what == "empty_replay":
        bad.write_text("")
        return tiny_config(name=what), [f"replay.data={bad}"], "empty replay file"
    if what == "no_model":
        return (tiny_config(name=what), [f"model={tmp_path / 'nowhere'}"],
                "model: model folder not found")
    if what == "unknown_key":
        return (tiny_config(name=what), ["replay.strategi=tm"],
                "replay.strategi: unknown key (did you mean 'strategy'?)")
    raise AssertionError(what)


@pytest.mark.parametrize("what", ["malformed", "missing_field", "bad_label", "empty_task",
                                  "empty_replay", "no_model", "unknown_key"])
def test_bad_input_one_line_and_nonzero_exit(tiny_config, tmp_path, what):
    cfg, overrides, needle = _bad(tmp_path, tiny_config, what)
    proc = run_python(["launch/train.py", "--config", str(cfg), *overrides])
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]
    run_dir = Path(cfg).parent / f"run_{what}"
    assert not (run_dir / "checkpoints").exists()  # nothing started


def test_bad_input_under_the_launcher_stops_both_ranks(tiny_config, tmp_path):
    cfg, overrides, needle = _bad(tmp_path, tiny_config, "bad_label")
    proc = run_deepspeed(REPO / "launch/train.py", ["--config", str(cfg), *overrides], nproc=2,
                         timeout=180)
    assert proc.returncode != 0
    assert sum(needle in ln for ln in proc.stderr.splitlines()) == 1


def test_one_process_without_a_launcher_trains(tiny_config):
    """`python launch/train.py --config X`: a world of one, no MPI discovery, no traceback."""
    cfg = tiny_config("replay", name="plain", replay={"per_batch": 2}, eval={"enabled": False},
                      train={"max_steps_per_task": 2})
    proc = run_python(["launch/train.py", "--config", str(cfg)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "mpi4py" not in proc.stderr
    steps = _steps(cfg.parent / "run_plain")
    assert len(steps) == 4 and all(s["train/loss"] == s["train/loss"] for s in steps)


@pytest.mark.parametrize("below", [False, True])
def test_output_dir_naming_a_file_is_one_line_before_any_start(tiny_config, tmp_path, below):
    taken = tmp_path / "taken.txt"
    taken.write_text("not a folder")
    out = taken / "run" if below else taken
    cfg = tiny_config("replay", name="on_file", output_dir=str(out))
    proc = run_python(["launch/train.py", "--config", str(cfg)])
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "output_dir" in lines[0] and str(taken) in lines[0]
    assert "Traceback" not in proc.stderr and taken.read_text() == "not a folder"
