"""Model, tokenizer and DeepSpeed engine: the DeepSpeed JSON is filled from the run config.

Under ZeRO-3 an `HfDeepSpeedConfig` is created BEFORE `from_pretrained`, so the weights are
loaded straight into partitions (an 8B model never materialises on one rank). transformers keeps
that object by weakref only: the Engine holds it for the whole run.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from gere_ds.config.sections import RunConfig
from gere_ds.errors import InputError
from gere_ds.model.step_guard import skipped_step, step_is_nonfinite


def resolve_ds_config(cfg: RunConfig, world_size: int,
                      log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON with every "auto" filled from the run config (gere_ds.model.ds_config)."""
    from gere_ds.model.ds_config import resolve_ds_config as resolve

    return resolve(cfg, world_size, note=log)


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def load_tokenizer(cfg: RunConfig, log: Callable[[str], None]):
    from transformers import AutoTokenizer

    folder = cfg.tokenizer or cfg.model
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code)
    if tok.eos_token_id is None:
        raise InputError("tokenizer has no eos token (needed to end answers)", file=folder)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
        log(f"tokenizer has no pad token: using eos ({tok.eos_token!r}) for padding")
    return tok


def check_model_folder(cfg: RunConfig) -> None:
    """Resolve a hub id to its cached folder (once; cfg is updated), then check the folder."""
    from gere_ds.model.hub import resolve_model_sources

    resolve_model_sources(cfg)
    folder = Path(cfg.model)
    if not folder.is_dir():
        raise InputError("model folder not found", file=cfg.model, field="model")
    if not (folder / "config.json").is_file():
        raise InputError("not a Hugging Face model folder (config.json missing)", file=cfg.model,
                         field="model")


def forward_logits(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token logits [B, T, V] of a Hugging Face model or a DeepSpeed engine wrapping one
    (position p predicts token p + 1; a collective under ZeRO-3). Packed rows
    (gere_ds.data.collate.PackedRows) come with no attention mask and their position ids."""
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                 use_cache=False).logits


# Attention kernels that take an arbitrary 4D mask: sdpa a boolean one, eager an additive one.
TREE_MASK_KERNELS = ("sdpa", "eager")


@dataclass(frozen=True)
class ModelForward:
    """The scorers' forward (gere_ds.evaluation) over a Hugging Face model or a DeepSpeed engine.

    ``forward(input_ids, attention_mask)`` gives next-token logits; ``tree`` (present when the
    model's attention kernel takes a 4D mask) runs packed rows with their own mask and position
    ids, so several continuations of one context cost one row
    (:mod:`gere_ds.evaluation.packing`).
    """

    model: Any

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return forward_logits(self.model, input_ids, attention_mask)

    @property
    def tree(self) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """The packed-rows forward; absent (AttributeError, so ``getattr(f, "tree", None)`` is
        None) when the attention kernel cannot take a 4D mask."""
        if self.kernel() not in TREE_MASK_KERNELS:
            raise AttributeError("tree: the attention kernel takes no 4D mask")
        return self._tree

    def at_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     flat_positions: torch.Tensor) -> torch.Tensor:
        """Logits [N, V] at ``flat_positions`` (rows of the [B*T] positions) only: the LM head
        never sees the others (greedy decoding reads one position per row)."""
        from gere_ds.model.capture import lm_head_on_positions

        with lm_head_on_positions(getattr(self.model, "module", self.model), flat_positions):
            return forward_logits(self.model, input_ids, attention_mask)

    def kernel(self) -> str:
        config = getattr(getattr(self.model, "module", self.model), "config", None)
        return str(getattr(config, "_attn_implementation", None))

    def _tree(self, input_ids: torch.Tensor, allowed: torch.Tensor,
              position_ids: torch.Tensor) -> torch.Tensor:
        mask = allowed[:, None]
        if self.kernel() == "eager":
            dtype = next(getattr(self.model, "module", self.model).parameters()).dtype
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(dtype).min)
        return self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                          use_cache=False).logits


def model_forward(model: Any) -> ModelForward:
    """``forward(input_ids, attention_mask) -> logits`` for the scorers of gere_ds.evaluation."""
    return ModelForward(model)


@dataclass
class Engine:
    engine: Any  # deepspeed.DeepSpeedEngine (evaluation in one process: the plain HF model)
    tokenizer: Any
    ds_config: dict[str, Any]
    hf_ds_config: Any  # keeps ZeRO-3 partitioned loading alive (weakref in transformers)

    @property
    def module(self) -> torch.nn.Module:
        return getattr(self.engine, "module", self.engine)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] from one engine forward (collective under ZeRO-3)."""
        return forward_logits(self.engine, input_ids, attention_mask, position_ids)

    def context_length(self) -> int | None:
        """The longest sequence the model was built for (``max_position_embeddings``)."""
        config = getattr(self.module, "config", None)
        return getattr(config, "max_position_embeddings", None)

    def features_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """A forward for the final-norm capture only: the LM head runs on no position, so the
        [B, T, V] logits (at a 128k vocabulary the largest tensor and over a third of a small
        model's FLOPs) are never computed. Collective under ZeRO-3 like any forward."""
        from gere_ds.model.capture import lm_head_on_positions

        none = torch.zeros(0, dtype=torch.long, device=input_ids.device)
        with lm_head_on_positions(self.module, none):
            forward_logits(self.engine, input_ids, attention_mask)

    def scorer(self) -> ModelForward:
        """The forward the evaluation scorers take (packs multiple choice when it can)."""
        return ModelForward(self.engine)

    def set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def reset_optimizer_state(self) -> None:
        """Fresh AdamW moments (step 0), keeping the fp32 master weights."""
        inner = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        inner.state.clear()

    # The rest of gere-ds reaches DeepSpeed's engine only through these.
    def eval(self) -> None:
        self.engine.eval()

    def train(self) -> None:
        self.engine.train()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def at_boundary(self) -> bool:
        """Whether the next ``step`` ends an optimizer step (the accumulation boundary)."""
        return self.engine.is_gradient_accumulation_boundary()

    def step_is_nonfinite(self, losses_bad: torch.Tensor | None) -> bool:
        """Every rank's verdict on this optimizer step (a collective: gere_ds.model.step_guard)."""
        return step_is_nonfinite(self.engine, losses_bad)

    def step(self, skip: bool = False) -> None:
        """DeepSpeed's step; ``skip``: through its overflow path (no update, gradients dropped)."""
        with skipped_step(self.engine) if skip else contextlib.nullcontext():
            self.engine.step()

    def was_step_applied(self) -> bool:
        return self.engine.was_step_applied()

    def grad_norm(self) -> float | None:
        """The last optimizer step's global gradient norm, before clipping."""
        return self.engine.get_global_grad_norm()

    def save_checkpoint(self, root: Path, tag: str, exclude_frozen: bool) -> None:
        self.engine.save_checkpoint(str(root), tag=tag, save_latest=False,
                                    exclude_frozen_parameters=exclude_frozen)

    def load_checkpoint(self, folder: Path, strict: bool) -> None:
        """Weights and optimizer state of ``folder`` (the lr schedule is gere-ds's own)."""
        self.engine.load_checkpoint(str(folder.parent), tag=folder.name,
                                    load_optimizer_states=True, load_lr_scheduler_states=False,
                                    load_module_strict=strict)


def _load_model(cfg: RunConfig, ds: dict[str, Any]) -> tuple[Any, Any]:
    """(model, HfDeepSpeedConfig or None): under ZeRO-3 the config exists BEFORE from_pretrained,
    so the weights load straight into partitions."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    hf_ds = HfDeepSpeedConfig(ds) if zero_stage(ds) == 3 else None
    dtype = torch.bfloat16 if cfg.train.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype,
                                                 trust_remote_code=cfg.trust_remote_code)
    model.config.use_cache = False
    return model, hf_ds


def build_engine(cfg: RunConfig, world_size: int, log: Callable[[str], None]) -> Engine:
    """The training engine: model, AdamW from the DeepSpeed JSON, ZeRO as configured."""
    import deepspeed

    ds = resolve_ds_config(cfg, world_size, log)
    tokenizer = load_tokenizer(cfg, log)
    model, hf_ds = _load_model(cfg, ds)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.train.lora is not None:  # before initialize: DeepSpeed partitions the adapters too
        from gere_ds.model.lora import add_adapters

        model = add_adapters(model, cfg.train.lora, cfg.train.seed)
    engine, _, _, _ = deepspeed.initialize(
        model=model, config=ds, model_parameters=[p for p in model.parameters() if p.requires_grad])
    return Engine(engine=engine, tokenizer=tokenizer, ds_config=ds, hf_ds_config=hf_ds)


def build_eval_engine(cfg: RunConfig, log: Callable[[str], None]) -> Engine:
    """An engine that only scores ``cfg.model``, in eval mode.

    In one plain process, or under a process group whose training config is ZeRO-0/1/2: the
    Hugging Face model on the device of DeepSpeed's accelerator (every rank holds the weights,
    as training did; the scorers shard the examples). Under ZeRO-3: a DeepSpeed stage-3 engine
    without an optimizer (weights partitioned; every forward is a collective). Neither runs the
    global-batch check: scoring has no optimizer step, so any rank count may evaluate.
    """
    from gere_ds.runtime import dist

    check_model_folder(cfg)
    tokenizer = load_tokenizer(cfg, log)
    if dist.is_initialized():
        ds = eval_ds_config(cfg, dist.world_size())
        if zero_stage(ds) == 3:
            import deepspeed

            model, hf_ds = _load_model(cfg, ds)
            engine, _, _, _ = deepspeed.initialize(model=model, config=ds)
            engine.eval()
            return Engine(engine=engine, tokenizer=tokenizer, ds_config=ds, hf_ds_config=hf_ds)
    model, _ = _load_model(cfg, {})
    module = model.to(dist.device()).eval()
    return Engine(engine=module, tokenizer=tokenizer, ds_config={}, hf_ds_config=None)


def eval_ds_config(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """The training DeepSpeed JSON made an inference one: no optimizer, one micro-batch per
    step and no accumulation (DeepSpeed's own batch arithmetic then holds on any rank count)."""
    from gere_ds.model.ds_config import resolve_ds_config as resolve

    ds = resolve(cfg, world_size, check_batch=False)
    ds.pop("optimizer", None)
    ds.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1,
              train_batch_size=world_size)
    return ds
