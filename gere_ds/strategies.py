"""Replay strategies as objects: one ``ReplayTerm`` class per ``replay.strategy``.

A term knows everything the rest of the code needs about its strategy: whether replay rows are
mixed in at all, which teacher data it reads (``teacher_kind``: the teacher cache's kind, None
= no teacher pass), whether it reads the logits at every replay token (``needs_full_logits``),
the settings its teacher data depends on (part of the cache fingerprint), the per-row local sums
of its term, its weight and its TensorBoard names. Config validation, the trainer, the teacher
pass and the cache ask the term (what else a new strategy touches today: docs/strategies.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch

from gere_ds.errors import InputError
from gere_ds.losses import feature_diff_rows, tm_dead_band, tm_row_terms, topk_kl_rows

if TYPE_CHECKING:  # config imports this module (validation asks the registry)
    from gere_ds.config import ReplayConfig, RunConfig

# (sum, counted elements, elements looked at, violations the opt-in band holds without gradient)
LocalSums = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class ReplayRows:
    """The replay rows of one micro-batch, as a term reads them."""

    rows: torch.Tensor  # [R] row indices in the micro-batch
    sample_ids: list[int]  # their replay sample ids
    mask: torch.Tensor  # [R, T] attention mask of those rows
    width: int  # T, the micro-batch's padded length


class ReplayTerm:
    """The strategy ``none``'s behaviour; subclasses override what differs."""

    name: ClassVar[str] = "none"
    uses_replay: ClassVar[bool] = False  # replay rows are mixed into the batches
    teacher_kind: ClassVar[str | None] = None  # the teacher cache's kind; None: no teacher pass
    needs_full_logits: ClassVar[bool] = False  # the term reads logits at every replay token

    def __init__(self, replay: ReplayConfig, bf16: bool = True) -> None:
        """``replay``: the run's ReplayConfig; ``bf16``: the compute dtype of training."""
        self.replay = replay
        self.compute_dtype = torch.bfloat16 if bf16 else torch.float32
        self.teacher: Any = None  # set by attach(): this rank's teacher data

    @property
    def needs_teacher(self) -> bool:
        return self.teacher_kind is not None

    @property
    def weight(self) -> float | str:
        """The weight rule of the term: a number, or 'dy' (CE_r / REG_r per row)."""
        return self.replay.weight

    def teacher_settings(self) -> dict[str, Any]:
        """Settings, beyond the common ones, that this term's teacher data depends on."""
        return {}

    def check_model(self, vocab_size: int, model_dir: str) -> None:
        """Checks against the model's config.json, before any work (one clear line)."""

    def attach(self, teacher: Any, device: torch.device | str = "cpu",
               log: Callable[[str], None] | None = None) -> None:
        """Use ``teacher`` (this rank's teacher data) from now on."""
        self.teacher = teacher

    def local_sums(self, replay: ReplayRows, logits: torch.Tensor, hidden: torch.Tensor
                   ) -> LocalSums | None:
        """Per replay row: the term's sums. ``logits`` are [B, T, V] when ``needs_full_logits``
        (else only the supervised positions'), ``hidden`` [B, T, D]. None: no term."""
        return None

    def log_values(self, means: dict[str, float]) -> dict[str, float]:
        """The term's own TensorBoard scalars from one step's log values (losses.step_means)."""
        if not self.needs_teacher:
            return {}
        values = {f"train/{self.name}": means["reg"]}
        if "reg_weight" in means:  # dy: absent where no replay row had a non-zero term
            values[f"train/{self.name}_weight"] = means["reg_weight"]
        return values


class NoReplay(ReplayTerm):
    """Plain fine-tuning on the task rows."""


class PlainReplay(ReplayTerm):
    """Replay rows trained with their language-modelling CE only."""

    name = "replay"
    uses_replay = True


class ThresholdMargin(ReplayTerm):
    """GeRe's TM: the final-norm output kept on the teacher's side of mu +- k*sigma."""

    name = "tm"
    uses_replay = True
    teacher_kind = "states"

    def __init__(self, replay: ReplayConfig, bf16: bool = True) -> None:
        super().__init__(replay, bf16)
        self.lo = self.hi = self.band = None

    def teacher_settings(self) -> dict[str, Any]:
        return {"threshold_k": self.replay.threshold_k}

    def attach(self, teacher: Any, device: torch.device | str = "cpu",
               log: Callable[[str], None] | None = None) -> None:
        super().attach(teacher, device, log)
        self.device = device
        self.lo, self.hi = teacher.lo.to(device), teacher.hi.to(device)
        units = float(self.replay.tm_dead_band)
        # band 0 (the default) takes the reference's path, not a band of zeros
        self.band = tm_dead_band(teacher.lo, teacher.hi, teacher.sigma, units,
                                 self.compute_dtype).to(device) if units > 0 else None
        if log is None:
            return
        if self.band is not None:
            log(f"TM rounding guard: violations up to {units:g} rounding units x sigma + one "
                f"{self.compute_dtype} rounding step pass no gradient (median "
                f"{float(self.band.median()):.3g}, max {float(self.band.max()):.3g}; median "
                f"sigma {float(teacher.sigma.median()):.3g})")
        else:
            log("TM: the reference's exact test (no rounding guard)")

    def local_sums(self, replay: ReplayRows, logits: torch.Tensor, hidden: torch.Tensor
                   ) -> LocalSums:
        states = self.teacher.batch(replay.sample_ids, width=replay.width).to(self.lo.device)
        return tm_row_terms(hidden.index_select(0, replay.rows), states, self.lo, self.hi,
                            replay.mask, self.band)

    def log_values(self, means: dict[str, float]) -> dict[str, float]:
        return {**super().log_values(means), "train/tm_violation_frac": means["violation_frac"],
                "train/tm_ignored_frac": means["ignored_frac"]}


class TopKDistillation(ReplayTerm):
    """Token mean of KL(teacher || student) over the teacher's top-k tokens."""

    name = "kl"
    uses_replay = True
    teacher_kind = "topk"
    needs_full_logits = True

    def teacher_settings(self) -> dict[str, Any]:
        return {"kl_topk": self.replay.kl_topk}

    def check_model(self, vocab_size: int, model_dir: str) -> None:
        """kl keeps the teacher's top-k tokens: k cannot exceed the vocabulary."""
        if self.replay.kl_topk > vocab_size:
            raise InputError(f"kl_topk={self.replay.kl_topk} is larger than the model's "
                             f"vocabulary ({vocab_size} tokens, vocab_size in "
                             f"{Path(model_dir) / 'config.json'})", field="replay.kl_topk")

    def local_sums(self, replay: ReplayRows, logits: torch.Tensor, hidden: torch.Tensor
                   ) -> LocalSums:
        top_ids, top_logp = self.teacher.batch(replay.sample_ids, width=replay.width)
        s, c = topk_kl_rows(logits.index_select(0, replay.rows), top_ids.to(logits.device),
                            top_logp.to(logits.device), replay.mask, self.replay.kl_temperature)
        return s, c, c, c.new_zeros(c.shape)


class FeatureImitation(ReplayTerm):
    """Element mean of |h - t|^p between the student's and the teacher's final-norm output."""

    teacher_kind = "features"
    power: ClassVar[int] = 1

    def local_sums(self, replay: ReplayRows, logits: torch.Tensor, hidden: torch.Tensor
                   ) -> LocalSums:
        feats = self.teacher.batch(replay.sample_ids, width=replay.width).to(hidden.device)
        s, c = feature_diff_rows(hidden.index_select(0, replay.rows), feats, replay.mask,
                                 self.power)
        return s, c, c, c.new_zeros(c.shape)


class L1Features(FeatureImitation):
    name = "l1"
    uses_replay = True
    power = 1


class L2Features(FeatureImitation):
    name = "l2"
    uses_replay = True
    power = 2


STRATEGIES: dict[str, type[ReplayTerm]] = {
    cls.name: cls for cls in (NoReplay, PlainReplay, ThresholdMargin, TopKDistillation,
                              L1Features, L2Features)}


def make_term(cfg: RunConfig) -> ReplayTerm:
    """The ReplayTerm of a RunConfig (``cfg.replay.strategy``; validated by config.validate)."""
    return STRATEGIES[cfg.replay.strategy](cfg.replay, cfg.train.bf16)
