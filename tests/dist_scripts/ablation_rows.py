"""Launched by tests under `deepspeed --num_gpus 2`: the train command's main() once per ablation
row, in one launch (a launch costs most of a tiny row's time).

Each row is the tiny config plus the preset's replay.strategy / replay.weight, its own
output_dir under --results and the shared teacher cache <results>/teacher, exactly the overrides
launch/run_ablation.py passes; rows run one after another and the first failure stops.
"""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from gere_ds.commands import train
from gere_ds.runtime import dist

REPO = Path(__file__).resolve().parents[2]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--results", required=True)
    p.add_argument("--rows", required=True, help="comma-separated row names of run_ablation")
    p.add_argument("--local_rank", type=int, default=0)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    spec = importlib.util.spec_from_file_location("run_ablation",
                                                  REPO / "launch" / "run_ablation.py")
    ablation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablation)
    results = Path(args.results)
    for row in args.rows.split(","):
        argv = ["--config", args.config,
                *ablation.row_overrides(row, results, args.overrides)]
        rc = train.main(argv)
        if dist.is_main():
            print(f"ROW {row} rc={rc}", flush=True)
        if rc != 0:
            return rc
    return 0


if __name__ == "__main__":
    dist.exit_process(main())  # no interpreter teardown after the last barrier
