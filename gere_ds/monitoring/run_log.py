"""What a person watches: a log file, TensorBoard scalars (and W&B when asked for), a per-step
JSONL, a progress bar.

Everything is written by rank 0 only; on other ranks these are no-ops (errors still go to
stderr on every rank so a failing node names itself). The files are opened on their first
write, so a job that stops before its first line (a refused relaunch) leaves them untouched.

``train_steps.jsonl`` survives a crash mid-write: a torn last line is dropped with one warning
line; a torn line anywhere else is an error naming the file and line. At every start the log is
cut back to the step the run resumes from (nothing for a fresh start), so steps never repeat.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from gere_ds.runtime import dist
from gere_ds.errors import InputError
from gere_ds.monitoring.progress_bar import progress_bar
from gere_ds.storage.atomic import write_text_atomic
from gere_ds.monitoring.wandb_sink import WandbSink

STEPS_FILE = "train_steps.jsonl"


def read_step_log(path: Path, warn: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """The rows of a step log. A torn last line (a crash mid-write) is dropped with one line to
    ``warn``; a line that does not parse anywhere else is an InputError naming file and line."""
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    rows: list[dict[str, Any]] = []
    last = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or "global_step" not in row:
                raise ValueError("not a step record")
        except ValueError:  # json.JSONDecodeError is a ValueError
            if i == last:
                warn(f"{path}:{i + 1}: torn last line of the step log (a crash mid-write) "
                     f"dropped")
                break
            raise InputError("unreadable step record (only the last line may be torn)",
                             file=str(path), line=i + 1) from None
        rows.append(row)
    return rows


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
        self._log: Any = None
        self._steps: Any = None

    def _log_file(self) -> Any:
        if self._log is None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._log = open(self.output_dir / "train.log", "a", buffering=1)
        return self._log

    def _steps_file(self) -> Any:
        if self._steps is None:
            path = self.output_dir / STEPS_FILE
            if path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
                self._rewrite_steps(None)  # a torn last line: never append to it
            self._steps = open(path, "a", buffering=1)
        return self._steps

    def _rewrite_steps(self, max_step: int | None) -> None:
        """Keep the readable rows (those up to ``max_step``), atomically."""
        path = self.output_dir / STEPS_FILE
        rows = read_step_log(path, self.info)
        kept = [r for r in rows if max_step is None or r["global_step"] <= max_step]
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))

    # --------------------------------------------------------------- text
    def info(self, message: str) -> None:
        if not self.enabled:
            return
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {message}"
        if self._bar is not None:
            self._bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)
        self._log_file().write(line + "\n")

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
        self._steps_file().write(json.dumps(row) + "\n")

    def truncate_steps_after(self, global_step: int) -> None:
        """On resume: forget per-step records beyond the checkpoint (they will be redone), in
        the step log and in TensorBoard (its writer purges events from ``global_step + 1``)."""
        self._purge_step = global_step + 1
        if not self.enabled:
            return
        if self._steps is not None:
            self._steps.close()
            self._steps = None
        if (self.output_dir / STEPS_FILE).is_file():
            self._rewrite_steps(global_step)

    def start_fresh(self) -> None:
        """A start without a checkpoint: the steps and scalars of an earlier attempt go."""
        self.truncate_steps_after(-1)

    # --------------------------------------------------------------- progress
    def progress(self, total: int, desc: str, initial: int = 0) -> None:
        if not self.enabled:
            return
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
            for fh in (self._log, self._steps):
                if fh is not None:
                    fh.close()
            self._log = self._steps = None
