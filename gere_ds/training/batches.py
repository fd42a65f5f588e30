"""Micro-batches from sampler rows: task examples encoded once and cached, and this rank's
shard of the replay set encoded at setup."""
from __future__ import annotations

import torch

from gere_ds.config import RunConfig
from gere_ds.data.collate import MicroBatch, collate
from gere_ds.data.encode import Encoded, encode_example, encode_replay
from gere_ds.data.sampler import Row, replay_shard
from gere_ds.data.tasks import Example


class BatchMaker:
    """Rows ``(is_replay, index)`` -> a MicroBatch on the device, and the replay sample id of
    each row (-1 for a task row)."""

    def __init__(self, cfg: RunConfig, tokenizer, device: torch.device,
                 train_sets: list[list[Example]], replay_texts: list[str], uses_replay: bool,
                 world: int, rank: int) -> None:
        self.cfg, self.tokenizer, self.device = cfg, tokenizer, device
        self.train_sets = train_sets
        self.shard: list[int] = []
        self.replay_ids: dict[int, list[int]] = {}  # token ids of this rank's replay samples
        if uses_replay:
            self.shard = replay_shard(len(replay_texts), world, rank, cfg.train.seed)
            self.replay_ids = {i: encode_replay(tokenizer, replay_texts[i], cfg.replay.max_len)
                               for i in self.shard}
        self._encoded: dict[tuple[int, int], Encoded] = {}

    def encode(self, task_index: int, example_index: int) -> Encoded:
        key = (task_index, example_index)
        if key not in self._encoded:
            task, t = self.cfg.tasks[task_index], self.cfg.train
            ex = self.train_sets[task_index][example_index]
            self._encoded[key] = encode_example(self.tokenizer, task.instruction, task.labels,
                                                ex.text, ex.label, t.max_source_len,
                                                t.max_target_len,
                                                truncate_source=t.truncate_source,
                                                option_line=task.option_line)
        return self._encoded[key]

    def make(self, task_index: int, rows: list[Row],
             pack_capacity: int | None = None) -> tuple[MicroBatch, list[int]]:
        """The micro-batch of ``rows``; packed as well when ``pack_capacity`` is given."""
        encoded, replay_ids = [], []
        for is_replay, idx in rows:
            if is_replay:
                ids = self.replay_ids[idx]
                encoded.append(Encoded(ids, ids))
                replay_ids.append(idx)
            else:
                encoded.append(self.encode(task_index, idx))
                replay_ids.append(-1)
        mb = collate(encoded, replay_ids, self.tokenizer.pad_token_id,
                     pack_capacity).to(self.device)
        return mb, replay_ids
