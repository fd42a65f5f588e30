"""DeepSpeed configs written for the HF Trainer: every "auto" filled or refused with one line;
`deepspeed: auto` picks the CPU or GPU config by accelerator."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, run_deepspeed
from gere_ds.config.loading import load_config
from gere_ds.errors import InputError
from gere_ds.model.ds_config import DS_CONFIG_DIR, ds_config_path, fill_ds_config, resolve_ds_config

DATA = Path(__file__).parent / "data"
HIDDEN = 64  # the tiny model's


def _cfg(tiny_config, **sections):
    return load_config(tiny_config("tm", **sections))


def _resolve(tiny_config, name: str, accelerator: str = "cpu", **sections):
    cfg = _cfg(tiny_config, **sections)
    cfg.deepspeed = str(DATA / name) if not name.startswith("/") else name
    notes: list[str] = []
    ds = resolve_ds_config(cfg, world_size=2, note=notes.append, accelerator=accelerator)
    return cfg, ds, notes


def test_hf_docs_zero3_config_is_filled_like_transformers(tiny_config):
    cfg, ds, notes = _resolve(tiny_config, "hf_docs_zero3.json")
    t = cfg.train
    zero = ds["zero_optimization"]
    assert zero["reduce_bucket_size"] == HIDDEN * HIDDEN
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * HIDDEN * HIDDEN)
    assert zero["stage3_param_persistence_threshold"] == 10 * HIDDEN
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # explicit: kept
    assert ds["train_batch_size"] == t.micro_batch_size * t.grad_accum * 2
    assert ds["train_micro_batch_size_per_gpu"] == t.micro_batch_size
    assert ds["gradient_accumulation_steps"] == t.grad_accum
    assert ds["gradient_clipping"] == t.grad_clip
    assert ds["fp16"]["enabled"] is False and ds["bf16"]["enabled"] is t.bf16
    assert ds["optimizer"]["params"] == {"lr": t.lr, "betas": list(t.adam_betas),
                                         "eps": t.adam_eps, "weight_decay": t.weight_decay}
    assert "scheduler" not in ds
    assert len(notes) == 1 and "scheduler 'WarmupLR' is not used" in notes[0]
    assert "auto" not in json.dumps(ds)


def test_hf_docs_zero2_config_is_filled(tiny_config):
    _, ds, _ = _resolve(tiny_config, "hf_docs_zero2.json", train={"bf16": True})
    assert ds["zero_optimization"]["reduce_bucket_size"] == 2e8  # explicit: kept
    assert "stage3_prefetch_bucket_size" not in ds["zero_optimization"]
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert "auto" not in json.dumps(ds)


@pytest.mark.parametrize("edit, field, words", [
    ({"fp16": {"enabled": True}}, "fp16.enabled", "fp16 training is not supported"),
    ({"amp": {"enabled": True}}, "amp.enabled", "apex amp is not supported"),
    ({"optimizer": {"type": "Lamb", "params": {}}}, "optimizer.type", "'Lamb' is not supported"),
    ({"zero_optimization": {"stage": 3, "sub_group_size": "auto"}},
     "zero_optimization.sub_group_size", "cannot fill"),
    ({"gradient_clipping": 0.5}, "gradient_clipping", "disagrees with the run config"),
    ({"zero_optimization": {"stage": 3, "stage3_module_granularity_threshold": 4000000}},
     "zero_optimization.stage3_module_granularity_threshold", "crashes DeepSpeed's CPU"),
    ({"optimizer": {"type": "AdamW", "params": {"eps": 1e-6}}}, "optimizer.params.eps",
     "disagrees"),
])
def test_unfillable_or_contradicting_keys_are_refused_in_one_line(tiny_config, tmp_path, edit,
                                                                    field, words):
    ds = json.loads((DATA / "hf_docs_zero3.json").read_text())
    ds.update(edit)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    cfg = _cfg(tiny_config)
    cfg.deepspeed = str(path)
    with pytest.raises(InputError) as err:
        resolve_ds_config(cfg, world_size=2, accelerator="cpu")
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"{path}: {field}: ") and words in line, line


def test_module_granularity_is_kept_on_gpus(tiny_config):
    zero = {"stage": 3, "stage3_module_granularity_threshold": 4000000}
    ds = fill_ds_config({"zero_optimization": dict(zero)}, _cfg(tiny_config), 1, "x.json",
                        accelerator="cuda")
    assert ds["zero_optimization"]["stage3_module_granularity_threshold"] == 4000000
    zero2 = {"stage": 2, "stage3_module_granularity_threshold": 4000000}  # ignored by ZeRO-2
    fill_ds_config({"zero_optimization": zero2}, _cfg(tiny_config), 1, "x.json")


def test_hidden_size_auto_needs_a_model_config(tiny_config, tmp_path):
    cfg = _cfg(tiny_config)
    cfg.model = str(tmp_path)  # no config.json
    ds = json.loads((DATA / "hf_docs_zero3.json").read_text())
    with pytest.raises(InputError, match="zero_optimization.reduce_bucket_size: .*hidden_size"):
        fill_ds_config(ds, cfg, 2, "x.json")


def test_missing_optimizer_is_adamw_from_the_run_config(tiny_config):
    cfg = _cfg(tiny_config)
    ds = fill_ds_config({"zero_optimization": {"stage": 3}}, cfg, 1, "x.json", accelerator="cpu")
    params = ds["optimizer"]["params"]
    assert ds["optimizer"]["type"] == "AdamW" and params["torch_adam"] is True
    assert params["fused"] is True  # torch's fused kernel: nothing to compile
    assert ds["optimizer"]["params"]["lr"] == cfg.train.lr


def test_auto_picks_the_config_by_accelerator_and_model_size(tiny_config, monkeypatch):
    import gere_ds.model.ds_config as D

    # without a run config: ZeRO-3, which fits any model
    assert ds_config_path("auto", "cpu") == DS_CONFIG_DIR / "zero3.json"
    assert ds_config_path("auto", "cuda") == DS_CONFIG_DIR / "zero3_gpu.json"
    assert ds_config_path("my.json", "cuda") == Path("my.json")
    cfg = _cfg(tiny_config)
    cfg.deepspeed = "auto"
    params = D.model_parameters(cfg.model)
    need = D.zero2_state_bytes(params, params, 8, cfg.train.bf16)
    assert need == (2 if cfg.train.bf16 else 4) * params + 16 * params // 8
    notes: list[str] = []
    # a rank with room for the replicated model: ZeRO-2, and one line says why
    monkeypatch.setattr(D, "rank_memory_bytes", lambda acc: int(need / D.REPLICATED_SHARE) + 1)
    gpu = resolve_ds_config(cfg, world_size=8, accelerator="cuda", note=notes.append)
    assert gpu["zero_optimization"]["stage"] == 2 and gpu["zero_optimization"]["overlap_comm"]
    assert notes and "ds_configs/zero2_gpu.json" in notes[0] and "<= 35%" in notes[0]
    # torch's fused AdamW everywhere (DeepSpeed's FusedAdam would need nvcc at the first run)
    assert gpu["optimizer"]["params"]["torch_adam"] is True and gpu["optimizer"]["params"]["fused"]
    assert gpu["zero_optimization"]["reduce_bucket_size"] == HIDDEN * HIDDEN
    cpu = resolve_ds_config(cfg, world_size=8, accelerator="cpu")
    assert cpu["zero_optimization"]["stage"] == 2
    assert cpu["optimizer"]["params"]["torch_adam"] is True and cpu["optimizer"]["params"]["fused"]
    # one byte less room: ZeRO-3
    monkeypatch.setattr(D, "rank_memory_bytes", lambda acc: int(need / D.REPLICATED_SHARE) - 1)
    gpu3 = resolve_ds_config(cfg, world_size=8, accelerator="cuda")
    assert gpu3["zero_optimization"]["stage"] == 3
    assert ds_config_path("auto", "cpu", cfg, 8) == DS_CONFIG_DIR / "zero3.json"
    # a folder whose parameters cannot be counted: ZeRO-3, the choice that fits any model
    monkeypatch.setattr(D, "model_parameters", lambda model: None)
    monkeypatch.setattr(D, "rank_memory_bytes", lambda acc: 2 ** 50)
    assert ds_config_path("auto", "cuda", cfg, 8) == DS_CONFIG_DIR / "zero3_gpu.json"



LLAMA_8B = 8_030_261_248  # Llama-3.1-8B's parameters
H100_80GB = 85_000_000_000  # what an "80 GB" card reports free, about
H200_141GB = 150_000_000_000


@pytest.mark.parametrize("world, memory, nodes, host, want", [
    (8, H100_80GB, 1, 10**12, 3),  # docs/performance.md: 8 x 80 GB -> ZeRO-3
    (6, H100_80GB, 1, 10**12, 3),  # the paper's 6 GPUs
    (8, H200_141GB, 1, 10**12, 2),  # 8 x 141 GB -> ZeRO-2
    (16, H200_141GB, 2, 10**12, 3),  # fits replicated, but two nodes: ZeRO-3
    (1, H100_80GB, 1, 256 * 10**9, "offload"),  # 144 GB of ZeRO-3 states on one GPU
])
def test_auto_stage_at_8b_matches_the_docs(tiny_config, monkeypatch, world, memory, nodes, host,
                                           want):
    import gere_ds.model.ds_config as D

    cfg = _cfg(tiny_config, train={"bf16": True})
    monkeypatch.setattr(D, "model_parameters", lambda model: LLAMA_8B)
    stage, why = D.auto_stage(cfg, world, "cuda", memory=memory, nodes=nodes, host_memory=host)
    assert stage == want, why
    if want == "offload":
        assert D.AUTO_CONFIGS[("cuda", stage)] == "zero3_offload.json"


@pytest.mark.parametrize("accelerator, host", [("cuda", 20 * 10**9), ("cpu", 20 * 10**9)])
def test_auto_stops_with_one_line_when_nothing_fits(tiny_config, monkeypatch, accelerator, host):
    """8B on one rank: ZeRO-3 needs 144 GB; no offload config on a CPU, too little host RAM on a
    GPU: one line naming the field, raised while the inputs are checked (before any load)."""
    import gere_ds.model.ds_config as D

    cfg = _cfg(tiny_config, train={"bf16": True})
    cfg.deepspeed = "auto"
    monkeypatch.setattr(D, "model_parameters", lambda model: LLAMA_8B)
    monkeypatch.setattr(D, "rank_memory_bytes", lambda acc: H100_80GB)
    monkeypatch.setattr(D, "host_memory_bytes", lambda: host)
    with pytest.raises(InputError) as err:
        resolve_ds_config(cfg, world_size=1, accelerator=accelerator)
    line = str(err.value)
    assert "\n" not in line and line.startswith("deepspeed: ") and "ZeRO-3 model states" in line


@pytest.mark.slow
def test_ranks_agree_on_the_stage_with_different_memory(tiny_config, tmp_path):
    """Two ranks whose memory differs across the ZeRO-2 threshold pick one stage: the
    smaller rank's."""
    cfg = tiny_config("tm", name="agree")
    out = tmp_path / "agree"
    proc = run_deepspeed(REPO / "tests/dist_scripts/auto_stage.py",
                         ["--config", str(cfg), "--out", str(out)], nproc=2, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert got[0]["alone"] == 2 and got[1]["alone"] == 3  # each rank alone would differ
    assert got[0]["agreed"] == got[1]["agreed"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hf_docs_zero2.json", "hf_docs_zero3.json"])
def test_hf_docs_configs_train_on_two_cpu_ranks(tiny_config, name):
    cfg = tiny_config("tm", name=name.split(".")[0], deepspeed=str(DATA / name),
                      eval={"enabled": False}, replay={"per_batch": 2},
                      train={"max_steps_per_task": 2, "epochs": 1})
    proc = run_deepspeed(REPO / "launch/train.py", ["--config", str(cfg)], nproc=2, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = cfg.parent / f"run_{name.split('.')[0]}"
    steps = [json.loads(ln) for ln in (run_dir / "train_steps.jsonl").read_text().splitlines()]
    assert len(steps) == 4 and all(s["train/loss"] == s["train/loss"] for s in steps)
    assert "scheduler 'WarmupLR' is not used" in (run_dir / "train.log").read_text()
