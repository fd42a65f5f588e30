"""Each rank reports a different memory size (rank 0 room for ZeRO-2, rank 1 not); writes the
stage `deepspeed: auto` picks on this rank alone and after the ranks agree."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import gere_ds.model.ds_config as D
from gere_ds.config.loading import load_config
from gere_ds.runtime import dist


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--local_rank", type=int, default=0)
    args = p.parse_args()
    cfg = load_config(args.config, ["deepspeed=auto"])
    dist.init()
    rank, world = dist.rank(), dist.world_size()
    params = D.model_parameters(cfg.model)
    need = D.zero2_state_bytes(params, params, world, cfg.train.bf16)
    mine = int(need / D.REPLICATED_SHARE) * (2 if rank == 0 else 1) - (0 if rank == 0 else 1)
    D.local_memory_bytes = lambda accelerator: mine  # this rank's card, as if measured
    alone, _ = D.auto_stage(cfg, world, "cpu")
    D.agree_on_memory("cpu")
    agreed, _ = D.auto_stage(cfg, world, "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps({"alone": alone, "agreed": agreed}))
    dist.barrier()


if __name__ == "__main__":
    dist.exit_process(main())  # no interpreter teardown after the last barrier
