"""The one exception type users see for bad input: a single line naming file, line and field."""
from __future__ import annotations


class InputError(ValueError):
    """Bad user input found before any work starts.

    str(err) is the one line printed to the user: ``file:line: field: what is wrong``.
    """

    def __init__(self, message: str, file: str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        self.file, self.line, self.field, self.detail = file, line, field, message
        where = ""
        if file:
            where = f"{file}:{line}: " if line else f"{file}: "
        what = f"{field}: " if field else ""
        super().__init__(f"{where}{what}{message}")


def one_line(text: object) -> str:
    """``text`` with every run of whitespace (newlines included) made one space: report cells."""
    return " ".join(str(text).split())
