"""Launched by tests/test_strategy_extension.py under `deepspeed --num_gpus 2`: the train
command, as launch/train.py runs it, with the strategies of tests/cosine_strategy.py registered
first (a strategy defined outside gere_ds needs nothing more)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the strategy module

from cosine_strategy import ActivationDecay, FeatureCosine  # noqa: E402
from gere_ds.commands.train import main  # noqa: E402
from gere_ds.runtime import dist  # noqa: E402
from gere_ds.strategies import register  # noqa: E402

register(FeatureCosine)
register(ActivationDecay)

if __name__ == "__main__":
    dist.exit_process(main())  # as launch/train.py
