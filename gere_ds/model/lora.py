"""LoRA adapters on a frozen base, under DeepSpeed ZeRO-2/3 (docs/lora.md).

The adapters come from PEFT (``LoraConfig`` / ``get_peft_model``) and are added to the loaded
model BEFORE ``deepspeed.initialize``, so DeepSpeed partitions them (ZeRO-3) and its optimizer
holds only them. The base stays frozen; with fresh adapters B = 0, so the student equals the
teacher (the base model) until the first update.

Between tasks (``train.lora.continual``): ``carry`` keeps training one adapter; ``merge`` folds
the adapter into the base weights and starts a fresh one. Every merge first writes the merged
adapter's exact values to ``<output_dir>/lora_merges/`` (one copy per node), and the trainer
state counts the merges: a resume rebuilds the merged base by replaying those merges on the
base model with the same arithmetic, so checkpoints never hold the 16 GB base.
"""
from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from gere_ds.config.sections import LoraConfig, RunConfig
from gere_ds.errors import InputError
from gere_ds.model.hf_folder import meta_model
from gere_ds.runtime import dist

ADAPTER = "default"  # PEFT's adapter name
MERGES_DIR = "lora_merges"


# ---------------------------------------------------------------------------- checks
def check_targets(cfg: RunConfig) -> None:
    """Every ``train.lora.target_modules`` name must name linear layers of the model (checked on
    the meta device: no weights are read). One line naming the key on a mistake."""
    from transformers import AutoConfig

    lora = cfg.train.lora
    try:
        import peft  # noqa: F401
    except ImportError:
        raise InputError("LoRA needs the peft package: pip install -e '.[lora]'",
                         field="train.lora") from None
    config = AutoConfig.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
    model = meta_model(config, trust_remote_code=cfg.trust_remote_code)
    modules = dict(model.named_modules())
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    linear = sorted({n.rpartition(".")[2] for n, m in modules.items()
                     if isinstance(m, nn.Linear) and not (tied and m is head)})  # the choices
    field = "train.lora.target_modules"
    for name in lora.target_modules:
        hits = [m for n, m in modules.items() if n == name or n.endswith("." + name)]
        if not hits:
            raise InputError(f"{name!r} names no module of the model (its linear layers: "
                             f"{', '.join(linear)})", file=cfg.model, field=field)
        bad = next((m for m in hits if not isinstance(m, nn.Linear)), None)
        if bad is not None:
            raise InputError(f"{name!r} is a {type(bad).__name__}; LoRA here adapts nn.Linear "
                             f"layers only (the merge and the ZeRO-3 gathering assume W x): "
                             f"{', '.join(linear)}", file=cfg.model, field=field)
        if tied and any(m is head for m in hits):
            raise InputError(f"{name!r} is the LM head, whose weight is tied to the input "
                             f"embeddings: merging an adapter into it would change the embeddings "
                             f"too", file=cfg.model, field=field)


# ---------------------------------------------------------------------------- adapters
def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{module name: PEFT LoRA layer} in module order (the same on every rank)."""
    return {name: m for name, m in model.named_modules()
            if hasattr(m, "lora_A") and ADAPTER in getattr(m, "lora_A", {})}


def fresh_adapter_values(model: nn.Module, seed: int, task_index: int
                         ) -> dict[str, torch.Tensor]:
    """Fresh values of every adapter, seeded by (seed, task): A as PEFT draws it
    (kaiming-uniform, a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))), B = 0. A CPU generator of its
    own, so every rank, every world size and a resumed run draw the same adapters."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + task_index)
    values: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model).items():
        a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        a_shape = tuple(getattr(a, "ds_shape", a.shape))
        b_shape = tuple(getattr(b, "ds_shape", b.shape))
        bound = 1.0 / math.sqrt(a_shape[1])
        values[f"{name}.A"] = (torch.rand(a_shape, generator=g) * 2 - 1) * bound
        values[f"{name}.B"] = torch.zeros(b_shape)
    return values


def add_adapters(model: nn.Module, lora: LoraConfig, seed: int) -> nn.Module:
    """The model wrapped by PEFT with fresh adapters (task 0); the base is frozen. Call before
    ``deepspeed.initialize`` (the adapters are ordinary tensors here; DeepSpeed partitions
    them)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                              target_modules=list(lora.target_modules), bias="none",
                              task_type="CAUSAL_LM")
    wrapped = get_peft_model(model, peft_cfg)
    values = fresh_adapter_values(wrapped, seed, 0)
    with torch.no_grad():
        for name, layer in lora_layers(wrapped).items():
            for part, sub in (("A", layer.lora_A[ADAPTER]), ("B", layer.lora_B[ADAPTER])):
                sub.weight.copy_(values[f"{name}.{part}"].to(sub.weight.dtype))
    return wrapped


@contextlib.contextmanager
def _gathered(params: list[nn.Parameter], modifier_rank: int | None = None) -> Iterator[None]:
    """Full tensors of ZeRO-3 partitioned parameters inside (no-op for others). With
    ``modifier_rank``, that rank's changes are broadcast and re-partitioned on exit."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def adapter_values(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter's current values on CPU, on every rank (a collective under ZeRO-3): the
    working copies the forward uses (bf16 when training in bf16)."""
    values: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model).items():
        a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        with _gathered([a, b]):
            values[f"{name}.A"] = a.detach().to("cpu", copy=True)
            values[f"{name}.B"] = b.detach().to("cpu", copy=True)
    return values


def set_adapter_values(model: nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Overwrite every adapter with ``values`` (all ranks, the same values): the working copy
    and DeepSpeed's fp32 master copy, else the next optimizer step would bring the old values
    back. Collective under ZeRO-3."""
    from deepspeed.utils import safe_set_full_fp32_param

    for name, layer in lora_layers(model).items():
        for part, sub in (("A", layer.lora_A[ADAPTER]), ("B", layer.lora_B[ADAPTER])):
            p, value = sub.weight, values[f"{name}.{part}"]
            with _gathered([p], modifier_rank=0), torch.no_grad():
                p.data.copy_(value.to(p.device, p.dtype).view(p.shape))
            safe_set_full_fp32_param(p, value.to(p.device, torch.float32))


def merged_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float
                  ) -> torch.Tensor:
    """W + scaling * B @ A in fp32, rounded once to W's dtype (the one merge arithmetic: in
    training, on resume and in the export)."""
    delta = b.to(torch.float32) @ a.to(torch.float32)
    return (weight.to(torch.float32) + scaling * delta).to(weight.dtype)


def merge_values(model: nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Fold the adapters ``values`` into the base weights of ``model`` (the live adapters are
    not touched). Collective under ZeRO-3: rank 0 computes, DeepSpeed broadcasts."""
    for name, layer in lora_layers(model).items():
        w = layer.base_layer.weight
        with _gathered([w], modifier_rank=0), torch.no_grad():
            w.data.copy_(merged_weight(w.data, values[f"{name}.A"], values[f"{name}.B"],
                                       float(layer.scaling[ADAPTER])))


# ---------------------------------------------------------------------------- the continual run
def merge_file(out_dir: Path, task_index: int) -> Path:
    return Path(out_dir) / MERGES_DIR / f"task{task_index + 1:03d}.pt"


class LoraRun:
    """The LoRA side of a run: merges between tasks (``merge``), what a checkpoint records
    about them and how a resume restores the merged base."""

    def __init__(self, cfg: RunConfig) -> None:
        self.lora: LoraConfig = cfg.train.lora
        self.seed = cfg.train.seed
        self.out = Path(cfg.output_dir)
        self.merged = 0  # tasks whose adapter is folded into the live base

    def state(self) -> dict[str, Any]:
        """Part of the trainer state."""
        return {"lora_continual": self.lora.continual, "lora_merged": self.merged}

    def before_task(self, module: nn.Module, task_index: int,
                    log: Any = None) -> None:
        """At the first step of ``task_index``: with ``merge``, fold the previous task's adapter
        into the base and start fresh adapters (B = 0)."""
        if self.lora.continual != "merge" or task_index <= self.merged:
            return
        if task_index != self.merged + 1:
            raise RuntimeError(f"merge of task {task_index} after {self.merged} merges")
        values = adapter_values(module)
        self._save(values, task_index - 1)
        merge_values(module, values)
        set_adapter_values(module, fresh_adapter_values(module, self.seed, task_index))
        self.merged = task_index
        if log:
            log(f"lora: task {task_index}'s adapter merged into the base "
                f"({merge_file(self.out, task_index - 1)}); fresh adapters for task "
                f"{task_index + 1}")

    def _save(self, values: dict[str, torch.Tensor], task_index: int) -> None:
        """One writer per node (no shared disk assumed), atomically, before any checkpoint
        that counts this merge."""
        path = merge_file(self.out, task_index)
        if dist.local_rank() == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            torch.save(values, tmp)
            os.replace(tmp, path)
        dist.barrier()

    def restore(self, module: nn.Module, state: dict[str, Any], folder: Path) -> None:
        """Before loading a checkpoint's adapters: replay its merges on the base."""
        check_lora_state(state, folder, self.lora)
        n = int(state.get("lora_merged", 0))
        for values in load_merges(self.out, n, folder):
            merge_values(module, values)
        self.merged = n


def check_lora_state(state: dict[str, Any], folder: Path, lora: LoraConfig | None) -> None:
    """A checkpoint resumes only the same kind of run: LoRA with the same continual choice, or
    full fine-tuning."""
    saved = state.get("lora_continual")
    wanted = lora.continual if lora is not None else None
    if saved != wanted:
        what = {None: "full fine-tuning"}
        raise InputError(f"checkpoint {folder} was written by "
                         f"{what.get(saved, f'LoRA with continual={saved}')} and the config asks "
                         f"for {what.get(wanted, f'LoRA with continual={wanted}')}; use a new "
                         f"output_dir", field="train.lora")


def load_merges(out_dir: Path, n: int, folder: Path | str = "") -> list[dict[str, torch.Tensor]]:
    """The adapters of the first ``n`` merges, in order (InputError if one is missing)."""
    found = []
    for i in range(n):
        path = merge_file(out_dir, i)
        if not path.is_file():
            raise InputError(f"checkpoint {folder} counts {n} merged adapters but {path} is "
                             f"missing; copy {path.parent} from the run or start a new "
                             f"output_dir", file=str(path), field="train.lora.continual")
        found.append(torch.load(path, weights_only=True))
    return found


def lora_run(cfg: RunConfig) -> LoraRun | None:
    return LoraRun(cfg) if cfg.train.lora is not None else None
