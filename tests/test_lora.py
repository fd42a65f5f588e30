"""LoRA without a process group: config checks, target-module checks against the model, the
merge arithmetic and the export names, the bad-input lines of launch/train.py."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import run_python
from gere_ds.config.loading import load_config
from gere_ds.errors import InputError

GOOD = {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"],
        "continual": "carry"}


def _lora_config(tiny_config, **changes) -> Path:
    return tiny_config("tm", name="lora", train={"lora": {**GOOD, **changes}})


def test_lora_absent_is_full_fine_tuning_and_round_trips(tiny_config, tmp_path):
    from gere_ds.config.loading import save_resolved

    assert load_config(tiny_config("tm")).train.lora is None
    cfg = load_config(_lora_config(tiny_config))
    assert cfg.train.lora.r == 4 and cfg.train.lora.alpha == 8.0
    save_resolved(cfg, tmp_path / "resolved.yaml")  # what a run directory keeps
    assert load_config(tmp_path / "resolved.yaml").train.lora == cfg.train.lora
    save_resolved(load_config(tiny_config("tm")), tmp_path / "full.yaml")
    assert load_config(tmp_path / "full.yaml").train.lora is None  # `lora: null`


@pytest.mark.parametrize("changes,needle", [
    ({"r": 0}, "train.lora.r: must be > 0, got 0"),
    ({"alpha": -1}, "train.lora.alpha: must be > 0, got -1.0"),
    ({"dropout": 1.0}, "train.lora.dropout: must be in [0, 1), got 1.0"),
    ({"dropout": -0.1}, "train.lora.dropout: must be in [0, 1), got -0.1"),
    ({"target_modules": []}, "train.lora.target_modules: name at least one linear layer"),
    ({"continual": ""}, "train.lora.continual: choose carry (one adapter through the sequence) "
                        "or merge"),
    ({"rank": 4}, "train.lora.rank: unknown key"),
])
def test_bad_lora_config_one_line(tiny_config, changes, needle):
    with pytest.raises(InputError) as err:
        load_config(_lora_config(tiny_config, **changes))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_merge_refuses_carried_adam_moments(tiny_config):
    path = tiny_config("tm", name="m", train={"lora": {**GOOD, "continual": "merge"},
                                              "reset_optimizer_per_task": False})
    with pytest.raises(InputError, match="train.reset_optimizer_per_task: lora.continual=merge "
                                         "starts a fresh adapter"):
        load_config(path)


@pytest.mark.parametrize("targets,needle", [
    (["q_prj"], "'q_prj' names no module of the model (its linear layers: down_proj, gate_proj, "
                "k_proj, o_proj, q_proj, up_proj, v_proj)"),
    (["norm"], "'norm' is a LlamaRMSNorm; LoRA here adapts nn.Linear layers only"),
    (["lm_head"], "'lm_head' is the LM head, whose weight is tied to the input embeddings"),
])
def test_target_modules_checked_against_the_model(tiny_config, targets, needle):
    from gere_ds.model.lora import check_targets

    cfg = load_config(_lora_config(tiny_config, target_modules=targets))
    with pytest.raises(InputError) as err:
        check_targets(cfg)
    assert needle in str(err.value) and "train.lora.target_modules" in str(err.value)


@pytest.mark.slow  # a launch/train.py process: torch and DeepSpeed imports
def test_unknown_target_one_line_before_any_work(tiny_config):
    cfg = _lora_config(tiny_config)
    proc = run_python(["launch/train.py", "--config", str(cfg),
                       "train.lora.target_modules=[q_proj, qkv]"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "train.lora.target_modules: 'qkv' names no module" in lines[0]
    assert not (Path(cfg).parent / "run_cfg" / "checkpoints").exists()


def test_fresh_adapters_leave_the_model_unchanged_and_merge_is_exact(tiny_paths):
    """B = 0: the PEFT model's logits are the base model's bit for bit; merging values into
    the base reproduces the adapter's function; the export's names are the plain model's."""
    from transformers import AutoModelForCausalLM

    from gere_ds.config.sections import LoraConfig
    from gere_ds.model.lora import (adapter_values, add_adapters, fresh_adapter_values, lora_layers,
                                    merge_values)
    from gere_ds.model.lora_export import merged_state_dict

    base = AutoModelForCausalLM.from_pretrained(tiny_paths["model"]).eval()
    ids = torch.tensor([[5, 17, 300, 2, 9, 41]])
    with torch.no_grad():
        want = base(input_ids=ids).logits
    lora = LoraConfig(r=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "down_proj"],
                      continual="carry")
    model = add_adapters(base, lora, seed=3).eval()
    assert len(lora_layers(model)) == 4
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 8 and all("lora_" in n for n in trainable)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, want)
    # the same draw on every call: ranks, world sizes and resumes agree
    a, b = fresh_adapter_values(model, 3, 1), fresh_adapter_values(model, 3, 1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    for layer in lora_layers(model).values():  # a point away from B = 0
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.3)
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        sd = {n: p.detach().clone() for n, p in model.named_parameters()}
        merged, adapters = merged_state_dict(model, sd)
        assert "model.layers.0.self_attn.q_proj.weight" in merged and len(adapters) == 8
        assert not any("base_layer" in k or "lora_" in k for k in merged)
        merge_values(model, adapter_values(model))
        with model.disable_adapter():
            folded = model(input_ids=ids).logits
    assert float((adapted - want).abs().max()) > 1e-3
    assert float((folded - adapted).abs().max()) < 1e-5


def test_final_norm_found_inside_the_peft_wrapper(tiny_paths):
    from transformers import AutoModelForCausalLM

    from gere_ds.config.sections import LoraConfig
    from gere_ds.model.capture import find_final_norm
    from gere_ds.model.lora import add_adapters

    base = AutoModelForCausalLM.from_pretrained(tiny_paths["model"])
    norm = base.model.norm
    model = add_adapters(base, LoraConfig(r=2, target_modules=["q_proj"], continual="merge"), 0)
    assert find_final_norm(model) is norm


def test_lora_recipe_is_the_paper_recipe_plus_adapters():
    from conftest import REPO

    full = load_config(REPO / "configs" / "llama3.1-8b-long15.yaml").to_dict()
    lora = load_config(REPO / "configs" / "llama3.1-8b-long15-lora.yaml").to_dict()
    assert lora["train"].pop("lora")["continual"] == "carry" and full["train"].pop("lora") is None
    for cfg in (full, lora):
        cfg["train"].pop("lr"), cfg.pop("output_dir")
    assert lora == full
