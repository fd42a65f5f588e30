"""Hugging Face export: verification of saved folders, the CLI from a ZeRO-3 checkpoint and the
in-run export from a live engine, both compared with the engine's own logits.

The slow tests share two DeepSpeed launches (module fixture): one 2-rank ZeRO-3 training run of
launch/train.py on the tiny config, and one 2-rank script that loads its task-2 checkpoint into an
engine, saves the engine's logits and runs `export_from_engine`.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import REPO, run_deepspeed, run_python
from gere_ds.model.export import (ExportError, checkpoint_problem, export_checkpoint, gather_units,
                                  export_from_engine, find_checkpoint, inspect_export,
                                  verify_export)

ATOL = 1e-5
BROKEN_TENSOR = "model.layers.1.mlp.up_proj.weight"


def _logits(folder: Path, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder))
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.float()


def _break(src: Path, dst: Path, how: str) -> Path:
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    if how == "empty":  # what a ZeRO-3 save without gathering writes: the (0,) placeholder
        sd[BROKEN_TENSOR] = torch.empty(0)
    elif how == "drop":
        del sd[BROKEN_TENSOR]
    elif how == "shape":
        sd[BROKEN_TENSOR] = sd[BROKEN_TENSOR][:-1].clone()
    elif how == "extra":
        sd["model.layers.9.mlp.up_proj.weight"] = torch.zeros(3)
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


# ---------------------------------------------------------------------------- fast: verification
def test_verify_accepts_a_save_pretrained_folder(tiny_paths):
    info = inspect_export(tiny_paths["model"])
    # 2-layer Llama, hidden 64, tied embeddings counted once
    assert info["parameters"] == 3_290_496 and info["tensors"] == 20
    verify_export(tiny_paths["model"])


@pytest.mark.parametrize("how,needle", [
    ("empty", f"tensor {BROKEN_TENSOR} has shape (0,), expected (128, 64) - empty weights"),
    ("drop", f"tensor {BROKEN_TENSOR} missing (expected shape (128, 64))"),
    ("shape", f"tensor {BROKEN_TENSOR} has shape (127, 64), expected (128, 64)"),
    ("extra", "unexpected tensor model.layers.9.mlp.up_proj.weight with shape (3,)"),
])
def test_verify_catches_a_broken_export(tiny_paths, tmp_path, how, needle):
    folder = _break(Path(tiny_paths["model"]), tmp_path / how, how)
    with pytest.raises(ExportError) as err:
        verify_export(folder)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_verify_cli_one_error_line(tiny_paths, tmp_path):
    folder = _break(Path(tiny_paths["model"]), tmp_path / "broken", "empty")
    proc = run_python(["launch/export.py", "--verify", str(folder)])
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and BROKEN_TENSOR in lines[0], proc.stderr[-2000:]


def test_verify_sharded_folder(tiny_paths, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_paths["model"])
    model.save_pretrained(tmp_path / "sharded", max_shard_size="2MB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    verify_export(tmp_path / "sharded")
    (tmp_path / "sharded" / shards[-1]).unlink()
    with pytest.raises(ExportError, match="weight file named by the index is missing"):
        verify_export(tmp_path / "sharded")


def test_export_from_a_plain_module_in_one_process(tiny_paths, tmp_path):
    """No DeepSpeed, no process group: the in-run export degrades to a plain save + check."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_paths["model"])
    model.config.use_cache = False  # as the trainer sets it
    tok = AutoTokenizer.from_pretrained(tiny_paths["model"])
    ids = torch.tensor([[5, 17, 300, 2, 9]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    ticks: list[int] = []
    info = export_from_engine(model, tok, tmp_path / "hf", progress=ticks.append)
    assert info["via"] == "engine" and info["parameters"] == 3_290_496
    assert sum(ticks) == gather_units(model) > 0  # the export's progress bar ends full
    assert model.config.use_cache is False  # restored
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["use_cache"] is True
    assert torch.equal(_logits(tmp_path / "hf", ids, mask), want)
    assert not list(tmp_path.glob(".hf.export-*"))


def _fake_run(tiny_paths, tmp_path: Path, markers: bool) -> Path:
    """A run directory whose task-1 checkpoint has its files' names but no markers, or markers
    of which rank 1's vouches for a longer file than there is (truncated)."""
    from gere_assets.tiny import tiny_config_dict
    from gere_ds.checkpointing.checkpoint import run_identity
    from gere_ds.checkpointing.checkpoint_marker import write_marker
    from gere_ds.config.loading import load_config

    run = tmp_path / "run"
    folder = run / "checkpoints" / "task001-end"
    folder.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(tiny_config_dict(tiny_paths, str(run))))
    state = json.dumps({"world_size": 2})
    (folder / "trainer_state.json").write_text(state)
    for r in range(2):
        (folder / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"x" * 99)
    if markers:
        ident = run_identity(load_config(run / "config.yaml"))
        for r in range(2):
            write_marker(folder, r, run=ident, tag=folder.name, seq=1, parent=None, world_size=2)
        (folder / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"x" * 10)
    return run


def test_incomplete_checkpoint_is_refused(tiny_paths, tmp_path):
    run = _fake_run(tiny_paths, tmp_path, markers=False)
    out = tmp_path / "hf"
    proc = run_python(["launch/export.py", str(run), "--task", "1", "--out", str(out)])
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "refusing to export this checkpoint: incomplete: no COMPLETE marker" in lines[0]
    assert not out.exists() and not list(tmp_path.glob(".hf.export-*"))
    with pytest.raises(ExportError, match="no complete end-of-task checkpoint"):
        find_checkpoint(run, log=lambda msg: None)  # the default skips it, and finds nothing


def test_truncated_checkpoint_is_refused(tiny_paths, tmp_path):
    run = _fake_run(tiny_paths, tmp_path, markers=True)
    folder = run / "checkpoints" / "task001-end"
    assert checkpoint_problem(folder) == \
        "zero_pp_rank_1_mp_rank_00_optim_states.pt truncated (10 of 99 bytes)"
    with pytest.raises(ExportError, match="refusing to export this checkpoint: .* truncated"):
        export_checkpoint(run, tmp_path / "hf", task=1)
    with pytest.raises(ExportError, match="give --task or --tag, not both"):
        find_checkpoint(run, task=1, tag="task001-end")
    with pytest.raises(ExportError, match=r"no checkpoint 'task003-end' \(task-end checkpoints "
                                          r"here: task001-end\)"):
        find_checkpoint(run, task=3)


# ---------------------------------------------------------------------------- slow: real runs
@pytest.fixture(scope="module")
def trained(tiny_paths, tmp_path_factory):
    """A 2-rank ZeRO-3 run (replay, fp32, 2 steps per task) + the engine's logits and in-run
    export from its task-2 checkpoint: the module's only two DeepSpeed launches."""
    from gere_assets.tiny import tiny_config_dict

    base = tmp_path_factory.mktemp("export")
    cfg = tiny_config_dict(tiny_paths, str(base / "run"), "replay")
    cfg["train"].update(bf16=False, max_steps_per_task=2)
    cfg["eval"] = {"enabled": False}
    cfg_path = base / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    proc = run_deepspeed(REPO / "launch/train.py", ["--config", str(cfg_path)], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = base / "run"
    proc = run_deepspeed(REPO / "tests/dist_scripts/export_logits.py",
                         ["--config", str(run / "config.yaml"), "--tag", "task002-end",
                          "--out", str(base / "engine.pt"), "--export-dir", str(base / "inrun")],
                         nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    engine = torch.load(base / "engine.pt", weights_only=False)
    return SimpleNamespace(base=base, run=run, engine=engine, inrun=base / "inrun")


@pytest.mark.slow
def test_cli_export_gives_the_engine_logits(trained, tiny_paths):
    out = trained.base / "hf_cli"
    proc = run_python(["launch/export.py", str(trained.run), "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"export: wrote {out}" in proc.stdout
    info = json.loads((out / "export_info.json").read_text())
    assert info["tag"] == "task002-end" and info["dtype"] == "float32"  # last task, config dtype
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    e = trained.engine
    got = _logits(out, e["input_ids"], e["attention_mask"])
    diff = (got - e["logits"]).abs().max().item()
    print(f"CLI export vs engine: max |logits diff| = {diff:.3g}")
    assert diff <= ATOL
    # the weights are the trained ones, not the base model's
    base = _logits(Path(tiny_paths["model"]), e["input_ids"], e["attention_mask"])
    assert (base - e["logits"]).abs().max() > 1e-2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.eos_token == "<|endoftext|>"


@pytest.mark.slow
def test_in_run_export_gives_the_engine_logits(trained):
    e = trained.engine
    assert torch.equal(e["logits_after_export"], e["logits"])  # the export left the engine alone
    assert e["info"]["via"] == "engine" and e["info"]["world_size"] == 2
    verify_export(trained.inrun)
    got = _logits(trained.inrun, e["input_ids"], e["attention_mask"])
    diff = (got - e["logits"]).abs().max().item()
    print(f"in-run export vs engine: max |logits diff| = {diff:.3g}")
    assert diff <= ATOL


@pytest.mark.slow
def test_task_dtype_and_existing_destination(trained, monkeypatch):
    out = trained.base / "hf_task1"
    info = export_checkpoint(trained.run, out, task=1, dtype="bfloat16", log=lambda m: None)
    assert info["tag"] == "task001-end" and info["dtypes"] == ["BF16"]
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    stamp = (out / "export_info.json").read_text()
    with pytest.raises(ExportError, match="destination folder exists; pass --force"):
        export_checkpoint(trained.run, out, task=2, log=lambda m: None)
    assert (out / "export_info.json").read_text() == stamp  # untouched
    # a failure after writing (here: the check) leaves the old folder and no temp folder
    import gere_ds.model.export as ex

    def fail(folder, trust_remote_code=False):
        raise ExportError("tensor x missing", file=str(folder))

    monkeypatch.setattr(ex, "inspect_export", fail)
    with pytest.raises(ExportError, match="tensor x missing"):
        export_checkpoint(trained.run, out, task=2, force=True, log=lambda m: None)
    assert (out / "export_info.json").read_text() == stamp
    assert not list(trained.base.glob(".hf_task1.export-*"))
    monkeypatch.undo()
    info = export_checkpoint(trained.run, out, task=2, force=True, log=lambda m: None)
    assert info["tag"] == "task002-end" and info["dtypes"] == ["F32"]
    e = trained.engine
    assert (_logits(out, e["input_ids"], e["attention_mask"]) - e["logits"]).abs().max() <= ATOL


@pytest.mark.slow
def test_incomplete_newest_checkpoint_is_skipped_or_refused(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained.run, run, ignore=shutil.ignore_patterns("tensorboard", "teacher"))
    (run / "checkpoints" / "task002-end" / "COMPLETE.rank00001").unlink()
    with pytest.raises(ExportError, match="refusing to export this checkpoint: incomplete: no "
                                          "COMPLETE marker of rank 1 of 2"):
        export_checkpoint(run, tmp_path / "hf", task=2)
    logs: list[str] = []
    assert find_checkpoint(run, log=logs.append)[1] == "task001-end"
    assert len(logs) == 1 and "skipping checkpoint" in logs[0] and "task002-end" in logs[0]
    assert not (tmp_path / "hf").exists()


def test_stale_export_temp_folders_of_dead_processes_are_removed(tmp_path):
    """A killed export leaves a full-size hidden temp folder: the next export removes those of
    dead processes on this host, never a live one's (or another host's)."""
    import socket
    import subprocess
    import sys

    from gere_ds.model.export import clean_stale_temps

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    host = socket.gethostname()
    names = {"no_owner": f".hf.export-tmp-{dead_pid}",
             "dead": f".hf.export-tmp-{dead_pid}@{host}",
             "dead_old": f".hf.export-old-{dead_pid}@{host}",
             "live": f".hf.export-tmp-{os.getppid()}@{host}",
             "other_host": f".hf.export-tmp-{dead_pid}@elsewhere",
             "not_ours": ".hf.something-else"}
    for name in names.values():
        (tmp_path / name).mkdir()
    gone = clean_stale_temps(tmp_path)
    assert sorted(p.name for p in gone) == sorted(names[k] for k in ("dead", "dead_old"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        names[k] for k in ("no_owner", "live", "other_host", "not_ours"))
