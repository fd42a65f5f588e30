"""Pre-flight check under the training launcher (the deepspeed launcher runs a script path):

    deepspeed --hostfile H launch/preflight.py --config X.yaml [key=value ...] [--timeout 60]
    deepspeed --no_ssh --hostfile H --num_nodes N --node_rank R --master_addr A \\
        launch/preflight.py --config X.yaml

The same as `gere-ds preflight` (gere_ds.commands.preflight); accepts the launcher's --local_rank.
"""
from __future__ import annotations

from gere_ds.commands.preflight import main
from gere_ds.runtime import dist

if __name__ == "__main__":
    dist.exit_process(main())  # abandoned name-lookup threads are not joined either
