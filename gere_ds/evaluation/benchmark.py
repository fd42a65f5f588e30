"""The continual benchmark's results folder, read and checked as one benchmark.

A results folder holds one sub-folder per row (strategy) and, inside, one per seed::

    <results>/<row>/seed<N>/{config.yaml, metrics.json, outcomes.json, train_steps.jsonl,
                             states.json (optional: `gere-ds states` on the run's task ends)}

:func:`load_benchmark` refuses, with one line naming the mismatch, a folder whose runs were not
made under one regime (same model, tasks, schedule and evaluation; the non-``none`` rows also
share their replay set) or whose runs scored different test examples (``outcomes.json``
fingerprints); nothing is silently averaged. What is computed from it is
:mod:`gere_ds.evaluation.benchmark_stats`; its tables :mod:`gere_ds.evaluation.benchmark_tables`,
its pictures :mod:`gere_ds.evaluation.benchmark_figures`, and the files written
:mod:`gere_ds.evaluation.benchmark_report`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gere_ds.config.loading import load_config
from gere_ds.errors import InputError
from gere_ds.evaluation.outcomes import OUTCOMES_JSON, unbits

STATES_JSON = "states.json"
MACHINE_JSON = "machine.json"
NOT_RECORDED = "not recorded"  # a run made before the runner wrote machine.json
ROW_ORDER = ("none", "replay", "tm_w1", "tm_w100", "tm_dy", "tm_dy_guard", "tm_dy_k2",
             "tm_dy_exact", "kl", "l2", "lora_tm_dy")
PAIRS = (("replay", "none"), ("tm_dy", "none"), ("tm_dy", "replay"), ("tm_w100", "replay"),
         ("tm_dy", "kl"), ("tm_dy", "l2"), ("kl", "replay"), ("l2", "replay"), ("l2", "none"),
         ("tm_dy", "tm_w100"), ("tm_w1", "tm_dy"), ("tm_w1", "replay"),
         ("tm_dy_k2", "tm_dy"), ("tm_dy_exact", "tm_dy"), ("tm_dy_exact", "replay"),
         ("tm_dy_exact", "none"), ("lora_tm_dy", "tm_dy"), ("tm_dy_guard", "tm_dy"),
         ("tm_dy_guard", "none"), ("tm_dy_guard", "replay"))
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


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise BenchmarkError(f"{path}: unreadable ({err})") from None


def _read_steps(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def regime(cfg: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in cfg.items() if k not in ROW_KEYS}
    out["train"] = {k: v for k, v in cfg.get("train", {}).items() if k not in SEED_KEYS}
    return out


def _replay_set(cfg: dict[str, Any]) -> dict[str, Any]:
    r = cfg.get("replay", {})
    return {k: r.get(k) for k in ("data", "num_samples", "max_len", "per_batch")}


def _state_settings(states: dict[str, Any]) -> dict[str, Any]:
    return {k: states.get(k) for k in ("base", "replay", "heldout", "samples", "max_len",
                                       "threshold_k")}


def first_difference(a: Any, b: Any, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
    return f"{prefix.rstrip('.')}: {a!r} vs {b!r}"


# replay.tm_dead_band 'auto', the default of runs saved before 0 was: the rounding units it
# meant by compute dtype (those runs' band left small violations out of the loss entirely)
FORMER_AUTO_BAND = {True: 48.0, False: 1024.0}


def former_values(path: Path) -> list[str]:
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
    try:
        return load_config(path, former_values(path)).to_dict()
    except InputError as err:
        raise BenchmarkError(f"{path}: unreadable ({err})") from None


def load_run(folder: Path, row: str) -> Run:
    seed = int(folder.name.removeprefix("seed"))
    config = resolved_config(folder / "config.yaml")
    metrics = read_json(folder / "metrics.json")
    outcomes = read_json(folder / OUTCOMES_JSON)
    n_tasks = len(metrics.get("tasks", []))
    if metrics.get("completed_tasks") != n_tasks or len(outcomes.get("rows", [])) != n_tasks + 1:
        raise BenchmarkError(f"{folder}: unfinished run ({metrics.get('completed_tasks')} of "
                             f"{n_tasks} tasks, {len(outcomes.get('rows', []))} evaluations)")
    states = read_json(folder / STATES_JSON) if (folder / STATES_JSON).is_file() else None
    info = read_json(folder / MACHINE_JSON) if (folder / MACHINE_JSON).is_file() else None
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
        if regime(run.config) != regime(ref.config):
            raise BenchmarkError(f"{run.folder} and {ref.folder} differ in their regime ("
                                 f"{first_difference(regime(run.config), regime(ref.config))})")
        if run.outcomes["test_sets"] != ref.outcomes["test_sets"]:
            raise BenchmarkError(f"{run.folder} and {ref.folder} scored different test sets ("
                                 f"{first_difference(run.outcomes['test_sets'], ref.outcomes['test_sets'])})")
    measured = [r for r in runs if r.states is not None]
    for run in measured[1:]:
        if _state_settings(run.states) != _state_settings(measured[0].states):
            raise BenchmarkError(f"{run.folder} and {measured[0].folder} measured states "
                                 f"differently ({first_difference(_state_settings(run.states), _state_settings(measured[0].states))})")
    replayed = [r for r in runs if r.config.get("replay", {}).get("strategy") != "none"]
    for run in replayed[1:]:
        if _replay_set(run.config) != _replay_set(replayed[0].config):
            raise BenchmarkError(f"{run.folder} and {replayed[0].folder} replay different data "
                                 f"({first_difference(_replay_set(run.config), _replay_set(replayed[0].config))})")
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
