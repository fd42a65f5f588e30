"""Launched by tests/test_golden_losses.py under `deepspeed --num_gpus {1,2}`: the train
command's main() once per strategy (tm, kl, l1, l2) in one launch, each a short real run of the
tiny config; rank 0 writes every run's per-step logged loss and strategy term as JSON."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from gere_ds.commands import train
from gere_ds.runtime import dist

STRATEGIES = ("tm", "kl", "l1", "l2")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--results", required=True)
    p.add_argument("--local_rank", type=int, default=0)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    results = Path(args.results)
    out = {}
    for s in STRATEGIES:
        run = results / s
        rc = train.main(["--config", args.config, *args.overrides, f"replay.strategy={s}",
                         f"output_dir={run}", f"replay.teacher_cache={results / 'teacher'}"])
        if rc != 0:
            return rc
        if dist.is_main():
            steps = [json.loads(line) for line in
                     (run / "train_steps.jsonl").read_text().splitlines()]
            out[s] = {"loss": [st["train/loss"] for st in steps],
                      "term": [st[f"train/{s}"] for st in steps]}
    if dist.is_main():
        (results / "golden.json").write_text(json.dumps(out, indent=1))
    dist.barrier()
    return 0


if __name__ == "__main__":
    dist.exit_process(main())  # no interpreter teardown after the last barrier
