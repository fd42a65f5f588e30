"""The benchmark's pictures (PNG bytes, the same data giving the same file): forgetting per task,
the general suite, TM's violations over training, activation states moved, fit against accuracy."""
from __future__ import annotations

import io
from typing import Any

from gere_ds.evaluation.benchmark import Benchmark
from gere_ds.evaluation.benchmark_stats import (TRAINING_TAIL, fit_points, general_outcomes,
                                                states_mean)
from gere_ds.evaluation.stats import mean_interval



def _png(fig: Any) -> bytes:
    """The figure as PNG bytes (no timestamp: the same data gives the same file); closed after."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def forgetting_figure(b: Benchmark) -> bytes:
    """Per task: accuracy at every evaluation point for each row (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = ["base"] + [f"after {t}" for t in b.tasks]
    fig, axes = plt.subplots(1, len(b.tasks), figsize=(4.2 * len(b.tasks), 3.6), squeeze=False)
    for i, (task, ax) in enumerate(zip(b.tasks, axes[0])):
        for row, runs in b.runs.items():
            ys = [sum(r.metrics["matrix"][k][i] for r in runs) / len(runs)
                  for k in range(len(points))]
            ax.plot(range(len(points)), ys, marker="o", label=row)
        ax.axvline(i + 1, color="grey", lw=0.8, ls=":")
        ax.set_title(f"{task} (trained at step {i + 1})")
        ax.set_xticks(range(len(points)), points, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("accuracy (%)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def general_figure(b: Benchmark) -> bytes:
    """The general suite (mean acc_norm) and the perplexities after each task, per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_points = len(b.tasks) + 1
    panels = ["general acc_norm"] + [f"{p} perplexity" for p in b.perplexity]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.6), squeeze=False)
    for row, runs in b.runs.items():
        acc = [100 * mean_interval(general_outcomes(runs, b.general, k), n_boot=1).mean
               for k in range(n_points)]
        axes[0][0].plot(range(n_points), acc, marker="o", label=row)
        for ax, p in zip(axes[0][1:], b.perplexity):
            ys = [sum(r.metrics["general"][p][k] for r in runs) / len(runs)
                  for k in range(n_points)]
            ax.plot(range(n_points), ys, marker="o", label=row)
    labels = ["base"] + [f"after {t}" for t in b.tasks]
    for ax, title in zip(axes[0], panels):
        ax.set_title(title)
        ax.set_xticks(range(n_points), labels, rotation=30, ha="right", fontsize=8)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def violation_figure(b: Benchmark) -> bytes:
    """TM's violating fraction of replay activation elements over training (TM rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for row, runs in b.runs.items():
        series = [[s.get("train/tm_violation_frac") for s in r.steps] for r in runs]
        if not any(v is not None for s in series for v in s):
            continue
        steps = [s["global_step"] for s in runs[0].steps]
        ys = [sum(s[k] or 0.0 for s in series) / len(series) for k in range(len(steps))]
        ax.plot(steps, [100 * y for y in ys], label=row)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("violating elements (%)")
    ax.set_title("TM: replay activation states outside the base model's")
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def states_figure(b: Benchmark) -> bytes:
    """Activation states flipped from the base model's after each task, per row (mean over the
    seeds that measured them), on replay texts (solid) and held-out texts (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    xs = list(range(1, len(b.tasks) + 1))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (row, runs) in enumerate(b.runs.items()):
        measured = [r for r in runs if r.states is not None]
        for texts, style in (("replay", "-"), ("heldout", "--")):
            ys = [states_mean(measured, i, texts, "flipped_pct") for i in range(len(b.tasks))]
            if any(y is not None for y in ys):
                ax.plot(xs, [float("nan") if y is None else y for y in ys], style, marker="o",
                        color=colours[k % len(colours)],
                        label=f"{row} ({'replay' if texts == 'replay' else 'held-out'})")
    ax.set_xticks(xs, [f"after {t}" for t in b.tasks], fontsize=8)
    ax.set_ylabel("states flipped (% of elements)")
    ax.set_ylim(bottom=0)
    ax.set_title("Final-norm activation states moved from the base model's")
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def fit_figure(b: Benchmark) -> bytes:
    """Per task: every run's task CE over the task's last steps against its accuracy right
    after them, coloured by row; the dashed line is the task's majority-label rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(b.tasks), figsize=(4.2 * len(b.tasks), 3.8), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (task, ax) in enumerate(zip(b.tasks, axes[0])):
        for k, (row, pts) in enumerate(fit_points(b, i).items()):
            ax.scatter([p[1] for p in pts], [p[2] for p in pts], s=22, label=row,
                       color=colours[k % len(colours)], marker="os^D"[k // len(colours) % 4])
        majority = next(iter(b.runs.values()))[0].outcomes.get("majority", {}).get(task)
        if majority is not None:
            ax.axhline(100 * majority, color="grey", lw=0.8, ls="--")
        ax.set_title(task)
        ax.set_xlabel(f"task CE, last {TRAINING_TAIL} steps of its training")
        ax.set_ylabel("accuracy after its training (%)")
    fullest = max(axes[0], key=lambda a: len(a.collections))  # the first panel with every row
    if fullest.collections:
        fullest.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)
