"""Deterministic batch plans that mix replay documents into a task.

Replay ownership: the replay set is split once into `world_size` shards (a seeded permutation,
stripe r for rank r). Rank r only ever trains on, and the teacher pass only computes teacher data
for, its own shard; so teacher data never crosses the network and needs no shared disk.

Two mixing modes (docs/method.md, "Mixing replay into a task"):
- shuffle-in (per_batch = 0): every task example and every replay document once per epoch; a
  seeded shuffle decides which global-batch slots hold replay rows;
- batch interpolation (per_batch = k): exactly k replay rows in every global batch, drawn without
  replacement from each rank's reshuffled replay stream (a new shuffle each pass over the shard).
Within a global batch, replay slot j (counted over the epoch, or over the task in BI mode) goes
to rank j % world_size, so shards are consumed evenly. Task rows fill the remaining slots in the
order of a per-epoch permutation. The plan is a pure function of (seed, task, epoch, step,
sizes): the sampler holds no state, and a resumed run asks for the steps it has not done yet.
"""
from __future__ import annotations

import math
import numpy as np

Row = tuple[bool, int]  # (is_replay, index into the task examples or the replay set)


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in keys])


def replay_shard(n_replay: int, world_size: int, rank: int, seed: int) -> list[int]:
    """Replay sample ids owned by ``rank`` (disjoint over ranks, union = all)."""
    perm = _rng(seed, 7919).permutation(n_replay)
    return sorted(int(i) for i in perm[rank::world_size])


class ContinualSampler:
    """Plans the optimizer steps of one task for one rank."""

    def __init__(self, n_task: int, n_replay: int, world_size: int, rank: int,
                 micro_batch_size: int, grad_accum: int, per_batch: int, seed: int,
                 task_index: int, use_replay: bool = True) -> None:
        self.n_task, self.world, self.rank = n_task, world_size, rank
        self.n_replay = n_replay if use_replay else 0
        self.micro, self.accum = micro_batch_size, grad_accum
        self.per_batch = per_batch if self.n_replay else 0
        self.seed, self.task = seed, task_index
        self.global_batch = world_size * micro_batch_size * grad_accum
        self.rows_per_rank = micro_batch_size * grad_accum
        if self.n_replay and self.n_replay < world_size:
            raise ValueError(f"replay set of {self.n_replay} is smaller than the world size "
                             f"{world_size}")
        if self.per_batch >= self.global_batch:
            raise ValueError(f"replay.per_batch={self.per_batch} must be smaller than the global "
                             f"batch {self.global_batch}")
        self.shards = [replay_shard(self.n_replay, world_size, r, seed)
                       for r in range(world_size)] if self.n_replay else []

    # ------------------------------------------------------------------ sizes
    def steps_per_epoch(self) -> int:
        if self.per_batch:
            return math.ceil(self.n_task / (self.global_batch - self.per_batch))
        return math.ceil((self.n_task + self.n_replay) / self.global_batch)

    # ------------------------------------------------------------------ replay stream
    def _replay_at(self, rank: int, position: int) -> int:
        """The position-th draw of rank's replay stream (reshuffled every pass)."""
        shard = self.shards[rank]
        cycle, offset = divmod(position, len(shard))
        perm = _rng(self.seed, 31, self.task, rank, cycle).permutation(len(shard))
        return shard[int(perm[offset])]

    def _replay_consumed(self, rank: int, slots_before: int) -> int:
        """Draws rank has taken when ``slots_before`` replay slots were dealt round-robin."""
        return slots_before // self.world + (1 if rank < slots_before % self.world else 0)

    # ------------------------------------------------------------------ plans
    def _slot_pattern(self, epoch: int) -> np.ndarray:
        """Shuffle-in: bool per global slot of the epoch, True where a replay row goes."""
        pattern = np.zeros(self.n_task + self.n_replay, dtype=bool)
        pattern[self.n_task:] = True
        return pattern[_rng(self.seed, 17, self.task, epoch).permutation(len(pattern))]

    def global_step_rows(self, epoch: int, step: int) -> list[list[Row]]:
        """Rows of every rank for one optimizer step: ``[rank][row]``, rows_per_rank each."""
        G = self.global_batch
        task_perm = _rng(self.seed, 13, self.task, epoch).permutation(self.n_task)
        if self.per_batch:
            k = self.per_batch
            replay_before = (epoch * self.steps_per_epoch() + step) * k
            pass_base = [0] * self.world  # BI: one stream over the whole task
            task_before = step * (G - k)
            n_task_rows = G - k
        else:
            pattern = self._slot_pattern(epoch)
            window = pattern[step * G:(step + 1) * G]
            k = int(window.sum())
            # one full pass of the replay set per epoch: each epoch starts a new pass
            replay_before = int(pattern[:step * G].sum())
            pass_base = [epoch * len(shard) for shard in self.shards]
            task_before = step * G - int(pattern[:step * G].sum())
            n_task_rows = G - k  # a short last window is filled with wrapped task rows
        task_ids = [int(task_perm[(task_before + i) % self.n_task]) for i in range(n_task_rows)]
        per_rank: list[list[Row]] = [[] for _ in range(self.world)]
        for j in range(replay_before, replay_before + k):
            r = j % self.world
            pos = pass_base[r] + self._replay_consumed(r, j)
            per_rank[r].append((True, self._replay_at(r, pos)))
        it = iter(task_ids)
        for r in range(self.world):
            while len(per_rank[r]) < self.rows_per_rank:
                per_rank[r].append((False, next(it)))
        for r in range(self.world):  # spread replay rows over the micro-batches
            order = _rng(self.seed, 101, self.task, epoch, step, r).permutation(self.rows_per_rank)
            per_rank[r] = [per_rank[r][int(i)] for i in order]
        return per_rank

    def step_micro_batches(self, epoch: int, step: int) -> list[list[Row]]:
        """This rank's micro-batches for one optimizer step (grad_accum lists of micro rows)."""
        rows = self.global_step_rows(epoch, step)[self.rank]
        return [rows[m * self.micro:(m + 1) * self.micro] for m in range(self.accum)]
