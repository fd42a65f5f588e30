"""All continuations of one context scored in one row: a tree-shaped attention mask.

Multiple-choice scoring needs log p(continuation_j | context) for every choice j. Run one row per
choice and the context is encoded once per choice: ten colour labels cost ten forwards of the same
prompt. Packed, the row is the context followed by every continuation's tokens except its last
(whose logits are never read), each with position ids that restart right after the context, and an
attention mask in which a continuation token sees the context and its own earlier tokens only::

    tokens     c0 c1 c2 | a0 a1 | b0        (context c, continuations a = a0 a1 a2, b = b0 b1)
    positions   0  1  2 |  3  4 |  3
    a1 sees    c0 c1 c2   a0 a1
    b0 sees    c0 c1 c2          b0

log p(a0 | c) is read at c2, log p(a1 | c a0) at a0, log p(a2 | c a0 a1) at a1; log p(b0 | c) at c2
and log p(b1 | c b0) at b0. Under causal attention these are the same quantities the one-row-per-
choice forward computes, up to the rounding of a different matrix shape; a continuation of one
token adds nothing to the row. This is the same saving lm-evaluation-harness makes when it scores
single-token choices from one context forward, extended to any continuation length.

A model forward opts in by having a ``tree(input_ids, mask_4d, position_ids) -> logits`` method
(:class:`gere_ds.engine.ModelForward`); any other callable is scored one row per choice.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from gere_ds.data.collate import pad_rows
from gere_ds.evaluation.batching import ForwardFn, run_sharded

# (input_ids [B, T], allowed [B, T, T] bool, position_ids [B, T]) -> logits [B, T, V]
TreeForwardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Choices:
    """One context (token ids) and the continuations to score after it."""

    context: tuple[int, ...]
    continuations: tuple[tuple[int, ...], ...]

    def packed_length(self) -> int:
        return len(self.context) + sum(len(c) - 1 for c in self.continuations)


@dataclass(frozen=True)
class PackedRow:
    tokens: list[int]
    positions: list[int]
    segments: list[int]  # 0: context; j + 1: continuation j
    reads: list[list[int]]  # reads[j][t]: the row position whose logits predict continuation j's token t


def pack(choices: Choices) -> PackedRow:
    """The row of ``choices``: context, then each continuation without its last token."""
    n = len(choices.context)
    if n == 0:
        raise ValueError("an empty context has no position to predict the first token from")
    tokens, positions, segments = list(choices.context), list(range(n)), [0] * n
    reads: list[list[int]] = []
    for j, cont in enumerate(choices.continuations):
        if not cont:
            raise ValueError(f"continuation {j} is empty")
        start = len(tokens)
        tokens += list(cont[:-1])
        positions += range(n, n + len(cont) - 1)
        segments += [j + 1] * (len(cont) - 1)
        reads.append([n - 1] + list(range(start, start + len(cont) - 1)))
    return PackedRow(tokens, positions, segments, reads)


def tree_batch(rows: Sequence[PackedRow], pad: int) -> tuple[torch.Tensor, torch.Tensor,
                                                               torch.Tensor]:
    """(input_ids, allowed, position_ids) of right-padded rows.

    ``allowed[b, q, k]``: query q may attend key k (k <= q, and k is in the context or in q's own
    continuation). A padding query attends only itself so that no softmax row is empty.
    """
    width = max(len(r.tokens) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    allowed = torch.zeros((len(rows), width, width), dtype=torch.bool)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    for b, r in enumerate(rows):
        n = len(r.tokens)
        ids[b, :n] = torch.tensor(r.tokens, dtype=torch.long)
        pos[b, :n] = torch.tensor(r.positions, dtype=torch.long)
        seg = torch.tensor(r.segments, dtype=torch.long)
        same = (seg[None, :] == 0) | (seg[None, :] == seg[:, None])
        allowed[b, :n, :n] = same & causal[:n, :n]
        allowed[b, range(n, width), range(n, width)] = True
    return ids, allowed, pos


def token_logprobs(logits: torch.Tensor, row: PackedRow,
                   continuations: Sequence[Sequence[int]]) -> list[list[float]]:
    """log p of every continuation token, read from one row's logits [T, V]."""
    out = []
    for reads, cont in zip(row.reads, continuations):
        lp = torch.log_softmax(logits[reads].float(), dim=-1)
        tok = torch.tensor(list(cont), dtype=torch.long, device=lp.device)
        out.append(lp.gather(-1, tok[:, None])[:, 0].tolist())
    return out


def score_continuations(forward: ForwardFn, items: Sequence[Choices], batch_size: int, pad: int,
                        device: Any = None) -> list[list[list[float]]]:
    """``lp[i][j][t]``: log p(token t of continuation j of item i | context, earlier tokens).

    Packed (one row per item) when ``forward`` has a ``tree`` method, else one row per
    (item, continuation). Sharded over ranks; the full result on every rank.
    """
    tree: Optional[TreeForwardFn] = getattr(forward, "tree", None)
    if tree is not None:
        def run_packed(batch: list[int]) -> list[list[list[float]]]:
            rows = [pack(items[i]) for i in batch]
            ids, allowed, pos = (t.to(device) for t in tree_batch(rows, pad))
            logits = tree(ids, allowed, pos)
            return [token_logprobs(logits[b], r, items[i].continuations)
                    for b, (i, r) in enumerate(zip(batch, rows))]

        with torch.no_grad():
            return run_sharded(list(range(len(items))), batch_size, run_packed,
                               size=lambda i: items[i].packed_length())

    pairs = [(i, j) for i in range(len(items)) for j in range(len(items[i].continuations))]

    def run_rows(batch: list[tuple[int, int]]) -> list[list[float]]:
        rows = [pack(Choices(items[i].context, (items[i].continuations[j],))) for i, j in batch]
        ids, mask = pad_rows([r.tokens for r in rows], pad)
        logits = forward(ids.to(device), mask.to(device))
        return [token_logprobs(logits[b], r, (items[i].continuations[j],))[0]
                for b, (r, (i, j)) in enumerate(zip(rows, batch))]

    with torch.no_grad():
        flat = run_sharded(pairs, batch_size, run_rows,
                           size=lambda p: len(items[p[0]].context) + len(items[p[0]].continuations[p[1]]))
    out: list[list[list[float]]] = [[[] for _ in it.continuations] for it in items]
    for (i, j), v in zip(pairs, flat):
        out[i][j] = v
    return out
