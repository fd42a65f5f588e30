"""Intervals for the continual benchmark: means and paired differences over examples and seeds.

The benchmark's design is paired: every row (strategy) and every seed scores the very same test
examples; seeds vary only the training (data order, replay assignment), and two rows trained
with the same seed see the same batches. A row's outcomes are therefore a matrix ``O[s, e]``
(seed ``s``, example ``e``; 0/1 for accuracy, or any per-example score). Two sources of noise
matter: which examples the test sets happen to hold, and which seed the training happened to
get. A two-level bootstrap draws both:

- examples with replacement *within each stratum* (a task's test set, a general set), so every
  draw keeps each stratum's size and the average weighs the strata as the estimate does; the
  same example draw serves both sides of a paired difference;
- seeds with replacement, and for a paired difference the *same* seed draw for both rows (the
  rows must hold the same seeds, in the same order).

The interval is the percentile interval of the resampled statistic. With one seed the training
noise is not measured at all, so there is no interval (``Interval.low`` and ``high`` are nan
and ``fmt`` says "1 seed"): an interval from the examples alone would look exact where it is not.

Everything is numpy (float64), deterministic in ``seed``, and small enough to run inside
``compare``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

LEVEL = 0.95
N_BOOT = 4000


@dataclass(frozen=True)
class Interval:
    """A point estimate with a percentile-bootstrap interval (same unit as the data); low and
    high are nan where one seed leaves the training noise unmeasured."""

    mean: float
    low: float
    high: float
    n_examples: int
    n_seeds: int
    p_not_above_zero: float | None = None  # paired differences: share of draws <= 0

    @property
    def has_interval(self) -> bool:
        return not (math.isnan(self.low) or math.isnan(self.high))

    def fmt(self, digits: int = 1, scale: float = 1.0) -> str:
        """``mean [low, high]``, or ``mean (1 seed)`` without an interval."""
        mean = f"{scale * self.mean:.{digits}f}"
        if not self.has_interval:
            return f"{mean} ({self.n_seeds} seed)"
        return f"{mean} [{scale * self.low:.{digits}f}, {scale * self.high:.{digits}f}]"


def outcome_matrix(rows: Sequence[Sequence[float]]) -> np.ndarray:
    """Seeds x examples as float64; every seed must cover the same examples."""
    lengths = {len(r) for r in rows}
    if not rows or len(lengths) != 1 or 0 in lengths:
        raise ValueError(f"outcomes need one or more seeds of equal, non-zero length; got "
                         f"lengths {sorted(lengths)}")
    return np.asarray(rows, dtype=np.float64)


def _strata_bounds(strata: Sequence[int] | None, n_examples: int) -> list[tuple[int, int]]:
    """[start, end) of each stratum along the example axis; None = one stratum of all."""
    sizes = [n_examples] if strata is None else [int(n) for n in strata]
    if any(n < 1 for n in sizes) or sum(sizes) != n_examples:
        raise ValueError(f"strata {sizes} must be positive and add up to the {n_examples} "
                         f"examples")
    ends = np.cumsum(sizes).tolist()
    return list(zip([0] + ends[:-1], ends))


def _example_draws(rng: np.random.Generator, bounds: list[tuple[int, int]], n_boot: int
                   ) -> np.ndarray:
    """(n_boot, E) example indices: each stratum resampled within itself, keeping its size."""
    return np.concatenate([rng.integers(lo, hi, size=(n_boot, hi - lo)) for lo, hi in bounds],
                          axis=1)


def _percentiles(draws: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(draws, [tail, 100.0 - tail])
    return float(low), float(high)


def _resampled_means(m: np.ndarray, seeds: np.ndarray, examples: np.ndarray) -> np.ndarray:
    """Mean of ``m[seeds[b]][:, examples[b]]`` for every draw b, without a Python loop per draw."""
    per_example = m[seeds]                       # (B, S, E): the drawn seeds' outcome rows
    per_example = per_example.mean(axis=1)       # (B, E): mean over drawn seeds
    return np.take_along_axis(per_example, examples, axis=1).mean(axis=1)


def mean_interval(outcomes: Sequence[Sequence[float]], strata: Sequence[int] | None = None,
                  level: float = LEVEL, n_boot: int = N_BOOT, seed: int = 0) -> Interval:
    """Mean over seeds and examples with a two-level bootstrap interval; ``strata``: the sizes
    of the consecutive test sets the examples come from (resampled each within itself)."""
    m = outcome_matrix(outcomes)
    n_seeds, n_examples = m.shape
    bounds = _strata_bounds(strata, n_examples)
    if n_seeds == 1:
        return Interval(float(m.mean()), math.nan, math.nan, n_examples, 1)
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    draws = _resampled_means(m, seeds, _example_draws(rng, bounds, n_boot))
    low, high = _percentiles(draws, level)
    return Interval(float(m.mean()), low, high, n_examples, n_seeds)


def paired_difference(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]],
                      strata: Sequence[int] | None = None, level: float = LEVEL,
                      n_boot: int = N_BOOT, seed: int = 0) -> Interval:
    """mean(a) - mean(b) over the same examples and seeds, with one example draw (within each
    stratum) and one seed draw shared by both sides.

    ``a`` and ``b`` are seeds x examples of two rows with the same seeds in the same order (the
    caller keeps the seeds both rows ran) and the same examples in the same order.
    """
    ma, mb = outcome_matrix(a), outcome_matrix(b)
    if ma.shape[1] != mb.shape[1]:
        raise ValueError(f"paired rows must score the same examples: {ma.shape[1]} vs "
                         f"{mb.shape[1]}")
    if ma.shape[0] != mb.shape[0]:
        raise ValueError(f"paired rows must hold the same seeds: {ma.shape[0]} vs "
                         f"{mb.shape[0]}")
    n_seeds, n_examples = ma.shape
    bounds = _strata_bounds(strata, n_examples)
    mean = float(ma.mean() - mb.mean())
    if n_seeds == 1:
        return Interval(mean, math.nan, math.nan, n_examples, 1)
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    examples = _example_draws(rng, bounds, n_boot)
    draws = _resampled_means(ma - mb, seeds, examples)
    low, high = _percentiles(draws, level)
    return Interval(mean, low, high, n_examples, n_seeds, float((draws <= 0).mean()))


def concat_examples(parts: Sequence[Sequence[Sequence[float]]]) -> list[list[float]]:
    """Join several test sets' outcome matrices (same seeds, in order) into one, example-wise.

    An average over tasks is then the mean over their pooled examples, weighted by test-set size;
    the benchmark's test sets all have the same size, so this is the plain task mean. Pass the
    parts' sizes as ``strata`` to the intervals so the bootstrap keeps that weighting.
    """
    seeds = {len(p) for p in parts}
    if len(seeds) != 1:
        raise ValueError(f"every part needs the same seeds; got seed counts {sorted(seeds)}")
    return [sum((list(p[s]) for p in parts), []) for s in range(seeds.pop())]


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their mean rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    for value in np.unique(x):  # ties share the mean of the ranks they span
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def rank_correlation(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho: Pearson's correlation of the ranks (ties at their mean rank); nan where
    either side is constant or there are fewer than 3 pairs."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"rank_correlation needs two equal-length vectors; got {a.shape} and "
                         f"{b.shape}")
    if len(a) < 3:
        return float("nan")
    ra, rb = _ranks(a) - (len(a) + 1) / 2, _ranks(b) - (len(b) + 1) / 2
    denom = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")
