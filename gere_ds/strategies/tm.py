"""GeRe's threshold-margin strategy ``tm``: its settings' checks, its teacher data (per-dimension
thresholds from global statistics and each sample's 2-bit tri-states) and its per-row term."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from gere_ds.training.losses import tm_dead_band, tm_row_terms, tri_states
from gere_ds.runtime import dist
from gere_ds.strategies.base import ReplayRows, ReplaySection, ReplayTerm, RowStats, field_error
from gere_ds.teaching.teacher import (TeacherJob, TeacherSpec, forward_shard, job_meta,
                                      scratch_folder)
from gere_ds.teaching.teacher_cache import TeacherStates, open_states, write_rank_cache

# the opt-in rounding guard may hold violations up to this many threshold_k * sigma_d, no more
MAX_TM_DEAD_BAND = 0.5


def thresholds_from_sums(s1: torch.Tensor, s2: torch.Tensor, n: torch.Tensor | float,
                         threshold_k: float) -> torch.Tensor:
    """[4, D] float32: lo, hi, mu, sigma per dimension from float64 sums of h and h^2 over n
    tokens (population sigma; lo/hi = mu -+ k*sigma)."""
    mu = s1 / n
    sigma = (s2 / n - mu * mu).clamp(min=0).sqrt()
    lo, hi = (mu - threshold_k * sigma).float(), (mu + threshold_k * sigma).float()
    return torch.stack([lo, hi, mu.float(), sigma.float()])


@torch.no_grad()
def states_pass(job: TeacherJob, threshold_k: float, scratch: Path,
                progress: Callable[[int, int], None]
                ) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """The tm pass: global thresholds [4, D] (sums of h and h^2 in float64, one all-reduce) and
    this rank's (sample id, tri-states). The fp32 features spill to ``scratch`` between the two
    phases, so memory stays flat for big replay sets."""
    d = job.hidden_size
    s1 = torch.zeros(d, dtype=torch.float64, device=job.device)
    s2 = torch.zeros(d, dtype=torch.float64, device=job.device)
    count = torch.zeros(1, dtype=torch.float64, device=job.device)
    tokens = sum(len(job.replay_ids[s]) for s in job.shard)
    feats = np.lib.format.open_memmap(scratch / "features.npy", mode="w+", dtype=np.float32,
                                      shape=(max(tokens, 1), d))
    spans: list[tuple[int, int, int]] = []  # sample id, start row, tokens
    row = 0
    for ids, mb, _, hidden in forward_shard(job, progress):
        h = hidden.float()
        flat = h[mb.attention_mask.bool()].double()
        s1 += flat.sum(0)
        s2 += (flat * flat).sum(0)
        count += flat.shape[0]
        for b, sid in enumerate(ids):
            n = len(job.replay_ids[sid])
            feats[row:row + n] = h[b, :n].cpu().numpy()
            spans.append((sid, row, n))
            row += n
    stats = dist.all_reduce_sum(torch.cat([s1, s2, count]))
    thresholds = thresholds_from_sums(stats[:d], stats[d:2 * d], stats[-1],
                                      threshold_k).cpu().numpy()
    lo_t, hi_t = torch.from_numpy(thresholds[0]), torch.from_numpy(thresholds[1])
    samples = [(sid, tri_states(torch.from_numpy(feats[start:start + n]), lo_t, hi_t).numpy())
               for sid, start, n in spans]
    del feats
    return thresholds, samples


class StatesSpec(TeacherSpec):
    """Thresholds lo/hi = mu -+ k*sigma per dimension and each replay sample's tri-states."""

    kind = "states"

    def __init__(self, replay: ReplaySection) -> None:
        self.threshold_k = float(replay.threshold_k)

    def settings(self) -> dict[str, Any]:
        return {"threshold_k": self.threshold_k}

    def compute(self, job: TeacherJob, folder: Path, progress: Callable[[int, int], None]
                ) -> None:
        scratch = scratch_folder(job, job.hidden_size * 4)
        try:
            thresholds, samples = states_pass(job, self.threshold_k, scratch, progress)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        write_rank_cache(folder, job.fingerprint, thresholds, samples,
                         {**job_meta(job), "threshold_k": self.threshold_k})

    def open(self, folder: Path, manifest: dict[str, Any], index: Any) -> TeacherStates:
        return open_states(folder, manifest, index)


class ThresholdMargin(ReplayTerm):
    """GeRe's TM: the final-norm output kept on the teacher's side of mu +- k*sigma."""

    name = "tm"
    uses_replay = True
    has_term = True
    spec_type = StatesSpec

    def __init__(self, replay: ReplaySection, bf16: bool = True) -> None:
        super().__init__(replay, bf16)
        self.lo = self.hi = self.band = None

    @classmethod
    def check_settings(cls, replay: ReplaySection, bf16: bool) -> None:
        if not replay.threshold_k > 0:
            raise field_error("threshold_k", f"must be > 0, got {replay.threshold_k!r}")
        band = replay.tm_dead_band
        if band == "auto":  # the former default
            raise field_error("tm_dead_band", "'auto' is no longer accepted: 0 is the "
                                              "reference's exact test (the default), a number "
                                              "of rounding units opts into the rounding guard "
                                              "('auto' was 48 in bf16, 1024 in fp32)")
        if isinstance(band, str):
            raise field_error("tm_dead_band", f"must be a number >= 0, got {band!r}")
        if not band >= 0:
            raise field_error("tm_dead_band", f"must be >= 0, got {band!r}")
        band_sigmas = band * (2.0 ** -7 if bf16 else 2.0 ** -23)
        if band_sigmas > MAX_TM_DEAD_BAND * replay.threshold_k:
            raise field_error("tm_dead_band",
                              f"must be at most {MAX_TM_DEAD_BAND} * threshold_k sigma (a wider "
                              f"band would hide real violations); {band!r} units = "
                              f"{band_sigmas:.3g} sigma in {'bf16' if bf16 else 'fp32'}")

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
                   ) -> RowStats:
        states = self.teacher.batch(replay.sample_ids, width=replay.width).to(self.lo.device)
        total, violating, elements, held = tm_row_terms(
            hidden.index_select(0, replay.rows), states, self.lo, self.hi, replay.mask,
            self.band)
        return RowStats(total, violating, elements=elements, held=held)

    def log_values(self, means: dict[str, float]) -> dict[str, float]:
        return {**super().log_values(means), "train/tm_violation_frac": means["violation_frac"],
                "train/tm_ignored_frac": means["ignored_frac"]}
