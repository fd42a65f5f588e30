"""The numbers the results page quotes from the benchmark on the new tasks
(docs/results/continual_med/) and its calibration screen, checked against the committed files."""
from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MED = REPO / "docs" / "results" / "continual_med"
SCREEN = REPO / "docs" / "results" / "calibration" / "screen5_first_task"


def _section() -> str:
    text = (REPO / "docs" / "results.md").read_text(encoding="utf-8")
    start = text.index("## The continual benchmark (SmolLM2-135M-Instruct; about")
    return text[start:text.index("\n## ", start + 10)]


def _rows(name: str) -> list[dict[str, str]]:
    lines = (MED / name).read_text(encoding="utf-8").split("\n\n")[0].splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in x.strip("|").split("|")))) for x in lines[2:]]


def test_the_page_shows_the_committed_table_and_learning_table():
    section = _section()
    for name in ("table.md", "paired.md", "learning.md"):
        assert (MED / name).read_text(encoding="utf-8").split("\n\n")[0].strip() in section, name


def test_prose_numbers_are_the_committed_ones():
    section = " ".join(_section().split())
    learning = {r["task"]: r for r in _rows("learning.md") if r["row"].startswith("none")}
    for task, r in learning.items():
        assert f"`{task}` {r['base']} -> {r['after own training']}" in section, task
    assert f"`med_basic` falls to {learning['med_basic']['after last task']}" in section
    assert f"`about` only to {learning['about']['after last task']}" in section
    assert "means of the two seeds" in section and none_seeds() == "1,2"
    none = next(r for r in _rows("table.md") if r["row"].startswith("none"))
    gap = none["general - own base"].split()[0].lstrip("-")
    assert f"general acc_norm ends {gap} points under its own base model's" in section
    news, base = none["news_ppl ppl"].replace("(base ", "").rstrip(")").split()
    assert f"news perplexity rises from {base} to {news}" in section


def none_seeds() -> str:
    return next(r for r in _rows("table.md") if r["row"].startswith("none"))["seeds"]


def test_the_replay_paragraph_quotes_the_paired_differences():
    section = " ".join(_section().split())
    pair = next(r for r in _rows("paired.md") if r["difference"] == "replay - none")
    assert pair["seeds"] == "1,2"
    assert f"(BWT +{pair['BWT']} against `none`)" in section
    assert f"(AP +{pair['AP']})" in section
    assert f"general acc_norm ({pair['general acc_norm']})" in section
    table = {r["row"].split()[0]: r for r in _rows("table.md")}
    assert (f"news perplexity at the base model's ({table['replay']['news_ppl ppl'].split()[0]} "
            f"against `none`'s {table['none']['news_ppl ppl'].split()[0]})") in section
    readme = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
    assert f"(BWT +{pair['BWT']} against `none`)" in readme and f"(AP +{pair['AP']})" in readme


def test_calibration_numbers_are_the_screens():
    section = " ".join(_section().split())
    about = json.loads((SCREEN / "metrics.json").read_text())["matrix"]
    majority = json.loads((SCREEN / "outcomes.json").read_text())["majority"]["about"]
    assert (f"`about` went {about[0][0]:.1f} -> {about[1][0]:.1f} (majority {100 * majority:.1f})"
            in section)
    adj2 = json.loads((SCREEN / "adj2_metrics.json").read_text())
    column = adj2["tasks"].index("adj2")
    assert f"2 adjectives: {adj2['matrix'][0][column]:.1f} -> {adj2['matrix'][1][column]:.1f}" in section


def test_the_gere_paragraph_quotes_the_committed_rows():
    section = " ".join(_section().split())
    table = {r["row"].split()[0]: r for r in _rows("table.md")}
    learning = {(r["row"].split()[0], r["task"]): r for r in _rows("learning.md")}
    tm, none, replay = table["tm_dy"], table["none"], table["replay"]

    def num(cell: str) -> str:
        return cell.split()[0]

    assert f"general acc_norm {num(tm['general - own base'])} over its own base model's" in section
    assert f"where `none` ends {num(none['general - own base']).lstrip('-')} under" in section
    assert f"news perplexity {num(tm['news_ppl ppl'])} against `none`'s " \
           f"{num(none['news_ppl ppl'])}" in section
    for task in ("about", "med_basic"):
        assert f"`{task}` to {learning['tm_dy', task]['after own training']}" in section
    assert (f"where `none` reached {learning['none', 'about']['after own training']} and "
            f"{learning['none', 'med_basic']['after own training']}") in section
    matrix = json.loads((MED / "tm_dy/seed1/metrics.json").read_text())["matrix"]
    assert (f"`about` falls to {matrix[2][0]:.1f} while `med_basic` trains and ends at "
            f"{learning['tm_dy', 'about']['after last task']}") in section
    assert (f"AP {num(tm['AP'])} against {num(none['AP'])} for `none` and {num(replay['AP'])} "
            f"for `replay`") in section
    readme = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
    assert (f"(AP {num(tm['AP'])} against {num(none['AP'])} and {num(replay['AP'])})"
            in readme)
