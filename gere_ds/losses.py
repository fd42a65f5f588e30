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


def supervised_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat positions p in [B*T] whose logits predict a target, and those targets.

    Position (b, t) predicts labels[b, t + 1]; the last position of a row predicts nothing.
    """
    nxt = torch.full_like(labels, IGNORE)
    nxt[:, :-1] = labels[:, 1:]
    flat = nxt.reshape(-1)
    pos = (flat != IGNORE).nonzero().squeeze(1)
    return pos, flat.index_select(0, pos)


def picked_ce_sums(logits: torch.Tensor, targets: torch.Tensor, row_is_replay: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(task CE sum, task count, replay CE sum, replay count) from logits already restricted
    to the supervised positions ([N, V], see capture.lm_head_on_positions); fp32 in chunks.

    Equal to token_ce_sum on the full logits for each row kind, without computing the LM head on
    the prompt tokens of task rows.
    """
    parts = [F.cross_entropy(logits[i:i + CE_CHUNK].float(), targets[i:i + CE_CHUNK],
                             reduction="none") for i in range(0, logits.shape[0], CE_CHUNK)]
    ce = torch.cat(parts) if parts else logits.new_zeros((0,), dtype=torch.float32)
    zero = ce.new_zeros(())
    n_replay = row_is_replay.sum().to(torch.float32)
    return (torch.where(row_is_replay, zero, ce).sum(), float(ce.shape[0]) - n_replay,
            torch.where(row_is_replay, ce, zero).sum(), n_replay)


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


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (float64 stays float64: tests check exact zeros in it)."""
    return x if x.dtype == torch.float64 else x.float()


def topk_kl_per_token(logits: torch.Tensor, teacher_ids: torch.Tensor,
                      teacher_logp: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) at temperature T per position, over the teacher's top-k tokens.

    logits [..., V] (student, any float dtype; computed in fp32), teacher_ids [..., k] (token
    ids), teacher_logp [..., k] (the teacher's log-probabilities at temperature 1 over the FULL
    vocabulary, as the teacher pass stores them). Returns [...] >= 0.

    The approximation (docs/strategies.md): both distributions are restricted to the teacher's
    k kept ids S and renormalised over S,

        p~_j = softmax_S(log p_j / T),   q~_j = softmax_S(z_j / T),
        KL_k = sum_S p~ (log p~ - log q~)

    ``log p_j / T`` equals the teacher's logits over T up to a per-position constant, which the
    renormalisation removes, so the stored T=1 log-probs serve every temperature. The student
    side is the student's full-vocabulary log-softmax at T restricted to S and renormalised;
    the full-vocabulary normaliser cancels in the renormalisation, so it is computed directly
    from the k gathered logits (exactly equal, and no [N, V] fp32 tensor is built). KL_k equals
    the full KL when the kept ids hold all the teacher's mass; in general
    KL_full = KL(Bern(P_t(S)) || Bern(P_s(S))) + P_t(S) KL_k + P_t(not S) KL_tail, so KL_k
    misses the mass the student moves between S and the rest. No T^2 factor (the reference's
    ``calc_kl`` has none); multiply ``replay.weight`` by T^2 for Hinton's scaling.
    """
    t = float(temperature)
    z = _fp32(logits.gather(-1, teacher_ids.long())) / t
    log_q = z - torch.logsumexp(z, dim=-1, keepdim=True)
    a = _fp32(teacher_logp).to(z.dtype) / t
    log_p = a - torch.logsumexp(a, dim=-1, keepdim=True)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def topk_kl_sum_count(logits: torch.Tensor, teacher_ids: torch.Tensor,
                      teacher_logp: torch.Tensor, mask: torch.Tensor, temperature: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of per-token top-k KL over valid positions, number of valid positions).

    logits [B, T, V], teacher_ids / teacher_logp [B, T, k], mask [B, T] (1 = real token). Every
    real replay position counts, the last one included (its distribution is still the teacher's);
    padding contributes nothing to either number. sum / count = the token mean.
    """
    kl = topk_kl_per_token(logits, teacher_ids, teacher_logp, temperature)
    valid = mask.bool()
    kl = torch.where(valid, kl, kl.new_zeros(()))
    return kl.sum(), valid.sum().to(torch.float32)


def full_kl_per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """Exact KL(teacher || student) at temperature T over the whole vocabulary, per position
    (the reference's ``calc_kl`` before its mean). For tests and measurements."""
    t = float(temperature)
    log_q = F.log_softmax(_fp32(student_logits) / t, dim=-1)
    log_p = F.log_softmax(_fp32(teacher_logits) / t, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def teacher_topk(logits: torch.Tensor, k: int, chunk: int = CE_CHUNK
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k (ids int32, log-probs fp32 at T=1 over the full vocabulary) per
    position of logits [N, V]; the fp32 log-softmax runs ``chunk`` positions at a time."""
    ids, logp = [], []
    for start in range(0, logits.shape[0], chunk):
        lp = F.log_softmax(logits[start:start + chunk].float(), dim=-1)
        values, idx = lp.topk(k, dim=-1)
        ids.append(idx.to(torch.int32))
        logp.append(values)
    if not ids:
        return (logits.new_zeros((0, k), dtype=torch.int32),
                logits.new_zeros((0, k), dtype=torch.float32))
    return torch.cat(ids), torch.cat(logp)


def feature_diff_sum_count(hidden: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor,
                           p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """L1 (p=1) / L2 (p=2) feature imitation: (sum over valid elements of |h - t| or (h - t)^2,
    number of valid elements = real tokens * D). sum / count = the element mean.

    hidden [B, T, D] student final-norm output (computed in fp32), teacher [B, T, D] (the stored
    bf16 features, upcast), mask [B, T]. Padding contributes nothing.
    """
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p}")
    diff = _fp32(hidden) - _fp32(teacher)
    v = diff.abs() if p == 1 else diff * diff
    valid = mask.bool()[..., None]
    v = torch.where(valid, v, v.new_zeros(()))
    return v.sum(), mask.sum().to(torch.float32) * hidden.shape[-1]


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
    has_task: torch.Tensor  # 1.0 where the global micro-batch held task / replay / term elements
    has_replay: torch.Tensor
    has_reg: torch.Tensor


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
                    violation_frac=creg / ereg.clamp(min=1.0), tokens=tokens, has_task=has_t,
                    has_replay=has_r, has_reg=(ereg > 0).float())
