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
(:class:`gere_ds.model.engine.ModelForward`); any other callable is scored one row per choice,
and so is ``layout="rows"`` (the former path, kept to compare against). When the forward also
exposes its ``model``, the LM head runs on the read positions only (a context's last position once
for all its continuations): a row of 130 prompt tokens and 4 one-token labels needs 1 row of logits,
not 130. Up to the rounding of other matrix shapes the numbers are the same as one row per choice:
within 1e-5 in fp32 (2e-5 on SmolLM2-135M's 30 layers); in bf16 a score moves by up to 0.3 (the
tests allow 0.5, tests/test_eval_layouts.py) and the benchmark's predictions do not change.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from gere_ds.data.collate import pad_rows
from gere_ds.evaluation.batching import MAX_BATCH_TOKENS, ForwardFn, check_layout, run_sharded
from gere_ds.model.capture import lm_head_on_positions

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


def _tree_logits_at(forward: Any, tree: TreeForwardFn, ids: torch.Tensor, allowed: torch.Tensor,
                    pos: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """Logits [N, V] of the packed batch at ``flat`` (indices into its [B*T] positions); the LM
    head sees only those rows when the forward exposes its model (a ModelForward)."""
    model = getattr(forward, "model", None)
    if model is None:
        logits = tree(ids, allowed, pos)
        return logits.reshape(-1, logits.shape[-1]).index_select(0, flat.to(logits.device))
    with lm_head_on_positions(getattr(model, "module", model), flat):
        return tree(ids, allowed, pos)


def _packed_logprobs(forward: Any, tree: TreeForwardFn, items: Sequence[Choices], pad: int,
                     device: Any) -> list[list[list[float]]]:
    """One batch of packed rows: log p of every continuation token, the LM head run on the read
    positions only (a context's last position once, however many continuations read it)."""
    rows = [pack(it) for it in items]
    ids, allowed, pos = (t.to(device) for t in tree_batch(rows, pad))
    width = ids.shape[1]
    flat: list[int] = []
    where: dict[tuple[int, int], int] = {}
    for b, row in enumerate(rows):
        for p in sorted({p for reads in row.reads for p in reads}):
            where[(b, p)] = len(flat)
            flat.append(b * width + p)
    logits = _tree_logits_at(forward, tree, ids, allowed, pos,
                             torch.tensor(flat, dtype=torch.long, device=ids.device))
    lp = torch.log_softmax(logits.float(), dim=-1)
    at = [where[(b, p)] for b, row in enumerate(rows) for reads in row.reads for p in reads]
    tok = [t for it in items for cont in it.continuations for t in cont]
    picked = lp[torch.tensor(at, device=lp.device), torch.tensor(tok, device=lp.device)].tolist()
    out: list[list[list[float]]] = []
    k = 0
    for it in items:
        per = []
        for cont in it.continuations:
            per.append(picked[k:k + len(cont)])
            k += len(cont)
        out.append(per)
    return out


def score_continuations(forward: ForwardFn, items: Sequence[Choices], batch_size: int, pad: int,
                        device: Any = None, layout: str = "packed") -> list[list[list[float]]]:
    """``lp[i][j][t]``: log p(token t of continuation j of item i | context, earlier tokens).

    ``packed`` (the default) when ``forward`` has a ``tree`` method: one row per item, batches of
    at most ``batch_size`` rows and :data:`MAX_BATCH_TOKENS` tokens, the LM head on the read
    positions only. Else, or with ``layout="rows"``, one row per (item, continuation) with full
    logits. Sharded over ranks; the full result on every rank.
    """
    check_layout(layout)
    tree: Optional[TreeForwardFn] = getattr(forward, "tree", None)
    if tree is not None and layout == "packed":
        def run_packed(batch: list[int]) -> list[list[list[float]]]:
            return _packed_logprobs(forward, tree, [items[i] for i in batch], pad, device)

        with torch.no_grad():
            return run_sharded(list(range(len(items))), batch_size, run_packed,
                               size=lambda i: items[i].packed_length(),
                               max_tokens=MAX_BATCH_TOKENS)

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
