"""The numbers the results page quotes from the benchmark on the new tasks
(docs/results/continual_med/) and its calibration screen, checked against the committed files."""
from __future__ import annotations

import json
from pathlib import Path

from test_doc_numbers import signed

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


def seed_words(seeds: str) -> str:
    """'1,2' -> '1 and 2'; '1,2,3' -> '1, 2 and 3' (as the page writes seeds)."""
    parts = seeds.split(",")
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"


def test_prose_numbers_are_the_committed_ones():
    section = " ".join(_section().split())
    learning = {r["task"]: r for r in _rows("learning.md") if r["row"].startswith("none")}
    for task, r in learning.items():
        assert f"`{task}` {r['base']} -> {r['after own training']}" in section, task
    assert f"`med_basic` falls to {learning['med_basic']['after last task']}" in section
    assert f"`about` only to {learning['about']['after last task']}" in section
    assert f"means over seeds {seed_words(row_seeds('none'))})" in section
    none = next(r for r in _rows("table.md") if r["row"].startswith("none"))
    gap = none["general - own base"].split()[0].lstrip("-")
    assert f"general acc_norm ends {gap} points under its own base model's" in section
    news, base = none["news_ppl ppl"].replace("(base ", "").rstrip(")").split()
    assert f"news perplexity rises from {base} to {news}" in section


def row_seeds(row: str) -> str:
    """The seeds of a row of table.md ('1,2,3')."""
    return next(r for r in _rows("table.md") if r["row"].split()[0] == row)["seeds"]


def test_rows_so_far_names_the_committed_seeds_and_one_machine():
    section = " ".join(_section().split())
    table = _rows("table.md")
    main = [r for r in table if not r["row"].startswith("tm_dy_guard")]
    seeds = {r["seeds"] for r in main}
    assert len(seeds) == 1, "the bullet names one seed set for the main rows"
    rows = ", ".join(f"`{r['row']}`" for r in main[:-1]) + f" and `{main[-1]['row']}`"
    assert (f"{rows} (GeRe with the exact test, w = dy) at seeds {seed_words(seeds.pop())}, "
            f"and GeRe with the opt-in rounding guard (`tm_dy_guard`) at seeds "
            f"{seed_words(row_seeds('tm_dy_guard'))}, every run on one machine (A)") in section
    assert {r["machine"] for r in table} == {"A"}


def test_the_guard_paragraph_quotes_the_committed_runs():
    section = " ".join(_section().split())
    seeds = row_seeds("tm_dy_guard")
    paired = {r["difference"]: r for r in _rows("paired.md")}
    learning = {(r["row"].split()[0], r["task"]): r for r in _rows("learning.md")}
    training = {(r["row"].split()[0], r["task"]): r for r in _rows("training.md")}
    states = {(r["row"].split()[0], r["after task"]): r for r in _rows("states.md")}
    table = {r["row"].split()[0]: r for r in _rows("table.md")}
    assert f"seeds {seed_words(seeds)} so far" in section
    # no rounding violation at the first step on this machine
    for run in sorted((MED / "tm_dy").glob("seed*")):
        first = json.loads((run / "train_steps.jsonl").read_text().splitlines()[0])
        assert first["global_step"] == 1 and first["train/tm"] == 0.0, run
    assert "TM is 0 at step 1 of every `tm_dy` run" in section
    norm = {row: training[row, "about"]["grad norm (median)"]
            for row in ("tm_dy_guard", "tm_dy", "replay")}
    assert (f"median {norm['tm_dy_guard']} during `about`, where the exact test has "
            f"{norm['tm_dy']} and replay {norm['replay']}") in section
    assert (f"`about` to {learning['tm_dy_guard', 'about']['after own training']}, `med_basic` "
            f"to {learning['tm_dy_guard', 'med_basic']['after own training']}") in section
    sure, names = [], {"tm_dy": "`tm_dy`", "none": "`none`", "replay": "replay"}
    for other, name in names.items():
        pair = paired[f"tm_dy_guard - {other}"]
        assert pair["seeds"] == seeds
        assert (f"Against {name}: AP {signed(pair['AP'])}, BWT {signed(pair['BWT'])}, general "
                f"acc_norm {signed(pair['general acc_norm'])}.") in section, other
        sure += [(k, name) for k in ("AP", "BWT", "general acc_norm") if surely(pair[k])]
    # the sentence on what is sure names exactly the differences whose interval leaves out 0
    # (all of them above 0 here)
    assert sure == [("AP", "`tm_dy`"), ("AP", "`none`"), ("BWT", "`none`"),
                    ("AP", "replay")], sure
    assert all(not paired[f"tm_dy_guard - {o}"][k].startswith("-") for k, o in
               (("AP", "tm_dy"), ("AP", "none"), ("BWT", "none"), ("AP", "replay")))
    assert ("Sure at these seeds: a higher AP than `tm_dy`, `none` and replay, a higher BWT than "
            "`none`. Not sure: the rest.") in section
    assert (f"({states['tm_dy_guard', '1 about']['flipped %, replay texts']} % flipped after the "
            f"first task)") in section
    assert (f"ends at {table['tm_dy_guard']['general - own base']} from its own base model's "
            f"general acc_norm") in section
    assert f"{'Two' if seeds.count(',') == 1 else 'Three'} seeds:" in section


def surely(cell: str) -> bool:
    """Whether a 'v [lo, hi]' cell's interval leaves out 0."""
    lo, hi = (float(x) for x in cell.split("[")[1].rstrip("]").split(","))
    return lo > 0 or hi < 0


def test_the_replay_paragraph_quotes_the_paired_differences():
    section = " ".join(_section().split())
    pair = next(r for r in _rows("paired.md") if r["difference"] == "replay - none")
    assert pair["seeds"] == row_seeds("none")
    # the paragraph says "not surely different" of all three: the intervals must hold 0
    assert not any(surely(pair[k]) for k in ("AP", "BWT", "general acc_norm"))
    assert (f"is not surely different from `none` on the tasks (AP {signed(pair['AP'])}, "
            f"BWT {signed(pair['BWT'])}) or in general acc_norm "
            f"({signed(pair['general acc_norm'])})") in section
    table = {r["row"].split()[0]: r for r in _rows("table.md")}
    assert (f"news perplexity at the base model's ({table['replay']['news_ppl ppl'].split()[0]} "
            f"against `none`'s {table['none']['news_ppl ppl'].split()[0]})") in section
    readme = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
    assert (f"replay is not surely different from `none` (AP {signed(pair['AP'])}, BWT "
            f"{signed(pair['BWT'])})") in readme


def test_calibration_numbers_are_the_screens():
    section = " ".join(_section().split())
    about = json.loads((SCREEN / "metrics.json").read_text())["matrix"]
    majority = json.loads((SCREEN / "outcomes.json").read_text())["majority"]["about"]
    assert (f"`about` went {about[0][0]:.1f} -> {about[1][0]:.1f} (majority {100 * majority:.1f})"
            in section)
    adj2 = json.loads((SCREEN / "adj2_metrics.json").read_text())
    column = adj2["tasks"].index("adj2")
    assert f"2 adjectives: {adj2['matrix'][0][column]:.1f} -> {adj2['matrix'][1][column]:.1f}" in section


def test_the_gere_paragraph_and_verdict_quote_the_committed_rows():
    section = " ".join(_section().split())
    table = {r["row"].split()[0]: r for r in _rows("table.md")}
    paired = {r["difference"]: r for r in _rows("paired.md")}
    learning = {(r["row"].split()[0], r["task"]): r for r in _rows("learning.md")}
    states = {(r["row"], r["after task"]): r for r in _rows("states.md")}
    tm, none = table["tm_dy"], table["none"]

    def num(cell: str) -> str:
        return cell.split()[0]

    assert f"(`tm_dy`, seeds {seed_words(tm['seeds'])})" in section
    first = "1 about"
    flipped = {row: states[row, first]["flipped %, replay texts"] for row in
               ("tm_dy", "none", "replay")}
    assert (f"{flipped['tm_dy']} % of the replay texts' states have flipped after the first "
            f"task, against {flipped['none']} % under `none` and {flipped['replay']} % under "
            f"replay") in section
    # "a third as many flipped"
    assert 0.25 < float(flipped["tm_dy"]) / float(flipped["none"]) < 0.4
    assert f"general acc_norm {tm['general - own base']} from it" in section
    assert f"where `none` ends {num(none['general - own base']).lstrip('-')} under" in section
    tn, tr = paired["tm_dy - none"], paired["tm_dy - replay"]
    assert not surely(tn["general acc_norm"]) and not surely(tr["general acc_norm"])
    assert (f"above `none` and replay by {signed(tn['general acc_norm'])} and "
            f"{signed(tr['general acc_norm'])}, not surely") in section
    assert f"news perplexity {num(tm['news_ppl ppl'])} against `none`'s " \
           f"{num(none['news_ppl ppl'])}" in section
    for task in ("about", "med_basic"):
        assert f"`{task}` to {learning['tm_dy', task]['after own training']}" in section
    assert (f"where `none` reached {learning['none', 'about']['after own training']} and "
            f"{learning['none', 'med_basic']['after own training']}") in section
    assert surely(tn["AP"]) and surely(tr["AP"])
    assert f"lower than `none`'s ({tn['AP']}) and replay's ({tr['AP']})" in section
    assert not surely(tn["BWT"])
    assert f"not surely different from `none`'s (BWT {tn['BWT']})" in section
    # the verdict: what is sure and what is not
    assert f"({len(tm['seeds'].split(','))} seeds a row, one machine)" in section
    assert (f"AP {num(tn['AP']).lstrip('-')} points under `none`, {num(tr['AP']).lstrip('-')} "
            f"under replay") in section
    assert not surely(paired["replay - none"]["BWT"])
    readme = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
    assert (f"general acc_norm {signed(tn['general acc_norm'])} against `none`, not surely"
            in readme)
    assert f"(AP {tn['AP']} against `none`, {tr['AP']} against replay)" in readme


def test_the_verdict_and_readme_quote_the_guard_against_none():
    section = " ".join(_section().split())
    readme = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
    pair = next(r for r in _rows("paired.md") if r["difference"] == "tm_dy_guard - none")
    assert surely(pair["AP"]) and surely(pair["BWT"])  # "ends above it", "keeps them better"
    quote = f"AP {signed(pair['AP'])}, BWT {signed(pair['BWT'])}"
    count = {"1,2": "two", "1,2,3": "three"}[pair["seeds"]]
    assert f"({quote}; {count} seeds so far)" in section
    assert f"{count} seeds so far) GeRe learns the tasks as `none` does" in readme
    assert f"({quote} against `none`)" in readme
    replay = next(r for r in _rows("paired.md") if r["difference"] == "tm_dy_guard - replay")
    assert surely(replay["AP"]) and not surely(replay["general acc_norm"])
    assert f"above replay on AP ({signed(replay['AP'])})" in section
    assert not surely(pair["general acc_norm"])  # "with no sure difference in general ability"
