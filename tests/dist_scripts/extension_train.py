"""Launched by tests/test_strategy_extension.py under `deepspeed --num_gpus 2`: the train
command, as launch/train.py runs it, with the strategies of tests/cosine_strategy.py registered
first (a strategy defined outside gere_ds needs nothing more). The test puts tests/ on
PYTHONPATH, where the strategy module is."""
from __future__ import annotations

from cosine_strategy import ActivationDecay, FeatureCosine
from gere_ds.commands.train import main
from gere_ds.runtime import dist
from gere_ds.strategies import register

register(FeatureCosine)
register(ActivationDecay)

if __name__ == "__main__":
    dist.exit_process(main())  # as launch/train.py
