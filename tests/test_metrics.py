"""Metric functions against hand-computed matrices (full run, partial runs, T = 1)."""
from __future__ import annotations

import pytest

from gere_ds.evaluation.metrics import (average_performance, backward_transfer, compute_metrics,
                                        f1_score, forgetting, forward_transfer, harmonic_mean)

# row 0 = base, row t = after task t; columns = tasks 1..3
R = [
    [10.0, 20.0, 30.0],
    [80.0, 25.0, 35.0],
    [70.0, 90.0, 40.0],
    [60.0, 85.0, 95.0],
]


def test_full_run():
    assert average_performance(R) == pytest.approx((60 + 85 + 95) / 3)
    assert backward_transfer(R) == pytest.approx(((60 - 80) + (85 - 90)) / 2)  # -12.5
    assert forward_transfer(R) == pytest.approx(((25 - 20) + (40 - 30)) / 2)  # 7.5
    # task 1: max(80, 70) - 60 = 20; task 2: 90 - 85 = 5
    assert forgetting(R) == pytest.approx((20 + 5) / 2)
    m = compute_metrics(R, {"mmlu": [50, 45, 44, 40], "ppl": [9, 9, 9, 9]})
    assert (m.num_tasks, m.completed_tasks) == (3, 3)
    assert m.AP == pytest.approx(80.0)
    assert m.general_final == {"mmlu": 40.0, "ppl": 9.0}
    assert m.F1_general == "mmlu"
    assert m.F1 == pytest.approx(2 * 40 * 80 / 120)
    assert compute_metrics(R, {"mmlu": [1] * 4, "x": [20] * 4}, f1_with="x").F1 == \
        pytest.approx(2 * 20 * 80 / 100)


def test_partial_runs():
    # after 2 of 3 tasks: final row = 2; tasks 1, 2 count; FWT includes task 3 (a[2][3] exists)
    m = compute_metrics(R[:3], {"mmlu": [50, 45, 44]})
    assert (m.num_tasks, m.completed_tasks) == (3, 2)
    assert m.AP == pytest.approx((70 + 90) / 2)
    assert m.BWT == pytest.approx(70 - 80)
    assert m.forgetting == pytest.approx(80 - 70)
    assert m.FWT == pytest.approx(((25 - 20) + (40 - 30)) / 2)
    assert m.general_final == {"mmlu": 44.0}
    assert m.F1 == pytest.approx(2 * 44 * 80 / 124)
    # after 1 task
    m = compute_metrics(R[:2])
    assert m.AP == pytest.approx(80.0)
    assert m.BWT is None and m.forgetting is None
    assert m.FWT == pytest.approx(25 - 20)
    assert m.F1 is None and m.F1_general is None
    # base only
    m = compute_metrics(R[:1], {"mmlu": [50]})
    assert m.completed_tasks == 0
    assert m.AP is None and m.BWT is None and m.FWT is None and m.forgetting is None
    assert m.general_final == {"mmlu": 50.0} and m.F1 is None
    # a general score missing for the final row
    assert compute_metrics(R[:3], {"mmlu": [50, 45]}).general_final == {"mmlu": None}


def test_single_task():
    m = compute_metrics([[40.0], [90.0]], {"mmlu": [60.0, 50.0]})
    assert m.AP == pytest.approx(90.0)
    assert m.BWT is None and m.FWT is None and m.forgetting is None
    assert m.F1 == pytest.approx(2 * 50 * 90 / 140)
    assert m.to_dict()["AP"] == pytest.approx(90.0)


def test_harmonic_mean_edges():
    assert harmonic_mean(0, 0) == 0.0
    assert harmonic_mean(None, 5) is None
    assert f1_score(50, 50) == pytest.approx(50)


@pytest.mark.parametrize("bad", [[], [[1, 2], [3]], [[1], [2], [3]], [[1, None]]])
def test_bad_matrices(bad):
    with pytest.raises(ValueError):
        compute_metrics(bad)


def test_unknown_f1_general():
    with pytest.raises(ValueError):
        compute_metrics(R, {"mmlu": [1, 2, 3, 4]}, f1_with="nope")
