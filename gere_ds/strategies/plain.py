"""The two strategies without a term: ``none`` (plain fine-tuning on the task rows) and
``replay`` (replay rows trained with their language-modelling CE only)."""
from __future__ import annotations

from gere_ds.strategies.base import ReplayTerm


class NoReplay(ReplayTerm):
    """Plain fine-tuning on the task rows."""


class PlainReplay(ReplayTerm):
    """Replay rows trained with their language-modelling CE only."""

    name = "replay"
    uses_replay = True
