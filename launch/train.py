"""The `deepspeed` target: `deepspeed --num_gpus N launch/train.py --config X.yaml [key=value ...]`
(the command itself: gere_ds.commands.train)."""
from __future__ import annotations

import os
import sys

from gere_ds.commands.train import main

if __name__ == "__main__":
    code = main()  # an unexpected exception propagates: traceback and a non-zero exit
    sys.stdout.flush()
    sys.stderr.flush()
    # every file is closed and every rank passed the last barrier: skip interpreter teardown,
    # whose at-exit hooks of the process group occasionally abort with -6 ("terminate called
    # without an active exception") after all work is done
    os._exit(code)
