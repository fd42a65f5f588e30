"""The general replay set: the first N documents of a row file with a 'text' field."""
from __future__ import annotations

from gere_ds.data.files import read_rows


def load_replay_texts(path: str, num_samples: int) -> list[str]:
    """The first ``num_samples`` texts, fixed for the whole task sequence."""
    texts: list[str] = []
    for row in read_rows(path, what="replay")[:num_samples]:
        text = row.data.get("text")
        if not isinstance(text, str) or not text.strip():
            raise row.error(path, "text", "missing or empty text")
        texts.append(text)
    return texts
