"""Loss terms and their cross-rank reduction.

Every term is a ratio ``sum / count`` over the GLOBAL micro-batch (the union of all ranks'
micro-batches at this micro-step). Each rank computes local sums with autograd and the counts;
one all-reduce of a small detached vector gives the global counts and values. DeepSpeed averages
gradients over ranks, so the local loss handed to ``backward`` is ``world * local_sum /
global_count``: the averaged gradient then equals the gradient of the global loss, exactly what
one process would compute on the global batch. The reported values are the global ones, equal on
every rank. No `.item()` here: nothing forces a host-device sync per micro-step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gere_ds import dist
from gere_ds.data.encode import IGNORE

TM_EPS = 1e-8  # reference: sum(v) / (count_nonzero(v) + 1e-8)
CE_CHUNK = 4096  # positions per fp32 log-softmax chunk


# ----------------------------------------------------------------------------- local terms


def token_ce_sum(logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token CE over the selected rows' supervised positions, and their count.

    Only the positions that carry a target are gathered, and the fp32 log-softmax runs in chunks,
    so the full [B, T, V] logits are never upcast at once.
    """
    shift_logits = logits[:, :-1]
    shift_labels = labels[:, 1:].masked_fill(~rows[:, None], IGNORE)
    keep = shift_labels != IGNORE
    picked = shift_logits[keep]  # [N, V]
    targets = shift_labels[keep]
    total = logits.new_zeros((), dtype=torch.float32)
    for start in range(0, picked.shape[0], CE_CHUNK):
        chunk = picked[start:start + CE_CHUNK].float()
        total = total + F.cross_entropy(chunk, targets[start:start + CE_CHUNK], reduction="sum")
    return total, keep.sum().to(torch.float32)


def tm_violations(hidden: torch.Tensor, states: torch.Tensor, lo: torch.Tensor,
                  hi: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Elementwise TM penalty v >= 0 (method.md table), zero on padding.

    hidden [B, T, D] (any float dtype, computed in fp32), states [B, T, D] in {-1, 0, +1},
    lo/hi [D], mask [B, T].
    """
    h = hidden.float()
    above_hi = F.relu(h - hi)
    below_lo = F.relu(lo - h)
    v = torch.where(states > 0, F.relu(hi - h),
                    torch.where(states < 0, F.relu(h - lo), above_hi + below_lo))
    return v * mask[..., None].to(v.dtype)


def tm_sum_count(hidden: torch.Tensor, states: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                 mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum of violations, number of violating elements, number of valid elements)."""
    v = tm_violations(hidden, states, lo, hi, mask)
    elems = mask.sum().to(torch.float32) * hidden.shape[-1]
    return v.sum(), torch.count_nonzero(v.detach()).to(torch.float32), elems


def tm_reference(hidden: torch.Tensor, states: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
    """The reference reduction on one process: sum(v) / (count_nonzero(v) + 1e-8)."""
    v = tm_violations(hidden, states, lo, hi, mask)
    return v.sum() / (torch.count_nonzero(v) + TM_EPS)


# ----------------------------------------------------------------------------- combination


@dataclass
class LocalTerms:
    """This rank's sums (with autograd) and counts (detached) for one micro-step."""

    task_sum: torch.Tensor
    task_count: torch.Tensor
    replay_sum: torch.Tensor
    replay_count: torch.Tensor
    reg_sum: torch.Tensor  # the strategy term (tm / kl / l1 / l2); zeros for none/replay
    reg_count: torch.Tensor
    reg_elems: torch.Tensor  # elements the term looked at (for the violation fraction)
    tokens: torch.Tensor  # non-pad tokens in the micro-batch (throughput)


STAT_NAMES = ("task_sum", "task_count", "replay_sum", "replay_count", "reg_sum", "reg_count",
              "reg_elems", "tokens")


@dataclass
class StepLoss:
    """The loss to back-propagate on this rank, and the global values to log (detached)."""

    local_loss: torch.Tensor
    loss: torch.Tensor
    task_ce: torch.Tensor
    replay_ce: torch.Tensor
    reg: torch.Tensor
    reg_weight: torch.Tensor
    violation_frac: torch.Tensor
    tokens: torch.Tensor


def combine(terms: LocalTerms, weight: float | str, reg_eps: float = TM_EPS) -> StepLoss:
    """L = a_t * CE_task + a_r * CE_replay + w * REG over the global micro-batch.

    a_t = a_r = 1/2 when the global micro-batch holds both task and replay tokens, else 1 for the
    one present (reference behaviour). ``weight`` is a number or 'dy' = CE / (REG + 1e-8), both
    detached. Every rank runs exactly one all-reduce here.
    """
    local = torch.stack([getattr(terms, n).detach().float().reshape(()) for n in STAT_NAMES])
    g = dist.all_reduce_sum(local.clone())
    st, ct, sr, cr, sreg, creg, ereg, tokens = g.unbind(0)
    has_t, has_r = (ct > 0).float(), (cr > 0).float()
    both = (has_t + has_r).clamp(min=1.0)
    a_t, a_r = has_t / both, has_r / both
    task_ce = st / ct.clamp(min=1.0)
    replay_ce = sr / cr.clamp(min=1.0)
    ce = a_t * task_ce + a_r * replay_ce
    reg = sreg / (creg + reg_eps)
    w = ce / (reg + TM_EPS) if weight == "dy" else g.new_tensor(float(weight))
    world = float(dist.world_size())
    local_loss = world * (a_t * terms.task_sum / ct.clamp(min=1.0)
                          + a_r * terms.replay_sum / cr.clamp(min=1.0)
                          + w * terms.reg_sum / (creg + reg_eps))
    return StepLoss(local_loss=local_loss, loss=ce + w * reg, task_ce=task_ce,
                    replay_ce=replay_ce, reg=reg, reg_weight=w,
                    violation_frac=creg / ereg.clamp(min=1.0), tokens=tokens)
