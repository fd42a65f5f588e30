"""Config loading: typed values, dotted overrides, one-line errors with file, line and field."""
from __future__ import annotations

import json

import pytest
import yaml

from gere_ds.config.loading import load_config
from gere_ds.errors import InputError
from gere_ds.model.engine import resolve_ds_config

BASE = """\
model: m
output_dir: runs/x
tasks:
  - name: a
    train: a.jsonl
    labels: ["yes", "no"]
replay:
  data: r.jsonl
  strategy: tm
train:
  lr: 3e-6
"""


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_loads_defaults_types_and_numeric_strings(tmp_path):
    cfg = load_config(_write(tmp_path, BASE))
    assert cfg.train.lr == 3e-6  # PyYAML reads 3e-6 as a string; we take the number
    assert cfg.replay.weight == 100.0 and cfg.replay.max_len == 563
    assert cfg.tasks[0].text_field == "sentence" and cfg.tasks[0].label_field == "label"


def test_dotted_overrides(tmp_path):
    cfg = load_config(_write(tmp_path, BASE), ["train.lr=1e-5", "replay.weight=dy",
                                               "tasks.0.name=b", "replay.per_batch=2"])
    assert cfg.train.lr == 1e-5 and cfg.replay.weight == "dy"
    assert cfg.tasks[0].name == "b" and cfg.replay.per_batch == 2


def test_unknown_key_names_line_and_closest(tmp_path):
    text = BASE.replace("  strategy: tm", "  stratgy: tm")
    with pytest.raises(InputError) as err:
        load_config(_write(tmp_path, text))
    msg = str(err.value)
    assert "c.yaml:9:" in msg and "replay.stratgy" in msg and "did you mean 'strategy'" in msg


def test_unknown_override_key(tmp_path):
    with pytest.raises(InputError, match=r"<command line>.*train.lrr.*did you mean 'lr'"):
        load_config(_write(tmp_path, BASE), ["train.lrr=1"])


@pytest.mark.parametrize("line,needle", [
    ("  strategy: tmx", "unknown strategy 'tmx'"),
    ("  weight: heavy", "must be a number or 'dy'"),
    ("  max_len: many", "expected an integer"),
    ("  reduction: rows", r"c.yaml:\d+: replay.reduction: unknown reduction 'rows' \(did you mean "
                         r"'row'\?\)"),
    ("  weight: -1", r"c.yaml:\d+: replay.weight: must be >= 0"),
    ("  threshold_k: -0.5", r"c.yaml:\d+: replay.threshold_k: must be > 0"),
    ("  tm_dead_band: -1", r"c.yaml:\d+: replay.tm_dead_band: must be >= 0"),
    ("  tm_dead_band: wide", r"c.yaml:\d+: replay.tm_dead_band: must be a number >= 0, got 'wide'"),
    # the former default: one line saying what replaced it
    ("  tm_dead_band: auto", r"c.yaml:\d+: replay.tm_dead_band: 'auto' is no longer accepted: 0 "
                            r"is the reference's exact test \(the default\)"),
    # 128 bf16 units = 1 sigma: wider than half the threshold distance
    ("  tm_dead_band: 128", r"c.yaml:\d+: replay.tm_dead_band: .*would hide real violations"),
])
def test_bad_values(tmp_path, line, needle):
    text = BASE.replace("  strategy: tm", line if "strategy" in line else
                        "  strategy: tm\n" + line)
    with pytest.raises(InputError, match=needle) as err:
        load_config(_write(tmp_path, text))
    assert str(err.value).startswith(str(tmp_path / "c.yaml"))


def test_the_default_is_the_reference_exact_tm_test(tmp_path):
    assert load_config(_write(tmp_path, BASE)).replay.tm_dead_band == 0.0


def test_dead_band_bound_follows_the_compute_dtype(tmp_path):
    """The same band in rounding units is 2^16 times narrower in fp32: allowed there."""
    cfg = load_config(_write(tmp_path, BASE + "  bf16: false\n"), ["replay.tm_dead_band=1000"])
    assert cfg.replay.tm_dead_band == 1000.0
    with pytest.raises(InputError, match="<command line>: replay.tm_dead_band"):
        load_config(_write(tmp_path, BASE), ["replay.tm_dead_band=1000"])


def test_missing_required_and_invalid_yaml(tmp_path):
    with pytest.raises(InputError, match="missing required key 'model'"):
        load_config(_write(tmp_path, BASE.replace("model: m\n", "")))
    with pytest.raises(InputError, match=r"c.yaml:\d+: invalid YAML"):
        load_config(_write(tmp_path, BASE + "train: [unclosed\n"))


def test_ds_config_filled_from_run_config_or_disagreement_named(tmp_path):
    cfg = load_config(_write(tmp_path, BASE), ["train.micro_batch_size=2", "train.grad_accum=3"])
    ds = resolve_ds_config(cfg, world_size=4)
    assert ds["train_batch_size"] == 24 and ds["gradient_accumulation_steps"] == 3
    from gere_ds.model.ds_config import ds_config_path

    bad = json.loads(ds_config_path(cfg.deepspeed).read_text())
    bad["gradient_accumulation_steps"] = 5
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(bad))
    cfg.deepspeed = str(p)
    with pytest.raises(InputError, match=r"ds.json: gradient_accumulation_steps: .*5.*disagrees.*3"):
        resolve_ds_config(cfg, world_size=4)


def test_resolved_config_round_trips(tmp_path):
    from gere_ds.config.loading import save_resolved

    cfg = load_config(_write(tmp_path, BASE), ["replay.weight=dy"])
    save_resolved(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "resolved.yaml").read_text())["replay"]["weight"] == "dy"


def test_negative_checkpoint_retention_names_the_line(tmp_path):
    path = _write(tmp_path, BASE + "checkpoint:\n  keep_task_ends: -1\n")
    with pytest.raises(InputError) as err:
        load_config(path)
    assert str(err.value) == f"{path}:13: checkpoint.keep_task_ends: must be >= 0"


@pytest.mark.parametrize("extra,needle", [
    ("train:\n  lr: 3e-6\n  collective_timeout_s: 0\n", r":\d+: train.collective_timeout_s: must be > 0"),
    ("train:\n  lr: 3e-6\n  collective_timeout_s: .inf\n",
     r":\d+: train.collective_timeout_s: must be a finite number"),
    ("train:\n  lr: .nan\n", r":\d+: train.lr: must be a finite number"),
    ("train:\n  lr: 3e-6\n  max_bad_steps: 0\n", r":\d+: train.max_bad_steps: must be >= 1"),
    ("eval:\n  batch_size: 0\n", r":\d+: eval.batch_size: must be >= 1"),
    ("eval:\n  max_new_tokens: 0\n", r":\d+: eval.max_new_tokens: must be >= 1"),
    ("checkpoint:\n  every_steps: -2\n", r":\d+: checkpoint.every_steps: must be >= 0"),
])
def test_out_of_range_values_name_file_line_and_field(tmp_path, extra, needle):
    text = BASE.replace("train:\n  lr: 3e-6\n", "") + extra
    with pytest.raises(InputError, match=needle) as err:
        load_config(_write(tmp_path, text))
    assert str(err.value).startswith(str(tmp_path / "c.yaml")) and "\n" not in str(err.value)


def test_a_duplicate_key_is_an_error_naming_its_line(tmp_path):
    path = _write(tmp_path, BASE + "  lr: 1e-3\n")
    with pytest.raises(InputError) as err:
        load_config(path)
    assert str(err.value) == f"{path}:12: train.lr: duplicate key 'lr' (first on line 11)"


def test_empty_output_dir_and_text_field_equal_to_label_field(tmp_path):
    with pytest.raises(InputError, match=r"c.yaml:2: output_dir: empty"):
        load_config(_write(tmp_path, BASE.replace("output_dir: runs/x", "output_dir: ''")))
    same = BASE.replace('    labels: ["yes", "no"]\n',
                        '    labels: ["yes", "no"]\n    text_field: text\n    label_field: text\n')
    with pytest.raises(InputError, match=r"c.yaml:8: tasks.0.label_field: the same column"):
        load_config(_write(tmp_path, same))


def test_keep_last_zero_is_refused_in_one_line(tmp_path):
    """keep_last 0 would prune the checkpoint just written (even the pre-emption one)."""
    path = _write(tmp_path, BASE + "checkpoint:\n  keep_last: 0\n")
    with pytest.raises(InputError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}:13: checkpoint.keep_last: must be >= 1")
    assert "\n" not in str(err.value)
