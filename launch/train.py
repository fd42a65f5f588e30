"""Entry point: `deepspeed --num_gpus N launch/train.py --config X.yaml [key=value ...]`."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without install

from gere_ds import dist  # noqa: E402
from gere_ds.config import load_config  # noqa: E402
from gere_ds.errors import InputError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", required=True, help="run config YAML")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                   help="set by the deepspeed launcher")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=1e-5")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        from gere_ds.trainer import ContinualTrainer, validate_inputs

        inputs = validate_inputs(cfg, dist.world_size())
    except InputError as err:
        # every rank finds the same error; rank 0 says it once
        if dist.rank() == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        else:
            time.sleep(2)
        return 2
    from gere_ds.trainer import Preempted, TrainingError

    dist.init(timeout_s=cfg.train.collective_timeout_s)
    trainer = ContinualTrainer(cfg)
    try:
        trainer.run(inputs)
    except InputError as err:
        if dist.rank() == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except Preempted as stop:
        trainer.log.info(str(stop))
        dist.barrier()
        return 0  # documented: a pre-empted run exits 0 after its checkpoint
    except TrainingError as err:
        if dist.rank() == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        trainer.log.close()
    dist.barrier()  # a clean exit without destroy_process_group (see docs/platform notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
