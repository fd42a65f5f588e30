"""Task sets: rows read from disk, validated against the task's fields and label set. Training
and evaluation read their splits through the same function, so both accept the same files and
report a bad row the same way."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from gere_ds.config.sections import TaskConfig
from gere_ds.data.files import read_rows
from gere_ds.errors import InputError


@dataclass
class Example:
    text: str
    label: str
    line: Optional[int] = None  #: 1-based line in the source file (None when unknown)


def read_examples(path: str, task: TaskConfig, what: str = "data",
                  test: bool = False) -> list[Example]:
    """Every row of ``path`` as an Example: the text field must be a string or number and the
    label (as a string) one of the task's labels (or, for a ``test`` split, of its
    ``test_only_labels``); otherwise one error naming file, line, field."""
    allowed = [str(x) for x in task.labels]
    if test:
        allowed += [str(x) for x in getattr(task, "test_only_labels", None) or []]
    out: list[Example] = []
    for row in read_rows(path, what=what):
        for field in (task.text_field, task.label_field):
            if row.data.get(field) is None:
                raise row.error(path, field, f"missing field (task {task.name!r})")
        if isinstance(row.data[task.text_field], (dict, list)):
            raise row.error(path, task.text_field, "the text must be a string")
        label = str(row.data[task.label_field])
        if label not in allowed:
            raise row.error(path, task.label_field, f"label {label!r} is not one of {allowed}")
        out.append(Example(str(row.data[task.text_field]), label, row.line))
    return out


def load_examples(task: TaskConfig, split: str = "train") -> list[Example]:
    """The validated examples of one split ('train' or 'test') of a task."""
    path = task.train if split == "train" else task.test
    if not path:
        raise InputError(f"task {task.name!r} has no {split} file", field=f"{split}")
    return read_examples(path, task, what=f"{task.name} {split}", test=split != "train")
