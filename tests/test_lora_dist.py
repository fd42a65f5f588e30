"""LoRA under real 2-rank DeepSpeed ZeRO-3 runs on CPU (the tiny model, fp32): 2 ranks == 1
process at a perturbed point, TM 0 at the first step, SIGKILL + resume == uninterrupted (carry),
a resume after a merge == uninterrupted (merge), the merged export's logits == the engine's."""
from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, run_deepspeed
from test_resume import _start, _wait_for_step
from test_train_dist import close_fp32

pytestmark = pytest.mark.slow
LORA = {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}
ADAPTER_KEYS = ("lora_A", "lora_B")


def _lora(continual: str) -> dict:
    return {**LORA, "continual": continual}


def _steps(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "train_steps.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "train/tokens_per_s"} for r in rows]


def _run_config(tiny_config, name: str, continual: str, **extra) -> Path:
    return tiny_config("tm", name=name, replay={"per_batch": 2}, eval={"enabled": False},
                       train={"max_steps_per_task": 3, "epochs": 3, "lora": _lora(continual)},
                       checkpoint={"every_steps": 1, "keep_last": 10, **extra})


def test_lora_two_ranks_equal_one_process(tiny_config, tmp_path):
    """tm (row, w = 100 and dy; global_micro_batch) and kl (w = 100 and dy): one optimizer step
    of 2 micro-steps at a perturbed adapter point; logged values and every adapter gradient,
    2 ranks x 2 rows == 1 process x 4 rows."""
    results = {}
    for n in (2, 1):
        cfg = tiny_config("tm", name=f"leq{n}")
        out = tmp_path / f"leq{n}.pt"
        lora = "train.lora=" + json.dumps(_lora("carry"))
        proc = run_deepspeed(REPO / "tests/dist_scripts/equivalence.py",
                             ["--config", str(cfg), "--out", str(out), lora], nproc=n)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[n] = torch.load(out, weights_only=True)
    two, one = results[2], results[1]
    flags = ("thresholds", "packed", "chunked")
    modes = [k for k in one if k not in flags]
    assert len(modes) == 5 and set(modes) == {k for k in two if k not in flags}
    for mode in modes:
        a, b = two[mode], one[mode]
        assert float(b["reg"]) > 0.05, mode
        for key in ("loss", "task_ce", "replay_ce", "reg", "reg_weight"):
            assert close_fp32(a[key], b[key]), (mode, key, a[key], b[key])
        # the adapters only: 3 target kinds x 2 layers x (A, B)
        assert len(b["grads"]) == 12 and all(any(k in n for k in ADAPTER_KEYS)
                                             for n in b["grads"]), sorted(b["grads"])
        for name, grad in b["grads"].items():
            assert grad.abs().max() > 0, (mode, name)
            assert close_fp32(a["grads"][name], grad), (mode, name)


@pytest.fixture(scope="module")
def carry_reference(tmp_path_factory, tiny_paths):
    """The uninterrupted 2-task carry run."""
    from gere_assets.tiny import tiny_config_dict

    d = tmp_path_factory.mktemp("lora_ref")
    cfg = tiny_config_dict(tiny_paths, str(d / "run_ref"), "tm")
    cfg["replay"]["per_batch"] = 2
    cfg["eval"] = {"enabled": False}
    cfg["train"].update(max_steps_per_task=3, epochs=3, lora=_lora("carry"))
    cfg["checkpoint"] = {"every_steps": 1, "keep_last": 10}
    path = d / "ref.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = run_deepspeed(REPO / "launch/train.py", ["--config", str(path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return d / "run_ref"


def test_lora_tm_is_rounding_at_first_step_and_adapter_only_checkpoints(carry_reference):
    steps = _steps(carry_reference)
    assert len(steps) == 6
    # fresh adapters: B = 0, the student is the teacher up to fp32 rounding between the
    # teacher's and training's batch shapes, which the exact test counts
    assert steps[0]["train/tm"] < 1e-5 and steps[0]["train/replay_ce"] > 0
    assert any(s["train/tm"] > 0 for s in steps[1:])
    folder = carry_reference / "checkpoints" / "task002-end"
    state = json.loads((folder / "trainer_state.json").read_text())
    assert state["lora_continual"] == "carry" and state["lora_merged"] == 0
    # the frozen base (3.3M parameters, 13 MB in fp32) is not saved: adapters + Adam only
    assert sum(p.stat().st_size for p in folder.glob("*_states.pt")) < 200_000


def test_lora_sigkill_mid_task_then_rerun_equals_uninterrupted(carry_reference, tiny_config):
    cfg = _run_config(tiny_config, "lkilled", "carry")
    run_dir = cfg.parent / "run_lkilled"
    proc = _start(cfg)
    _wait_for_step(run_dir, proc, task=1, step=1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    again = run_deepspeed(REPO / "launch/train.py", ["--config", str(cfg)])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in (run_dir / "train.log").read_text()
    assert _steps(run_dir) == _steps(carry_reference)  # bitwise: fp32 on CPU


def _merge_run(tmp_path_factory, tiny_paths, stage: int = 3) -> Path:
    from gere_assets.tiny import tiny_config_dict

    d = tmp_path_factory.mktemp(f"lora_merge_zero{stage}")
    cfg = tiny_config_dict(tiny_paths, str(d / "run_merge"), "tm")
    cfg["deepspeed"] = str(REPO / "ds_configs" / f"zero{stage}.json")
    cfg["replay"]["per_batch"] = 2
    cfg["eval"] = {"enabled": False}
    cfg["train"].update(max_steps_per_task=3, epochs=3, lora=_lora("merge"))
    cfg["checkpoint"] = {"every_steps": 1, "keep_last": 10, "export_hf": True}
    path = d / "merge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = run_deepspeed(REPO / "launch/train.py", ["--config", str(path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return d / "run_merge"


@pytest.fixture(scope="module")
def merge_run(tmp_path_factory, tiny_paths):
    """An uninterrupted 2-task merge run with the in-run export after every task (ZeRO-3)."""
    return _merge_run(tmp_path_factory, tiny_paths)


@pytest.fixture(scope="module")
def merge_run_zero2(tmp_path_factory, tiny_paths):
    """The same under ZeRO-2 (what `deepspeed: auto` picks for adapters on a model that fits)."""
    return _merge_run(tmp_path_factory, tiny_paths, stage=2)


def test_lora_resume_after_a_merge_equals_uninterrupted(merge_run, tmp_path):
    assert (merge_run / "lora_merges" / "task001.pt").is_file()
    # the run as if killed after step 1 of task 2 (after the merge): later checkpoints gone
    copy = tmp_path / "run_merge"
    shutil.copytree(merge_run, copy)
    for tag in ("task002-step000002", "task002-end"):
        shutil.rmtree(copy / "checkpoints" / tag)
    shutil.rmtree(copy / "hf" / "task002-end")
    cfg = yaml.safe_load((copy / "config.yaml").read_text())
    cfg["output_dir"] = str(copy)
    (tmp_path / "again.yaml").write_text(yaml.safe_dump(cfg))
    proc = run_deepspeed(REPO / "launch/train.py", ["--config", str(tmp_path / "again.yaml")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in (copy / "train.log").read_text()
    ours, ref = _steps(copy), _steps(merge_run)
    assert len(ref) == 6 and ref[3]["train/tm"] > 0  # the merged base is no longer the teacher
    assert ours == ref


@pytest.mark.parametrize("stage", [3, 2])
def test_lora_merge_starts_fresh_adapters_in_the_fp32_master(stage, request, tiny_paths):
    """After the merge, task 2 starts from fresh adapters in DeepSpeed's fp32 master copy too:
    one Adam step (|change| <= lr = 3e-3) from task 2's fresh A, far (~0.1) from task 1's;
    under ZeRO-3 and ZeRO-2."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM

    from gere_ds.config.sections import LoraConfig
    from gere_ds.model.lora import add_adapters, fresh_adapter_values

    merge_run = request.getfixturevalue("merge_run" if stage == 3 else "merge_run_zero2")
    root = str(merge_run / "checkpoints")
    sd = {tag: get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)
          for tag in ("task001-end", "task002-step000001")}
    model = add_adapters(AutoModelForCausalLM.from_pretrained(tiny_paths["model"]),
                         LoraConfig(**_lora("merge")), seed=1)
    fresh = fresh_adapter_values(model, seed=1, task_index=1)
    names = [k for k in fresh if k.endswith(".A")]
    assert len(names) == 6
    for key in names:
        name = key.removesuffix(".A") + ".lora_A.default.weight"
        assert float((sd["task002-step000001"][name] - fresh[key]).abs().max()) < 4e-3, name
        assert float((sd["task001-end"][name] - fresh[key]).abs().max()) > 0.05, name


def _hf_logits(folder: Path, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.float()


def test_lora_merged_export_logits_equal_the_engines(merge_run, tmp_path):
    """task002-end of the merge run (one merge in the base + task 2's adapter): the engine's
    logits (2 ranks, ZeRO-3) == the in-script export == the in-run export == the offline
    export from the checkpoint, each a verified HF folder with its adapter/."""
    from peft import PeftModel

    from gere_ds.model.export import export_checkpoint, verify_export

    out = tmp_path / "logits.pt"
    proc = run_deepspeed(REPO / "tests/dist_scripts/export_logits.py",
                         ["--config", str(merge_run / "config.yaml"), "--tag", "task002-end",
                          "--out", str(out), "--export-dir", str(tmp_path / "hf_script")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = torch.load(out, weights_only=False)
    ids, mask, want = saved["input_ids"], saved["attention_mask"], saved["logits"]
    assert torch.equal(saved["logits_after_export"], want)
    offline = export_checkpoint(merge_run, tmp_path / "hf_offline", task=2, log=lambda m: None)
    assert offline["lora_merged_before_adapter"] == 1
    for folder in (tmp_path / "hf_script", merge_run / "hf" / "task002-end",
                   tmp_path / "hf_offline"):
        verify_export(folder)
        assert (folder / "adapter" / "adapter_model.safetensors").is_file()
        got = _hf_logits(folder, ids, mask)
        assert float((got - want).abs().max()) < 1e-4, folder
    # the adapter folder on top of the base with task 1 merged reproduces the engine too
    from transformers import AutoModelForCausalLM

    task1 = AutoModelForCausalLM.from_pretrained(str(merge_run / "hf" / "task001-end"))
    with torch.no_grad():  # task001-end export = base + task 1's adapter, merged
        peft = PeftModel.from_pretrained(task1, str(tmp_path / "hf_offline" / "adapter")).eval()
        got = peft(input_ids=ids, attention_mask=mask).logits.float()
    assert float((got - want).abs().max()) < 1e-4
