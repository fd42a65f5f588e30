"""Weights & Biases as a second sink next to TensorBoard (``report_to: [tensorboard, wandb]``).

Off by default. ``wandb`` is an optional extra (``pip install -e '.[wandb]'``); the usual
environment applies (``WANDB_PROJECT``, ``WANDB_MODE=offline`` for clusters without network).
Rank 0 only.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from gere_ds.errors import InputError

REPORTERS = ("tensorboard", "wandb")


def check_report_to(report_to: list[str]) -> None:
    """Known names only, and wandb importable when asked for (before any work starts)."""
    for i, name in enumerate(report_to):
        if name not in REPORTERS:
            raise InputError(f"unknown reporter {name!r}; one of {', '.join(REPORTERS)}",
                             field=f"report_to.{i}")
    if "wandb" in report_to:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise InputError("wandb is not installed (pip install -e '.[wandb]')",
                             field="report_to") from None


class WandbSink:
    """One W&B run per gere-ds run directory (resumed runs continue the same W&B run)."""

    def __init__(self, output_dir: Path, config: Mapping[str, Any]) -> None:
        import wandb

        name = Path(output_dir).resolve().name
        self._wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "gere-ds"), name=name,
                              id=_run_id(output_dir), resume="allow", dir=str(output_dir),
                              config=dict(config))

    def log(self, values: Mapping[str, float], step: int) -> None:
        self.run.log(dict(values), step=step)

    def summary(self, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            self.run.summary[key] = value

    def finish(self) -> None:
        self.run.finish()


def _run_id(output_dir: Path) -> str:
    """A stable id kept in the run directory, so a resumed run logs into the same W&B run."""
    path = Path(output_dir) / "wandb_run_id"
    if path.is_file():
        return path.read_text().strip()
    import uuid

    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id + "\n")
    return run_id
