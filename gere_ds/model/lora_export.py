"""Export of a LoRA run: the merged Hugging Face model and, in ``adapter/`` inside it, the PEFT
adapter folder (``PeftModel.save_pretrained``).

The merged weights are ``W + (alpha / r) * B @ A`` with gere_ds.model.lora.merged_weight, the same
arithmetic as a ``merge`` run uses between tasks. With ``continual: merge`` the adapter applies
to the base with the earlier tasks' adapters merged (export_info.json says how many).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from gere_ds.config.sections import RunConfig
from gere_ds.model.hf_folder import ExportError, plain_model_building
from gere_ds.model.lora import (ADAPTER, add_adapters, load_merges, lora_layers, merge_values,
                                merged_weight)

PREFIX = "base_model.model."  # PEFT's name of the wrapped model
ADAPTER_DIR = "adapter"


def _plain_name(name: str) -> str:
    return name.removeprefix(PREFIX).replace(".base_layer.", ".")


def merged_state_dict(peft_module: nn.Module, sd: dict[str, torch.Tensor]
                      ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the merged model's state dict under the plain model's names, the adapter tensors under
    PEFT's names) from a gathered state dict of the PEFT model."""
    adapters = {k: v for k, v in sd.items() if ".lora_" in k}
    merged = {_plain_name(k): v for k, v in sd.items() if ".lora_" not in k}
    for name, layer in lora_layers(peft_module).items():
        key = _plain_name(f"{name}.base_layer.weight")
        merged[key] = _merge(merged[key], adapters, name, float(layer.scaling[ADAPTER]))
    return merged, adapters


def _merge(weight: torch.Tensor, adapters: dict[str, torch.Tensor], name: str, scaling: float
           ) -> torch.Tensor:
    a = adapters[f"{name}.lora_A.{ADAPTER}.weight"]
    b = adapters[f"{name}.lora_B.{ADAPTER}.weight"]
    return merged_weight(weight, a, b, scaling)


def adapter_writer(peft_module: nn.Module, adapters: dict[str, torch.Tensor], merged: int
                   ) -> Callable[[Path], dict[str, Any]]:
    """Writes ``adapter/`` into an export folder; returns what export_info records about it."""
    def write(folder: Path) -> dict[str, Any]:
        peft_module.save_pretrained(str(folder / ADAPTER_DIR), state_dict=adapters,
                                    safe_serialization=True)
        return {"lora_adapter": ADAPTER_DIR, "lora_merged_before_adapter": merged}

    return write


def model_from_checkpoint(cfg: RunConfig, run_dir: Path, folder: Path,
                          trainable: dict[str, Any], dtype: torch.dtype) -> tuple[nn.Module, int]:
    """(the PEFT model of a LoRA checkpoint on CPU, merges in its base): the base from the model
    folder, the run's merges replayed, the checkpoint's adapters (fp32 master values, rounded to
    the training dtype as the engine's working copy is)."""
    from transformers import AutoModelForCausalLM

    state = json.loads((folder / "trainer_state.json").read_text())
    with plain_model_building():
        base = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype,
                                                    trust_remote_code=cfg.trust_remote_code)
    model = add_adapters(base, cfg.train.lora, cfg.train.seed)
    n = int(state.get("lora_merged", 0))
    for values in load_merges(run_dir, n, folder):
        merge_values(model, values)
    wanted = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(trainable) != wanted:
        extra = sorted(set(trainable) ^ wanted)
        raise ExportError(f"the checkpoint's trainable tensors are not this config's adapters "
                          f"({extra[0]} and {len(extra) - 1} more differ)", file=str(folder))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in wanted:
            params[name].copy_(trainable[name].contiguous().to(params[name].dtype))
    return model, n


def lora_export_parts(peft_module: nn.Module, sd: dict[str, torch.Tensor],
                      info: dict[str, Any]
                      ) -> tuple[nn.Module, dict[str, torch.Tensor], Callable[[Path], dict]]:
    """(the plain model to save, its merged state dict, the writer of ``adapter/``) for
    export_from_engine's writer; ``info["lora_merged"]``: merges already in the base."""
    merged, adapters = merged_state_dict(peft_module, sd)
    rest = {k: v for k, v in info.items() if k != "lora_merged"}
    write_adapter = adapter_writer(peft_module, adapters, int(info.get("lora_merged", 0)))
    return peft_module.get_base_model(), merged, lambda folder: {**rest, **write_adapter(folder)}
