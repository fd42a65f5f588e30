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

With a token budget (``max_tokens``, the ``packed`` layout) the batches are planned globally
instead (:func:`plan_batches`): every rank holds every item, so each computes the same plan
without talking to the others. Items sorted longest first are cut into batches of at most
``batch_size`` rows and ``max_tokens`` padded tokens (a few long texts no longer pad fifteen short
ones to their length), and each batch goes to the rank with the least estimated work so far.
"""
from __future__ import annotations

import math
import random
from typing import Any, Callable, Optional, Sequence, TypeVar

import torch

from gere_ds.runtime import dist, stop

ForwardFn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]  # (ids, mask) -> logits [B, T, V]
_T = TypeVar("_T")

# packed: all choices of a context in one row, batches planned by tokens, the LM head on scored
# positions only; rows: one padded row per (example, choice), fixed-size batches (the former path,
# kept to compare against)
EVAL_LAYOUTS = ("packed", "rows")
MAX_BATCH_TOKENS = 4096  # padded tokens per planned batch: [4096, V] logits at most
# Attention costs about 4 x layers x hidden FLOPs per query and key, the rest 2 x params per
# token: at SmolLM2-135M's shapes a row of T tokens costs about T x (1 + T / 4096) tokens (larger
# models: less attention per token). Only the balance of work between ranks depends on it.
ATTENTION_KEYS_PER_TOKEN = 4096


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


def check_layout(layout: str) -> None:
    if layout not in EVAL_LAYOUTS:
        raise ValueError(f"unknown eval layout {layout!r}; one of {', '.join(EVAL_LAYOUTS)}")


def batch_cost(rows: int, width: int) -> float:
    """Estimated work of a padded batch, in tokens (attention adds width / 4096 per token)."""
    return rows * width * (1.0 + width / ATTENTION_KEYS_PER_TOKEN)


def plan_batches(sizes: Sequence[int], world: int, batch_size: int,
                 max_tokens: int) -> list[list[list[int]]]:
    """``plan[rank]``: that rank's batches of item indices, the same number on every rank.

    Items sorted longest first (ties by index) fill batches of at most ``max_tokens`` padded
    tokens (an item longer than that is a batch alone) and at most ``batch_size`` rows, and of no
    more than a rank's share of the items (so that no rank idles); each batch goes to the rank
    with the least :func:`batch_cost` so far (the lowest rank on ties). A rank with fewer
    batches gets empty ones, which :func:`run_sharded` runs as a dummy batch of the shortest item.
    """
    if batch_size < 1 or max_tokens < 1:
        raise ValueError("batch_size and max_tokens must be >= 1")
    rows = min(batch_size, max(1, math.ceil(len(sizes) / world)))
    batches: list[list[int]] = []
    for j in sorted(range(len(sizes)), key=lambda j: (-sizes[j], j)):
        last = batches[-1] if batches else None
        if last and len(last) < rows and (len(last) + 1) * sizes[last[0]] <= max_tokens:
            last.append(j)
        else:
            batches.append([j])
    plan: list[list[list[int]]] = [[] for _ in range(world)]
    load = [0.0] * world
    for batch in batches:
        r = min(range(world), key=lambda k: (load[k], k))
        plan[r].append(batch)
        load[r] += batch_cost(len(batch), max(1, sizes[batch[0]]))
    depth = max(len(p) for p in plan)
    for p in plan:
        p.extend([] for _ in range(depth - len(p)))
    return plan


def logits_at(forward: ForwardFn, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
              flat_positions: torch.Tensor) -> torch.Tensor:
    """Logits [N, V] at ``flat_positions`` (indices into the [B*T] positions). A forward with
    ``at_positions`` (gere_ds.model.engine.ModelForward) runs the LM head on those rows only: no
    [B, T, V] logits for padding or unscored tokens."""
    at = getattr(forward, "at_positions", None)
    if at is not None:
        return at(input_ids, attention_mask, flat_positions)
    logits = forward(input_ids, attention_mask)
    return logits.reshape(-1, logits.shape[-1]).index_select(0, flat_positions.to(logits.device))


def run_sharded(items: Sequence[_T], batch_size: int, run_batch: Callable[[list[_T]], list[Any]],
                size: Optional[Callable[[_T], int]] = None, max_tokens: int = 0) -> list[Any]:
    """``run_batch`` over all items, sharded over ranks; the full result list on every rank.

    ``run_batch`` gets a list of items and returns one picklable result per item; the number of
    forwards it runs must not depend on the data. Rank r takes items r::world; every rank runs
    :func:`num_batches` batches, the missing ones as a dummy batch (the first global item) whose
    result is discarded. ``size`` (e.g. the token length) sorts each shard longest-first.
    With ``max_tokens`` and ``size`` the batches follow :func:`plan_batches` instead.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    rank, world = (dist.rank(), dist.world_size()) if dist.is_initialized() else (0, 1)
    n = len(items)
    if n == 0:
        return []
    if max_tokens and size is not None:
        sizes = [size(it) for it in items]
        mine = plan_batches(sizes, world, batch_size, max_tokens)[rank]
        dummy = min(range(n), key=lambda j: (sizes[j], j))  # the cheapest forward
    else:
        local = list(range(rank, n, world))
        if size is not None:
            local.sort(key=lambda j: -size(items[j]))
        mine = [local[b * batch_size:(b + 1) * batch_size]
                for b in range(num_batches(n, world, batch_size))]
        dummy = 0
    results: dict[int, Any] = {}
    for chunk in mine:
        stop.check()  # every rank runs the same batches: a safe point to stop
        if not chunk:
            run_batch([items[dummy]])  # dummy batch: keeps the ZeRO-3 collectives in step
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
