"""Task sets: rows read from disk, validated against the task's fields and label set."""
from __future__ import annotations

from dataclasses import dataclass

from gere_ds.config import TaskConfig
from gere_ds.data.files import line_of_row, read_rows
from gere_ds.errors import InputError


@dataclass
class Example:
    text: str
    label: str


def load_examples(task: TaskConfig, split: str = "train") -> list[Example]:
    """The validated examples of one split ('train' or 'test') of a task."""
    path = task.train if split == "train" else task.test
    if not path:
        raise InputError(f"task {task.name!r} has no {split} file", field=f"{split}")
    rows = read_rows(path, what=f"{task.name} {split}")
    allowed = set(task.labels)
    out: list[Example] = []
    for i, row in enumerate(rows):
        for field in (task.text_field, task.label_field):
            if row.get(field) is None:
                raise InputError(f"missing field (task {task.name!r})", file=path,
                                 line=line_of_row(path, i), field=field)
        label = str(row[task.label_field])
        if label not in allowed:
            raise InputError(f"label {label!r} is not one of {task.labels}", file=path,
                             line=line_of_row(path, i), field=task.label_field)
        out.append(Example(str(row[task.text_field]), label))
    return out
