"""The LM head and its cross-entropy in chunks of positions: no [N, V] logits kept.

With a 128k vocabulary the logits of the supervised positions are the largest tensors of a step
(N x 128,256 in bf16, and as many gradients): 1.6 GB each for 11 replay rows of 563 tokens. Here
the head's matrix product and the CE run chunk by chunk; the forward keeps only each position's
log-sum-exp, and the backward recomputes each chunk's logits to form their gradient (the
softmax minus the one-hot target), so peak memory holds one chunk of logits, whatever N is.

The values are the ones the plain path computes (the head's product in the weights' dtype, then
CE in fp32 from those logits: ``losses.row_ce_sums``), up to the rounding of other matrix
shapes; the gradient of the weight is summed over the chunks in fp32.

The head runs through its module (``head_ce_on_positions``), so under ZeRO-3 DeepSpeed's hooks
gather its (possibly tied) weight for the forward and again for the backward, as for any layer.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

CHUNK = 1024  # positions per chunk: 1024 x 128,256 fp32 logits = 0.5 GB


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk: int) -> torch.Tensor:
        ce = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(ce)
        for s in range(0, hidden.shape[0], chunk):
            logits = (hidden[s:s + chunk] @ weight.t()).float()
            lse[s:s + chunk] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, targets[s:s + chunk, None]).squeeze(1)
            ce[s:s + chunk] = lse[s:s + chunk] - picked
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk = chunk
        return ce

    @staticmethod
    def backward(ctx, grad_ce: torch.Tensor):
        hidden, weight, targets, lse = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                       if ctx.needs_input_grad[1] else None)
        for s in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[s:s + ctx.chunk]
            probs = torch.exp((h @ weight.t()).float() - lse[s:s + ctx.chunk, None])
            rows = torch.arange(h.shape[0], device=h.device)
            probs[rows, targets[s:s + ctx.chunk]] -= 1.0
            grad_logits = (probs * grad_ce[s:s + ctx.chunk, None]).to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[s:s + ctx.chunk] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight += (grad_logits.t() @ h).float()
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int = CHUNK) -> torch.Tensor:
    """Per-position CE [N] (fp32) of ``hidden`` [N, D] under the head ``weight`` [V, D]."""
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk)


def check_head(model: nn.Module) -> str | None:
    """Why the chunked head cannot stand in for this model's (None when it can): a bias, or
    logits the model transforms after its head (soft-capping)."""
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        return "its LM head has a bias"
    config = getattr(model, "config", None)
    if getattr(config, "final_logit_softcapping", None):
        return "it soft-caps its logits"
    return None


@contextlib.contextmanager
def head_ce_on_positions(model: nn.Module, flat_positions: torch.Tensor,
                         targets: torch.Tensor, chunk: int = CHUNK) -> Iterator[None]:
    """While active, the model's LM head returns the CE [N] of ``targets`` at
    hidden[flat_positions] (rows of [B*T, D]) instead of logits, chunk by chunk."""
    head = model.get_output_embeddings()

    def forward(h: torch.Tensor) -> torch.Tensor:
        picked = h.reshape(-1, h.shape[-1]).index_select(0, flat_positions)
        return linear_cross_entropy(picked, head.weight, targets, chunk)

    head.forward = forward  # an instance attribute: the module's hooks still run around it
    try:
        yield
    finally:
        del head.forward
