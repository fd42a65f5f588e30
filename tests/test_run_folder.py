"""The run folder's files: modes of atomic writes, the step log, the one-job lock, temporary
folders owned by dead processes, the digest cache of the teacher fingerprint, the evaluation's
exported folders and the ablation runner's --force."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from gere_ds.atomic import write_json_atomic, write_text_atomic


def test_atomic_writes_get_the_umask_mode_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "a.txt", "x")
        write_json_atomic(tmp_path / "b.json", {"a": 1})
    finally:
        os.umask(old)
    for name in ("a.txt", "b.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644
