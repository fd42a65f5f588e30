"""Every rank computes the teacher fingerprint as a run's resume check does; each rank writes
how many weight files it read in full and the fingerprint it got."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from gere_ds.config.loading import load_config
from gere_ds.training.inputs import validate_inputs
from gere_ds.runtime import dist
from gere_ds.training.trainer import ContinualTrainer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--local_rank", type=int, default=0)
    args = p.parse_args()
    cfg = load_config(args.config)
    inputs = validate_inputs(cfg, dist.world_size())
    dist.init()
    tr = ContinualTrainer(cfg)
    tr.check_resume(inputs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{dist.rank()}.json").write_text(json.dumps(
        {"hashed": len(tr.teacher_source.digests.hashed), "fingerprint": tr.teacher_fingerprint}))
    dist.barrier()


if __name__ == "__main__":
    dist.exit_process(main())  # no interpreter teardown after the last barrier
