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


def test_two_examples_two_equal_seeds_match_the_exact_bootstrap():
    # draws of 2 examples from {0, 1}: mean 0, .5, 1 with probability 1/4, 1/2, 1/4, so the
    # 2.5th and 97.5th percentiles are 0 and 1 (equal seeds: resampling them changes nothing)
    iv = mean_interval([[0.0, 1.0], [0.0, 1.0]], n_boot=20000)
    assert (iv.mean, iv.low, iv.high) == (0.5, 0.0, 1.0)


def test_one_seed_has_no_interval_and_says_so():
    # the training noise of one seed is not measured: no interval, not an exact one
    iv = mean_interval([[0.0, 1.0, 1.0, 1.0]])
    assert iv.mean == 0.75 and iv.n_seeds == 1 and not iv.has_interval
    assert math.isnan(iv.low) and math.isnan(iv.high)
    assert iv.fmt(1, 100) == "75.0 (1 seed)"
    d = paired_difference([[1.0, 1.0]], [[1.0, 0.0]])
    assert d.mean == 0.5 and not d.has_interval and d.p_not_above_zero is None
    # two seeds: 0 when seed 1 and its example 0 are both drawn twice (1/16 > 2.5 %), 1 when
    # seed 2 is drawn twice (1/4)
    assert mean_interval([[0.0, 1.0], [1.0, 1.0]]).fmt(1, 100) == "75.0 [0.0, 100.0]"


def test_bootstrap_is_stratified_by_test_set():
    # task 1 all right, task 2 all wrong, 300 examples each: resampling within each task keeps
    # 300 right and 300 wrong in every draw, so the interval is [50, 50]; drawing from the pool
    # reweights the tasks (about 50 [46, 54])
    outcomes = [[1.0] * 300 + [0.0] * 300] * 2
    iv = mean_interval(outcomes, strata=[300, 300])
    assert (iv.mean, iv.low, iv.high) == (0.5, 0.5, 0.5)
    pooled = mean_interval(outcomes)
    assert pooled.low == pytest.approx(0.46, abs=0.01) and pooled.high == pytest.approx(0.54, abs=0.01)
    with pytest.raises(ValueError, match="add up to the 600 examples"):
        mean_interval(outcomes, strata=[300, 200])


def test_seed_noise_widens_the_interval():
    # two seeds that disagree on every example: resampling seeds gives 0, .5, 1 (1/4, 1/2, 1/4)
    iv = mean_interval([[1.0] * 50, [0.0] * 50], n_boot=20000)
    assert (iv.mean, iv.low, iv.high) == (0.5, 0.0, 1.0)


def test_identical_rows_differ_by_exactly_zero():
    # the point of pairing: the same example draw on both sides cancels example noise
    a = [[1, 1, 0, 0, 1, 0], [1, 0, 0, 0, 1, 1]]
    d = paired_difference(a, a)
    assert (d.mean, d.low, d.high) == (0.0, 0.0, 0.0)
    assert d.p_not_above_zero == 1.0


def test_seeds_are_paired_across_rows():
    # seed 1 gets every example right in both rows, seed 2 none: each seed's difference is 0,
    # and with the same seed draw on both sides so is every resampled difference. Seeds drawn
    # independently per row would give -1 with probability 1/16 (a draws seed 2 twice, b seed
    # 1 twice), so the interval would be [-1, 1]
    a = b = [[1.0] * 20, [0.0] * 20]
    d = paired_difference(a, b, strata=[10, 10], n_boot=20000)
    assert (d.mean, d.low, d.high) == (0.0, 0.0, 0.0)
    # a gains one example at seed 2 only: the difference is 1/40 in the mean, and a draw is
    # 0 (seed 1 twice, 1/4), 1/40 (one of each, 1/2) or 1/20 (seed 2 twice, 1/4), before
    # examples: the interval runs from 0 to at least 1/20 and no lower than 0
    a2 = [[1.0] * 20, [1.0] + [0.0] * 19]
    d = paired_difference(a2, b, strata=[10, 10], n_boot=20000)
    assert d.mean == pytest.approx(1 / 40) and d.low == 0.0 and d.high >= 1 / 20
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference([[1, 0], [1, 0], [1, 0]], [[0, 0], [0, 0]])


def test_a_shift_on_every_example_is_exact():
    b = [[0.2, 0.5, 0.1, 0.9], [0.3, 0.3, 0.0, 1.0]]
    a = [[x + 1.0 for x in row] for row in b]
    d = paired_difference(a, b)
    assert (d.mean, d.low, d.high) == pytest.approx((1.0, 1.0, 1.0))
    assert d.p_not_above_zero == 0.0


def test_unpaired_noise_is_what_pairing_removes():
    # a beats b on one example of two: the paired draws give 0, .5 or 1 -> [0, 1], mean .5
    d = paired_difference([[1.0, 1.0]] * 2, [[1.0, 0.0]] * 2, n_boot=20000)
    assert (d.mean, d.low, d.high) == (0.5, 0.0, 1.0)
    assert d.p_not_above_zero == pytest.approx(0.25, abs=0.02)


def test_examples_must_match():
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
