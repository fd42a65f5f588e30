"""The general replay set: the first N documents of a JSONL file with a 'text' field."""
from __future__ import annotations

from gere_ds.data.files import line_of_row, read_rows
from gere_ds.errors import InputError


def load_replay_texts(path: str, num_samples: int) -> list[str]:
    """The first ``num_samples`` texts, fixed for the whole task sequence."""
    rows = read_rows(path, what="replay")
    texts: list[str] = []
    for i, row in enumerate(rows[:num_samples]):
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            raise InputError("missing or empty text", file=path, line=line_of_row(path, i),
                             field="text")
        texts.append(text)
    return texts
