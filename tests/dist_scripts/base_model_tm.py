"""Launched by tests under `deepspeed --num_gpus 2`: TM of the BASE model (before any update)
through the trainer's own step, for teacher passes of several batch sizes against training
micro-batches of several rows (each replay row with task rows of other lengths, so every shape
differs from the teacher pass's). Writes one JSON line per case from rank 0.

Each case runs the reference's exact test (band 0, the default), which shows whether this
machine's kernels rounded differently by shape, and the opt-in rounding guard at 48 bf16 units
(the former default), under which every such violation must pass no gradient.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from gere_ds.runtime import dist
from gere_ds.config.loading import load_config
from gere_ds.training.losses import step_means
from gere_ds.training.inputs import validate_inputs
from gere_ds.training.step import TrainStep
from gere_ds.strategies import ThresholdMargin
from gere_ds.training.trainer import ContinualTrainer

REPLAY_ROWS = 8  # replay rows of this rank's shard scored per case
GUARD_UNITS = 48.0  # rounding units x sigma: above the 22-37 measured in bf16 (bench/tm_dead_band.py)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--teacher-batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--micro", type=int, nargs="+", default=[1, 2])
    p.add_argument("--local_rank", type=int, default=0)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides + ["eval.enabled=false"])
    inputs = validate_inputs(cfg, dist.world_size())
    dist.init()
    tr = ContinualTrainer(cfg)
    tr.setup(inputs)
    out = Path(args.out)
    lines = []
    for tb in args.teacher_batch:
        cfg.replay.teacher_batch_size = tb
        cfg.replay.teacher_cache = str(out.parent / f"teacher_tb{tb}")  # no reuse across sizes
        tr.prepare_teacher()
        for micro in args.micro:
            for label, band in (("guard", GUARD_UNITS), ("exact", 0.0)):
                term = ThresholdMargin(replace(cfg.replay, tm_dead_band=band), cfg.train.bf16)
                term.attach(tr.teacher, tr.device)
                step = TrainStep(cfg, tr.engine, tr.capture, tr.batches, term, dist.world_size())
                total = None
                with torch.no_grad():
                    for i, sid in enumerate(tr.batches.shard[:REPLAY_ROWS]):
                        rows = [(True, sid)] + [(False, (7 * i + j) % len(inputs.train_sets[0]))
                                                for j in range(micro - 1)]
                        st = step.compute_loss(0, rows).stats
                        total = st if total is None else total + st
                m = step_means(dist.all_reduce_sum(total.clone()))
                lines.append({"teacher_batch": tb, "micro_batch": micro, "test": label,
                              "tm": m["reg"], "violation_frac": m["violation_frac"],
                              "ignored_frac": m["ignored_frac"],
                              "replay_rows": m["replay_rows"]})
    if dist.is_main():
        out.write_text("".join(json.dumps(x) + "\n" for x in lines))
    dist.barrier()


if __name__ == "__main__":
    dist.exit_process(main())  # no interpreter teardown after the last barrier
