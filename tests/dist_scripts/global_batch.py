"""Shared by the equivalence scripts: one fixed global micro-batch split over the ranks.

GLOBAL_ROWS holds (is_replay, index) rows, task and replay mixed with replay ids from every shard;
with W ranks, rank r takes rows r*n/W .. (r+1)*n/W, so 1 process sees exactly the union of the
2 ranks' micro-batches.
"""
from __future__ import annotations

import argparse

from gere_ds import dist
from gere_ds.config import RunConfig, load_config
from gere_ds.data.encode import encode_replay
from gere_ds.trainer import ContinualTrainer, Inputs, validate_inputs

GLOBAL_ROWS = [(False, 0), (True, 0), (True, 3), (False, 5),
               (True, 1), (False, 2), (True, 8), (True, 4)]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--local_rank", type=int, default=0)
    p.add_argument("overrides", nargs="*")
    return p.parse_args()


def trainer_on_global_batch(args: argparse.Namespace, extra: list[str]
                            ) -> tuple[RunConfig, Inputs, ContinualTrainer, list]:
    """A set-up trainer whose micro-batch is this rank's share of GLOBAL_ROWS (lr ~ 0, so the
    optimizer step leaves the weights as they are), and that share."""
    n = len(GLOBAL_ROWS) // dist.world_size()
    cfg = load_config(args.config, args.overrides + [f"train.micro_batch_size={n}",
                                                     "train.grad_accum=1", "train.lr=1e-30",
                                                     *extra])
    inputs = validate_inputs(cfg, dist.world_size())
    dist.init()
    tr = ContinualTrainer(cfg)
    tr.setup(inputs)
    return cfg, inputs, tr, GLOBAL_ROWS[dist.rank() * n:(dist.rank() + 1) * n]


def encode_whole_replay_set(tr: ContinualTrainer, cfg: RunConfig, inputs: Inputs) -> None:
    """Every replay id must be encodable on this rank, not only its shard's."""
    tr._replay_ids = {i: encode_replay(tr.tokenizer, t, cfg.replay.max_len)
                      for i, t in enumerate(inputs.replay_texts)}
