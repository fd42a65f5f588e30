"""The README: the two set-up commands first, and only files that exist."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIRST = ["# gere-ds", "", "```bash",
         "bash launch/demo.sh      # install into .venv, build the real assets offline, run the "
         "demo (configs/demo.yaml) on 2 CPU ranks",
         "bash scripts/test.sh     # install into .venv with every extra the tests use and run the "
         "whole test suite", "```"]


def test_setup_commands_are_the_first_lines():
    assert (REPO / "README.md").read_text().splitlines()[:6] == FIRST


def test_every_repository_path_the_readme_names_exists():
    text = (REPO / "README.md").read_text()
    paths = set(re.findall(r"(?<![\w/.-])((?:configs|ds_configs|launch|eval|bench|docs|scripts|"
                           r"tests)/[\w./-]+\.(?:yaml|json|py|sh|md))", text))
    assert "configs/llama3.1-8b-long15.yaml" in paths and len(paths) > 15
    missing = sorted(p for p in paths if not (REPO / p).exists())
    assert not missing, missing
