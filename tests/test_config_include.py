"""`base:` includes (relative to the including file, cycles refused) and `--print-config`."""
from __future__ import annotations

from pathlib import Path

import pytest

from gere_ds.config.loading import load_config
from gere_ds.errors import InputError

REPO = Path(__file__).resolve().parents[1]
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
  weight: 100
train:
  lr: 1.0e-5
"""


def test_base_is_relative_to_the_including_file_and_merged_under_it(tmp_path):
    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "base.yaml").write_text(BASE)
    (tmp_path / "mid.yaml").write_text("base: common/base.yaml\ntrain:\n  epochs: 1\n")
    (tmp_path / "rows").mkdir()
    row = tmp_path / "rows" / "row.yaml"
    row.write_text("base: ../mid.yaml\nreplay:\n  weight: dy\n")
    cfg = load_config(row, ["train.seed=7"])
    assert cfg.replay.weight == "dy" and cfg.replay.strategy == "tm"  # mapping merged
    assert cfg.train.epochs == 1 and cfg.train.lr == 1e-5 and cfg.train.seed == 7
    assert cfg.tasks[0].name == "a"


def test_an_error_in_a_base_names_the_base_file_and_line(tmp_path):
    (tmp_path / "base.yaml").write_text(BASE.replace("strategy: tm", "stratgy: tm"))
    row = tmp_path / "row.yaml"
    row.write_text("base: base.yaml\noutput_dir: runs/y\n")
    with pytest.raises(InputError) as err:
        load_config(row)
    assert str(err.value).startswith(f"{tmp_path / 'base.yaml'}:9: replay.stratgy: unknown key")


def test_cycles_and_missing_bases_are_one_line(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(InputError) as err:
        load_config(tmp_path / "a.yaml")
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"{tmp_path / 'b.yaml'}:1: base: configs include "
                                                f"each other: ")
    (tmp_path / "c.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(InputError, match=r"c.yaml:1: base: base config .*nowhere.yaml not found"):
        load_config(tmp_path / "c.yaml")


def test_ablation_presets_hold_only_what_differs(monkeypatch):
    monkeypatch.chdir(REPO)
    for path in (REPO / "configs" / "ablation").glob("*.yaml"):
        if path.name == "base.yaml":
            continue
        keys = [ln for ln in path.read_text().splitlines() if ln and not ln.startswith("#")]
        assert keys[0] == "base: base.yaml" and len(keys) <= 6, path
        load_config(path)


def test_print_config_is_documented_yaml_that_loads_back(tmp_path, capsys):
    import yaml

    from gere_ds.commands.train import main
    from gere_ds.config.sections import RunConfig

    (tmp_path / "c.yaml").write_text(BASE)
    assert main(["--config", str(tmp_path / "c.yaml"), "--print-config", "train.lr=2e-5"]) == 0
    out = capsys.readouterr().out
    assert "lr: 2.0e-05  # peak learning rate (AdamW)" in out
    assert "  - name: a  # short task name" in out
    assert "deepspeed: auto  # DeepSpeed JSON config" in out
    (tmp_path / "printed.yaml").write_text(out)
    again = load_config(tmp_path / "printed.yaml")
    assert again == load_config(tmp_path / "c.yaml", ["train.lr=2e-5"])
    import dataclasses

    docs = [f for f in dataclasses.fields(RunConfig)]
    assert all(f"{f.name}:" in out for f in docs)
    assert isinstance(yaml.safe_load(out), dict)
