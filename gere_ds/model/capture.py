"""Capture the final-norm output (the features that feed the LM head) with one forward hook.

Never `output_hidden_states=True`: that keeps every layer's activations alive. Under ZeRO-3 the
hook sees the full activations of this rank's micro-batch. With activation checkpointing only the
decoder layers are recomputed, not the final norm, and in any case the latest call wins, which is
the forward that the loss is computed from.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

_NORM_PATHS = ("model.norm", "transformer.ln_f", "model.decoder.final_layer_norm",
               "gpt_neox.final_layer_norm", "model.final_layernorm", "transformer.norm_f")


def find_final_norm(model: nn.Module) -> nn.Module:
    """The module whose output feeds the LM head (Llama/Qwen/SmolLM: model.norm; GPT-2: ln_f).
    A PEFT wrapper is looked through (its paths start with base_model.model.)."""
    model = getattr(model, "get_base_model", lambda: model)()
    modules = dict(model.named_modules())
    for path in _NORM_PATHS:
        if path in modules:
            return modules[path]
    decoder = getattr(model, "get_decoder", lambda: None)()
    for name in ("norm", "final_layernorm", "ln_f", "final_layer_norm"):
        if decoder is not None and isinstance(getattr(decoder, name, None), nn.Module):
            return getattr(decoder, name)
    raise ValueError(f"cannot find the final norm of {type(model).__name__}; "
                     f"looked for {', '.join(_NORM_PATHS)}")


class FinalNormCapture:
    """Keeps the latest output of the final norm; ``pop()`` hands it over and forgets it."""

    def __init__(self, model: nn.Module) -> None:
        self._out: torch.Tensor | None = None
        self._handle = find_final_norm(model).register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self._out = output[0] if isinstance(output, tuple) else output

    def pop(self) -> torch.Tensor:
        if self._out is None:
            raise RuntimeError("no final-norm output captured: was a forward run?")
        out, self._out = self._out, None
        return out

    def remove(self) -> None:
        self._handle.remove()


@contextlib.contextmanager
def lm_head_on_positions(model: nn.Module, flat_positions: torch.Tensor) -> Iterator[None]:
    """While active, the LM head sees only hidden[flat_positions] (rows of [B*T, D]).

    CE needs logits only where a target is (the answer tokens of task rows, the next tokens of
    replay rows), so the forward returns [N, V] instead of [B, T, V] logits: less head compute
    and no full-vocabulary logits for prompt tokens. Only the module's input is rewritten, so
    DeepSpeed's own hooks still gather the (possibly tied) weight under ZeRO-3.
    """
    head = model.get_output_embeddings()

    def pre_hook(module: nn.Module, args: tuple) -> tuple:
        h = args[0]
        return (h.reshape(-1, h.shape[-1]).index_select(0, flat_positions), *args[1:])

    handle = head.register_forward_pre_hook(pre_hook)
    try:
        yield
    finally:
        handle.remove()
