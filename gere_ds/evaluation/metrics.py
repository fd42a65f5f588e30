"""Continual-learning metrics: pure functions of the accuracy matrix.

Matrix convention
-----------------
``R`` is a list of rows of accuracies in percent (0-100). Row 0 is the base model, before task 1;
row t (t = 1..T) is the model after training task t. Column i is task i. In code rows and columns
are 0-based (``R[t][i-1]`` is task i); the formulas below use 1-based task indices and write
``a[t][i]`` for the accuracy on task i after training task t (``a[0][i]`` = base model)::

    AP         = 1/T      * sum_{i=1..T}   a[T][i]
    BWT        = 1/(T-1)  * sum_{i=1..T-1} (a[T][i] - a[i][i])
    FWT        = 1/(T-1)  * sum_{i=2..T}   (a[i-1][i] - a[0][i])
    forgetting = 1/(T-1)  * sum_{i=1..T-1} max_{t=i..T-1} (a[t][i] - a[T][i])
    F1         = 2 * G * AP / (G + AP)      (harmonic mean; G = a general score, e.g. MMLU)

Every row has T columns (every task's test set is evaluated after every task).

Partial runs
------------
A run stopped after k < T tasks has k + 1 rows (rows k+1..T are missing). The last row present,
row k, plays the role of "final" and only the k tasks learned so far count::

    AP         = mean_{i=1..k}   a[k][i]                               (None if k = 0)
    BWT        = mean_{i=1..k-1} (a[k][i] - a[i][i])                   (None if k < 2)
    forgetting = mean_{i=1..k-1} max_{t=i..k-1} (a[t][i] - a[k][i])    (None if k < 2)
    FWT        = mean_{i=2..min(k+1, T)} (a[i-1][i] - a[0][i])         (None if that range is empty)

FWT uses every task whose "just before training it" accuracy a[i-1][i] exists: after k tasks
that includes task k+1 (its zero-shot accuracy after task k is already measured). For a full run
(k = T) all four reduce to the formulas above. With T = 1: AP = a[1][1]; BWT, forgetting and FWT
are None (there is no earlier task, and no later task to transfer to).

F1 uses the general score of the final row (row k) and AP; None when either is None. When
both are 0 the harmonic mean is defined as 0.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional, Sequence

Number = float
Matrix = Sequence[Sequence[Number]]


@dataclass
class CLMetrics:
    """All summary numbers of one (possibly partial) accuracy matrix; None where undefined."""

    num_tasks: int  #: T, the number of columns
    completed_tasks: int  #: k, the number of tasks trained so far (rows present - 1)
    AP: Optional[float]
    BWT: Optional[float]
    FWT: Optional[float]
    forgetting: Optional[float]
    general_final: dict[str, Optional[float]] = field(default_factory=dict)
    F1: Optional[float] = None
    F1_general: Optional[str] = None  #: name of the general score used for F1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check(R: Matrix, num_tasks: int | None = None) -> tuple[int, int]:
    """Validate the matrix; return (T, k) with k = index of the last row present."""
    if len(R) == 0:
        raise ValueError("the accuracy matrix has no rows (row 0 = base model is required)")
    T = len(R[0]) if num_tasks is None else num_tasks
    if T < 1:
        raise ValueError("the accuracy matrix needs at least one task column")
    if len(R) > T + 1:
        raise ValueError(f"the accuracy matrix has {len(R)} rows, more than T+1 = {T + 1}")
    for t, row in enumerate(R):
        if len(row) != T:
            raise ValueError(f"row {t} of the accuracy matrix has {len(row)} values, expected {T}")
        for i, v in enumerate(row):
            if v is None or not isinstance(v, (int, float)) or math.isnan(float(v)):
                raise ValueError(f"R[{t}][{i}] is not a number: {v!r}")
    return T, len(R) - 1


def _mean(values: list[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def average_performance(R: Matrix, num_tasks: int | None = None) -> Optional[float]:
    """AP = mean_{i=1..k} a[k][i] over the k tasks learned (k = last row). None if k = 0."""
    _, k = _check(R, num_tasks)
    return _mean([float(R[k][i]) for i in range(k)])


def backward_transfer(R: Matrix, num_tasks: int | None = None) -> Optional[float]:
    """BWT = mean_{i=1..k-1} (a[k][i] - a[i][i]). None if k < 2."""
    _, k = _check(R, num_tasks)
    # 1-based task i is column i-1 and was learned in row i.
    return _mean([float(R[k][i - 1]) - float(R[i][i - 1]) for i in range(1, k)])


def forward_transfer(R: Matrix, num_tasks: int | None = None) -> Optional[float]:
    """FWT = mean_{i=2..min(k+1,T)} (a[i-1][i] - a[0][i]). None if that range is empty."""
    T, k = _check(R, num_tasks)
    return _mean([float(R[i - 1][i - 1]) - float(R[0][i - 1])
                  for i in range(2, min(k + 1, T) + 1)])


def forgetting(R: Matrix, num_tasks: int | None = None) -> Optional[float]:
    """forgetting = mean_{i=1..k-1} max_{t=i..k-1} (a[t][i] - a[k][i]). None if k < 2."""
    _, k = _check(R, num_tasks)
    return _mean([max(float(R[t][i - 1]) for t in range(i, k)) - float(R[k][i - 1])
                  for i in range(1, k)])


def harmonic_mean(a: Optional[float], b: Optional[float]) -> Optional[float]:
    """2ab/(a+b); None if either is None; 0 when a + b == 0."""
    if a is None or b is None:
        return None
    a, b = float(a), float(b)
    if a + b == 0:
        return 0.0
    return 2.0 * a * b / (a + b)


def f1_score(general: Optional[float], ap: Optional[float]) -> Optional[float]:
    """F1 = harmonic mean of a general score (e.g. MMLU, percent) and AP (percent)."""
    return harmonic_mean(general, ap)


def compute_metrics(R: Matrix, general: Mapping[str, Sequence[Optional[float]]] | None = None,
                    num_tasks: int | None = None, f1_with: str | None = None) -> CLMetrics:
    """Every metric of the matrix ``R`` (see the module doc) plus F1.

    ``general`` maps a general-score name to its values per row (same row convention as ``R``;
    a row may be None when it was not evaluated). ``general_final[name]`` is the value at the
    final row k (None if missing). F1 uses ``f1_with`` (default: the first name in ``general``)
    at row k, and AP. ``num_tasks`` defaults to the number of columns of ``R``.
    """
    T, k = _check(R, num_tasks)
    general = dict(general or {})
    general_final: dict[str, Optional[float]] = {}
    for name, values in general.items():
        v = values[k] if k < len(values) else None
        general_final[name] = None if v is None else float(v)
    if f1_with is None and general:
        f1_with = next(iter(general))
    if f1_with is not None and f1_with not in general:
        raise ValueError(f"F1 general score {f1_with!r} is not among {list(general)}")
    ap = average_performance(R, T)
    return CLMetrics(
        num_tasks=T,
        completed_tasks=k,
        AP=ap,
        BWT=backward_transfer(R, T),
        FWT=forward_transfer(R, T),
        forgetting=forgetting(R, T),
        general_final=general_final,
        F1=f1_score(general_final.get(f1_with) if f1_with else None, ap),
        F1_general=f1_with,
    )
