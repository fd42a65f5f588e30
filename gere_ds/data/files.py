"""The one reader of row files (training sets, test sets, replay and general-ability files, and
the asset sources), with the 1-based line of every row so that a bad row names file, line, field.

Formats: ``.jsonl`` (one object per line, blank lines skipped), ``.json`` (a JSON array, an
object with an ``Instances`` array as in O-LoRA's CL_Benchmark, or JSON lines), ``.csv`` (header
row; values are strings) and ``.parquet``. The standard ``json``/``csv`` modules and pyarrow do
the parsing; `datasets` is not used here because it cannot say which line a bad row is on.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from gere_ds.errors import InputError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class Row:
    """One row of a data file and where it is."""

    data: dict[str, Any]
    line: Optional[int]  #: 1-based line of the row's start (None for parquet and Instances)
    where: str = ""      #: field prefix naming the row when the line is unknown ("[3].")

    def error(self, path: str | Path, field: str, message: str) -> InputError:
        """The one-line error for a bad ``field`` of this row."""
        return InputError(message, file=str(path), line=self.line, field=f"{self.where}{field}")


def _json_array_items(text: str) -> list[tuple[int, Any]]:
    """(1-based line of the element's start, element) for a top-level JSON array."""
    dec = json.JSONDecoder()
    pos = text.index("[") + 1
    line, counted = 1, 0  # lines counted incrementally: linear in the file size
    out: list[tuple[int, Any]] = []
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text):
            raise ValueError("unterminated JSON array")
        if text[pos] == "]":
            return out
        line += text.count("\n", counted, pos)
        counted = pos
        obj, pos = dec.raw_decode(text, pos)
        out.append((line, obj))


def _json_lines(path: str, text: str) -> list[tuple[Optional[int], str, Any]]:
    items = []
    # split on "\n" only: str.splitlines() also breaks at U+2028 inside JSON strings
    for lineno, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            items.append((lineno, "", json.loads(raw)))
        except json.JSONDecodeError as err:
            raise InputError(f"invalid JSON ({err.msg})", file=path, line=lineno) from None
    return items


def _items(path: str, suffix: str) -> list[tuple[Optional[int], str, Any]]:
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as err:  # pyarrow raises several types for a damaged file
            raise InputError(f"unreadable parquet ({str(err).splitlines()[0][:200]})",
                             file=path) from None
        return [(None, f"[{i + 1}].", row) for i, row in enumerate(table.to_pylist())]
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except UnicodeDecodeError as err:
        raise InputError(f"not UTF-8 text ({err.reason} at byte {err.start})", file=path) from None
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            # line_num after reading a row is the line it ended on; a row starts after the last
            start, items = 2, []
            for row in reader:
                items.append((start, "", row))
                start = reader.line_num + 1
        except csv.Error as err:
            raise InputError(f"invalid CSV ({err})", file=path, line=reader.line_num) from None
        return items
    stripped = text.lstrip()
    if suffix == ".json" and stripped.startswith("["):
        try:
            return [(line, "", obj) for line, obj in _json_array_items(text)]
        except (ValueError, json.JSONDecodeError) as err:
            raise InputError(f"invalid JSON ({err})", file=path) from None
    if suffix == ".json" and stripped.startswith("{"):
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # JSON lines under a .json name
        if isinstance(whole, dict):
            instances = whole.get("Instances")
            if not isinstance(instances, list):
                raise InputError("a JSON object file needs an 'Instances' list", file=path)
            return [(None, f"Instances[{i + 1}].", row) for i, row in enumerate(instances)]
    return _json_lines(path, text)


def _first_json_lines(path: str, limit: int) -> list[tuple[Optional[int], str, Any]]:
    """The first ``limit`` rows of a JSON-lines file, read line by line: the rest of a large
    file is never read (the same rows as :func:`_json_lines`, which it stops early)."""
    items: list[tuple[Optional[int], str, Any]] = []
    try:
        # newline="\n": split on "\n" only, as _json_lines does
        with open(path, encoding="utf-8", newline="\n") as fh:
            for lineno, raw in enumerate(fh, start=1):
                if len(items) >= limit:
                    break
                if not raw.strip():
                    continue
                try:
                    items.append((lineno, "", json.loads(raw)))
                except json.JSONDecodeError as err:
                    raise InputError(f"invalid JSON ({err.msg})", file=path,
                                     line=lineno) from None
    except UnicodeDecodeError as err:
        raise InputError(f"not UTF-8 text ({err.reason})", file=path) from None
    return items


def read_rows(path: str | Path, what: str = "data", limit: int | None = None) -> list[Row]:
    """All rows of a data file (with ``limit``: the first ``limit``; a JSON-lines file is then
    read only that far). Raises InputError for a missing, empty or malformed file and for a
    row that is not an object, naming the file and line."""
    path = str(path)
    if not path:
        raise InputError(f"no {what} file given")
    if not Path(path).is_file():
        raise InputError(f"{what} file not found", file=path)
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise InputError(f"unsupported {what} format {suffix!r} (use {', '.join(SUFFIXES)})",
                         file=path)
    rows = []
    items = (_first_json_lines(path, limit) if limit is not None and suffix == ".jsonl"
             else _items(path, suffix)[:limit])
    for line, where, obj in items:
        if not isinstance(obj, dict):
            raise InputError(f"{where}expected a JSON object, got {type(obj).__name__}",
                             file=path, line=line)
        rows.append(Row(obj, line, where))
    if not rows:
        raise InputError(f"empty {what} file", file=path)
    return rows


def read_dicts(path: str | Path, what: str = "data") -> list[dict[str, Any]]:
    """The rows of :func:`read_rows` without their locations."""
    return [row.data for row in read_rows(path, what)]
