"""Pad token rows into batches of tensors: training micro-batches and the scorers' batches."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gere_ds.data.encode import IGNORE, Encoded
from gere_ds.losses import supervised_positions


@dataclass
class MicroBatch:
    """One forward's worth of rows for one rank.

    ``replay_ids[b]`` is the replay sample id of row b, or -1 for a task row; task rows carry CE
    targets only on their answer tokens, replay rows on every next token. The index tensors
    the loss needs (supervised positions and their targets, the replay rows) are built on the
    CPU here, so the step reads no value back from the device to make them.
    """

    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] long
    labels: torch.Tensor  # [B, T] long, IGNORE where no CE
    replay_ids: torch.Tensor  # [B] long
    positions: torch.Tensor | None = None  # [N] flat positions in [B*T] that predict a target
    targets: torch.Tensor | None = None  # [N] those targets
    replay_rows: torch.Tensor | None = None  # [R] the rows b with replay_ids[b] >= 0

    @property
    def is_replay(self) -> torch.Tensor:
        return self.replay_ids >= 0

    def to(self, device: torch.device) -> "MicroBatch":
        """On ``device``; to a GPU from pinned host memory without blocking the host (the
        copies queue ahead of the forward on the same stream)."""
        cuda = torch.device(device).type == "cuda"

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            return (t.pin_memory() if cuda else t).to(device, non_blocking=cuda)

        return MicroBatch(*(move(t) for t in (self.input_ids, self.attention_mask, self.labels,
                                              self.replay_ids, self.positions, self.targets,
                                              self.replay_rows)))


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int,
             left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows as one LongTensor batch [B, T] and its attention mask; right padding unless
    ``left`` (prompts for a ``generate`` that appends at the end)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        cols = slice(width - len(row), width) if left else slice(0, len(row))
        ids[b, cols] = torch.tensor(list(row), dtype=torch.long)
        mask[b, cols] = 1
    return ids, mask


def collate(rows: list[Encoded], replay_ids: list[int], pad_id: int) -> MicroBatch:
    """Right-pad rows to the longest one (causal attention: padding never changes real tokens)."""
    ids, mask = pad_rows([r.input_ids for r in rows], pad_id)
    labels = torch.full_like(ids, IGNORE)
    for b, row in enumerate(rows):
        labels[b, :len(row.labels)] = torch.tensor(row.labels)
    positions, targets = supervised_positions(labels)
    replay_rows = torch.tensor([b for b, sid in enumerate(replay_ids) if sid >= 0],
                               dtype=torch.long)
    return MicroBatch(ids, mask, labels, torch.tensor(replay_ids, dtype=torch.long), positions,
                      targets, replay_rows)
