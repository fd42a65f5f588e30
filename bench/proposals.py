"""Optimisations measured by the benchmarks side by side with the code before them.

P1 "LM head only where a loss needs it" is no longer a proposal: it is the trainer's own path
(capture.lm_head_on_positions + losses.supervised_positions / row_ce_sums in
ContinualTrainer.forward_loss, every strategy but kl), and the benchmarks run the trainer's code
for it (``head_select`` / ``supervised_positions`` below are its names in
tests/test_optimisations.py). What is left here: P2, the CE of the supervised positions with a
flat index_select gather and/or a fused CE (FusedCE), measured by bench_ce.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gere_ds.capture import lm_head_on_positions
from gere_ds.losses import supervised_positions  # noqa: F401  (re-exported for the benchmarks)

IGNORE = -100
CE_CHUNK = 4096


# P1 is the trainer's path (ContinualTrainer.forward_loss); the same hook under its old name
head_select = lm_head_on_positions


def ce_per_position(logits: torch.Tensor, targets: torch.Tensor, chunk: int = CE_CHUNK
                    ) -> torch.Tensor:
    """fp32 CE of each row of logits [N, V], computed ``chunk`` rows at a time."""
    parts = [F.cross_entropy(logits[s:s + chunk].float(), targets[s:s + chunk], reduction="none")
             for s in range(0, logits.shape[0], chunk)]
    return torch.cat(parts) if parts else logits.new_zeros((0,), dtype=torch.float32)


class FusedCE(torch.autograd.Function):
    """P2: per-row CE of bf16/fp32 logits [N, V] with fp32 maths and a hand-written backward
    (softmax - one-hot, computed in place in one fp32 buffer), instead of F.cross_entropy on an
    fp32 copy whose log_softmax backward is the slowest kernel of the CE term on CPU."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = logits.float()
        lse = torch.logsumexp(x, dim=-1)
        loss = lse - x.gather(1, targets[:, None]).squeeze(1)
        ctx.save_for_backward(logits, targets, lse)
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        p = logits.float().sub_(lse[:, None]).exp_()
        p[torch.arange(p.shape[0], device=p.device), targets] -= 1
        p.mul_(grad[:, None].float())
        return p.to(logits.dtype), None


def fused_ce_per_position(logits: torch.Tensor, targets: torch.Tensor, chunk: int = CE_CHUNK
                          ) -> torch.Tensor:
    """P2 applied ``chunk`` rows at a time (the fp32 buffer is at most chunk x V)."""
    parts = [FusedCE.apply(logits[s:s + chunk], targets[s:s + chunk])
             for s in range(0, logits.shape[0], chunk)]
    return torch.cat(parts) if parts else logits.new_zeros((0,), dtype=torch.float32)


def flat_supervised(labels: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Like supervised_positions, restricted to the selected rows (token_ce_sum's selection)."""
    return supervised_positions(labels.masked_fill(~rows[:, None], IGNORE))
