"""Loss terms per row, and the two ways of weighing rows into one loss.

Every term is computed per row of this rank's micro-batch (sums with autograd, counts detached:
``RowTerms``). Then one of two reductions (docs/method.md, "Weighing rows"):

- ``row`` (default, the reference recipe): the loss of an optimizer step is the mean over the B
  rows of the global batch of each row's loss, ``l_r = CE_r`` for a task row and
  ``l_r = CE_r + w_r * REG_r`` for a replay row (``dy``: ``w_r = CE_r / (REG_r + 1e-8)``, per
  row). Each row's loss needs only its own row, so this needs no collective: the local loss is
  ``world * grad_accum / B * sum(l_r)``, and DeepSpeed's mean over ranks and accumulation steps
  gives exactly the gradient of the global mean.
- ``global_micro_batch``: CE of task and replay tokens mixed 1:1 and the term as one ratio over
  the union of all ranks' micro-batches at this micro-step (one small all-reduce of counts).

DeepSpeed averages gradients over ranks and divides by the accumulation steps, so with either
reduction the optimised value is ``sum over ranks and micro-steps of local_loss / (world *
grad_accum)``: that is what ``StepLoss.stats`` carries to the log. No `.item()` here: nothing
forces a host-device sync per micro-step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from gere_ds.data.encode import IGNORE
from gere_ds.runtime import dist

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


def row_ce_sums(logits: torch.Tensor, targets: torch.Tensor, row_of: torch.Tensor,
                n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row [B]: (CE sum, number of targets), from logits already restricted to the
    supervised positions ([N, V], see capture.lm_head_on_positions); fp32 in chunks.

    ``row_of`` [N] is the row of each position. Equal to token_ce_sum on the full logits row by
    row, without computing the LM head on the prompt tokens of task rows.
    """
    parts = [F.cross_entropy(logits[i:i + CE_CHUNK].float(), targets[i:i + CE_CHUNK],
                             reduction="none") for i in range(0, logits.shape[0], CE_CHUNK)]
    ce = torch.cat(parts) if parts else logits.new_zeros((0,), dtype=torch.float32)
    return row_sums(ce, row_of, n_rows)


def row_sums(ce: torch.Tensor, row_of: torch.Tensor, n_rows: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row [B]: (CE sum, number of targets) of the per-position CE [N] (fp32)."""
    sums = ce.new_zeros(n_rows).index_add(0, row_of, ce)
    # index_add, not bincount: bincount reads the largest index back to size its output, a
    # host-device sync per micro-step on a GPU
    counts = ce.new_zeros(n_rows).index_add(0, row_of, torch.ones_like(ce))
    return sums, counts


def tri_states(hidden: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """The activation state of each element (int8): +1 at or above hi, -1 at or below lo, else 0.
    The one rule for the teacher's cached states and for every later measurement of them."""
    return (hidden >= hi).to(torch.int8) - (hidden <= lo).to(torch.int8)


def tm_violations(hidden: torch.Tensor, states: torch.Tensor, lo: torch.Tensor,
                  hi: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Elementwise TM penalty v >= 0 (docs/method.md table), zero on padding.

    hidden [B, T, D] (any float dtype, computed in fp32), states [B, T, D] in {-1, 0, +1},
    lo/hi [D], mask [B, T].
    """
    h = hidden.float()
    above_hi = F.relu(h - hi)
    below_lo = F.relu(lo - h)
    v = torch.where(states > 0, F.relu(hi - h),
                    torch.where(states < 0, F.relu(h - lo), above_hi + below_lo))
    return v * mask[..., None].to(v.dtype)


def rounding_step(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype``'s grid at |x| (one unit in the last place), in fp32."""
    _, exponent = torch.frexp(x.float().abs())  # |x| = m * 2^e, m in [0.5, 1)
    eps = torch.finfo(dtype).eps  # the spacing at 1, i.e. in [1, 2) where e = 1
    return torch.ldexp(torch.full_like(x, eps, dtype=torch.float32), exponent - 1)


def tm_dead_band(lo: torch.Tensor, hi: torch.Tensor, sigma: torch.Tensor, units: float,
                 compute_dtype: torch.dtype) -> torch.Tensor:
    """Per-dimension band [D] of the opt-in rounding guard (``replay.tm_dead_band``):
    ``units`` rounding units of the compute dtype (its eps: 2^-7 for bf16, 2^-23 for fp32) times
    sigma_d, plus one rounding step at the larger threshold magnitude; all 0 when ``units`` is 0
    (the default: the reference's exact test).

    Kernels that round by shape make the base model's final-norm output differ between the
    teacher pass and training by a few rounding units of the layers below, which scale with the
    dimension's spread sigma_d; and teacher and student values both lie on the compute dtype's
    grid, so a threshold between two neighbouring grid points turns a one-step difference into
    a violation of up to one step.
    """
    if units <= 0:
        return torch.zeros_like(sigma, dtype=torch.float32)
    edge = torch.maximum(lo.float().abs(), hi.float().abs())
    return units * torch.finfo(compute_dtype).eps * sigma.float() + \
        rounding_step(edge, compute_dtype)


def tm_row_terms(hidden: torch.Tensor, states: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                 mask: torch.Tensor, band: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row [B]: (sum of violations, violating elements, valid elements, violating elements
    inside the band).

    Without ``band`` (or band 0) this is the reference's exact test. With the opt-in ``band`` [D]
    a violation no larger than its dimension's band keeps its value in the sum and its place in
    the count, but passes no gradient: the loss, the per-row normaliser and the dy weight are
    the reference's, so a larger violation gets exactly the reference's gradient, the loss is
    continuous at the band's edge, and only the push on rounding-sized violations is removed.
    """
    v = tm_violations(hidden, states, lo, hi, mask)
    inside = v.new_zeros(v.shape[0])
    if band is not None:
        small = (v <= band) & (v.detach() > 0)
        inside = small.sum((1, 2)).to(torch.float32)
        # value kept, gradient cut: the normaliser and dy weight see every violation
        v = torch.where(small, v.detach(), v)
    elems = mask.sum(1).to(torch.float32) * hidden.shape[-1]
    violating = (v.detach() > 0).sum((1, 2)).to(torch.float32)
    return v.sum((1, 2)), violating, elems, inside


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


def topk_kl_rows(logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logp: torch.Tensor,
                 mask: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row [B]: (sum of per-token top-k KL over valid positions, valid positions).

    logits [B, T, V], teacher_ids / teacher_logp [B, T, k], mask [B, T] (1 = real token). Every
    real replay position counts, the last one included (its distribution is still the teacher's);
    padding contributes nothing to either number. sum / count = the row's token mean.
    """
    kl = topk_kl_per_token(logits, teacher_ids, teacher_logp, temperature)
    valid = mask.bool()
    kl = torch.where(valid, kl, kl.new_zeros(()))
    return kl.sum(1), valid.sum(1).to(torch.float32)


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


def feature_diff_rows(hidden: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor,
                      p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """L1 (p=1) / L2 (p=2) feature imitation per row [B]: (sum over valid elements of |h - t|
    or (h - t)^2, valid elements = real tokens * D). sum / count = the row's element mean.

    hidden [B, T, D] student final-norm output (computed in fp32), teacher [B, T, D] (the stored
    bf16 features, upcast), mask [B, T]. Padding contributes nothing.
    """
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p}")
    diff = _fp32(hidden) - _fp32(teacher)
    v = diff.abs() if p == 1 else diff * diff
    valid = mask.bool()[..., None]
    v = torch.where(valid, v, v.new_zeros(()))
    return v.sum((1, 2)), mask.sum(1).to(torch.float32) * hidden.shape[-1]


# ----------------------------------------------------------------------------- reductions


@dataclass
class RowTerms:
    """Per-row sums (with autograd) and counts (detached) of this rank's micro-batch, [B] each.

    The strategy term REG_r = reg_sum / (reg_count + 1e-8) (its RowStats): for tm the mean over
    the row's violating elements (reg_count = violating elements), for kl the token mean, for
    l1/l2 the element mean. Task rows, and every row of none / replay, carry zeros there.
    """

    is_replay: torch.Tensor  # bool
    ce_sum: torch.Tensor
    ce_count: torch.Tensor
    reg_sum: torch.Tensor
    reg_count: torch.Tensor
    reg_elems: torch.Tensor  # elements the term looked at (tm: its violation fraction)
    reg_ignored: torch.Tensor  # counted elements passing no gradient (tm: inside the guard)
    tokens: torch.Tensor  # scalar: non-pad tokens of the micro-batch (throughput)
    # the term's own per-row statistics by name (RowStats.logged), summed over replay rows
    logged: dict[str, torch.Tensor] = field(default_factory=dict)


# the detached values each micro-step adds to the step's log (summed over micro-steps and ranks);
# a term's own statistics (RowTerms.logged) follow them, under their names (StepLoss.logged)
STAT_NAMES = ("loss", "task_rows", "task_ce", "replay_rows", "replay_ce", "reg", "weight",
              "weight_rows", "violating", "reg_elems", "reg_ignored", "tokens", "nonfinite")


@dataclass
class StepLoss:
    """The loss to back-propagate on this rank, and this rank's detached log values
    (``stats``, ordered as STAT_NAMES then ``logged``), which sum over micro-steps and ranks."""

    local_loss: torch.Tensor
    stats: torch.Tensor
    logged: tuple[str, ...] = ()  # the names of the term's own statistics at the end of stats


def _stats(t: RowTerms, loss_part: torch.Tensor, ce_r: torch.Tensor, reg_r: torch.Tensor,
           w_r: torch.Tensor, dy: bool) -> torch.Tensor:
    """The STAT_NAMES vector of one micro-step: row sums of CE and REG (logged as row means
    whatever the reduction) and of the weight; a dy weight only over the rows whose term is
    non-zero (CE / 1e-8 where the term is 0 is no number to average)."""
    replay = t.is_replay.float()
    task = 1.0 - replay
    weighted = replay * (reg_r > 0).float() if dy else replay
    loss_part = loss_part.detach().float()
    parts = [loss_part, task.sum(), (task * ce_r).sum(), replay.sum(), (replay * ce_r).sum(),
             (replay * reg_r).sum(), (weighted * w_r).sum(), weighted.sum(),
             (replay * t.reg_count).sum(), (replay * t.reg_elems).sum(),
             (replay * t.reg_ignored).sum(), t.tokens.float(),
             (~torch.isfinite(loss_part)).float()]
    parts += [(replay * value).sum() for value in t.logged.values()]
    return torch.stack([x.detach().float().reshape(()) for x in parts])


def _row_means(t: RowTerms, reg_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: CE_r (token mean) and REG_r = reg_sum / (reg_count + reg_eps)."""
    return t.ce_sum / t.ce_count.clamp(min=1.0), t.reg_sum / (t.reg_count + reg_eps)


def reduce_per_row(t: RowTerms, weight: float | str, global_rows: int, grad_accum: int,
                   world: int | None = None, reg_eps: float = TM_EPS) -> StepLoss:
    """L = (1/B) sum over the global batch's B rows of l_r (docs/method.md), with
    l_r = CE_r for a task row and CE_r + w_r * REG_r for a replay row.

    CE_r is the row's token mean; w_r is ``weight`` or, for 'dy', CE_r / (REG_r + 1e-8),
    detached. No collective: the local loss is scaled so DeepSpeed's mean over ranks and
    accumulation steps is the global mean.
    """
    world = dist.world_size() if world is None else world
    ce_r, reg_r = _row_means(t, reg_eps)
    if weight == "dy":
        w_r = (ce_r / (reg_r + TM_EPS)).detach()
    else:
        w_r = ce_r.new_full(ce_r.shape, float(weight))
    row_loss = ce_r + torch.where(t.is_replay, w_r * reg_r, reg_r.new_zeros(()))
    local_loss = row_loss.sum() * (world * grad_accum / global_rows)
    return StepLoss(local_loss, _stats(t, row_loss.sum() / global_rows, ce_r, reg_r, w_r,
                                       weight == "dy"), tuple(t.logged))


def reduce_global_micro_batch(t: RowTerms, weight: float | str, grad_accum: int,
                              world: int | None = None, reg_eps: float = TM_EPS) -> StepLoss:
    """L = a_t * CE_task + a_r * CE_replay + w * REG over the global micro-batch (the union of
    all ranks' micro-batches at this micro-step): token-mean CEs, REG one ratio over all replay
    rows' elements; a_t = a_r = 1/2 when both kinds are present, else 1 for the one present.
    ``weight`` a number or 'dy' = CE / (REG + 1e-8), detached. One all-reduce of 6 numbers.
    """
    world = dist.world_size() if world is None else world
    replay = t.is_replay
    zero = t.ce_sum.new_zeros(())
    task_sum = torch.where(replay, zero, t.ce_sum).sum()
    replay_sum = torch.where(replay, t.ce_sum, zero).sum()
    reg_sum = torch.where(replay, t.reg_sum, zero).sum()
    counts = torch.stack([torch.where(replay, zero, t.ce_count).sum(),
                          torch.where(replay, t.ce_count, zero).sum(),
                          torch.where(replay, t.reg_count, zero).sum()])
    local = torch.cat([torch.stack([task_sum, replay_sum, reg_sum]).detach(), counts.detach()])
    g = dist.all_reduce_sum(local.float().clone()) if world > 1 else local.float()
    st, sr, sreg, ct, cr, creg = g.unbind(0)
    has_t, has_r = (ct > 0).float(), (cr > 0).float()
    both = (has_t + has_r).clamp(min=1.0)
    a_t, a_r = has_t / both, has_r / both
    ce = a_t * st / ct.clamp(min=1.0) + a_r * sr / cr.clamp(min=1.0)
    reg = sreg / (creg + reg_eps)
    w = ce / (reg + TM_EPS) if weight == "dy" else g.new_tensor(float(weight))
    local_loss = world * (a_t * task_sum / ct.clamp(min=1.0) + a_r * replay_sum / cr.clamp(min=1.0)
                          + w * reg_sum / (creg + reg_eps))
    ce_r, reg_r = _row_means(t, reg_eps)
    return StepLoss(local_loss, _stats(t, local_loss / (world * grad_accum), ce_r, reg_r,
                                       w.expand(ce_r.shape), weight == "dy"), tuple(t.logged))


def reduce_rows(t: RowTerms, reduction: str, weight: float | str, global_rows: int,
                grad_accum: int) -> StepLoss:
    """The configured reduction (``replay.reduction``) of one micro-step's row terms."""
    if reduction == "row":
        return reduce_per_row(t, weight, global_rows, grad_accum)
    if reduction == "global_micro_batch":
        return reduce_global_micro_batch(t, weight, grad_accum)
    raise ValueError(f"unknown reduction {reduction!r}")


def step_means(total: torch.Tensor, logged: tuple[str, ...] = ()) -> dict[str, float]:
    """Log values of one optimizer step from the STAT_NAMES sums (then the term's ``logged``
    ones) over its micro-steps and all ranks. The loss is the optimised one; CEs and the term
    are row means; the weight is left out where no replay row had a non-zero term; the
    fractions (counted, held) are over the elements the term looked at; a term's own statistic
    is its mean over replay rows, under its name."""
    s = dict(zip(STAT_NAMES + logged, (float(x) for x in total.tolist())))
    out = {"loss": s["loss"],
           "task_ce": s["task_ce"] / max(s["task_rows"], 1.0),
           "replay_ce": s["replay_ce"] / max(s["replay_rows"], 1.0),
           "reg": s["reg"] / max(s["replay_rows"], 1.0),
           "violation_frac": s["violating"] / max(s["reg_elems"], 1.0),
           "ignored_frac": s["reg_ignored"] / max(s["reg_elems"], 1.0),
           "tokens": s["tokens"], "nonfinite": s["nonfinite"],
           "task_rows": s["task_rows"], "replay_rows": s["replay_rows"]}
    if s["weight_rows"] > 0:
        out["reg_weight"] = s["weight"] / s["weight_rows"]
    out.update({name: s[name] / max(s["replay_rows"], 1.0) for name in logged})
    return out
