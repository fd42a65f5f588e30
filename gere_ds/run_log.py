"""What a person watches: a log file, TensorBoard scalars (and W&B when asked for), a per-step
JSONL, a progress bar.

Everything is written by rank 0 only; on other ranks these are no-ops (errors still go to
stderr on every rank so a failing node names itself).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from gere_ds import dist


class RunLogger:
    def __init__(self, output_dir: Path, enabled: bool | None = None,
                 report_to: list[str] | tuple[str, ...] = ("tensorboard",),
                 config: Mapping[str, Any] | None = None) -> None:
        self.enabled = dist.is_main() if enabled is None else enabled
        self.output_dir = Path(output_dir)
        self.report_to = tuple(report_to)
        self._config = dict(config or {})
        self._wandb: Any = None
        self._tb = None
        self._bar = None
        self._purge_step: int | None = None
        if self.enabled:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._log = open(self.output_dir / "train.log", "a", buffering=1)
            self._steps = open(self.output_dir / "train_steps.jsonl", "a", buffering=1)

    # --------------------------------------------------------------- text
    def info(self, message: str) -> None:
        if not self.enabled:
            return
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {message}"
        if self._bar is not None:
            self._bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)
        self._log.write(line + "\n")

    # --------------------------------------------------------------- scalars
    @property
    def tb(self):
        """The TensorBoard SummaryWriter (rank 0), or None."""
        if self.enabled and self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            # after a resume, events beyond the checkpoint's step are dropped (no duplicates)
            self._tb = SummaryWriter(str(self.output_dir / "tensorboard"),
                                     purge_step=self._purge_step)
        return self._tb

    @property
    def wandb(self) -> Any:
        """The W&B sink (rank 0, when report_to names it), or None."""
        if self.enabled and "wandb" in self.report_to and self._wandb is None:
            from gere_ds.wandb_sink import WandbSink

            self._wandb = WandbSink(self.output_dir, self._config)
        return self._wandb if self.enabled else None

    def external(self, values: Mapping[str, float], step: int) -> None:
        """Values for the outside sinks only (W&B); TensorBoard gets them from the report."""
        if self.wandb is not None:
            self.wandb.log(values, step)

    def scalars(self, values: dict[str, float], step: int, record: dict[str, Any] | None = None
                ) -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            self.tb.add_scalar(name, value, step)
        self.external(values, step)
        row = {"global_step": step, **(record or {}), **values}
        self._steps.write(json.dumps(row) + "\n")

    def truncate_steps_after(self, global_step: int) -> None:
        """On resume: forget per-step records beyond the checkpoint (they will be redone)."""
        self._purge_step = global_step + 1
        if not self.enabled:
            return
        path = self.output_dir / "train_steps.jsonl"
        self._steps.close()
        rows = [ln for ln in path.read_text().split("\n")
                if ln.strip() and json.loads(ln)["global_step"] <= global_step]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(r + "\n" for r in rows))
        tmp.replace(path)
        self._steps = open(path, "a", buffering=1)

    # --------------------------------------------------------------- progress
    def progress(self, total: int, desc: str, initial: int = 0) -> None:
        if not self.enabled:
            return
        from gere_ds.progress_bar import progress_bar

        self.close_progress()
        self._bar = progress_bar(total, desc, initial, sys.stdout)

    def advance(self, n: int = 1, **postfix: Any) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)

    def close_progress(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        self.close_progress()
        if self.enabled:
            if self._tb is not None:
                self._tb.flush()
                self._tb.close()
            if self._wandb is not None:
                self._wandb.finish()
                self._wandb = None
            self._log.close()
            self._steps.close()
