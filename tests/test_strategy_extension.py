"""A strategy is one class plus one registry line: tests/cosine_strategy.py defines two outside
gere_ds (a feature-cosine term with its own kind of teacher data, and a term without any
teacher), and they load from a config, are asked by the step, log their own statistics, and
(slow) train on 2 ranks with the real launcher, through a crash, a resume and the teacher cache.
"""
from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest
import torch

import cosine_strategy
from conftest import REPO, run_deepspeed, step_losses
from gere_ds.config.loading import load_config
from gere_ds.config.sections import ReplayConfig, RunConfig, TaskConfig
from gere_ds.data.collate import MicroBatch
from gere_ds.errors import InputError
from gere_ds.strategies import STRATEGIES, register, term_strategies
from gere_ds.training.losses import reduce_rows
from gere_ds.training.step import StepStats, TrainStep

B, T, V, D = 3, 5, 7, 4


@pytest.fixture(autouse=True)
def registered():
    """cosine and decay registered for one test only: the registry is the process's."""
    before = dict(STRATEGIES)
    register(cosine_strategy.FeatureCosine)
    register(cosine_strategy.ActivationDecay)
    yield
    STRATEGIES.clear()
    STRATEGIES.update(before)


def test_registered_strategies_are_config_values(tiny_config):
    assert STRATEGIES["cosine"] is cosine_strategy.FeatureCosine
    assert {"cosine", "decay"} <= set(term_strategies())
    cfg = load_config(tiny_config("cosine"))
    assert cfg.replay.strategy == "cosine"
    with pytest.raises(InputError) as err:
        load_config(tiny_config("cosine"), ["replay.strategy=cosin"])
    assert "unknown strategy 'cosin' (did you mean 'cosine'?)" in str(err.value)
    assert cfg.replay.options == {}


@pytest.mark.parametrize("yaml_line,needle", [
    ("    aligned: 2", r"c\.yaml:\d+: replay\.options\.aligned: a cosine in \(0, 1\], got 2$"),
    ("    algned: 0.9", r"c\.yaml:\d+: replay\.options\.algned: unknown key \(did you mean "
                      r"'aligned'\?\)$"),
])
def test_a_registered_strategy_checks_its_own_settings(tiny_config, tmp_path, yaml_line, needle):
    """Its keys of replay.options, checked by the strategy, one line naming file, line and key;
    a key no registered strategy reads is refused."""
    text = tiny_config("cosine").read_text()
    ok = tmp_path / "ok.yaml"
    ok.write_text(text.replace("replay:\n", "replay:\n  options:\n    aligned: 0.5\n", 1))
    assert load_config(ok).replay.options == {"aligned": 0.5}
    assert STRATEGIES["cosine"](load_config(ok).replay).aligned == 0.5
    bad = tmp_path / "c.yaml"
    bad.write_text(text.replace("replay:\n", f"replay:\n  options:\n{yaml_line}\n", 1))
    with pytest.raises(InputError) as err:
        load_config(bad)
    assert re.search(needle, str(err.value)), str(err.value)
    with pytest.raises(InputError, match="<command line>: replay.options.aligned: a cosine"):
        load_config(ok, ["replay.options.aligned=0"])


def test_another_strategy_with_its_name_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register(type("Other", (cosine_strategy.ActivationDecay,), {}))


def test_teacher_settings_are_the_specs_and_a_teacher_free_term_has_none():
    cosine = STRATEGIES["cosine"](ReplayConfig(strategy="cosine"))
    assert cosine.teacher_kind == "unit_features" and cosine.needs_teacher
    assert cosine.teacher_settings() == {"unit_dtype": "float16"}
    decay = STRATEGIES["decay"](ReplayConfig(strategy="decay"))
    assert decay.teacher_spec() is None and not decay.needs_teacher
    assert decay.teacher_settings() == {}


def _batch() -> tuple[MicroBatch, list[int], torch.Tensor, torch.Tensor]:
    """Row 0 a task row, rows 1 and 2 replay samples 10 and 11 (row 2 padded after 3 tokens)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[2, 3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :3] = -100  # the task row's prompt
    replay_ids = [-1, 10, 11]
    mb = MicroBatch(ids, mask, labels, torch.tensor(replay_ids))
    return mb, replay_ids, torch.randn(B, T, V, generator=g), torch.randn(B, T, D, generator=g)


def _cfg(strategy: str) -> RunConfig:
    cfg = RunConfig(model="m", output_dir="o", tasks=[TaskConfig(name="t", train="x")],
                    replay=ReplayConfig(strategy=strategy, weight=2.0))
    cfg.train.micro_batch_size, cfg.train.grad_accum = B, 1
    return cfg


def _step(strategy: str, teacher=None) -> tuple[TrainStep, object]:
    cfg = _cfg(strategy)
    term = STRATEGIES[strategy](cfg.replay, bf16=False)
    if teacher is not None:
        term.attach(teacher)
    return TrainStep(cfg, None, None, None, term, world=1), term


def test_a_term_without_teacher_data_is_asked_by_the_step():
    mb, replay_ids, logits, hidden = _batch()
    step, term = _step("decay")
    terms = step.row_terms(logits, hidden, mb, replay_ids)
    mask = mb.attention_mask.float()[..., None]
    want = ((hidden * hidden) * mask).sum((1, 2)) / (mask.sum((1, 2)) * D)
    assert terms.reg_sum[0] == 0 and terms.reg_count[0] == 0  # the task row
    assert torch.allclose(terms.reg_sum[1:] / terms.reg_count[1:], want[1:])
    stats = StepStats()
    stats.add(reduce_rows(terms, "row", 2.0, B, 1))
    logged = term.log_values(stats.reduce())
    assert logged["train/decay"] == pytest.approx(float(want[1:].mean()), rel=1e-6)
    assert logged["train/decay_weight"] == 2.0


def test_a_terms_own_statistics_reach_its_log_values():
    """With the student's own features as the teacher every real token is aligned: the logged
    'aligned' is the mean over replay rows of their real tokens, the term 0."""
    mb, replay_ids, logits, hidden = _batch()

    class Unit:
        def batch(self, sample_ids, width):
            rows = [1 + sample_ids.index(s) for s in (10, 11) if s in sample_ids]
            return torch.nn.functional.normalize(hidden[rows, :width], dim=-1)

    step, term = _step("cosine", Unit())
    terms = step.row_terms(logits, hidden, mb, replay_ids)
    assert list(terms.logged) == ["aligned"] and terms.logged["aligned"].tolist() == [0, 5, 3]
    loss = reduce_rows(terms, "row", 2.0, B, 1)
    assert loss.logged == ("aligned",) and loss.stats.shape[0] == 14
    stats = StepStats()
    stats.add(loss)
    logged = term.log_values(stats.reduce())
    assert logged["train/cosine_aligned"] == 4.0
    assert logged["train/cosine"] == pytest.approx(0.0, abs=1e-6)
    # a micro-batch without replay rows carries the same statistics, at zero
    none = step.row_terms(logits[:1], hidden[:1], MicroBatch(
        mb.input_ids[:1], mb.attention_mask[:1], mb.labels[:1], torch.tensor([-1])), [-1])
    assert list(none.logged) == ["aligned"] and none.logged["aligned"].tolist() == [0]


# ----------------------------------------------------------------------------- 2 ranks


def _launch(cfg: Path, kill_at: str = "") -> object:
    # tests/ on the path: the script imports the strategy module from there
    path = os.pathsep.join([str(REPO), str(REPO / "tests")])
    return run_deepspeed(REPO / "tests/dist_scripts/extension_train.py", ["--config", str(cfg)],
                         env={"GERE_DS_KILL_AT": kill_at, "PYTHONPATH": path})  # "": no crash


@pytest.mark.slow
def test_a_strategy_defined_in_a_test_trains_resumes_and_reuses_its_teacher_cache(tiny_config,
                                                                                   tmp_path):
    """cosine on 2 ranks: an uninterrupted run; a second run, killed after its first
    checkpoint, reuses the first run's teacher cache, and its relaunch resumes and ends with
    the uninterrupted run's per-step losses."""
    cache = tmp_path / "cache"

    def config(name: str) -> Path:
        return tiny_config("cosine", name=name, eval={"enabled": False},
                           replay={"per_batch": 1, "teacher_cache": str(cache)},
                           train={"max_steps_per_task": 2},
                           checkpoint={"every_steps": 1, "keep_last": 2})

    ref_cfg, cut_cfg = config("ref"), config("cut")
    done = _launch(ref_cfg)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ref = ref_cfg.parent / "run_ref"
    log = (ref / "train.log").read_text()
    assert "teacher pass: computing unit_features" in log
    manifests = sorted(cache.glob("*/rank*-of-00002/manifest.json"))
    assert len(manifests) == 2
    for m in manifests:
        manifest = json.loads(m.read_text())
        assert manifest["kind"] == "unit_features" and "unit.bin" in manifest["files"]
        assert manifest["settings"]["strategy"] == "cosine"
    steps = [json.loads(x) for x in (ref / "train_steps.jsonl").read_text().splitlines()]
    assert len(steps) == 4 and all("train/cosine_aligned" in s for s in steps)
    assert any(s["train/cosine"] > 0 for s in steps)  # the student moves off its teacher

    cut = _launch(cut_cfg, "a micro-step:5")  # task 1's step 2 is micro-steps 3 and 4
    assert cut.returncode == -signal.SIGKILL, cut.stdout[-3000:] + cut.stderr[-3000:]
    run = cut_cfg.parent / "run_cut"
    assert "teacher cache reused" in (run / "train.log").read_text()
    last = _launch(cut_cfg)
    assert last.returncode == 0, last.stdout[-3000:] + last.stderr[-3000:]
    log = (run / "train.log").read_text()
    assert "resumed from" in log and "teacher pass: computing" not in log
    assert step_losses(run) == step_losses(ref)
    keys = ("train/cosine", "train/cosine_aligned")
    runs = [[json.loads(x) for x in (r / "train_steps.jsonl").read_text().splitlines()]
            for r in (ref, run)]
    assert [[s[k] for k in keys] for s in runs[0]] == [[s[k] for k in keys] for s in runs[1]]
