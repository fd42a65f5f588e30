"""Shared by the equivalence scripts: one fixed global batch split over ranks and micro-steps.

GLOBAL_ROWS holds (is_replay, index) rows, task and replay mixed with replay ids from every shard.
Every layout runs GRAD_ACCUM micro-steps; micro-step m holds rows m*n/GRAD_ACCUM ..
(m+1)*n/GRAD_ACCUM of GLOBAL_ROWS, split evenly over the W ranks. So 1 process and W ranks see
the same rows in the same micro-steps, which makes even the global-micro-batch reduction
comparable; the per-row reduction does not depend on the split at all.
"""
from __future__ import annotations

import argparse

from gere_ds.config.loading import load_config
from gere_ds.config.sections import RunConfig
from gere_ds.data.encode import encode_replay
from gere_ds.training.inputs import Inputs, validate_inputs
from gere_ds.runtime import dist
from gere_ds.training.trainer import ContinualTrainer

GLOBAL_ROWS = [(False, 0), (True, 0), (True, 3), (False, 5),
               (True, 1), (False, 2), (True, 8), (True, 4)]
GRAD_ACCUM = 2


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--local_rank", type=int, default=0)
    p.add_argument("overrides", nargs="*")
    return p.parse_args()


def trainer_on_global_batch(args: argparse.Namespace, extra: list[str]
                            ) -> tuple[RunConfig, Inputs, ContinualTrainer, list[list]]:
    """A set-up trainer whose micro-batches are this rank's share of GLOBAL_ROWS (lr ~ 0, so the
    optimizer step leaves the weights as they are), and that share, one list per micro-step."""
    world, rank = dist.world_size(), dist.rank()
    per_micro = len(GLOBAL_ROWS) // GRAD_ACCUM
    n = per_micro // world
    cfg = load_config(args.config, args.overrides + [f"train.micro_batch_size={n}",
                                                     f"train.grad_accum={GRAD_ACCUM}",
                                                     "train.lr=1e-30", *extra])
    inputs = validate_inputs(cfg, world)
    dist.init()
    tr = ContinualTrainer(cfg)
    tr.setup(inputs)
    micro = [GLOBAL_ROWS[m * per_micro + rank * n: m * per_micro + (rank + 1) * n]
             for m in range(GRAD_ACCUM)]
    return cfg, inputs, tr, micro


def encode_whole_replay_set(tr: ContinualTrainer, cfg: RunConfig, inputs: Inputs) -> None:
    """Every replay id must be encodable on this rank, not only its shard's."""
    tr.batches.replay_ids.update({i: encode_replay(tr.tokenizer, t, cfg.replay.max_len)
                                  for i, t in enumerate(inputs.replay_texts)})
