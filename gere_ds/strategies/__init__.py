"""The strategy registry: ``replay.strategy`` -> its ReplayTerm class.

A strategy is one module defining a ReplayTerm subclass (gere_ds.strategies.base) and one
``register`` line: below for the built-in ones, in the caller's own code for any other
(docs/strategies.md, "Adding a strategy"). Everything else (config checks, the teacher pass and
its cache, the step, the logs, ``gere-ds dynamics``, the ablation runner) reads the registry.
"""
from __future__ import annotations

import difflib
from typing import Any

from gere_ds.errors import InputError
from gere_ds.strategies.base import ReplayRows, ReplaySection, ReplayTerm, RowStats
from gere_ds.strategies.features import FeatureImitation, L1Features, L2Features
from gere_ds.strategies.kl import TopKDistillation
from gere_ds.strategies.plain import NoReplay, PlainReplay
from gere_ds.strategies.tm import ThresholdMargin

__all__ = ["STRATEGIES", "FeatureImitation", "L1Features", "L2Features", "NoReplay",
           "PlainReplay", "ReplayRows", "ReplayTerm", "RowStats", "ThresholdMargin",
           "TopKDistillation", "check_replay", "make_term", "register", "term_strategies"]

STRATEGIES: dict[str, type[ReplayTerm]] = {}


def register(cls: type[ReplayTerm]) -> type[ReplayTerm]:
    """Make ``cls`` the strategy ``cls.name`` (usable as a class decorator)."""
    if cls.name in STRATEGIES and STRATEGIES[cls.name] is not cls:
        raise ValueError(f"strategy {cls.name!r} is already registered "
                         f"({STRATEGIES[cls.name].__qualname__})")
    STRATEGIES[cls.name] = cls
    return cls


for _cls in (NoReplay, PlainReplay, ThresholdMargin, TopKDistillation, L1Features, L2Features):
    register(_cls)


def term_strategies() -> list[str]:
    """The strategies that add a term to replay rows (the ones an ablation weighs)."""
    return [name for name, cls in STRATEGIES.items() if cls.has_term]


def check_replay(replay: ReplaySection, bf16: bool) -> None:
    """The strategy name, the keys of ``replay.options`` (each must be a registered strategy's),
    then every registered strategy's own settings; the first problem as one InputError."""
    if replay.strategy not in STRATEGIES:
        close = difflib.get_close_matches(replay.strategy, list(STRATEGIES), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise InputError(f"unknown strategy {replay.strategy!r}{hint}; one of "
                         f"{', '.join(STRATEGIES)}", field="replay.strategy")
    owned = [key for cls in STRATEGIES.values() for key in cls.option_keys]
    for key in replay.options:
        if key not in owned:
            close = difflib.get_close_matches(str(key), owned, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else \
                f" (no registered strategy reads it; read: {', '.join(owned) or 'none'})"
            raise InputError(f"unknown key{hint}", field=f"replay.options.{key}")
    for cls in STRATEGIES.values():
        cls.check_settings(replay, bf16)
    if STRATEGIES[replay.strategy].uses_replay and not replay.data:
        raise InputError(f"strategy {replay.strategy!r} needs a replay data file",
                         field="replay.data")


def make_term(cfg: Any) -> ReplayTerm:
    """The ReplayTerm of a RunConfig (``cfg.replay.strategy``, checked at load)."""
    return STRATEGIES[cfg.replay.strategy](cfg.replay, cfg.train.bf16)
