"""The pages that list the strategies agree with the registry: the table of docs/strategies.md
(the names, and each term's TensorBoard scalars) and the README's `replay.strategy` line.
"""
from __future__ import annotations

import re

from conftest import REPO
from gere_ds.config.sections import ReplayConfig
from gere_ds.strategies import STRATEGIES

COMMON = {"train/loss", "train/task_ce", "train/replay_ce"}  # logged by every run with the rows
# every value losses.step_means gives a built-in term's log_values
MEANS = {"reg": 0.5, "reg_weight": 2.0, "violation_frac": 0.25, "ignored_frac": 0.125}


def strategy_table() -> dict[str, set[str]]:
    """docs/strategies.md's first table: strategy -> the TensorBoard names its row cites."""
    lines = (REPO / "docs" / "strategies.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| strategy | loss of a row"))
    rows: dict[str, set[str]] = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        name = re.match(r"`([a-z0-9_]+)`", cells[0]).group(1)
        rows[name] = set(re.findall(r"`(train/[a-z0-9_]+)`", cells[-1]))
    return rows


def test_the_strategy_table_is_the_registry():
    table = strategy_table()
    assert sorted(table) == sorted(STRATEGIES) and len(table) == len(STRATEGIES)
    for name, cited in table.items():
        term = STRATEGIES[name](ReplayConfig(strategy=name))
        assert cited - COMMON == set(term.log_values(MEANS)), name


def test_the_readme_names_every_registered_strategy():
    line = next(x for x in (REPO / "README.md").read_text().splitlines()
                if x.strip().startswith("strategy:"))
    listed = [n.strip() for n in line.split("#", 1)[1].split("|")]
    assert listed == list(STRATEGIES)
