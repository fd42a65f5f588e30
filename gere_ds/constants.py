"""Names shared by the config and the layers below it (data, evaluation).

A leaf: it imports nothing of gere_ds, so any module may read these without pulling in the
config loader (which would close an import cycle through the data code).
"""
from __future__ import annotations

EVAL_MODES = ("rank", "generate")
TRUNCATE_SOURCE = ("head", "tail")
