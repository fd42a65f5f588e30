"""Write and log the evaluation results of a run.

:func:`write_report` writes, atomically (:mod:`gere_ds.storage.atomic`), into the run directory:

* ``metrics.json``: task names, row labels, the accuracy matrix, AP / BWT / FWT / forgetting,
  the general scores per row (``{name: [value per row]}``), the final general scores and F1,
* ``metrics.md``: the same as markdown tables,
* ``accuracy_matrix.png``: a heatmap of the matrix (rows = base / after task t, columns = tasks)
  with the numbers in the cells,
* ``forgetting_curve.png``: accuracy on each task after each task, one line per task.

:func:`log_to_tensorboard` logs the same to a ``SummaryWriter``: ``eval/<task>/acc`` at
step = row index (0 = base), ``general/<name>`` at step = row, ``eval/AP``, ``eval/BWT``,
``eval/FWT``, ``eval/forgetting``, ``eval/F1`` at step = last row, the heatmap and the
forgetting curve (``add_figure``) and the markdown (``add_text``); given the optimizer step, the
row's scores also as ``eval_step/<task>/acc`` and ``general_step/<name>`` at that step, so they
line up with the training curves. :func:`log_hparams` adds the run's settings with its final
metrics (``add_hparams``). All accuracies are percent (0-100).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Optional, Sequence

from gere_ds.evaluation.metrics import CLMetrics, compute_metrics
from gere_ds.storage.atomic import write_bytes_atomic, write_text_atomic

SUMMARY_KEYS = ("AP", "BWT", "FWT", "forgetting")
METRICS_JSON, METRICS_MD, MATRIX_PNG = "metrics.json", "metrics.md", "accuracy_matrix.png"
FORGETTING_PNG = "forgetting_curve.png"


def row_labels(task_names: Sequence[str], n_rows: int) -> list[str]:
    """``["base", "after <task 1>", ...]`` for the ``n_rows`` rows present."""
    return ["base"] + [f"after {name}" for name in list(task_names)[:n_rows - 1]]


def fmt(value: Optional[float], digits: int = 2) -> str:
    """A number for a table; ``-`` for None/NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def build_results(task_names: Sequence[str], matrix: Sequence[Sequence[float]],
                  general: Optional[Mapping[str, Sequence[Optional[float]]]] = None,
                  f1_with: Optional[str] = None) -> dict[str, Any]:
    """The content of ``metrics.json`` (see the module doc)."""
    names = list(task_names)
    general = {k: list(v) for k, v in (general or {}).items()}
    m: CLMetrics = compute_metrics(matrix, general, num_tasks=len(names), f1_with=f1_with)
    return {
        "tasks": names,
        "num_tasks": m.num_tasks,
        "completed_tasks": m.completed_tasks,
        "row_labels": row_labels(names, len(matrix)),
        "matrix": [[float(v) for v in row] for row in matrix],
        "AP": m.AP,
        "BWT": m.BWT,
        "FWT": m.FWT,
        "forgetting": m.forgetting,
        "general": general,
        "general_final": m.general_final,
        "F1": m.F1,
        "F1_general": m.F1_general,
    }


def render_markdown(results: Mapping[str, Any]) -> str:
    """``metrics.md``: the matrix, the summary metrics and the general scores."""
    names = results["tasks"]
    labels = results["row_labels"]
    out = [f"# Evaluation ({results['completed_tasks']} of {results['num_tasks']} tasks "
           "trained)", "", "## Accuracy matrix (%)", "",
           "Row = model after that task, column = task evaluated.", ""]
    out.append(_table([""] + names,
                      [[lab] + [fmt(v) for v in row]
                       for lab, row in zip(labels, results["matrix"])]))
    out += ["", "## Summary", ""]
    rows = [[k, fmt(results[k])] for k in SUMMARY_KEYS]
    for name, v in results["general_final"].items():
        rows.append([name, fmt(v)])
    f1_label = f"F1 ({results['F1_general']}, AP)" if results.get("F1_general") else "F1"
    rows.append([f1_label, fmt(results["F1"])])
    out.append(_table(["metric", "value"], rows))
    if results["general"]:
        out += ["", "## General scores", ""]
        gnames = list(results["general"])
        grows = []
        for r, lab in enumerate(labels):
            vals = [results["general"][g][r] if r < len(results["general"][g]) else None
                    for g in gnames]
            grows.append([lab] + [fmt(v) for v in vals])
        out.append(_table([""] + gnames, grows))
    return "\n".join(out) + "\n"


def matrix_figure(task_names: Sequence[str], matrix: Sequence[Sequence[float]]) -> Any:
    """A matplotlib figure: heatmap of the matrix with the value in each cell."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state

    names = list(task_names)
    labels = row_labels(names, len(matrix))
    n_rows, n_cols = len(matrix), len(names)
    fig = Figure(figsize=(1.6 + 0.75 * n_cols, 1.2 + 0.5 * n_rows), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow([[float(v) for v in row] for row in matrix], cmap="viridis", vmin=0, vmax=100,
                   aspect="auto")
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    ax.set_xticks(range(n_cols), labels=names, rotation=45, ha="right")
    ax.set_yticks(range(n_rows), labels=labels)
    ax.set_xlabel("task evaluated")
    ax.set_ylabel("model")
    size = max(6.5, min(10, 100 / max(n_cols, 1)))
    for r, row in enumerate(matrix):
        for c, v in enumerate(row):
            ax.text(c, r, f"{float(v):.1f}", ha="center", va="center", fontsize=size,
                    color="white" if float(v) < 50 else "black")
    ax.set_title("Accuracy matrix")
    fig.tight_layout()
    return fig


def forgetting_figure(task_names: Sequence[str], matrix: Sequence[Sequence[float]],
                      ax: Any = None, title: str = "Accuracy on each task after each task") -> Any:
    """Accuracy on each task (one line per task) against the model (base, after task 1, ...);
    a task's line is solid from the row that trained it on (before: dashed, FWT territory)."""
    from matplotlib.figure import Figure

    names = list(task_names)
    labels = row_labels(names, len(matrix))
    fig = None
    if ax is None:
        fig = Figure(figsize=(2.5 + 0.9 * max(len(labels), 2), 4.0), dpi=100)
        ax = fig.add_subplot(1, 1, 1)
    xs = list(range(len(matrix)))
    for j, name in enumerate(names):
        ys = [float(row[j]) for row in matrix]
        trained = min(j + 1, len(matrix) - 1)  # row after task j+1
        (line,) = ax.plot(xs[:trained + 1], ys[:trained + 1], linestyle="--", alpha=0.6)
        ax.plot(xs[trained:], ys[trained:], marker="o", color=line.get_color(), label=name)
    ax.set_xticks(xs, labels=labels, rotation=30, ha="right")
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="best")
    if fig is not None:
        fig.tight_layout()
    return fig if fig is not None else ax.figure


def _save_png(fig: Any, path: str) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_bytes_atomic(path, buf.getvalue())


def write_report(output_dir: str, task_names: Sequence[str], matrix: Sequence[Sequence[float]],
                 general: Optional[Mapping[str, Sequence[Optional[float]]]] = None,
                 f1_with: Optional[str] = None, plot: bool = True) -> dict[str, Any]:
    """Write metrics.json, metrics.md and accuracy_matrix.png into ``output_dir``; return the
    results dict (the JSON content). Call it on one rank only."""
    results = build_results(task_names, matrix, general, f1_with)
    write_text_atomic(os.path.join(output_dir, METRICS_JSON), json.dumps(results, indent=2) + "\n")
    write_text_atomic(os.path.join(output_dir, METRICS_MD), render_markdown(results))
    if plot:
        _save_png(matrix_figure(task_names, matrix), os.path.join(output_dir, MATRIX_PNG))
        _save_png(forgetting_figure(task_names, matrix), os.path.join(output_dir, FORGETTING_PNG))
    return results


def log_to_tensorboard(writer: Any, task_names: Sequence[str], matrix: Sequence[Sequence[float]],
                       general: Optional[Mapping[str, Sequence[Optional[float]]]] = None,
                       f1_with: Optional[str] = None, rows: str = "all",
                       global_step: Optional[int] = None) -> dict[str, Any]:
    """Log the results to a ``SummaryWriter``.

    ``rows="all"`` logs the per-row scalars of every row; ``rows="last"`` only those of the last
    row (for a trainer that calls this after every task). Summary scalars (None ones skipped),
    the heatmap and the markdown are logged at step = last row index.
    """
    if rows not in ("all", "last"):
        raise ValueError("rows must be 'all' or 'last'")
    results = build_results(task_names, matrix, general, f1_with)
    last = len(matrix) - 1
    steps = range(len(matrix)) if rows == "all" else [last]
    for t in steps:
        for i, name in enumerate(results["tasks"]):
            writer.add_scalar(f"eval/{name}/acc", float(matrix[t][i]), t)
        for g, values in results["general"].items():
            if t < len(values) and values[t] is not None:
                writer.add_scalar(f"general/{g}", float(values[t]), t)
    if global_step is not None:  # the last row again, on the training curves' axis
        for i, name in enumerate(results["tasks"]):
            writer.add_scalar(f"eval_step/{name}/acc", float(matrix[last][i]), global_step)
        for g, values in results["general"].items():
            if last < len(values) and values[last] is not None:
                writer.add_scalar(f"general_step/{g}", float(values[last]), global_step)
    for key in SUMMARY_KEYS + ("F1",):
        if results[key] is not None:
            writer.add_scalar(f"eval/{key}", float(results[key]), last)
    writer.add_figure("eval/accuracy_matrix", matrix_figure(task_names, matrix), last)
    writer.add_figure("eval/forgetting_curve", forgetting_figure(task_names, matrix), last)
    writer.add_text("eval/metrics", render_markdown(results), last)
    writer.flush()
    return results


def final_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """The run's final numbers (summary metrics, F1, final general scores), None ones left out."""
    out = {f"final/{k}": float(results[k]) for k in SUMMARY_KEYS + ("F1",)
           if results.get(k) is not None}
    out.update({f"final/{g}": float(v) for g, v in (results.get("general_final") or {}).items()
                if v is not None})
    return out


def log_hparams(writer: Any, hparams: Mapping[str, Any], results: Mapping[str, Any]) -> None:
    """TensorBoard's HPARAMS view: the run's settings against its final metrics (written into
    the same log folder)."""
    clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
             for k, v in hparams.items()}
    writer.add_hparams(clean, final_metrics(results), run_name=".")
    writer.flush()
