"""Pad a list of encoded rows into one micro-batch of tensors."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from gere_ds.data.encode import IGNORE, Encoded


@dataclass
class MicroBatch:
    """One forward's worth of rows for one rank.

    ``replay_ids[b]`` is the replay sample id of row b, or -1 for a task row; task rows carry CE
    targets only on their answer tokens, replay rows on every next token.
    """

    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] long
    labels: torch.Tensor  # [B, T] long, IGNORE where no CE
    replay_ids: torch.Tensor  # [B] long

    @property
    def is_replay(self) -> torch.Tensor:
        return self.replay_ids >= 0

    def to(self, device: torch.device) -> "MicroBatch":
        return MicroBatch(self.input_ids.to(device), self.attention_mask.to(device),
                          self.labels.to(device), self.replay_ids.to(device))


def collate(rows: list[Encoded], replay_ids: list[int], pad_id: int) -> MicroBatch:
    """Right-pad rows to the longest one (causal attention: padding never changes real tokens)."""
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for b, row in enumerate(rows):
        n = len(row.input_ids)
        ids[b, :n] = torch.tensor(row.input_ids)
        mask[b, :n] = 1
        labels[b, :n] = torch.tensor(row.labels)
    return MicroBatch(ids, mask, labels, torch.tensor(replay_ids, dtype=torch.long))
