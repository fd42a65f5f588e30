"""The benchmark's tables (markdown): the main table with 95 % intervals, learning, training,
fit, paired differences and activation states.

A row of one seed has no interval (its training noise is not measured) and every table says
"1 seed" beside it.
"""
from __future__ import annotations

import statistics
from typing import Any, Sequence

from gere_ds.evaluation.benchmark import NOT_RECORDED, PAIRS, Benchmark, Run
from gere_ds.evaluation.benchmark_stats import (TRAINING_HEAD, TRAINING_TAIL, ap_outcomes,
                                                bwt_outcomes, end_tag, fit_points,
                                                general_outcomes, machines_cell, paired_runs,
                                                states_mean, task_steps)
from gere_ds.evaluation.stats import Interval, mean_interval, paired_difference, rank_correlation

def _pct(iv: Interval) -> str:
    """Percent with its interval, or "(1 seed)" and none."""
    return iv.fmt(1, 100.0)


def row_label(row: str, runs: Sequence[Run]) -> str:
    """The row's name, marked where one seed ran it (no interval: training noise unmeasured)."""
    return f"{row} (1 seed)" if len(runs) == 1 else row



def machines_legend(b: Benchmark) -> str:
    """One line naming each machine letter by its machine.json record."""
    parts = []
    for i, m in enumerate(b.machines):
        what = ", ".join(f"{k} {v!r}" for k, v in m.items())
        if m == {"cpu_model": NOT_RECORDED}:
            what = "machine.json not recorded (runs made before the runner wrote it)"
        parts.append(f"{chr(ord('A') + i)} = {what}")
    return "Machines (each run's machine.json): " + "; ".join(parts) + ".\n"


def _ppl(runs: Sequence[Run], name: str) -> str:
    values = [r.metrics["general"][name][-1] for r in runs]
    base = [r.metrics["general"][name][0] for r in runs]  # each run's own machine's base
    return f"{sum(values) / len(values):.2f} (base {sum(base) / len(base):.2f})"


def render_table(b: Benchmark) -> str:
    """One line per row: AP, BWT and the general suite with 95 % intervals, the general suite of
    the row's own runs' base model (each on its own machine) and the row's paired change from
    it; perplexities against the runs' own base."""
    head = ["row", "seeds", "machine", "AP", "BWT", "general acc_norm", "own base general",
            "general - own base"] + [f"{p} ppl" for p in b.perplexity]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    bwt_strata = b.task_sizes[:-1]
    for row, runs in b.runs.items():
        final, base = (general_outcomes(runs, b.general, k) for k in (-1, 0))
        own_base = mean_interval(base, b.general_sizes, n_boot=1).mean
        cells = [row_label(row, runs), ",".join(str(r.seed) for r in runs),
                 machines_cell(b, runs),
                 _pct(mean_interval(ap_outcomes(runs, b.tasks), b.task_sizes)),
                 _pct(mean_interval(bwt_outcomes(runs, b.tasks), bwt_strata)),
                 _pct(mean_interval(final, b.general_sizes)), f"{100 * own_base:.1f}",
                 _pct(paired_difference(final, base, b.general_sizes))]
        cells += [_ppl(runs, p) for p in b.perplexity]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + machines_legend(b)


def render_learning(b: Benchmark) -> str:
    """Per task: the majority-label rate of its test set (what answering the most frequent label
    to everything scores), base accuracy, right after its own training, and at the end (mean
    over seeds). A task is learned when its accuracy after its own training passes the majority
    rate, not merely the base accuracy."""
    head = ["row", "task", "majority label", "base", "after own training", "after last task"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, runs in b.runs.items():
        majority = runs[0].outcomes.get("majority", {})
        for i, task in enumerate(b.tasks):
            vals = [[r.metrics["matrix"][k][i] for r in runs] for k in (0, i + 1, -1)]
            rate = f"{100 * majority[task]:.1f}" if task in majority else "-"
            cells = [row_label(row, runs), task, rate] + [f"{sum(v) / len(v):.1f}" for v in vals]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"



def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)



def render_training(b: Benchmark) -> str:
    """Per row and task, from the step logs (mean over seeds): the task CE over the first 5 and
    the last 10 steps (how far the training fit the task), the replay CE over the last 10, the
    median gradient norm (before clipping) and, for TM rows, the mean violating fraction and
    the median dy weight. It shows what a replay term did to the task's own learning."""
    head = ["row", "task", f"task CE, first {TRAINING_HEAD} steps",
            f"task CE, last {TRAINING_TAIL}",
            f"replay CE, last {TRAINING_TAIL}", "grad norm (median)", "TM violating %",
            "TM weight (median)"]
    first, last, every = slice(None, TRAINING_HEAD), slice(-TRAINING_TAIL, None), slice(None)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, runs in b.runs.items():
        if not all(r.steps for r in runs):
            continue
        for i, task in enumerate(b.tasks):
            per_run = [task_steps(r, i) for r in runs]

            def stat(key: str, part: slice, per_seed: Any = statistics.fmean) -> float | None:
                """``per_seed`` of the logged values in that part of the task, meaned over the
                seeds that logged the key; None where none did (a row without that term)."""
                values = [[s[key] for s in steps[part] if s.get(key) is not None]
                          for steps in per_run]
                found = [per_seed(v) for v in values if v]
                return statistics.fmean(found) if found else None

            replay = stat("train/replay_ce", last)
            viol = stat("train/tm_violation_frac", every)
            cells = [row_label(row, runs), task, _cell(stat("train/task_ce", first), ".3f"),
                     _cell(stat("train/task_ce", last), ".3f"),
                     _cell(replay or None, ".3f"),  # `none` logs a replay CE of 0
                     _cell(stat("train/grad_norm", every, statistics.median), ".1f"),
                     _cell(None if viol is None else 100 * viol, ".2f"),
                     _cell(stat("train/tm_weight", every, statistics.median), ".2f")]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_fit(b: Benchmark) -> str:
    """Per task, whether fitting the training examples is what decides the test accuracy: over
    every run, Spearman's rank correlation between its task CE over the task's last steps and
    its accuracy right after; then each run's two numbers, lowest CE first."""
    head = ["task", "runs", f"rank correlation (task CE, last {TRAINING_TAIL} steps; accuracy)",
            "runs, lowest task CE first: row seed (CE, accuracy)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, task in enumerate(b.tasks):
        runs = sorted((ce, acc, row, seed) for row, pts in fit_points(b, i).items()
                      for seed, ce, acc in pts)
        if not runs:
            continue
        rho = rank_correlation([p[0] for p in runs], [p[1] for p in runs])
        listing = "; ".join(f"{row} {seed} ({ce:.3f}, {acc:.1f})" for ce, acc, row, seed in runs)
        lines.append(f"| {task} | {len(runs)} | {rho:.2f} | {listing} |")
    return "\n".join(lines) + "\n"



def _pair_line(b: Benchmark, name: str, ra: Sequence[Run], rc: Sequence[Run], machine: str
               ) -> str:
    """One paired difference over the seeds of ``ra`` and ``rc`` (same seeds, same order)."""
    ap = paired_difference(ap_outcomes(ra, b.tasks), ap_outcomes(rc, b.tasks), b.task_sizes)
    bwt = paired_difference(bwt_outcomes(ra, b.tasks), bwt_outcomes(rc, b.tasks),
                            b.task_sizes[:-1])
    gen = paired_difference(general_outcomes(ra, b.general), general_outcomes(rc, b.general),
                            b.general_sizes)
    p = lambda iv: "-" if iv.p_not_above_zero is None else f"{iv.p_not_above_zero:.3f}"  # noqa: E731
    return (f"| {name} | {','.join(str(r.seed) for r in ra)} | {machine} | {_pct(ap)} | {p(ap)} "
            f"| {_pct(bwt)} | {_pct(gen)} | {p(gen)} |")




def render_paired(b: Benchmark, allow_mixed_machines: bool = False) -> str:
    """Paired differences (percentage points) for the pairs present, over the seeds both rows
    ran (one seed draw and one example draw per task or set shared by both sides)."""
    head = ["difference", "seeds", "machine", "AP", "P(AP diff <= 0)", "BWT", "general acc_norm",
            "P(gen diff <= 0)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    mixed = False
    for a, c in PAIRS:
        if a not in b.runs or c not in b.runs:
            continue
        for machine, ra, rc in paired_runs(b, a, c, allow_mixed_machines):
            mixed = mixed or machine.startswith("mixed")
            lines.append(_pair_line(b, f"{a} - {c}", ra, rc, machine))
    note = ("Mixed machines: a difference marked 'mixed' pairs runs made on different machines "
            "(allowed with --allow-mixed-machines); the lines after it keep one machine.\n"
            if mixed else "")
    return "\n".join(lines) + "\n\n" + machines_legend(b) + note



def render_states(b: Benchmark) -> str:
    """Per row and task end (mean over the seeds whose states were measured): the percentage of
    final-norm activation elements whose tri-state differs from the base model's, on the replay
    texts and on held-out texts, and the mean shift of an element in sigma units."""
    head = ["row", "seeds", "after task", "flipped %, replay texts", "flipped %, held-out",
            "shift (sigma), replay", "shift (sigma), held-out"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, runs in b.runs.items():
        measured = [r for r in runs if r.states is not None]
        if not measured:
            continue
        for i, task in enumerate(b.tasks):
            if not any(end_tag(i) in r.states["models"] for r in measured):
                continue
            cells = [_cell(states_mean(measured, i, texts, key), fmt)
                     for key, fmt in (("flipped_pct", ".2f"), ("mean_shift_sigma", ".3f"))
                     for texts in ("replay", "heldout")]
            lines.append(f"| {row_label(row, measured)} | "
                         f"{','.join(str(r.seed) for r in measured)} | "
                         f"{i + 1} {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
