"""``train.micro_batch_size: auto``: the split of each rank's rows into micro-batches and
accumulation steps, chosen by memory.

The per-row loss (gere_ds.training.losses, reduction "row") makes every split of a global batch give
the same gradient up to summation order: the rows, their order and their weights do not depend on
it (tests/test_train_dist.py proves it for 1 process against 2 ranks). So the trainer may pick
the split. With ``auto``, ``train.grad_accum`` is the number of rows each rank trains on per
optimizer step (the split "micro-batch 1 x grad_accum"), and the trainer takes the largest
micro-batch that divides it and whose activations fit the memory a rank has left after its
model states: fewer forwards of larger matrices, and under ZeRO-3 fewer gathers of every
parameter per optimizer step (an 8B model gathers about 16 GB per forward).

The activation estimate is deliberately simple and errs high: per token and layer, the bf16 (or
fp32) inputs of the attention and MLP matrices and the MLP's intermediate values (10 h + 4 i
numbers), the attention scores where the kernel keeps them (eager), one layer of them under
gradient checkpointing plus every layer's input; and the logits of every supervised position
with their gradient.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from gere_ds.config.sections import RunConfig
from gere_ds.errors import InputError

AUTO = "auto"
# activations may take this share of what a rank has left after its model states: the rest is
# the allocator's fragmentation, ZeRO's gather and reduce buckets, and the teacher pass
ACTIVATION_SHARE = 0.6
BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")


def rows_per_rank(cfg: RunConfig) -> int:
    """Rows one rank trains on per optimizer step, whatever the split."""
    t = cfg.train
    return t.grad_accum if t.micro_batch_size == AUTO else t.micro_batch_size * t.grad_accum


def model_shape(model: str) -> dict[str, int] | None:
    """hidden, intermediate, layers, heads, vocab of a model folder's config.json (the text
    model's for a multimodal one); None when it cannot be read."""
    try:
        conf = json.loads((Path(model) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    node = conf.get("text_config") or conf
    keys = {"hidden": "hidden_size", "intermediate": "intermediate_size",
            "layers": "num_hidden_layers", "heads": "num_attention_heads", "vocab": "vocab_size"}
    shape = {k: node.get(v) for k, v in keys.items()}
    if not all(isinstance(v, int) and v > 0 for v in shape.values()):
        return None
    return shape


def row_activation_bytes(shape: dict[str, int], tokens: int, bf16: bool, checkpointing: bool,
                         eager_attention: bool = False, keeps_logits: bool = True) -> int:
    """Activation memory of one row of ``tokens`` tokens in a training forward and backward
    (``keeps_logits`` False: the chunked head, train.chunked_ce, keeps none)."""
    width = 2 if bf16 else 4
    per_token_layer = width * (10 * shape["hidden"] + 4 * shape["intermediate"])
    if eager_attention:  # softmax input and output per head and key
        per_token_layer += width * 2 * shape["heads"] * tokens
    if checkpointing:  # every layer's input kept, one layer's intermediates at a time
        layers = width * shape["hidden"] * shape["layers"] + per_token_layer
    else:
        layers = per_token_layer * shape["layers"]
    # the logits of a supervised position and their gradient
    logits = 2 * width * shape["vocab"] if keeps_logits else 0
    return tokens * (layers + logits)


def pick_micro_batch(rows: int, row_bytes: int, budget: int) -> int | None:
    """The largest divisor of ``rows`` whose micro-batch fits ``budget`` bytes; None if even
    one row does not."""
    fits = [m for m in range(1, rows + 1) if rows % m == 0 and m * row_bytes <= budget]
    return max(fits) if fits else None


def resolve_micro_batch(cfg: RunConfig, ds: dict[str, Any], file: str, memory: int,
                        states: int | None, note: Callable[[str], None] = lambda _msg: None
                        ) -> None:
    """Replace ``auto`` in ``cfg.train`` by the split picked for ``memory`` bytes per rank (the
    ranks' agreed minimum, so every rank picks the same) of which the model states take
    ``states`` (None: unknown); one InputError line when the JSON fixes the split too or when
    one row does not fit."""
    t = cfg.train
    fixed = [k for k in BATCH_KEYS if k in ds and ds[k] != AUTO]
    if fixed:
        raise InputError(f"train.micro_batch_size: auto, but the DeepSpeed JSON fixes {fixed[0]} = "
                         f"{ds[fixed[0]]}; set it to \"auto\" or name a number in the run config",
                         file=file, field=fixed[0])
    if cfg.replay.reduction != "row":
        raise InputError(f"micro_batch_size: auto needs replay.reduction: row (the "
                         f"{cfg.replay.reduction!r} reduction depends on the split)",
                         field="train.micro_batch_size")
    rows = rows_per_rank(cfg)
    shape = model_shape(cfg.model)
    if shape is None or states is None:
        t.micro_batch_size = 1
        note(f"train.micro_batch_size: auto -> 1 x {rows} (the model's config.json cannot be "
             f"read to estimate activations)")
        return
    tokens = max(t.max_source_len + t.max_target_len, cfg.replay.max_len)
    left = memory - states
    budget = int(ACTIVATION_SHARE * max(left, 0))
    row = row_activation_bytes(shape, tokens, t.bf16, t.gradient_checkpointing,
                               keeps_logits=not t.chunked_ce)
    micro = pick_micro_batch(rows, row, budget)
    gb = 1e9
    if micro is None:
        raise InputError(f"auto: one row of {tokens} tokens needs about {row / gb:.2f} GB of "
                         f"activations, and a rank has {budget / gb:.2f} GB for them "
                         f"({ACTIVATION_SHARE:.0%} of the {left / gb:.2f} GB left of "
                         f"{memory / gb:.1f} GB after model states); turn on "
                         f"train.gradient_checkpointing, shorten the rows or use more ranks",
                         field="train.micro_batch_size")
    t.micro_batch_size, t.grad_accum = micro, rows // micro
    note(f"train.micro_batch_size: auto -> {micro} x {rows // micro} accumulation steps "
         f"({rows} rows per rank per step; the largest divisor whose activations, about "
         f"{row / gb:.2f} GB per row of {tokens} tokens, fit {budget / gb:.2f} GB; name a "
         f"number to choose)")
