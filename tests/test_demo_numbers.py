"""The demo's numbers that the README and the results page quote, checked against the committed
files of that run (results/demo/)."""
from __future__ import annotations

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "results" / "demo"


def _section(page: str, heading: str) -> str:
    text = (REPO / page).read_text(encoding="utf-8")
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start:end if end > 0 else None]


def test_the_results_page_shows_the_demo_matrix_it_ran():
    metrics = json.loads((DEMO / "metrics.json").read_text())
    section = _section("docs/results.md", "## The demo")
    names = ["base"] + [f"after {t}" for t in metrics["tasks"]]
    assert f"| model | {' | '.join(metrics['tasks'])} |" in section
    for name, row in zip(names, metrics["matrix"]):
        assert f"| {name} | {' | '.join(f'{a:.1f}' for a in row)} |" in section, name


def test_time_and_memory_quoted_are_those_measured():
    time_txt = (DEMO / "time.txt").read_text()
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\d+):(\d+)\.\d+", time_txt)
    minutes, seconds = int(wall.group(1)), int(wall.group(2))
    ranks = [float(x) for x in re.findall(r"rank \d (\d+\.\d+) GiB", time_txt)]
    quoted_ranks = f"{min(ranks):.1f} and\n  {max(ranks):.1f} GiB"
    readme = (REPO / "README.md").read_text()
    assert quoted_ranks in readme
    assert f"{minutes} min {seconds} s" in readme
    results = _section("docs/results.md", "## The demo")
    assert f"**{minutes} min {seconds} s**" in results
    assert f"{min(ranks):.1f} and {max(ranks):.1f} GiB" in results
