"""Compare runs side by side: AP, BWT, FWT, forgetting, general scores and F1.

Usage::

    python eval/compare.py RUN_DIR [RUN_DIR ...] [--out DIR] [--names a,b]

Each RUN_DIR is a run's output directory holding ``metrics.json`` (written by
``gere_ds.evaluation.report.write_report``), or the path of a metrics.json itself. The markdown
table is printed and saved to ``<out>/compare.md``; ``<out>/compare.png`` is a grouped bar chart,
``<out>/compare_forgetting.png`` each run's forgetting curve (accuracy on each task after each
task).
``--out`` defaults to the current directory; ``--names`` (comma-separated, one per run) defaults
to the run directory names. A missing or unreadable run stops with one line on stderr (exit 2).

    python eval/compare.py --benchmark docs/results/continual [--out DIR] [--allow-mixed-machines]

makes the continual benchmark's tables (with 95 % intervals and paired differences) and pictures
from a folder of ``<row>/seed<N>/`` result files (:mod:`gere_ds.evaluation.benchmark_report`);
a folder mixing regimes or test sets is refused with one line naming the mismatch, and so is a
paired difference between runs made on different machines (their ``machine.json``), unless
``--allow-mixed-machines``: then the tables mark such a difference as mixed and add one per
machine.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
from typing import Any, Optional, Sequence, TypeVar

from gere_ds.storage.atomic import write_bytes_atomic, write_text_atomic

SUMMARY = ("AP", "BWT", "FWT", "forgetting")
_T = TypeVar("_T")


class CompareError(Exception):
    """One-line user error."""


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{float(v):.2f}"


def load_run(path: str) -> dict[str, Any]:
    """The metrics.json of a run directory (or the file itself)."""
    file = path if path.endswith(".json") else os.path.join(path, "metrics.json")
    if not os.path.exists(path):
        raise CompareError(f"{path}: no such run directory")
    if not os.path.isfile(file):
        raise CompareError(f"{file}: not found (has the run been evaluated?)")
    try:
        with open(file, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise CompareError(f"{file}: unreadable metrics ({err})") from None
    if not isinstance(data, dict) or "AP" not in data:
        raise CompareError(f"{file}: not a gere-ds metrics.json (no 'AP' key)")
    return data


def run_name(path: str) -> str:
    p = os.path.abspath(path)
    if p.endswith(".json"):
        p = os.path.dirname(p)
    return os.path.basename(p.rstrip(os.sep)) or p


def general_base(run: dict[str, Any]) -> dict[str, Optional[float]]:
    """The base model's general scores (row 0 of each ``general`` series)."""
    return {g: (vals[0] if vals else None) for g, vals in (run.get("general") or {}).items()}


def mean_std(vals: Sequence[Any]) -> tuple[Optional[float], Optional[float]]:
    """Mean and population std of the non-None values (None, None when there are none)."""
    nums = [float(v) for v in vals if v is not None]
    if not nums:
        return None, None
    mean = sum(nums) / len(nums)
    return mean, (sum((v - mean) ** 2 for v in nums) / len(nums)) ** 0.5


def group_by_name(names: Sequence[str], items: Sequence[_T]) -> tuple[list[str], list[list[_T]]]:
    """The distinct names in first-seen order and, for each, its items (seeds of one row)."""
    groups: dict[str, list[_T]] = {}
    for name, item in zip(names, items):
        groups.setdefault(name, []).append(item)
    return list(groups), list(groups.values())


def merge_seeds(names: Sequence[str], runs: Sequence[dict[str, Any]]
                ) -> tuple[list[str], list[dict[str, Any]]]:
    """Runs sharing a name (e.g. seeds of one strategy) -> one column of means.

    Each merged run carries ``_std`` (metric -> population std over the seeds) and ``_n``;
    ``general_base`` and ``general_final`` hold the means of the base and final general scores
    (std under ``"<name> (base)"`` and ``"<name>"``).
    """
    order, groups = group_by_name(names, runs)
    merged = []
    for group in groups:
        gen = {g for r in group for g in (r.get("general_final") or {})}
        out: dict[str, Any] = dict(group[0])
        out["general_final"], out["general_base"], out["_std"] = {}, {}, {}
        out["_n"] = len(group)
        for k in list(SUMMARY) + ["F1"]:
            out[k], out["_std"][k] = mean_std([r.get(k) for r in group])
        for g in sorted(gen):
            out["general_final"][g], out["_std"][g] = mean_std(
                [(r.get("general_final") or {}).get(g) for r in group])
            out["general_base"][g], out["_std"][f"{g} (base)"] = mean_std(
                [general_base(r).get(g) for r in group])
        merged.append(out)
    return order, merged


def build_table(names: Sequence[str], runs: Sequence[dict[str, Any]]) -> tuple[str, list, list]:
    """(markdown, metric names, values[metric][run]) for the runs (mean ± std for merged seeds).

    Each general score gets two rows: the base model's (``<name> (base)``) and the final model's.
    """
    general: list[str] = []
    for r in runs:
        for g in (r.get("general_final") or {}):
            if g not in general:
                general.append(g)
    metrics = list(SUMMARY) + [m for g in general for m in (f"{g} (base)", g)] + ["F1"]
    values: list[list[Optional[float]]] = []
    for m in metrics:
        if m in SUMMARY or m == "F1":
            values.append([r.get(m) for r in runs])
        elif m.endswith(" (base)"):
            g = m[:-len(" (base)")]
            values.append([(r.get("general_base") or general_base(r)).get(g) for r in runs])
        else:
            values.append([(r.get("general_final") or {}).get(m) for r in runs])
    header = ["metric"] + list(names)
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] + ["---:"] * len(names)) + "|"]
    tasks_row = ["tasks trained"] + [f"{r.get('completed_tasks', '?')}/{r.get('num_tasks', '?')}"
                                     for r in runs]
    lines.append("| " + " | ".join(tasks_row) + " |")
    if any(r.get("_n", 1) > 1 for r in runs):
        lines.append("| " + " | ".join(["seeds"] + [str(r.get("_n", 1)) for r in runs]) + " |")
    for m, vals in zip(metrics, values):
        label = m
        if m == "F1":
            used = {r.get("F1_general") for r in runs if r.get("F1_general")}
            if len(used) == 1:
                label = f"F1 ({used.pop()}, AP)"
        cells = [_fmt(v) + (f" ± {r['_std'][m]:.2f}" if r.get("_n", 1) > 1 and v is not None
                            and r["_std"].get(m) is not None else "")
                 for v, r in zip(vals, runs)]
        lines.append("| " + " | ".join([label] + cells) + " |")
    return "\n".join(lines) + "\n", metrics, values


def bar_chart(names: Sequence[str], metrics: Sequence[str],
              values: Sequence[Sequence[Optional[float]]]) -> bytes:
    """PNG bytes of a grouped bar chart (one group per metric, one bar per run)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(min(16.0, max(6.0, 0.6 * len(metrics) * max(1, len(names)) + 2)), 4.5),
                 dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(names))
    for j, name in enumerate(names):
        xs, ys = [], []
        for i, vals in enumerate(values):
            if vals[j] is not None:
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(float(vals[j]))
        bars = ax.bar(xs, ys, width=width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=6 if len(names) > 4 else 7)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(metrics)), labels=list(metrics))
    ax.set_ylabel("percent (perplexity: as is)")
    ax.set_title("Run comparison")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def forgetting_grid(names: Sequence[str], runs: Sequence[dict[str, Any]]) -> bytes:
    """PNG bytes: one forgetting curve per run (accuracy on each task after each task)."""
    from matplotlib.figure import Figure

    from gere_ds.evaluation.report import forgetting_figure

    fig = Figure(figsize=(min(24.0, 4.5 * len(runs)), 4.2), dpi=100)
    for i, (name, run) in enumerate(zip(names, runs)):
        ax = fig.add_subplot(1, len(runs), i + 1)
        forgetting_figure(run["tasks"], run["matrix"], ax=ax, title=name)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def runs_cli(description: str, outputs: str, argv: Optional[Sequence[str]]
             ) -> tuple[argparse.Namespace, list[str]]:
    """Parse ``RUN_DIR... [--out DIR] [--names a,b]`` (shared with eval/dynamics.py); returns the
    arguments and one name per run (the folder names by default)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run output directories")
    ap.add_argument("--out", default=".", help=f"folder for {outputs}")
    ap.add_argument("--names", default="", help="comma-separated display names, one per run; "
                    "runs given the same name (seeds) are averaged: mean ± std")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.names.split(",")] if args.names else \
        [run_name(p) for p in args.runs]
    if len(names) != len(args.runs):
        raise CompareError(f"--names has {len(names)} names for {len(args.runs)} runs")
    return args, names


def save_outputs(out: str, stem: str, table: str, png: bytes) -> None:
    """``<out>/<stem>.md`` and ``<out>/<stem>.png``, each written atomically."""
    os.makedirs(out, exist_ok=True)
    write_text_atomic(os.path.join(out, f"{stem}.md"), table)
    write_bytes_atomic(os.path.join(out, f"{stem}.png"), png)


def benchmark_main(argv: Sequence[str]) -> int:
    """``--benchmark RESULTS [--out DIR]``: the continual benchmark's tables and pictures."""
    # lazy: the report reads outcomes with torch; compare's other modes start without it
    from gere_ds.evaluation.benchmark import BenchmarkError
    from gere_ds.evaluation.benchmark_report import compare_run, write_report

    ap = argparse.ArgumentParser(description="Tables and pictures of the continual benchmark.")
    ap.add_argument("--benchmark", required=True, metavar="RESULTS",
                    help="folder of <row>/seed<N>/ result files")
    ap.add_argument("--out", default="", help="output folder (default: RESULTS itself)")
    ap.add_argument("--against", default="", metavar="RUN_DIR",
                    help="instead: print this finished run next to the committed none and replay "
                         "rows, all scored on the examples the run scored (the demo does this)")
    ap.add_argument("--allow-mixed-machines", action="store_true",
                    help="pair runs made on different CPUs/GPUs (their machine.json) anyway; the "
                         "tables mark those differences as mixed")
    args = ap.parse_args(argv)
    try:
        if args.against:
            print(compare_run(args.against, args.benchmark), end="")
            return 0
        texts = write_report(args.benchmark, args.out or None, args.allow_mixed_machines)
    except BenchmarkError as err:
        print(f"compare: {err}", file=sys.stderr)
        return 2
    print("".join(texts.values()), end="")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--benchmark" or a.startswith("--benchmark=") for a in argv):
        return benchmark_main(argv)
    try:
        args, names = runs_cli("Compare gere-ds runs side by side.",
                               "compare.md and compare.png", argv)
        runs = [load_run(p) for p in args.runs]
        curves = forgetting_grid(names, runs)
        names, runs = merge_seeds(names, runs)  # repeated names = seeds of one row
        table, metrics, values = build_table(names, runs)
        save_outputs(args.out, "compare", table, bar_chart(names, metrics, values))
        write_bytes_atomic(os.path.join(args.out, "compare_forgetting.png"), curves)
    except CompareError as err:
        print(f"compare: {err}", file=sys.stderr)
        return 2
    print(table, end="")
    return 0

