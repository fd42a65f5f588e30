"""Intervals for the continual benchmark: means and paired differences over examples and seeds.

The benchmark's design is paired: every row (strategy) and every seed scores the very same test
examples; seeds vary only the training (data order, replay assignment). A row's outcomes are
therefore a matrix ``O[s, e]`` (seed ``s``, example ``e``; 0/1 for accuracy, or any per-example
score). Two sources of noise matter: which examples the test set happens to hold, and which seed
the training happened to get. A two-level bootstrap draws both: examples with replacement (the
same draw for both sides of a paired difference, which is what makes it paired) and, within each
row, seeds with replacement. The interval is the percentile interval of the resampled statistic.

Everything is numpy, deterministic in ``seed``, and small enough to run inside ``compare``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

LEVEL = 0.95
N_BOOT = 4000


@dataclass(frozen=True)
class Interval:
    """A point estimate with a percentile-bootstrap interval (same unit as the data)."""

    mean: float
    low: float
    high: float
    n_examples: int
    n_seeds: int
    p_not_above_zero: float | None = None  # paired differences: share of draws <= 0

    def fmt(self, digits: int = 1) -> str:
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def outcome_matrix(rows: Sequence[Sequence[float]]) -> np.ndarray:
    """Seeds x examples as float64; every seed must cover the same examples."""
    lengths = {len(r) for r in rows}
    if not rows or len(lengths) != 1 or 0 in lengths:
        raise ValueError(f"outcomes need one or more seeds of equal, non-zero length; got "
                         f"lengths {sorted(lengths)}")
    return np.asarray(rows, dtype=np.float64)


def _percentiles(draws: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(draws, [tail, 100.0 - tail])
    return float(low), float(high)


def _seed_draws(rng: np.random.Generator, n_seeds: int, n_boot: int) -> np.ndarray:
    # one seed has nothing to resample: its training noise is simply not measured
    if n_seeds == 1:
        return np.zeros((n_boot, 1), dtype=np.int64)
    return rng.integers(0, n_seeds, size=(n_boot, n_seeds))


def _resampled_means(m: np.ndarray, seeds: np.ndarray, examples: np.ndarray) -> np.ndarray:
    """Mean of ``m[seeds[b]][:, examples[b]]`` for every draw b, without a Python loop per draw."""
    per_example = m[seeds]                       # (B, S, E): the drawn seeds' outcome rows
    per_example = per_example.mean(axis=1)       # (B, E): mean over drawn seeds
    return np.take_along_axis(per_example, examples, axis=1).mean(axis=1)


def mean_interval(outcomes: Sequence[Sequence[float]], level: float = LEVEL,
                  n_boot: int = N_BOOT, seed: int = 0) -> Interval:
    """Mean over seeds and examples with a two-level bootstrap interval."""
    m = outcome_matrix(outcomes)
    n_seeds, n_examples = m.shape
    rng = np.random.default_rng(seed)
    seeds = _seed_draws(rng, n_seeds, n_boot)
    examples = rng.integers(0, n_examples, size=(n_boot, n_examples))
    draws = _resampled_means(m, seeds, examples)
    low, high = _percentiles(draws, level)
    return Interval(float(m.mean()), low, high, n_examples, n_seeds)


def paired_difference(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]],
                      level: float = LEVEL, n_boot: int = N_BOOT, seed: int = 0) -> Interval:
    """mean(a) - mean(b) over the same examples, with one example draw shared by both sides.

    ``a`` and ``b`` are seeds x examples of two rows; their seed counts may differ (each row's
    seeds are resampled on their own), their examples must be the same and in the same order.
    """
    ma, mb = outcome_matrix(a), outcome_matrix(b)
    if ma.shape[1] != mb.shape[1]:
        raise ValueError(f"paired rows must score the same examples: {ma.shape[1]} vs "
                         f"{mb.shape[1]}")
    n_examples = ma.shape[1]
    rng = np.random.default_rng(seed)
    examples = rng.integers(0, n_examples, size=(n_boot, n_examples))
    draws = (_resampled_means(ma, _seed_draws(rng, ma.shape[0], n_boot), examples)
             - _resampled_means(mb, _seed_draws(rng, mb.shape[0], n_boot), examples))
    low, high = _percentiles(draws, level)
    return Interval(float(ma.mean() - mb.mean()), low, high, n_examples,
                    min(ma.shape[0], mb.shape[0]), float((draws <= 0).mean()))


def concat_examples(parts: Sequence[Sequence[Sequence[float]]]) -> list[list[float]]:
    """Join several test sets' outcome matrices (same seeds, in order) into one, example-wise.

    An average over tasks is then the mean over their pooled examples, weighted by test-set size;
    the benchmark's test sets all have the same size, so this is the plain task mean.
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
