"""`model` as a hub id, resolved offline through a cache laid out as huggingface_hub lays it out
(models--org--name/snapshots/<commit>/..., refs/main)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from conftest import run_python
from gere_ds.config.loading import load_config, save_resolved
from gere_ds.errors import InputError
from gere_ds.model.engine import check_model_folder

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def populate_cache(cache: Path, repo_id: str, folder: str) -> Path:
    """Copy a model folder into ``cache`` as the snapshot of ``repo_id`` at refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, tiny_paths, monkeypatch) -> Path:
    cache = tmp_path / "hf_home" / "hub"
    populate_cache(cache, "tiny-org/tiny-llama", tiny_paths["model"])
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_id_resolves_to_the_cached_snapshot_and_is_recorded(tiny_config, offline_cache,
                                                                 tmp_path):
    cfg = load_config(tiny_config("tm"), ["model=tiny-org/tiny-llama",
                                          "tokenizer=tiny-org/tiny-llama"])
    check_model_folder(cfg)
    snapshot = offline_cache / "models--tiny-org--tiny-llama" / "snapshots" / COMMIT
    assert Path(cfg.model) == snapshot and Path(cfg.tokenizer) == snapshot
    assert cfg.model_id == "tiny-org/tiny-llama" and cfg.tokenizer_id == "tiny-org/tiny-llama"
    check_model_folder(cfg)  # idempotent
    assert cfg.model_id == "tiny-org/tiny-llama"
    save_resolved(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["model"] == str(snapshot) and saved["model_id"] == "tiny-org/tiny-llama"
    assert load_config(tmp_path / "config.yaml") == cfg  # a resolved config reloads as is


def test_a_local_folder_is_used_as_is(tiny_config, tiny_paths, offline_cache):
    cfg = load_config(tiny_config("tm"))
    check_model_folder(cfg)
    assert cfg.model == tiny_paths["model"] and cfg.model_id == ""


def test_uncached_hub_id_offline_is_one_line_saying_how_to_fetch(tiny_config, offline_cache):
    cfg = load_config(tiny_config("tm"), ["model=tiny-org/absent"])
    with pytest.raises(InputError) as err:
        check_model_folder(cfg)
    line = str(err.value)
    assert "\n" not in line and line.startswith("model: 'tiny-org/absent' is not a local folder")
    assert "`hf download tiny-org/absent`" in line and "HF_HUB_OFFLINE=0" in line
    assert str(offline_cache) in line


@pytest.mark.slow
def test_evaluate_command_takes_a_hub_id(tiny_config, offline_cache, tmp_path):
    """The whole command in a fresh process: the id resolves through HF_HOME, offline."""
    import json
    import os

    cfg = tiny_config("tm", name="hub", eval={"max_examples": 4})
    env_home = os.environ["HF_HOME"]
    proc = run_python(["-c", "import os, sys; os.environ['HF_HOME'] = sys.argv[1]; "
                       "from gere_ds.commands.evaluate import main; "
                       "sys.exit(main(sys.argv[2:]))", env_home, "--config", str(cfg),
                       "--model", "tiny-org/tiny-llama", "--out", str(tmp_path / "ev")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert len(metrics["matrix"]) == 1
