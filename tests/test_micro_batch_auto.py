"""``train.micro_batch_size: auto``: the split each rank's rows take, picked by memory (injected
here as the ranks' agreed memory), refused in one line where it cannot be, and training like the
split a user writes (2 ranks, per-step losses)."""
from __future__ import annotations

import json

import pytest

from conftest import REPO, run_deepspeed
from gere_ds.training.batch_split import model_shape, pick_micro_batch, row_activation_bytes
from gere_ds.config.loading import load_config
from gere_ds.errors import InputError
from gere_ds.model import ds_config
from gere_ds.model.ds_config import device_state_bytes, resolve_ds_config

GB = 10 ** 9


def test_the_largest_divisor_that_fits_is_picked():
    assert pick_micro_batch(12, 10, 35) == 3  # 4 and 6 divide 12 but need 40 and 60
    assert pick_micro_batch(12, 10, 1000) == 12
    assert pick_micro_batch(11, 10, 100) == 1  # 11 is prime: 1 x 11 or 11 x 1
    assert pick_micro_batch(12, 10, 9) is None


def test_activations_grow_with_rows_and_shrink_with_checkpointing(tiny_paths):
    shape = model_shape(tiny_paths["model"])
    full = row_activation_bytes(shape, 128, bf16=True, checkpointing=False)
    assert row_activation_bytes(shape, 128, bf16=True, checkpointing=True) < full
    assert row_activation_bytes(shape, 256, bf16=True, checkpointing=False) == 2 * full
    assert row_activation_bytes(shape, 128, bf16=False, checkpointing=False) == 2 * full
    # the chunked head (train.chunked_ce) keeps no logits: the vocabulary drops out
    chunked = row_activation_bytes(shape, 128, bf16=True, checkpointing=False,
                                   keeps_logits=False)
    assert full - chunked == 128 * 2 * 2 * shape["vocab"]


def _auto(tiny_config, monkeypatch, memory: int, **train):
    cfg = load_config(tiny_config("tm", train={"micro_batch_size": "auto", "grad_accum": 4,
                                               **train}))
    monkeypatch.setitem(ds_config._agreed_memory, "cpu", memory)  # as agree_on_memory leaves it
    notes: list[str] = []
    return cfg, notes, lambda: resolve_ds_config(cfg, 2, notes.append, accelerator="cpu")


def test_auto_splits_the_rows_by_memory_and_says_why(tiny_config, monkeypatch):
    cfg, notes, resolve = _auto(tiny_config, monkeypatch, 64 * GB)
    ds = resolve()
    assert (cfg.train.micro_batch_size, cfg.train.grad_accum) == (4, 1)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 1
    assert ds["train_batch_size"] == 8
    assert any("auto -> 4 x 1" in n for n in notes), notes
    # a budget for two rows of activations: 2 x 2
    states = device_state_bytes(cfg, 2, ds)
    shape = model_shape(cfg.model)
    row = row_activation_bytes(shape, 64 + 4, bf16=False, checkpointing=True)
    cfg, notes, resolve = _auto(tiny_config, monkeypatch, states + int(2.5 * row / 0.6))
    resolve()
    assert (cfg.train.micro_batch_size, cfg.train.grad_accum) == (2, 2)


def test_a_memory_too_small_for_one_row_is_one_line(tiny_config, monkeypatch):
    cfg, _, resolve = _auto(tiny_config, monkeypatch, 1)
    with pytest.raises(InputError) as err:
        resolve()
    text = str(err.value)
    assert "\n" not in text and text.startswith("train.micro_batch_size: auto: one row of 68")
    assert "gradient_checkpointing" in text


def test_auto_with_a_json_that_fixes_the_micro_batch_names_both(tiny_config, monkeypatch,
                                                                tmp_path):
    ds = json.loads((REPO / "ds_configs/zero3.json").read_text())
    ds["train_micro_batch_size_per_gpu"] = 2
    path = tmp_path / "fixed.json"
    path.write_text(json.dumps(ds))
    cfg, _, resolve = _auto(tiny_config, monkeypatch, 64 * GB)
    cfg.deepspeed = str(path)
    with pytest.raises(InputError) as err:
        resolve()
    text = str(err.value)
    assert text.startswith(f"{path}: train_micro_batch_size_per_gpu: train.micro_batch_size: auto")
    assert "= 2" in text


def test_auto_needs_the_per_row_reduction(tiny_config, monkeypatch):
    cfg, _, resolve = _auto(tiny_config, monkeypatch, 64 * GB)
    cfg.replay.reduction = "global_micro_batch"
    with pytest.raises(InputError, match="depends on the split"):
        resolve()


def test_a_word_other_than_auto_is_one_line(tiny_config):
    path = tiny_config("tm", train={"micro_batch_size": "big"})
    with pytest.raises(InputError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}:") and "'big': a number of rows or auto" in str(
        err.value)


@pytest.mark.slow
def test_auto_trains_like_the_written_split(tiny_config):
    """The same rows per rank per step, written as 1 x 4 and as auto (which picks 4 x 1 on this
    machine): the per-step losses agree to fp32 summation order, and the log says the pick."""
    losses = {}
    for name, micro in (("written", 1), ("auto", "auto")):
        cfg = tiny_config("tm", name=name, train={"micro_batch_size": micro, "grad_accum": 4,
                                                  "max_steps_per_task": 3, "epochs": 1},
                          eval={"enabled": False})
        proc = run_deepspeed(REPO / "launch/train.py", ["--config", str(cfg)], nproc=2)
        assert proc.returncode == 0, proc.stderr[-3000:]
        run = cfg.parent / f"run_{name}"
        steps = [json.loads(ln) for ln in (run / "train_steps.jsonl").read_text().splitlines()]
        losses[name] = [s["train/loss"] for s in steps]
        if micro == "auto":
            assert "train.micro_batch_size: auto -> 4 x 1" in (run / "train.log").read_text()
    assert len(losses["auto"]) == len(losses["written"]) == 6
    for a, b in zip(losses["auto"], losses["written"]):
        assert abs(a - b) <= 1e-5 * abs(b), (losses["auto"], losses["written"])


LLAMA_31_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
               "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
               "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
               "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


@pytest.mark.parametrize("card_gb, want", [(80, (11, 1)), (40, (11, 1)), (26, (1, 11)),
                                                 (24, None)])
def test_the_8b_recipe_on_six_cards(tmp_path, monkeypatch, card_gb, want):
    """The recipe's 11 rows per rank under ZeRO-3 on 6 GPUs (the memory injected as the ranks'
    agreed free memory): 80 and 40 GB cards take them in one micro-batch, 26 GB ones one row at
    a time (room for two rows, and 11 is prime), and 24 GB cards, which the partitioned states
    (about 24 GB per rank) fill, stop with one line."""
    model = tmp_path / "llama-3.1-8b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA_31_8B))
    cfg = load_config(REPO / "configs/llama3.1-8b-long15.yaml",
                      [f"model={model}", "deepspeed=ds_configs/zero3_gpu.json"])
    monkeypatch.setitem(ds_config._agreed_memory, "cuda", card_gb * GB)
    notes: list[str] = []
    if want is None:
        with pytest.raises(InputError, match="one row of 563 tokens needs about"):
            resolve_ds_config(cfg, 6, notes.append, accelerator="cuda")
        return
    ds = resolve_ds_config(cfg, 6, notes.append, accelerator="cuda")
    assert (cfg.train.micro_batch_size, cfg.train.grad_accum) == want
    assert ds["train_batch_size"] == 66
