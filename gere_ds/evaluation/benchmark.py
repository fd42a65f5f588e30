"""The continual benchmark's report: rows x seeds of small result files -> tables and pictures.

A results folder holds one sub-folder per row (strategy) and, inside, one per seed::

    <results>/<row>/seed<N>/{config.yaml, metrics.json, outcomes.json, train_steps.jsonl,
                             states.json (optional: `gere-ds states` on the run's task ends)}

:func:`load_benchmark` refuses, with one line naming the mismatch, a folder whose runs were not
made under one regime (same model, tasks, schedule and evaluation; the non-``none`` rows also
share their replay set) or whose runs scored different test examples (``outcomes.json``
fingerprints); nothing is silently averaged. :func:`write_report` then writes ``table.md``
(rows with 95 % intervals, each row's general ability against its own runs' base model),
``paired.md`` (paired differences over the seeds both rows ran, refused where their runs ran
on different machines unless ``allow_mixed_machines``), ``learning.md`` (each task
against its majority label), ``training.md`` (what each row's training did: task and replay CE,
gradient norm, TM's violations and weight), ``states.md`` (activation states flipped from the
base model's at each task end, for the runs that measured them), ``fit.md`` (whether each
run's fit of its training examples is what decides its test accuracy) and five pictures.
A row of one seed has no interval (its training noise is not measured) and every table says
"1 seed" beside it.
"""
from __future__ import annotations

import io
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from gere_ds.atomic import write_bytes_atomic, write_text_atomic
from gere_ds.evaluation.outcomes import OUTCOMES_JSON, unbits
from gere_ds.evaluation.stats import (Interval, concat_examples, mean_interval, paired_difference,
                                      rank_correlation)

STATES_JSON = "states.json"
MACHINE_JSON = "machine.json"
NOT_RECORDED = "not recorded"  # a run made before the runner wrote machine.json
ROW_ORDER = ("none", "replay", "tm_w1", "tm_w100", "tm_dy", "tm_dy_k2", "tm_dy_exact", "kl", "l2",
             "lora_tm_dy")
PAIRS = (("replay", "none"), ("tm_dy", "none"), ("tm_dy", "replay"), ("tm_w100", "replay"),
         ("tm_dy", "kl"), ("tm_dy", "l2"), ("kl", "replay"), ("l2", "replay"), ("l2", "none"),
         ("tm_dy", "tm_w100"), ("tm_w1", "tm_dy"), ("tm_w1", "replay"),
         ("tm_dy_k2", "tm_dy"), ("tm_dy_exact", "tm_dy"), ("tm_dy_exact", "replay"),
         ("tm_dy_exact", "none"), ("lora_tm_dy", "tm_dy"))
# keys that may differ between rows and seeds; everything else in config.yaml is the regime
ROW_KEYS = {"output_dir", "resume", "replay", "checkpoint"}
SEED_KEYS = {"seed", "lora"}  # train keys a row may set: the seed, and LoRA adapters (a LoRA row)


class BenchmarkError(Exception):
    """One-line refusal: the folder does not hold one comparable benchmark."""


@dataclass
class Run:
    row: str
    seed: int
    folder: Path
    config: dict[str, Any]
    metrics: dict[str, Any]
    outcomes: dict[str, Any]
    steps: list[dict[str, Any]] = field(default_factory=list)
    states: dict[str, Any] | None = None  # states.json (gere-ds states on the task ends), if any
    machine: dict[str, str] = field(default_factory=lambda: {"cpu_model": NOT_RECORDED})


@dataclass
class Benchmark:
    tasks: list[str]
    general: list[str]          # cloze sets (intervals from their outcomes)
    perplexity: list[str]       # perplexity sets (point values)
    runs: dict[str, list[Run]]  # row -> its seeds, in ROW_ORDER then name order
    machines: list[dict[str, str]] = field(default_factory=list)  # machine i is letter A + i
    task_sizes: list[int] = field(default_factory=list)      # test examples per task
    general_sizes: list[int] = field(default_factory=list)   # examples per cloze set

    def machine_letter(self, run: Run) -> str:
        return chr(ord("A") + self.machines.index(run.machine))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise BenchmarkError(f"{path}: unreadable ({err})") from None


def _read_steps(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def _regime(cfg: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in cfg.items() if k not in ROW_KEYS}
    out["train"] = {k: v for k, v in cfg.get("train", {}).items() if k not in SEED_KEYS}
    return out


def _replay_set(cfg: dict[str, Any]) -> dict[str, Any]:
    r = cfg.get("replay", {})
    return {k: r.get(k) for k in ("data", "num_samples", "max_len", "per_batch")}


def _state_settings(states: dict[str, Any]) -> dict[str, Any]:
    return {k: states.get(k) for k in ("base", "replay", "heldout", "samples", "max_len",
                                       "threshold_k")}


def _first_difference(a: Any, b: Any, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
    return f"{prefix.rstrip('.')}: {a!r} vs {b!r}"


# replay.tm_dead_band 'auto', the default of runs saved before 0 was: the rounding units it
# meant by compute dtype (those runs' band left small violations out of the loss entirely)
FORMER_AUTO_BAND = {True: 48.0, False: 1024.0}


def _former_values(path: Path) -> list[str]:
    """Overrides that read a saved config's former values as what they meant when it ran."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return []  # load_config says what is wrong
    replay, train = raw.get("replay") or {}, raw.get("train") or {}
    if isinstance(replay, dict) and replay.get("tm_dead_band") == "auto":
        bf16 = train.get("bf16", True) if isinstance(train, dict) else True
        return [f"replay.tm_dead_band={FORMER_AUTO_BAND[bool(bf16)]:g}"]
    return []


def resolved_config(path: Path) -> dict[str, Any]:
    """A run's saved config with every default filled in by this version's loader, so runs
    saved before a new key existed compare equal to runs that carry its default; a former
    value is read as the number it meant."""
    from gere_ds.config.loading import load_config
    from gere_ds.errors import InputError

    try:
        return load_config(path, _former_values(path)).to_dict()
    except InputError as err:
        raise BenchmarkError(f"{path}: unreadable ({err})") from None


def load_run(folder: Path, row: str) -> Run:
    seed = int(folder.name.removeprefix("seed"))
    config = resolved_config(folder / "config.yaml")
    metrics = _read_json(folder / "metrics.json")
    outcomes = _read_json(folder / OUTCOMES_JSON)
    n_tasks = len(metrics.get("tasks", []))
    if metrics.get("completed_tasks") != n_tasks or len(outcomes.get("rows", [])) != n_tasks + 1:
        raise BenchmarkError(f"{folder}: unfinished run ({metrics.get('completed_tasks')} of "
                             f"{n_tasks} tasks, {len(outcomes.get('rows', []))} evaluations)")
    states = _read_json(folder / STATES_JSON) if (folder / STATES_JSON).is_file() else None
    info = _read_json(folder / MACHINE_JSON) if (folder / MACHINE_JSON).is_file() else None
    return Run(row, seed, folder, config, metrics, outcomes,
               _read_steps(folder / "train_steps.jsonl"), states, machine_key(info))


def machine_key(info: dict[str, Any] | None) -> dict[str, str]:
    """What decides a run's kernels, from its machine.json: the CPU model and any GPU the
    record names (keys starting gpu or cuda); a run without the record is 'not recorded'."""
    if not info:
        return {"cpu_model": NOT_RECORDED}
    key = {"cpu_model": str(info.get("cpu_model") or NOT_RECORDED)}
    key.update({k: str(v) for k, v in sorted(info.items()) if k.startswith(("gpu", "cuda"))})
    return key


def _row_sort_key(row: str) -> tuple[int, str]:
    return (ROW_ORDER.index(row) if row in ROW_ORDER else len(ROW_ORDER), row)


def load_benchmark(results: str | Path) -> Benchmark:
    """Every finished run under ``results``, checked to be one comparable benchmark."""
    root = Path(results)
    folders = sorted(root.glob("*/seed*/metrics.json"))
    if not folders:
        raise BenchmarkError(f"{root}: no <row>/seed<N>/metrics.json under it")
    runs = [load_run(f.parent, f.parent.parent.name) for f in folders]
    ref = runs[0]
    for run in runs[1:]:
        if _regime(run.config) != _regime(ref.config):
            raise BenchmarkError(f"{run.folder} and {ref.folder} differ in their regime ("
                                 f"{_first_difference(_regime(run.config), _regime(ref.config))})")
        if run.outcomes["test_sets"] != ref.outcomes["test_sets"]:
            raise BenchmarkError(f"{run.folder} and {ref.folder} scored different test sets ("
                                 f"{_first_difference(run.outcomes['test_sets'], ref.outcomes['test_sets'])})")
    measured = [r for r in runs if r.states is not None]
    for run in measured[1:]:
        if _state_settings(run.states) != _state_settings(measured[0].states):
            raise BenchmarkError(f"{run.folder} and {measured[0].folder} measured states "
                                 f"differently ({_first_difference(_state_settings(run.states), _state_settings(measured[0].states))})")
    replayed = [r for r in runs if r.config.get("replay", {}).get("strategy") != "none"]
    for run in replayed[1:]:
        if _replay_set(run.config) != _replay_set(replayed[0].config):
            raise BenchmarkError(f"{run.folder} and {replayed[0].folder} replay different data "
                                 f"({_first_difference(_replay_set(run.config), _replay_set(replayed[0].config))})")
    by_row: dict[str, list[Run]] = {}
    for run in runs:
        by_row.setdefault(run.row, []).append(run)
    last = ref.outcomes["rows"][-1]
    kinds = {name: vals for name, vals in ref.metrics.get("general", {}).items()}
    perplexity = [n for n in kinds if n not in last["general"]]
    ordered = {row: sorted(by_row[row], key=lambda r: r.seed)
               for row in sorted(by_row, key=_row_sort_key)}
    machines: list[dict[str, str]] = []
    for run in (r for rs in ordered.values() for r in rs):
        if run.machine not in machines:
            machines.append(run.machine)
    tasks, general = list(ref.metrics["tasks"]), sorted(last["general"])
    return Benchmark(tasks=tasks, general=general, perplexity=perplexity, runs=ordered,
                     machines=machines,
                     task_sizes=[len(unbits(last["tasks"][t])) for t in tasks],
                     general_sizes=[len(unbits(last["general"][g])) for g in general])


# ------------------------------------------------------------------------------ outcome vectors


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


def _pct(iv: Interval) -> str:
    """Percent with its interval, or "(1 seed)" and none."""
    return iv.fmt(1, 100.0)


def _row_label(row: str, runs: Sequence[Run]) -> str:
    """The row's name, marked where one seed ran it (no interval: training noise unmeasured)."""
    return f"{row} (1 seed)" if len(runs) == 1 else row


def _machines_cell(b: Benchmark, runs: Sequence[Run]) -> str:
    """The machines that ran ``runs``: 'B', or 'A (1,2), B (3)' where they differ."""
    by: dict[str, list[int]] = {}
    for r in runs:
        by.setdefault(b.machine_letter(r), []).append(r.seed)
    if len(by) == 1:
        return next(iter(by))
    return ", ".join(f"{m} ({','.join(map(str, seeds))})" for m, seeds in sorted(by.items()))


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
        cells = [_row_label(row, runs), ",".join(str(r.seed) for r in runs),
                 _machines_cell(b, runs),
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
            cells = [_row_label(row, runs), task, rate] + [f"{sum(v) / len(v):.1f}" for v in vals]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _task_steps(run: Run, task: int) -> list[dict[str, Any]]:
    return [s for s in run.steps if s.get("task") == task]


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


TRAINING_HEAD = 5  # steps at the start of a task: the task CE before any learning
TRAINING_TAIL = 10  # steps at the end of a task whose mean task CE says how far it was learned


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
            per_run = [_task_steps(r, i) for r in runs]

            def stat(key: str, part: slice, per_seed: Any = statistics.fmean) -> float | None:
                """``per_seed`` of the logged values in that part of the task, meaned over the
                seeds that logged the key; None where none did (a row without that term)."""
                values = [[s[key] for s in steps[part] if s.get(key) is not None]
                          for steps in per_run]
                found = [per_seed(v) for v in values if v]
                return statistics.fmean(found) if found else None

            replay = stat("train/replay_ce", last)
            viol = stat("train/tm_violation_frac", every)
            cells = [_row_label(row, runs), task, _cell(stat("train/task_ce", first), ".3f"),
                     _cell(stat("train/task_ce", last), ".3f"),
                     _cell(replay or None, ".3f"),  # `none` logs a replay CE of 0
                     _cell(stat("train/grad_norm", every, statistics.median), ".1f"),
                     _cell(None if viol is None else 100 * viol, ".2f"),
                     _cell(stat("train/tm_weight", every, statistics.median), ".2f")]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def fit_points(b: Benchmark, task: int) -> dict[str, list[tuple[int, float, float]]]:
    """Per row, one point per run with a step log: (seed, its task CE over the last steps of
    task ``task``, its accuracy on that task right after them)."""
    points: dict[str, list[tuple[int, float, float]]] = {}
    for row, runs in b.runs.items():
        for r in runs:
            ce = [s["train/task_ce"] for s in _task_steps(r, task)[-TRAINING_TAIL:]
                  if s.get("train/task_ce") is not None]
            if ce:
                points.setdefault(row, []).append(
                    (r.seed, statistics.fmean(ce), r.metrics["matrix"][task + 1][task]))
    return points


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


class MixedMachinesError(BenchmarkError):
    """A difference would pair runs made on different machines."""


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
            f"on different machines ({_first_difference(runs[0].machine, other.machine)}, "
            f"machine.json); --allow-mixed-machines pairs them anyway")
    out = [(f"mixed: {a} {_machines_cell(b, ra)}; {c} {_machines_cell(b, rc)}", ra, rc)]
    for machine in b.machines:
        keep = [s for s, x, y in zip(seeds, ra, rc) if x.machine == y.machine == machine]
        if keep:
            out.append((f"{b.machine_letter(next(r for r in ra if r.seed == keep[0]))} only",
                        [r for r in ra if r.seed in keep], [r for r in rc if r.seed in keep]))
    return out


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


def _end_tag(i: int) -> str:
    """The name states.json gives task i's end: its export's folder, named by the checkpoint tag
    (checkpoint.task_tag, not imported: it would pull torch into the report)."""
    return f"task{i + 1:03d}-end"


def _states_mean(runs: Sequence[Run], task: int, texts: str, key: str) -> float | None:
    """Mean over ``runs`` (with states.json) of ``key`` at task ``task``'s end on ``texts``
    ("replay" or "heldout"); None where no run measured it."""
    vals = [m[texts][key] for m in (r.states["models"].get(_end_tag(task), {}) for r in runs)
            if texts in m]
    return statistics.fmean(vals) if vals else None


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
            if not any(_end_tag(i) in r.states["models"] for r in measured):
                continue
            cells = [_cell(_states_mean(measured, i, texts, key), fmt)
                     for key, fmt in (("flipped_pct", ".2f"), ("mean_shift_sigma", ".3f"))
                     for texts in ("replay", "heldout")]
            lines.append(f"| {_row_label(row, measured)} | "
                         f"{','.join(str(r.seed) for r in measured)} | "
                         f"{i + 1} {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ pictures


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
            ys = [_states_mean(measured, i, texts, "flipped_pct") for i in range(len(b.tasks))]
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


def write_report(results: str | Path, out: str | Path | None = None,
                 allow_mixed_machines: bool = False) -> dict[str, str]:
    """Write table.md, learning.md, paired.md, training.md, states.md, fit.md and the pictures;
    return the markdown texts. Nothing is written where a difference would mix machines and
    ``allow_mixed_machines`` is not given."""
    b = load_benchmark(results)
    out = Path(out or results)
    texts = {"table.md": render_table(b), "learning.md": render_learning(b),
             "paired.md": render_paired(b, allow_mixed_machines),
             "training.md": render_training(b),
             "states.md": render_states(b), "fit.md": render_fit(b)}
    out.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        write_text_atomic(out / name, text)
    for name, make in (("forgetting.png", forgetting_figure), ("general.png", general_figure),
                       ("violations.png", violation_figure), ("states.png", states_figure),
                       ("fit.png", fit_figure)):
        write_bytes_atomic(out / name, make(b))
    return texts


# ------------------------------------------------------------------------------ one run against it


def _run_sample(run_cfg: Any, digests: dict[str, str], full: dict[str, int]
                ) -> dict[str, list[int]]:
    """Indices into each full test file of the examples a run scored (its eval.max_examples
    sample), checked against the run's own digests; the committed rows must hold whole files."""
    from gere_ds.data.tasks import read_examples
    from gere_ds.evaluation.batching import sample_rows
    from gere_ds.evaluation.outcomes import digest

    out = {}
    for task in run_cfg.tasks:
        rows = read_examples(task.test, task, what="test", test=True)
        if full[task.name] != len(rows):
            raise BenchmarkError(f"{task.name}: the committed rows scored {full[task.name]} of "
                                 f"the {len(rows)} test examples in {task.test}")
        idx = sample_rows(list(range(len(rows))), run_cfg.eval.max_examples,
                          run_cfg.eval.sample_seed)
        if digest([(rows[i].text, rows[i].label) for i in idx]) != digests.get(task.name):
            raise BenchmarkError(f"{task.name}: the run scored other test examples than a sample "
                                 f"of {task.test}")
        out[task.name] = idx
    return out


def compare_run(run_dir: str | Path, results: str | Path,
                rows: Sequence[str] = ("none", "replay", "tm_dy")) -> str:
    """A finished run (e.g. the demo) next to the benchmark's rows, all scored on the examples the
    run scored: the committed rows' per-example outcomes are cut to the run's test sample."""
    from gere_ds.config.loading import load_config

    b = load_benchmark(results)
    run_dir = Path(run_dir)
    cfg_raw = resolved_config(run_dir / "config.yaml")
    ref = next(iter(b.runs.values()))[0]
    mine, theirs = _regime(cfg_raw), _regime(ref.config)
    mine.pop("eval", None), theirs.pop("eval", None)
    if mine != theirs:
        raise BenchmarkError(f"{run_dir} was not trained as the benchmark was "
                             f"({_first_difference(mine, theirs)})")
    cfg = load_config(run_dir / "config.yaml", _former_values(run_dir / "config.yaml"))
    own = _read_json(run_dir / OUTCOMES_JSON)
    full = {t: len(ref.outcomes["rows"][-1]["tasks"][t]) for t in b.tasks}
    idx = _run_sample(cfg, own["test_sets"], full)
    n_general = {g.name: g.max_examples for g in cfg.eval.general if g.kind == "cloze"}
    sets = [s for s in b.general if s in n_general]

    def summary(task_bits: list[dict[str, str]], general_bits: list[dict[str, str]],
                subset: bool) -> tuple[float, float, float]:
        def cut(t: str, bits: str) -> list[float]:
            return [unbits(bits)[i] for i in idx[t]] if subset else unbits(bits)

        def cut_g(s: str, bits: str) -> list[float]:
            n = n_general[s] if subset and n_general[s] else len(bits)
            return unbits(bits)[:n]

        ap = [x for t in b.tasks for x in cut(t, task_bits[-1][t])]
        bwt = [f - o for i, t in enumerate(b.tasks[:-1])
               for f, o in zip(cut(t, task_bits[-1][t]), cut(t, task_bits[i + 1][t]))]
        gen = [x for s in sets for x in cut_g(s, general_bits[-1][s])]
        mean = lambda v: 100.0 * sum(v) / len(v) if v else float("nan")  # noqa: E731
        return mean(ap), mean(bwt), mean(gen)

    lines = ["| row | seeds | AP | BWT | general acc_norm |", "|---|---|---|---|---|"]
    for row in rows:
        if row not in b.runs:
            continue
        vals = [summary([r_["tasks"] for r_ in r.outcomes["rows"]],
                        [r_["general"] for r_ in r.outcomes["rows"]], True) for r in b.runs[row]]
        means = [sum(v[k] for v in vals) / len(vals) for k in range(3)]
        lines.append(f"| {row} (committed) | {len(vals)} | " +
                     " | ".join(f"{m:.1f}" for m in means) + " |")
    mine_vals = summary([r_["tasks"] for r_ in own["rows"]], [r_["general"] for r_ in own["rows"]],
                        False)
    lines.append(f"| this run ({cfg.replay.strategy}) | 1 | " +
                 " | ".join(f"{m:.1f}" for m in mine_vals) + " |")
    return "\n".join(lines) + "\n"
