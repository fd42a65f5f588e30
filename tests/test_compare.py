"""eval/compare.py on two fake runs."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gere_ds.evaluation.report import write_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "eval", "compare.py")


@pytest.fixture()
def runs(tmp_path):
    a, b = tmp_path / "seq_ft", tmp_path / "gere_tm"
    write_report(str(a), ["t1", "t2"], [[20, 30], [80, 40], [50, 90]], {"mmlu": [60, 55, 50]},
                 plot=False)
    write_report(str(b), ["t1", "t2"], [[20, 30], [80, 40], [75, 88]], {"mmlu": [60, 59, 58]},
                 plot=False)
    return str(a), str(b)


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_compare_two_runs(runs, tmp_path):
    out = tmp_path / "cmp"
    p = _run(*runs, "--out", str(out), "--names", "Baseline,GeRe")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == "| metric | Baseline | GeRe |"
    assert "| tasks trained | 2/2 | 2/2 |" in lines
    assert "| AP | 70.00 | 81.50 |" in lines
    assert "| BWT | -30.00 | -5.00 |" in lines
    assert "| FWT | 10.00 | 10.00 |" in lines
    assert "| forgetting | 30.00 | 5.00 |" in lines
    assert "| mmlu (base) | 60.00 | 60.00 |" in lines
    assert "| mmlu | 50.00 | 58.00 |" in lines
    assert lines.index("| mmlu (base) | 60.00 | 60.00 |") + 1 == lines.index("| mmlu | 50.00 | 58.00 |")
    f1 = [ln for ln in lines if ln.startswith("| F1 (mmlu, AP)")]
    assert len(f1) == 1 and "58.33" in f1[0]
    assert (out / "compare.md").read_text() == p.stdout
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_default_names_and_errors(runs, tmp_path):
    p = _run(*runs, cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[0] == "| metric | seq_ft | gere_tm |"
    assert (tmp_path / "compare.md").exists()

    p = _run(runs[0], str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip().count("\n") == 0 and "nope: no such run directory" in p.stderr
    os.makedirs(tmp_path / "empty_run")
    p = _run(str(tmp_path / "empty_run"), "--out", str(tmp_path / "o"))
    assert p.returncode == 2 and "metrics.json: not found" in p.stderr
    p = _run(*runs, "--names", "only_one", "--out", str(tmp_path / "o"))
    assert p.returncode == 2 and "--names has 1 names for 2 runs" in p.stderr


def test_runs_with_one_name_are_seeds_averaged(runs, tmp_path):
    a, b = runs
    p = _run(a, b, "--out", str(tmp_path / "seeds"), "--names", "tm,tm")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == "| metric | tm |"
    assert "| seeds | 2 |" in lines
    assert "| AP | 75.75 ± 5.75 |" in lines  # (70 + 81.5) / 2, population std
    assert "| mmlu (base) | 60.00 ± 0.00 |" in lines and "| mmlu | 54.00 ± 4.00 |" in lines
