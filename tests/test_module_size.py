"""Modules stay small enough to read in one sitting: every module of gere_ds is at most 500 lines,
and the continual loop (gere_ds/training/trainer.py) under 300; run assembly, resume, evaluation and
the teacher pass live in their own modules. A module past the limit is split along its seams, not
the limit raised."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULE_LIMIT = 500
TRAINER_LIMIT = 300


def _lines(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def test_every_module_is_at_most_500_lines():
    long = sorted(f"{p.relative_to(REPO)} ({_lines(p)})" for p in (REPO / "gere_ds").rglob("*.py")
                  if _lines(p) > MODULE_LIMIT)
    assert not long, f"modules over {MODULE_LIMIT} lines (split them): {', '.join(long)}"


def test_the_continual_loop_stays_under_300_lines():
    n = _lines(REPO / "gere_ds" / "training" / "trainer.py")
    assert n < TRAINER_LIMIT, f"gere_ds/training/trainer.py has {n} lines: move what is not the " \
                              f"loop's order of events into the other modules of gere_ds/training/"
