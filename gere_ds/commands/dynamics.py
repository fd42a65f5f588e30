"""What the replay terms did during training: one table and one figure from the runs' step logs.

Usage::

    python eval/dynamics.py RUN_DIR [RUN_DIR ...] [--names a,b] [--out DIR]

Each RUN_DIR holds ``train_steps.jsonl`` (one line per optimizer step, written by the trainer).
Runs given the same name (seeds of one row) are averaged. For each row the table gives the mean
task CE and replay CE over training, the replay CE at the last step, and, for the imitation
strategies, the regulariser's mean value and median weight (over the steps where the term is not 0); for ``tm`` also the fraction of
activation elements outside their teacher state (the violating fraction) at the start of
training, its mean and at the end. ``<out>/dynamics.md`` is the table, ``<out>/dynamics.png``
the replay CE, violating fraction and weight against the optimizer step. A missing or malformed
log stops with one line on stderr naming the file and line (exit 2).
"""
from __future__ import annotations

import io
import math
import os
import statistics
import sys
from typing import Any, Optional, Sequence


from gere_ds.data.files import read_rows
from gere_ds.errors import InputError
from gere_ds.strategies import term_strategies

from gere_ds.commands.compare import (CompareError, group_by_name, mean_std, runs_cli,
                                      save_outputs)


STEPS_FILE = "train_steps.jsonl"
# the strategies with a term on replay rows: each logs train/<name> and train/<name>_weight
REGULARISERS = tuple(term_strategies())


def load_steps(run_dir: str) -> list[dict[str, Any]]:
    """The step records of a run, in order (read by gere-ds's one row reader)."""
    path = os.path.join(run_dir, STEPS_FILE)
    if not os.path.isfile(path):
        raise CompareError(f"{path}: not found (did the run train?)")
    try:
        rows = read_rows(path, what="step log")
        for row in rows:
            if "global_step" not in row.data:
                raise row.error(path, "global_step", "missing")
    except InputError as err:
        raise CompareError(str(err)) from None
    return [row.data for row in rows]


def run_strategy(run_dir: str) -> str:
    """The replay strategy a run was configured with (its saved ``config.yaml``)."""
    import yaml

    path = os.path.join(run_dir, "config.yaml")
    try:
        with open(path, encoding="utf-8") as fh:
            cfg = yaml.safe_load(fh)
        return str(cfg["replay"]["strategy"])
    except (OSError, yaml.YAMLError, KeyError, TypeError) as err:
        raise CompareError(f"{path}: cannot read replay.strategy ({err})") from None


def _finite(values: Sequence[Any]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def summarise(steps: list[dict[str, Any]]) -> dict[str, Optional[float]]:
    """One run's numbers for the table (None where the run did not log that quantity)."""
    def col(key: str) -> list[float]:
        return _finite([s.get(key) for s in steps])

    def mean(key: str) -> Optional[float]:
        vals = col(key)
        return sum(vals) / len(vals) if vals else None

    out: dict[str, Optional[float]] = {
        "task_ce": mean("train/task_ce"), "replay_ce": mean("train/replay_ce"),
        "replay_ce_last": (col("train/replay_ce") or [None])[-1],
        "reg": None, "reg_weight": None, "viol_first": None, "viol": None, "viol_last": None,
        "ignored": None}
    for name in REGULARISERS:
        if col(f"train/{name}"):
            out["reg"] = mean(f"train/{name}")
            # steps where the term is 0 are left out: there w = dy is CE / 1e-8 (the first step)
            weights = _finite([s.get(f"train/{name}_weight") for s in steps
                               if s.get(f"train/{name}") not in (None, 0, 0.0)])
            out["reg_weight"] = statistics.median(weights) if weights else None
    viol = col("train/tm_violation_frac")
    if viol:
        # the first step's fraction is rounding noise at most (the model is the teacher):
        # report the second step as "start"
        out["viol_first"] = viol[1] if len(viol) > 1 else viol[0]
        out["viol"], out["viol_last"] = sum(viol) / len(viol), viol[-1]
    # violations inside TM's opt-in rounding guard: they keep their value and pass no gradient
    # (runs made before the guard took that form left them out of the loss)
    out["ignored"] = mean("train/tm_ignored_frac")
    return out


COLUMNS = (("task_ce", "task CE (mean)", 3), ("replay_ce", "replay CE (mean)", 3),
           ("replay_ce_last", "replay CE (last step)", 3), ("reg", "regulariser (mean)", 4),
           ("reg_weight", "weight (median)", 1), ("viol_first", "TM violating % (step 2)", 2),
           ("viol", "TM violating % (mean)", 2), ("viol_last", "TM violating % (last)", 2),
           ("ignored", "TM in dead-band % (mean)", 3))


def build_table(names: Sequence[str], summaries: Sequence[Sequence[dict[str, Any]]]) -> str:
    """Markdown: one row per name, mean ± std over its runs (seeds)."""
    lines = ["| row | seeds | " + " | ".join(label for _, label, _ in COLUMNS) + " |",
             "|---|---:|" + "---:|" * len(COLUMNS)]
    for name, group in zip(names, summaries):
        cells = []
        for key, _, digits in COLUMNS:
            scale = 100.0 if key.startswith(("viol", "ignored")) else 1.0
            mean, std = mean_std([s[key] * scale if s[key] is not None else None for s in group])
            if mean is None:
                cells.append("-")
            else:
                cells.append(f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if len(group) > 1
                                                       else ""))
        lines.append(f"| {name} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _mean_curve(runs: Sequence[list[dict[str, Any]]], key: str) -> tuple[list[int], list[float]]:
    by_step: dict[int, list[float]] = {}
    for steps in runs:
        for s in steps:
            v = s.get(key)
            if v is not None and math.isfinite(float(v)):
                by_step.setdefault(int(s["global_step"]), []).append(float(v))
    xs = sorted(by_step)
    return xs, [sum(by_step[x]) / len(by_step[x]) for x in xs]


def figure(names: Sequence[str], runs: Sequence[Sequence[list[dict[str, Any]]]]) -> bytes:
    """PNG: replay CE, TM violating fraction, the fraction inside the dead-band (violations the
    loss ignores) and TM weight against the optimizer step."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend

    panels = (("train/replay_ce", "replay CE", False),
              ("train/tm_violation_frac", "TM violating fraction", False),
              ("train/tm_ignored_frac", "TM inside the dead-band (fraction)", False),
              ("train/tm_weight", "TM weight (log)", True))
    fig = Figure(figsize=(16, 4), dpi=100)
    for i, (key, title, log) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for name, group in zip(names, runs):
            xs, ys = _mean_curve(group, key)
            if log:  # drop the dy weight of a step where the term is exactly 0
                xs, ys = zip(*[(x, y) for x, y in zip(xs, ys) if 0 < y < 1e6]) if any(
                    0 < y < 1e6 for y in ys) else ([], [])
            if xs:
                ax.plot(xs, ys, label=name, linewidth=1.2)
        if log:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args, names = runs_cli("Training dynamics of gere-ds runs.",
                               "dynamics.md and dynamics.png", argv)
        runs: list[list[dict[str, Any]]] = []
        for run in args.runs:
            steps = load_steps(run)
            if run_strategy(run) == "none":  # no replay rows: the logged 0 is not a measurement
                steps = [{k: v for k, v in s.items() if k != "train/replay_ce"} for s in steps]
            runs.append(steps)
        order, groups = group_by_name(names, runs)
        table = build_table(order, [[summarise(steps) for steps in g] for g in groups])
        save_outputs(args.out, "dynamics", table, figure(order, groups))
    except CompareError as err:
        print(f"dynamics: {err}", file=sys.stderr)
        return 2
    print(table, end="")
    return 0

