"""The `deepspeed` target: `deepspeed --num_gpus N launch/train.py --config X.yaml [key=value ...]`
(the command itself: gere_ds.commands.train)."""
from __future__ import annotations

from gere_ds.commands.train import main
from gere_ds.runtime import dist

if __name__ == "__main__":
    # an unexpected exception propagates: traceback and a non-zero exit; otherwise every file is
    # closed and every rank passed the last barrier, and the process ends without teardown
    dist.exit_process(main())
