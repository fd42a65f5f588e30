"""Reading row files (jsonl/json/csv/parquet) with `datasets`, with errors that name file and line.

JSON Lines are checked line by line first, because a malformed line inside `datasets` surfaces as
an opaque Arrow error; the rows themselves are then read with `datasets`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gere_ds.errors import InputError

SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def _check_jsonl(path: Path) -> int:
    """Validate every line is a JSON object; return the number of rows."""
    rows = 0
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise InputError(f"malformed JSON ({getattr(err, 'msg', err)})", file=str(path),
                                 line=lineno) from None
            if not isinstance(obj, dict):
                raise InputError("each line must be a JSON object", file=str(path), line=lineno)
            rows += 1
    return rows


def line_of_row(path: str | Path, row: int) -> int:
    """1-based file line of 0-based data row ``row`` (csv has a header line)."""
    path = Path(path)
    if path.suffix == ".csv":
        return row + 2
    if path.suffix == ".jsonl":
        # skip blank lines the same way _check_jsonl does
        seen = -1
        with path.open("rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                if raw.strip():
                    seen += 1
                    if seen == row:
                        return lineno
    return row + 1


def read_rows(path: str | Path, what: str = "data") -> list[dict[str, Any]]:
    """All rows of a data file as dicts. Raises InputError for missing/empty/malformed files."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} file not found", file=str(path))
    kind = SUFFIXES.get(path.suffix)
    if kind is None:
        raise InputError(f"unsupported {what} format {path.suffix!r} "
                         f"(use {', '.join(SUFFIXES)})", file=str(path))
    if path.suffix == ".jsonl":
        if _check_jsonl(path) == 0:
            raise InputError(f"empty {what} file", file=str(path))
    elif path.stat().st_size == 0:
        raise InputError(f"empty {what} file", file=str(path))
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train",
                                   keep_in_memory=True)
    except Exception as err:  # datasets wraps parser errors in many types
        raise InputError(f"cannot read {what}: {str(err).splitlines()[0][:200]}",
                         file=str(path)) from None
    rows = ds.to_list()
    if not rows:
        raise InputError(f"empty {what} file", file=str(path))
    return rows
