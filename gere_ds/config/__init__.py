"""The run configuration, one job per module: ``sections`` (the typed, documented dataclasses),
``source`` (YAML with the file and line of every key, ``base:`` chains), ``overrides`` (dotted
``key=value`` from the command line), ``checks`` (value checks) and ``loading`` (``load_config``:
all of them in order; ``save_resolved``); ``commented`` prints a config with its docs.

The package's own modules import those modules directly; the names below are the package's face
for scripts outside it (``bench/``).
"""
from gere_ds.config.loading import load_config, save_resolved
from gere_ds.config.sections import (CheckpointConfig, EvalConfig, GeneralEvalConfig, LoraConfig,
                                     ReplayConfig, RunConfig, TaskConfig, TrainConfig)

__all__ = ["CheckpointConfig", "EvalConfig", "GeneralEvalConfig", "LoraConfig", "ReplayConfig",
           "RunConfig", "TaskConfig", "TrainConfig", "load_config", "save_resolved"]
