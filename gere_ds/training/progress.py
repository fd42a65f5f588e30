"""Where a run stands (saved in every checkpoint), the bad-step rule and the step's log values."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from gere_ds.strategies import ReplayTerm


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stayed non-finite); the message says why."""


@dataclass
class Progress:
    """Where the run stands in the task sequence; saved in every checkpoint."""

    task_index: int = 0  # the task being trained, or the next one
    task_done: bool = False  # task_index finished training (its end checkpoint exists)
    epoch: int = 0
    step: int = 0  # optimizer steps done in this epoch
    step_in_task: int = 0
    global_step: int = 0
    bad_steps_in_a_row: int = 0
    skipped_steps: int = 0
    matrix: list[list[float]] = field(default_factory=list)  # row 0 = base model
    general: dict[str, list[float]] = field(default_factory=dict)

    def next_task(self) -> "Progress":
        """The start of the next task, keeping the run's totals and scores."""
        return Progress(task_index=self.task_index + 1, global_step=self.global_step,
                        skipped_steps=self.skipped_steps, matrix=self.matrix,
                        general=self.general)


def count_bad_step(p: Progress, nonfinite: int, applied: bool, micro_batches: int,
                   max_bad_steps: int, log: Callable[[str], None]) -> None:
    """Count a step whose loss was non-finite on some micro-batch (``nonfinite``, over all ranks)
    or that DeepSpeed did not apply (non-finite gradients); stop after ``max_bad_steps`` in a
    row."""
    if not nonfinite and applied:
        p.bad_steps_in_a_row = 0
        return
    p.bad_steps_in_a_row += 1
    p.skipped_steps += 1
    where = f"task {p.task_index + 1} step {p.step_in_task}"
    log(f"non-finite loss or gradients at {where} ({nonfinite} of {micro_batches} rank "
        f"micro-batches): optimizer step skipped ({p.bad_steps_in_a_row} in a row, "
        f"{p.skipped_steps} in all)")
    if p.bad_steps_in_a_row >= max_bad_steps:
        raise TrainingError(f"loss non-finite for {p.bad_steps_in_a_row} steps in a row "
                            f"(train.max_bad_steps={max_bad_steps}) at {where}; lower train.lr "
                            f"or check the data; last good checkpoint kept")


class TokenWindow:
    """Tokens trained since the last log line, for a rate over that whole window (a log line
    every ``log_every`` steps covers that many steps' tokens, not only the last one's)."""

    def __init__(self, start: float) -> None:
        self.start, self.tokens = start, 0.0

    def add(self, tokens: float) -> None:
        self.tokens += tokens

    def rate(self, now: float) -> float:
        """Tokens per second since the window opened; opens the next window at ``now``."""
        rate = self.tokens / max(now - self.start, 1e-9)
        self.start, self.tokens = now, 0.0
        return rate


def step_scalars(m: dict[str, float], lr: float, tokens_per_s: float, grad_norm: float | None,
                 term: ReplayTerm) -> dict[str, float]:
    """The TensorBoard scalars of one optimizer step (``m``: losses.step_means)."""
    return {"train/loss": m["loss"], "train/task_ce": m["task_ce"],
            "train/replay_ce": m["replay_ce"], "train/lr": lr,
            "train/grad_norm": float(grad_norm) if grad_norm is not None else 0.0,
            "train/tokens_per_s": tokens_per_s, **term.log_values(m)}
