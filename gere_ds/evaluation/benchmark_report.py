"""The continual benchmark's report: a results folder -> tables and pictures, written; and one
finished run set beside the benchmark's rows.

:func:`write_report` writes ``table.md`` (rows with 95 % intervals, each row's general ability
against its own runs' base model), ``paired.md`` (paired differences over the seeds both rows
ran, refused where their runs ran on different machines unless ``allow_mixed_machines``),
``learning.md`` (each task against its majority label), ``training.md`` (what each row's
training did: task and replay CE, gradient norm, TM's violations and weight), ``states.md``
(activation states flipped from the base model's at each task end, for the runs that measured
them), ``fit.md`` (whether each run's fit of its training examples is what decides its test
accuracy) and five pictures.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from gere_ds.config.loading import load_config
from gere_ds.data.tasks import read_examples
from gere_ds.evaluation.batching import sample_rows
from gere_ds.evaluation.benchmark import (BenchmarkError, first_difference, former_values,
                                          load_benchmark, read_json, regime, resolved_config)
from gere_ds.evaluation.benchmark_figures import (fit_figure, forgetting_figure, general_figure,
                                                  states_figure, violation_figure)
from gere_ds.evaluation.benchmark_tables import (render_fit, render_learning, render_paired,
                                                 render_states, render_table, render_training)
from gere_ds.evaluation.outcomes import OUTCOMES_JSON, digest, unbits
from gere_ds.storage.atomic import write_bytes_atomic, write_text_atomic

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
    b = load_benchmark(results)
    run_dir = Path(run_dir)
    cfg_raw = resolved_config(run_dir / "config.yaml")
    ref = next(iter(b.runs.values()))[0]
    mine, theirs = regime(cfg_raw), regime(ref.config)
    mine.pop("eval", None), theirs.pop("eval", None)
    if mine != theirs:
        raise BenchmarkError(f"{run_dir} was not trained as the benchmark was "
                             f"({first_difference(mine, theirs)})")
    cfg = load_config(run_dir / "config.yaml", former_values(run_dir / "config.yaml"))
    own = read_json(run_dir / OUTCOMES_JSON)
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
