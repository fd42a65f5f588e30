"""The parts one launch trains with, built once after every check has passed: the engine (model,
tokenizer, DeepSpeed), the device, the final-norm capture and the batch maker over the task and
replay data. ``build_parts`` returns them whole: no field of :class:`RunParts` is ever None."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from gere_ds.training.batch_split import rows_per_rank
from gere_ds.training.batches import BatchMaker
from gere_ds.model.capture import FinalNormCapture
from gere_ds.config.loading import save_resolved
from gere_ds.config.sections import RunConfig
from gere_ds.model.engine import Engine, build_engine
from gere_ds.training.inputs import Inputs
from gere_ds.runtime import dist, stop
from gere_ds.strategies import ReplayTerm


@dataclass(frozen=True)
class RunParts:
    """What a launch trains with (every field set by ``build_parts``)."""

    engine: Engine
    device: torch.device
    tokenizer: Any
    capture: FinalNormCapture
    batches: BatchMaker


def build_parts(cfg: RunConfig, inputs: Inputs, uses_replay: bool, world: int, rank: int,
                log: Callable[[str], None]) -> RunParts:
    """The run folder's resolved config (rank 0), the seed, the pre-emption signals, then the
    engine and what reads from it. The first thing of a launch that writes."""
    out = Path(cfg.output_dir)
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, out / "config.yaml")
    torch.manual_seed(cfg.train.seed)
    stop.install()  # SIGTERM / SIGUSR1 (Slurm pre-emption), acted on by stop.check
    engine = build_engine(cfg, world, log)
    device = dist.device()
    capture = FinalNormCapture(engine.module)
    batches = BatchMaker(cfg, engine.tokenizer, device, inputs.train_sets, inputs.replay_texts,
                         uses_replay, world, rank)
    return RunParts(engine, device, engine.tokenizer, capture, batches)


def describe_run(cfg: RunConfig, inputs: Inputs, parts: RunParts, term: ReplayTerm, world: int,
                 steps_for: Callable[[int], int], log: Callable[[str], None]) -> None:
    """The run's shape in the log: batch arithmetic, strategy, each task's size and steps."""
    c, t = cfg, cfg.train
    gb = rows_per_rank(cfg) * world
    log(f"world size {world} | micro batch {t.micro_batch_size} x accum "
        f"{t.grad_accum} x ranks {world} = global batch {gb} | "
        f"strategy {term.name} (w={c.replay.weight}) | bf16 {t.bf16}")
    for i, (task, rows) in enumerate(zip(c.tasks, inputs.train_sets)):
        log(f"task {i + 1}/{len(c.tasks)} {task.name}: {len(rows)} train examples, "
            f"{steps_for(i)} optimizer steps")
    if term.uses_replay:
        log(f"replay: {len(inputs.replay_texts)} documents, "
            f"{len(parts.batches.shard)} on this rank, per_batch={c.replay.per_batch}")
