"""Pad token rows into batches of tensors: training micro-batches and the scorers' batches; and
the packed form of a training micro-batch (rows end to end, no padding paid for)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gere_ds.data.encode import IGNORE, Encoded
from gere_ds.training.losses import supervised_positions


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
    packed: "PackedRows | None" = None  # the same rows end to end, when training packs them

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

        packed = None
        if self.packed is not None:
            packed = PackedRows(*(move(t) for t in (self.packed.input_ids,
                                                    self.packed.position_ids,
                                                    self.packed.source)))
        return MicroBatch(*(move(t) for t in (self.input_ids, self.attention_mask, self.labels,
                                              self.replay_ids, self.positions, self.targets,
                                              self.replay_rows)), packed=packed)


@dataclass
class PackedRows:
    """The rows of a micro-batch laid end to end in as few sequences as fit ``capacity`` tokens
    (first fit, in row order), so no forward pays for padding.

    Each row's position ids restart at 0: Hugging Face models then attend within each row only
    (with no 2D attention mask they read the boundaries from the position ids: a block-causal
    mask for sdpa and eager, variable-length kernels for flash attention). The tail of a shorter
    sequence is padding with its own positions, so it is a segment of its own that no row sees.
    ``source[b * T + t]`` is where token t of row b sits in the flattened packed tensor, so
    per-token outputs go back to the padded [B, T] layout (:meth:`unpack`) and the supervised
    positions translate with one ``index_select``.
    """

    input_ids: torch.Tensor  # [S, L] long
    position_ids: torch.Tensor  # [S, L] long
    source: torch.Tensor  # [B * T] long: packed flat index of each padded position (0 on padding)

    def unpack(self, values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[S, L, D] per packed token -> [B, T, D] in the padded layout, zero on padding."""
        n_rows, width = attention_mask.shape
        flat = values.reshape(-1, values.shape[-1]).index_select(0, self.source)
        flat = flat.reshape(n_rows, width, values.shape[-1])
        return flat.masked_fill(attention_mask[..., None] == 0, 0)


def pack_rows(rows: Sequence[Sequence[int]], width: int, pad_id: int,
              capacity: int) -> PackedRows:
    """Rows (unpadded token ids) into packed sequences of at most ``capacity`` tokens; ``width``
    is the padded layout's T. A row longer than ``capacity`` cannot be packed whole (it is never
    cut): ValueError."""
    bins: list[list[int]] = []  # row indices per sequence
    used: list[int] = []
    for b, row in enumerate(rows):
        if len(row) > capacity:
            raise ValueError(f"a row of {len(row)} tokens is longer than the packing capacity "
                             f"of {capacity}")
        for s, n in enumerate(used):
            if n + len(row) <= capacity:
                bins[s].append(b)
                used[s] += len(row)
                break
        else:
            bins.append([b])
            used.append(len(row))
    length = max(used)
    ids = torch.full((len(bins), length), pad_id, dtype=torch.long)
    pos = torch.zeros((len(bins), length), dtype=torch.long)
    source = torch.zeros(len(rows) * width, dtype=torch.long)
    for s, members in enumerate(bins):
        at = 0
        for b in members:
            n = len(rows[b])
            ids[s, at:at + n] = torch.tensor(list(rows[b]), dtype=torch.long)
            pos[s, at:at + n] = torch.arange(n)
            source[b * width:b * width + n] = torch.arange(s * length + at, s * length + at + n)
            at += n
        pos[s, at:] = torch.arange(length - at)  # the padding tail: a segment of its own
    return PackedRows(ids, pos, source)


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


def collate(rows: list[Encoded], replay_ids: list[int], pad_id: int,
            pack_capacity: int | None = None) -> MicroBatch:
    """Right-pad rows to the longest one (causal attention: padding never changes real tokens);
    with ``pack_capacity``, also their packed form (:class:`PackedRows`), which the forward
    then runs instead."""
    ids, mask = pad_rows([r.input_ids for r in rows], pad_id)
    labels = torch.full_like(ids, IGNORE)
    for b, row in enumerate(rows):
        labels[b, :len(row.labels)] = torch.tensor(row.labels)
    positions, targets = supervised_positions(labels)
    replay_rows = torch.tensor([b for b, sid in enumerate(replay_ids) if sid >= 0],
                               dtype=torch.long)
    packed = None
    if pack_capacity is not None:
        packed = pack_rows([r.input_ids for r in rows], ids.shape[1], pad_id, pack_capacity)
    return MicroBatch(ids, mask, labels, torch.tensor(replay_ids, dtype=torch.long), positions,
                      targets, replay_rows, packed)
