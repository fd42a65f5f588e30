"""Duplicate-text detection between general text and task data.

BoolQ passages and Quac sections are Wikipedia paragraphs, so the Wikipedia replay and
held-out text can contain the very text a task is evaluated on, often from a different
revision of the article. Whole-document comparison misses those (BoolQ prefixes
"Title -- " and cleans markup differently), so two texts overlap when they share any
run of 13 normalised words (the usual contamination-check n-gram) or are equal as a whole.
"""
from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

NGRAM = 13

_NON_WORD = re.compile(r"[^0-9a-z]+")


def normalize(text: str) -> str:
    """Lower-case alphanumeric words separated by single spaces (accents folded)."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return _NON_WORD.sub(" ", folded.lower()).strip()


def fingerprints(text: str, n: int = NGRAM) -> set[int]:
    """Hashes of every n-word window of the normalised text, or of the whole text if shorter.

    Python's hash is salted per process; that is fine because an index lives in memory only.
    """
    words = normalize(text).split()
    if len(words) < n:
        return {hash(tuple(words))} if words else set()
    return {hash(tuple(words[i:i + n])) for i in range(len(words) - n + 1)}


class OverlapIndex:
    """Fingerprints of a set of texts, to test candidate documents against."""

    def __init__(self, texts: Iterable[str] = ()) -> None:
        self._prints: set[int] = set()
        for text in texts:
            self.add(text)

    def add(self, text: str) -> None:
        self._prints |= fingerprints(text)

    def overlaps(self, text: str) -> bool:
        return not self._prints.isdisjoint(fingerprints(text))

    def __len__(self) -> int:
        return len(self._prints)
