"""One micro-step of training as two calls: ``compute_loss`` (forward + loss, no backward) and
``apply`` (backward + DeepSpeed's step). Tests and benchmarks call these same two functions.

Data flow: rows -> BatchMaker.make -> engine forward (LM head on the supervised positions only,
unless the term reads logits at every replay token; the hook keeps the final-norm output) ->
``row_terms`` (per-row CE sums + the ReplayTerm's RowStats) -> losses.reduce_rows -> StepLoss.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, ContextManager

import torch

from gere_ds.training.batch_split import rows_per_rank
from gere_ds.training.batches import BatchMaker
from gere_ds.model.capture import FinalNormCapture, lm_head_on_positions
from gere_ds.config.sections import RunConfig
from gere_ds.data.collate import MicroBatch
from gere_ds.data.sampler import Row
from gere_ds.model.engine import Engine
from gere_ds.errors import InputError
from gere_ds.training.linear_ce import check_head, head_ce_on_positions
from gere_ds.training.losses import (RowTerms, StepLoss, reduce_rows, row_ce_sums, row_sums,
                                     step_means, supervised_positions)
from gere_ds.runtime import dist, stop
from gere_ds.strategies import ReplayRows, ReplayTerm

# phases(name) -> a context manager around that phase (benchmarks time them; default: nothing)
Phases = Callable[[str], ContextManager]


def _no_phase(name: str) -> ContextManager:
    return contextlib.nullcontext()


def pack_capacity(cfg: RunConfig, engine: Engine) -> int | None:
    """Tokens per packed sequence when training packs its rows (``train.packing``), else None:
    ``train.pack_length``, or the model's context length (positions restart in every row, so
    this bounds memory, not positions)."""
    t = cfg.train
    if not t.packing:
        return None
    context = engine.context_length()
    if t.pack_length and context and t.pack_length > context:
        raise InputError(f"{t.pack_length} is longer than the model's context "
                         f"(max_position_embeddings = {context})", field="train.pack_length")
    return t.pack_length or context or DEFAULT_PACK_LENGTH


DEFAULT_PACK_LENGTH = 4096  # a model that names no context length


def chunked_ce(cfg: RunConfig, engine: Engine) -> bool:
    """Whether the LM head and its CE run in chunks (``train.chunked_ce``); one line when the
    model's head cannot (gere_ds.training.linear_ce)."""
    if not cfg.train.chunked_ce:
        return False
    why = check_head(engine.module)
    if why:
        raise InputError(f"the model cannot run its head in chunks: {why}",
                         field="train.chunked_ce")
    return True


class TrainStep:
    """The loss of one micro-batch and its application, for one ReplayTerm."""

    def __init__(self, cfg: RunConfig, engine: Engine, capture: FinalNormCapture,
                 batches: BatchMaker, term: ReplayTerm, world: int,
                 phases: Phases | None = None) -> None:
        self.cfg, self.engine, self.capture = cfg, engine, capture
        self.batches, self.term, self.world = batches, term, world
        self.phases = phases or _no_phase
        self._losses_bad: torch.Tensor | None = None  # this optimizer step's, on the device
        self.pack_capacity = pack_capacity(cfg, engine)
        self.chunked_ce = chunked_ce(cfg, engine)
        self.skipped = False  # whether the last optimizer step was skipped as non-finite

    def row_terms(self, logits: torch.Tensor, hidden: torch.Tensor, mb: MicroBatch,
                  replay_ids: list[int], picked: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> RowTerms:
        """This rank's per-row loss terms. ``logits`` are [B, T, V], or with ``picked`` =
        (positions, targets) the [N, V] logits of the supervised positions only."""
        n_rows, width = mb.input_ids.shape
        logits_at = logits
        if picked is None:  # full logits: take the supervised positions here
            picked = self._picked(mb)
            logits_at = logits.reshape(-1, logits.shape[-1]).index_select(0, picked[0])
        pos, targets = picked
        if logits_at.dim() == 1:  # the chunked head's CE per position (train.chunked_ce)
            ce_sum, ce_count = row_sums(logits_at, pos // width, n_rows)
        else:
            ce_sum, ce_count = row_ce_sums(logits_at.reshape(-1, logits_at.shape[-1]), targets,
                                           pos // width, n_rows)
        zeros = ce_sum.new_zeros(n_rows)
        reg = [zeros, zeros, zeros, zeros]  # sum, count, elements, held
        # every rank and micro-step carries the same names, so the log values add up
        logged = {name: zeros for name in self.term.stat_names}
        rows = [i for i, sid in enumerate(replay_ids) if sid >= 0]
        stats = None
        if rows and self.term.has_term:  # asked with or without teacher data
            sel = mb.replay_rows if mb.replay_rows is not None else torch.tensor(
                rows, device=hidden.device)
            replay = ReplayRows(sel, [replay_ids[i] for i in rows],
                                mb.attention_mask.index_select(0, sel), width)
            stats = self.term.local_sums(replay, logits, hidden)
        if stats is not None:
            reg = [zeros.index_put((sel,), part.to(zeros.dtype)) for part in stats]
            logged = {name: zeros.index_put((sel,), stats.logged[name].detach().to(zeros.dtype))
                      for name in self.term.stat_names}
        return RowTerms(mb.is_replay, ce_sum, ce_count, *reg,
                        mb.attention_mask.sum().to(torch.float32), logged)

    def _forward(self, mb: MicroBatch, picked: tuple[torch.Tensor, torch.Tensor] | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ([N, V] at the picked positions, else [B, T, V]; with ``train.chunked_ce``
        the picked positions' CE [N] instead) and the final-norm output [B, T, D], from the
        padded rows or from their packed form: the same values, in the padded layout either
        way, so the loss terms never see which ran."""
        packed = mb.packed
        if packed is None:
            ids, mask, position_ids, head_at = mb.input_ids, mb.attention_mask, None, None
        else:
            ids, mask, position_ids = packed.input_ids, None, packed.position_ids
            head_at = None if picked is None else packed.source.index_select(0, picked[0])
        if picked is None:
            logits = self.engine.forward(ids, mask, position_ids)
        else:
            at = picked[0] if packed is None else head_at
            head = (head_ce_on_positions(self.engine.module, at, picked[1]) if self.chunked_ce
                    else lm_head_on_positions(self.engine.module, at))
            with head:
                logits = self.engine.forward(ids, mask, position_ids)
        hidden = self.capture.pop()
        if packed is not None:
            hidden = packed.unpack(hidden, mb.attention_mask)
            if picked is None:
                logits = packed.unpack(logits, mb.attention_mask)
        return logits, hidden

    @staticmethod
    def _picked(mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The supervised positions and targets, as collate built them on the CPU."""
        if mb.positions is not None and mb.targets is not None:
            return mb.positions, mb.targets
        return supervised_positions(mb.labels)

    def compute_loss(self, task_index: int, rows: list[Row],
                     full_logits: bool | None = None) -> StepLoss:
        """Forward on the engine, per-row terms, the configured reduction; no backward.
        Every rank calls it once per micro-step (ZeRO-3 forwards are collective).
        ``full_logits`` None: the term decides (kl reads logits at every replay token; else
        the LM head runs only where a target is: same loss and gradients, less work)."""
        with self.phases("make_batch"):
            mb, replay_ids = self.batches.make(task_index, rows, self.pack_capacity)
        full = self.term.needs_full_logits if full_logits is None else full_logits
        picked = None if full else self._picked(mb)
        with self.phases("forward"):
            logits, hidden = self._forward(mb, picked)
        with self.phases("row_terms"):
            terms = self.row_terms(logits, hidden, mb, replay_ids, picked)
        if stop.injected("GERE_DS_NAN_AT", "a micro-step"):  # test hook: a non-finite loss
            terms = dataclasses.replace(terms, ce_sum=terms.ce_sum * float("nan"))
        t = self.cfg.train
        with self.phases("reduce_rows"):
            return reduce_rows(terms, self.cfg.replay.reduction, self.term.weight,
                               rows_per_rank(self.cfg) * self.world, t.grad_accum)

    def apply(self, sl: StepLoss, before_step: Callable[[], None] | None = None) -> None:
        """Backward and DeepSpeed's step (which applies the optimizer at the accumulation
        boundary). A non-finite loss still goes through backward (skipping backward would leave
        ZeRO-3 without gradients to step on); at the boundary the ranks agree whether any loss
        of this optimizer step or any gradient is non-finite (gere_ds.model.step_guard), and such a
        step is skipped: no update, the gradients dropped. ``before_step`` runs between the two
        (tests read the accumulated gradients there)."""
        engine = self.engine
        with self.phases("backward"):
            engine.backward(sl.local_loss)
        bad = (~torch.isfinite(sl.local_loss.detach())).float()
        self._losses_bad = bad if self._losses_bad is None else self._losses_bad + bad
        if before_step is not None:
            before_step()
        skip = False
        if engine.at_boundary():
            skip = engine.step_is_nonfinite(self._losses_bad)
            self._losses_bad, self.skipped = None, skip
        with self.phases("optimizer_step"):
            engine.step(skip)


class StepStats:
    """This rank's log values (losses.STAT_NAMES) summed over the micro-steps of one optimizer
    step; ``reduce`` sums them over ranks (the step's one collective for logging)."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.logged: tuple[str, ...] = ()  # the term's own statistics (StepLoss.logged)

    def add(self, sl: StepLoss) -> None:
        self.total = sl.stats if self.total is None else self.total + sl.stats
        self.logged = sl.logged

    def reduce(self) -> dict[str, float]:
        """Global values of the step, identical on every rank (one all-reduce, every rank)."""
        return step_means(dist.all_reduce_sum(self.total.clone()), self.logged)
