"""Per-example outcomes of every evaluation of a run: what paired statistics are computed from.

``metrics.json`` keeps only accuracies; comparing two strategies with intervals needs to know
which test examples each one got right. After each evaluation the main rank rewrites
``outcomes.json`` in the run directory (atomically; a resumed run that evaluates a row again
replaces it)::

    {"test_sets": {name: sha256 of the scored examples, ...},
     "majority": {task: share of the test set's most frequent label, ...},
     "rows": [{"row": 0, "tasks": {task: "0110..."}, "general": {name: "1011..."},
               "general_acc": {name: "1001..."}, "general_nll": {name: [2.31, ...]},
               "general_tokens": {name: [17, ...]}}, ...]}

``majority`` is what answering the most frequent label to everything scores: a task counts as
learned only above it, not merely above the base model. ``tasks`` holds one character per test
example (1 = right). Every general set writes the per-example series its kind gives
(:mod:`gere_ds.evaluation.general_kinds`) under ``general_<series>``: cloze ``acc_norm`` and
``acc``, MMLU ``acc``, perplexity each text's summed ``nll`` and its predicted ``tokens``; the
``acc_norm`` series sits under plain ``general``, where the benchmark's paired statistics read
it. Right-or-wrong series are strings of 0/1, others lists of numbers. ``test_sets``
fingerprints the exact examples of the tasks and of the general sets compared example by example,
so rows scored on different test sets are never compared.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from collections import Counter
from typing import Any, Iterable, Sequence

from gere_ds.evaluation.general_kinds import general_kind
from gere_ds.storage.atomic import write_text_atomic

OUTCOMES_JSON = "outcomes.json"


def bits(correct: Iterable[bool]) -> str:
    return "".join("1" if c else "0" for c in correct)


def unbits(text: str) -> list[float]:
    return [1.0 if ch == "1" else 0.0 for ch in text]


def digest(items: Sequence[Any]) -> str:
    """sha256 of a JSON rendering of the scored items (examples or questions), in order."""
    blob = json.dumps([item if isinstance(item, (str, int, float, list, dict)) else repr(item)
                       for item in items], sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def test_set_digests(suite: Any) -> dict[str, str]:
    """Fingerprints of every task test set and every paired general set of an EvalSuite."""
    out = {name: digest([(ex.text, ex.label) for ex in examples])
           for name, examples in suite.examples.items()}
    for data in suite.general:
        kind = general_kind(data.cfg.kind)
        if kind.paired:
            out[data.cfg.name] = digest(kind.fingerprint(data))
    return out


def majority_rates(suite: Any) -> dict[str, float]:
    """Per task: the share of its scored test examples that carry the most frequent label."""
    out = {}
    for name, examples in suite.examples.items():
        counts = Counter(ex.label for ex in examples)
        if counts:
            out[name] = max(counts.values()) / sum(counts.values())
    return out


def _series(values: Sequence[Any]) -> str | list[Any]:
    return bits(values) if all(isinstance(v, bool) for v in values) else list(values)


def row_outcomes(row_index: int, eval_row: Any) -> dict[str, Any]:
    """One evaluation's outcomes (an EvalRow of gere_ds.evaluation.scoring)."""
    row: dict[str, Any] = {"row": row_index,
                           "tasks": {name: bits(s.correct)
                                     for name, s in eval_row.task_scores.items()},
                           "general": {}}
    for name, score in eval_row.general_scores.items():
        for series, values in general_kind(score.kind).outcomes(score).items():
            key = "general" if series == "acc_norm" else f"general_{series}"
            row.setdefault(key, {})[name] = _series(values)
    return row


def record_outcomes(run_dir: str | Path, row_index: int, eval_row: Any, suite: Any) -> None:
    """Replace row ``row_index`` (and drop any later ones) in ``run_dir/outcomes.json``."""
    path = Path(run_dir) / OUTCOMES_JSON
    rows: list[dict[str, Any]] = []
    if path.is_file():
        try:
            rows = json.loads(path.read_text(encoding="utf-8")).get("rows", [])
        except (OSError, ValueError):
            rows = []  # written atomically, so only a hand-edited file gets here: start over
    rows = [r for r in rows if r.get("row", -1) < row_index]
    rows.append(row_outcomes(row_index, eval_row))
    doc = {"test_sets": test_set_digests(suite), "majority": majority_rates(suite), "rows": rows}
    write_text_atomic(path, json.dumps(doc, indent=1) + "\n")
