"""Rows to batches for the scorers: token ids, the padding id, seeded samples, and sharding
over ranks that keeps ZeRO-3's collectives in step.

Distributed
-----------
If ``torch.distributed`` is initialized, rank r scores rows r::world. Every rank runs the same
number of batches, ``ceil(ceil(n / world) / batch_size)`` (a function of the global row count only),
and a rank whose shard runs out runs a dummy batch (the first global row) whose result is thrown
away: under ZeRO-3 every forward is a collective. Results are all-gathered with
``all_gather_object`` so every rank returns the same full result. Within a shard, rows are sorted
by length (longest first) to reduce padding; results are returned in the original order.
"""
from __future__ import annotations

import math
import random
from typing import Any, Callable, Optional, Sequence, TypeVar

import torch

from gere_ds import dist, stop

ForwardFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (ids, mask) -> logits [B, T, V]
_T = TypeVar("_T")


def sample_rows(items: list[_T], max_examples: int, seed: int) -> list[_T]:
    """A seeded sample of ``max_examples`` items in file order (all of them if 0 or more)."""
    if max_examples and 0 < max_examples < len(items):
        keep = sorted(random.Random(seed).sample(range(len(items)), max_examples))
        return [items[i] for i in keep]
    return list(items)


def argmax_first(values: Sequence[float]) -> int:
    """Index of the largest value; the first one on ties (every scorer's prediction rule)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def token_ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def pad_id(tokenizer: Any) -> int:
    """``pad_token_id``, else the eos id, else 0 (padding is masked and never scored)."""
    pid = tokenizer.pad_token_id
    if pid is None:
        pid = tokenizer.eos_token_id
    return int(pid) if pid is not None else 0


def num_batches(n_rows: int, world: int, batch_size: int) -> int:
    """Batches each rank runs for ``n_rows`` global rows: ``ceil(ceil(n / world) / batch_size)``."""
    return math.ceil(math.ceil(n_rows / world) / batch_size) if n_rows else 0


def run_sharded(items: Sequence[_T], batch_size: int, run_batch: Callable[[list[_T]], list[Any]],
                size: Optional[Callable[[_T], int]] = None) -> list[Any]:
    """``run_batch`` over all items, sharded over ranks; the full result list on every rank.

    ``run_batch`` gets a list of items and returns one picklable result per item; the number of
    forwards it runs must not depend on the data. Rank r takes items r::world; every rank runs
    :func:`num_batches` batches, the missing ones as a dummy batch (the first global item) whose
    result is discarded. ``size`` (e.g. the token length) sorts each shard longest-first.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    rank, world = (dist.rank(), dist.world_size()) if dist.is_initialized() else (0, 1)
    n = len(items)
    if n == 0:
        return []
    local = list(range(rank, n, world))
    if size is not None:
        local.sort(key=lambda j: -size(items[j]))
    results: dict[int, Any] = {}
    for b in range(num_batches(n, world, batch_size)):
        stop.check()  # every rank runs the same batches: a safe point to stop
        chunk = local[b * batch_size:(b + 1) * batch_size]
        if not chunk:
            run_batch([items[0]])  # dummy batch: keeps the ZeRO-3 collectives in step
            continue
        outs = run_batch([items[j] for j in chunk])
        if len(outs) != len(chunk):
            raise RuntimeError("run_batch returned a wrong number of results")
        results.update(zip(chunk, outs))
    if world > 1:
        gathered = dist.all_gather_object(sorted(results.items()))
        results = {}
        for part in gathered:
            results.update(dict(part))
    return [results[j] for j in range(n)]
