"""Statistics of a benchmark's runs: per-example outcome vectors (AP, BWT, the general suite),
the run pairs a paired difference compares (one machine, or refused), fit points, state means.
The intervals themselves are :mod:`gere_ds.evaluation.stats`.
"""
from __future__ import annotations

import statistics
from typing import Any, Sequence

from gere_ds.evaluation.benchmark import Benchmark, BenchmarkError, Run, first_difference
from gere_ds.evaluation.outcomes import unbits
from gere_ds.evaluation.stats import concat_examples



def ap_outcomes(runs: Sequence[Run], tasks: Sequence[str]) -> list[list[float]]:
    """Per seed: every task's test outcomes after the last task (their mean is AP)."""
    return concat_examples([[unbits(r.outcomes["rows"][-1]["tasks"][t]) for r in runs]
                            for t in tasks])


def bwt_outcomes(runs: Sequence[Run], tasks: Sequence[str]) -> list[list[float]]:
    """Per seed and example of tasks 1..T-1: final outcome minus the outcome right after its own
    task (their mean is BWT: test sets of equal size weigh tasks equally)."""
    parts = []
    for i, t in enumerate(tasks[:-1]):
        parts.append([[f - o for f, o in zip(unbits(r.outcomes["rows"][-1]["tasks"][t]),
                                             unbits(r.outcomes["rows"][i + 1]["tasks"][t]))]
                      for r in runs])
    return concat_examples(parts)


def general_outcomes(runs: Sequence[Run], sets: Sequence[str], row: int = -1
                     ) -> list[list[float]]:
    """Per seed: the cloze sets' acc_norm outcomes at evaluation ``row`` (default: the last)."""
    return concat_examples([[unbits(r.outcomes["rows"][row]["general"][s]) for r in runs]
                            for s in sets])



def machines_cell(b: Benchmark, runs: Sequence[Run]) -> str:
    """The machines that ran ``runs``: 'B', or 'A (1,2), B (3)' where they differ."""
    by: dict[str, list[int]] = {}
    for r in runs:
        by.setdefault(b.machine_letter(r), []).append(r.seed)
    if len(by) == 1:
        return next(iter(by))
    return ", ".join(f"{m} ({','.join(map(str, seeds))})" for m, seeds in sorted(by.items()))



def task_steps(run: Run, task: int) -> list[dict[str, Any]]:
    return [s for s in run.steps if s.get("task") == task]


TRAINING_HEAD = 5  # steps at the start of a task: the task CE before any learning
TRAINING_TAIL = 10  # steps at the end of a task whose mean task CE says how far it was learned


def fit_points(b: Benchmark, task: int) -> dict[str, list[tuple[int, float, float]]]:
    """Per row, one point per run with a step log: (seed, its task CE over the last steps of
    task ``task``, its accuracy on that task right after them)."""
    points: dict[str, list[tuple[int, float, float]]] = {}
    for row, runs in b.runs.items():
        for r in runs:
            ce = [s["train/task_ce"] for s in task_steps(r, task)[-TRAINING_TAIL:]
                  if s.get("train/task_ce") is not None]
            if ce:
                points.setdefault(row, []).append(
                    (r.seed, statistics.fmean(ce), r.metrics["matrix"][task + 1][task]))
    return points



class MixedMachinesError(BenchmarkError):
    """A difference would pair runs made on different machines."""



def paired_runs(b: Benchmark, a: str, c: str, allow_mixed_machines: bool = False
                ) -> list[tuple[str, list[Run], list[Run]]]:
    """The differences ``a - c`` to report, each (machine cell, a's runs, c's runs) over seeds
    both rows ran. One machine: one difference. Runs on different machines are refused with
    one line naming the key that differs, unless ``allow_mixed_machines``: then the mixed
    difference, marked so, and one per machine over the seeds both rows ran on it."""
    seeds = sorted({r.seed for r in b.runs[a]} & {r.seed for r in b.runs[c]})
    if not seeds:
        return []
    # runs are sorted by seed, so ra[i] and rc[i] share a seed: the seed draw pairs them
    ra = [r for r in b.runs[a] if r.seed in seeds]
    rc = [r for r in b.runs[c] if r.seed in seeds]
    runs = ra + rc
    other = next((r for r in runs if r.machine != runs[0].machine), None)
    if other is None:
        return [(b.machine_letter(runs[0]), ra, rc)]
    if not allow_mixed_machines:
        raise MixedMachinesError(
            f"{a} - {c}: {runs[0].row} seed {runs[0].seed} and {other.row} seed {other.seed} ran "
            f"on different machines ({first_difference(runs[0].machine, other.machine)}, "
            f"machine.json); --allow-mixed-machines pairs them anyway")
    out = [(f"mixed: {a} {machines_cell(b, ra)}; {c} {machines_cell(b, rc)}", ra, rc)]
    for machine in b.machines:
        keep = [s for s, x, y in zip(seeds, ra, rc) if x.machine == y.machine == machine]
        if keep:
            out.append((f"{b.machine_letter(next(r for r in ra if r.seed == keep[0]))} only",
                        [r for r in ra if r.seed in keep], [r for r in rc if r.seed in keep]))
    return out



def end_tag(i: int) -> str:
    """The name states.json gives task i's end: its export's folder, named by the checkpoint tag
    (checkpoint.task_tag, not imported: it would pull torch into the report)."""
    return f"task{i + 1:03d}-end"


def states_mean(runs: Sequence[Run], task: int, texts: str, key: str) -> float | None:
    """Mean over ``runs`` (with states.json) of ``key`` at task ``task``'s end on ``texts``
    ("replay" or "heldout"); None where no run measured it."""
    vals = [m[texts][key] for m in (r.states["models"].get(end_tag(task), {}) for r in runs)
            if texts in m]
    return statistics.fmean(vals) if vals else None
