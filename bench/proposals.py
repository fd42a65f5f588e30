"""Optimisations measured by the benchmarks side by side with the code before them; P1 has
since been applied in gere_ds/ (capture.lm_head_on_positions, losses.supervised_positions /
picked_ce_sums, used by ContinualTrainer.micro_step), and this module uses those functions.

P1 "LM head only where a loss needs it" (head_select + picked_terms + pick_micro_step):
the engine forward normally runs the LM head over every position of every row ([B, T, V]
logits), but CE needs logits only at supervised positions: the answer tokens of task rows (a few
per row) and every position of replay rows. A forward pre-hook on the output embedding replaces
its input [B, T, D] by the gathered [N, D] supervised positions, so the head computes [N, V]. The
final-norm hook still sees the full [B, T, D] (TM / l1 / l2 are unchanged). Works under ZeRO-3
(the hook only rewrites the module's input; DeepSpeed's own hooks still gather the weight) and
with tied embeddings. Not for kl (its term needs logits at every replay position, which P1
keeps, but the trainer's kl code indexes [B, T, V]; left as is).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gere_ds.capture import lm_head_on_positions
from gere_ds.losses import supervised_positions  # noqa: F401  (re-exported for the benchmarks)

IGNORE = -100
CE_CHUNK = 4096


# P1 now lives in gere_ds (the trainer's default path); the benchmarks use the same code
head_select = lm_head_on_positions


def ce_per_position(logits: torch.Tensor, targets: torch.Tensor, chunk: int = CE_CHUNK
                    ) -> torch.Tensor:
    """fp32 CE of each row of logits [N, V], computed ``chunk`` rows at a time."""
    parts = [F.cross_entropy(logits[s:s + chunk].float(), targets[s:s + chunk], reduction="none")
             for s in range(0, logits.shape[0], chunk)]
    return torch.cat(parts) if parts else logits.new_zeros((0,), dtype=torch.float32)


def picked_terms(tr, logits_sel: torch.Tensor, hidden: torch.Tensor, mb, replay_ids: list[int],
                 pos: torch.Tensor, targets: torch.Tensor):
    """The trainer's LocalTerms from the picked logits [N, V]: the CE sums from the N rows, the
    strategy term (tm / l1 / l2 need only the final-norm output) from the trainer's own code."""
    from gere_ds.data.collate import MicroBatch
    from gere_ds.losses import LocalTerms

    if tr.cfg.replay.strategy == "kl":
        raise ValueError("the picked-head proposal does not cover kl")
    T = mb.input_ids.shape[1]
    row_is_replay = mb.is_replay.index_select(0, pos // T)
    ce = ce_per_position(logits_sel, targets)
    task_sum = torch.where(row_is_replay, ce.new_zeros(()), ce).sum()
    replay_sum = torch.where(row_is_replay, ce, ce.new_zeros(())).sum()
    n_replay = row_is_replay.sum().to(torch.float32)
    n_task = torch.tensor(float(pos.numel()), device=pos.device) - n_replay
    # strategy term: the trainer's code, fed a batch without CE targets and empty logits
    no_labels = MicroBatch(mb.input_ids, mb.attention_mask, torch.full_like(mb.labels, IGNORE),
                           mb.replay_ids)
    dummy = hidden.new_zeros((1, 1, 1)).expand(mb.input_ids.shape[0], T, 1)
    reg = tr.local_terms(dummy, hidden, no_labels, replay_ids)
    return LocalTerms(task_sum, n_task, replay_sum, n_replay, reg.reg_sum, reg.reg_count,
                      reg.reg_elems, reg.tokens)


def pick_forward(tr, rows, task_index: int = 0):
    """make_batch + one engine forward with the head on supervised positions only."""
    mb, replay_ids = tr.make_batch(task_index, rows)
    pos, targets = supervised_positions(mb.labels)
    with head_select(tr.engine.module, pos):
        logits_sel = tr.engine.forward(mb.input_ids, mb.attention_mask)
    hidden = tr.capture.pop()
    return picked_terms(tr, logits_sel.reshape(-1, logits_sel.shape[-1]), hidden, mb,
                        replay_ids, pos, targets)


def pick_micro_step(tr, rows, task_index: int = 0):
    """ContinualTrainer.micro_step with P1 applied (same loss, same gradients)."""
    from gere_ds.losses import combine

    sl = combine(pick_forward(tr, rows, task_index), tr.cfg.replay.weight)
    if bool(torch.isfinite(sl.loss)):
        tr.engine.engine.backward(sl.local_loss)
    tr.engine.engine.step()
    return sl


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
