"""Bootstrap intervals of the benchmark (gere_ds.evaluation.stats) against hand-computed cases."""
from __future__ import annotations

import math

import pytest

from gere_ds.evaluation.stats import (concat_examples, mean_interval, paired_difference,
                                      rank_correlation)


def test_constant_outcomes_have_a_point_interval():
    iv = mean_interval([[1.0] * 7, [1.0] * 7])
    assert (iv.mean, iv.low, iv.high, iv.n_examples, iv.n_seeds) == (1.0, 1.0, 1.0, 7, 2)


def test_mean_is_over_seeds_and_examples():
    assert mean_interval([[1, 0, 1], [0, 0, 1]]).mean == pytest.approx(0.5)


def test_two_examples_one_seed_matches_the_exact_bootstrap():
    # draws of 2 examples from {0, 1}: mean 0, .5, 1 with probability 1/4, 1/2, 1/4, so the
    # 2.5th and 97.5th percentiles are 0 and 1
    iv = mean_interval([[0.0, 1.0]], n_boot=20000)
    assert (iv.mean, iv.low, iv.high) == (0.5, 0.0, 1.0)


def test_seed_noise_widens_the_interval():
    # two seeds that disagree on every example: resampling seeds gives 0, .5, 1 (1/4, 1/2, 1/4)
    iv = mean_interval([[1.0] * 50, [0.0] * 50], n_boot=20000)
    assert (iv.mean, iv.low, iv.high) == (0.5, 0.0, 1.0)


def test_identical_rows_differ_by_exactly_zero():
    # the point of pairing: the same example draw on both sides cancels example noise
    a = [[1, 1, 0, 0, 1, 0]]
    d = paired_difference(a, a)
    assert (d.mean, d.low, d.high) == (0.0, 0.0, 0.0)
    assert d.p_not_above_zero == 1.0


def test_a_shift_on_every_example_is_exact():
    b = [[0.2, 0.5, 0.1, 0.9]]
    a = [[x + 1.0 for x in b[0]]]
    d = paired_difference(a, b)
    assert (d.mean, d.low, d.high) == pytest.approx((1.0, 1.0, 1.0))
    assert d.p_not_above_zero == 0.0


def test_unpaired_noise_is_what_pairing_removes():
    # a beats b on one example of two: the paired draws give 0, .5 or 1 -> [0, 1], mean .5
    d = paired_difference([[1.0, 1.0]], [[1.0, 0.0]], n_boot=20000)
    assert (d.mean, d.low, d.high) == (0.5, 0.0, 1.0)
    assert d.p_not_above_zero == pytest.approx(0.25, abs=0.02)


def test_seed_counts_may_differ_but_examples_must_match():
    d = paired_difference([[1, 0], [1, 0], [1, 0]], [[0, 0]])
    assert d.mean == pytest.approx(0.5) and d.n_seeds == 1
    with pytest.raises(ValueError, match="same examples"):
        paired_difference([[1, 0]], [[1, 0, 1]])
    with pytest.raises(ValueError, match="equal, non-zero length"):
        mean_interval([[1, 0], [1]])


def test_concat_examples_pools_tasks_per_seed():
    assert concat_examples([[[1, 0], [0, 0]], [[1], [1]]]) == [[1, 0, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="same seeds"):
        concat_examples([[[1]], [[1], [0]]])


def test_rank_correlation_by_hand():
    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [9, 5, 2, 1]) == pytest.approx(-1.0)
    # ties at their mean rank: x ranks 1, 2.5, 2.5, 4 -> centred -1.5, 0, 0, 1.5; y ranks 1, 3,
    # 2, 4 -> -1.5, .5, -.5, 1.5; rho = 4.5 / sqrt(4.5 * 5)
    assert rank_correlation([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / (4.5 * 5) ** 0.5)
    # only the order counts, not the values
    assert rank_correlation([0.1, 0.5, 0.2], [1, 1000, 2]) == pytest.approx(1.0)


def test_rank_correlation_is_undefined_without_spread():
    assert math.isnan(rank_correlation([1, 1, 1], [1, 2, 3]))
    assert math.isnan(rank_correlation([1, 2], [1, 2]))
    with pytest.raises(ValueError, match="equal-length"):
        rank_correlation([1, 2, 3], [1, 2])
