"""General-ability scores of a model: MMLU-style multiple choice and held-out perplexity.

MMLU: the standard prompt (an optional subject header, k solved dev questions of the same
subject, the question ending in ``Answer:``); the option whose letter token has the highest
log-probability after ``Answer:`` wins. Perplexity: exp of the token-level mean NLL over the
whole corpus. Both shard rows over ranks like the task scorers (:mod:`.batching`).
"""
from __future__ import annotations

import math
import os
import string
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from gere_ds.data.collate import pad_rows
from gere_ds.data.encode import encode_source
from gere_ds.data.files import read_rows
from gere_ds.errors import InputError
from gere_ds.evaluation.batching import (MAX_BATCH_TOKENS, ForwardFn, argmax_first, check_layout,
                                        logits_at, pad_id, run_sharded, sample_rows, token_ids)

LETTERS = string.ascii_uppercase
NLL_CHUNK = 1024  # positions per fp32 log-softmax: a [1024, V] fp32 buffer at most
MMLU_HEADER = "The following are multiple choice questions (with answers) about {subject}.\n\n"


@dataclass
class GeneralScore:
    """One general-ability number: MMLU accuracy (percent) or perplexity."""

    name: str
    kind: str
    value: float
    n: int
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class MMLUExample:
    """One multiple-choice question; ``answer`` is the 0-based index of the right option."""

    question: str
    options: list[str]
    answer: int
    subject: str = ""
    line: Optional[int] = None


def load_mmlu(path: str, max_examples: int = 0, seed: int = 42) -> list[MMLUExample]:
    """Load MMLU-style rows ``{"question": str, "options": [str, ...], "answer": "A"}``.

    ``answer`` is a letter (A = first option) or a 0-based integer index; ``subject`` is optional.
    2..26 options. Bad rows raise :class:`InputError` naming the file, line and field.
    """
    out: list[MMLUExample] = []
    for located in read_rows(path, what="multiple-choice"):
        row = located.data
        q = row.get("question")
        if not isinstance(q, str) or not q.strip():
            raise located.error(path, "question", "missing or empty question")
        opts = row.get("options")
        if not isinstance(opts, list) or not 2 <= len(opts) <= len(LETTERS) or \
                not all(isinstance(o, (str, int, float)) for o in opts):
            raise located.error(path, "options",
                                f"expected a list of 2..{len(LETTERS)} strings")
        ans = row.get("answer")
        if isinstance(ans, bool):
            ans = None
        if isinstance(ans, str) and len(ans.strip()) == 1 and ans.strip().upper() in LETTERS:
            idx = LETTERS.index(ans.strip().upper())
        elif isinstance(ans, int):
            idx = ans
        else:
            raise located.error(path, "answer",
                                f"expected an answer letter, got {row.get('answer')!r}")
        if not 0 <= idx < len(opts):
            raise located.error(path, "answer",
                                   f"answer {row.get('answer')!r} is outside the {len(opts)} "
                                f"options (A-{LETTERS[len(opts) - 1]})")
        subject = row.get("subject") or ""
        out.append(MMLUExample(question=q, options=[str(o) for o in opts], answer=idx,
                               subject=str(subject), line=located.line))
    return sample_rows(out, max_examples, seed)


def find_dev_file(path: str) -> Optional[str]:
    """The k-shot dev file next to an MMLU test file, by convention.

    Tried in order: the file name with ``test`` replaced by ``dev`` (``mmlu_test.jsonl`` ->
    ``mmlu_dev.jsonl``), ``<stem>.dev<ext>``, ``<stem>_dev<ext>``, ``dev<ext>`` in the same folder.
    """
    folder, name = os.path.split(path)
    stem, ext = os.path.splitext(name)
    cands = []
    if "test" in name:
        cands.append(name.replace("test", "dev"))
    cands += [f"{stem}.dev{ext}", f"{stem}_dev{ext}", f"dev{ext}"]
    for c in cands:
        p = os.path.join(folder, c)
        if c != name and os.path.isfile(p):
            return p
    return None


def format_mmlu_question(ex: MMLUExample, answer: bool) -> str:
    """``{question}\\nA. {opt}\\nB. {opt}...\\nAnswer:`` (+ `` X`` when ``answer``)."""
    lines = [ex.question.strip()]
    lines += [f"{LETTERS[i]}. {opt}" for i, opt in enumerate(ex.options)]
    lines.append("Answer:" + (f" {LETTERS[ex.answer]}" if answer else ""))
    return "\n".join(lines)


def build_mmlu_prompt(ex: MMLUExample, shots: Sequence[MMLUExample] = ()) -> str:
    """The standard (Hendrycks et al.) MMLU prompt: optional subject header, the k solved dev
    questions each followed by a blank line, then the question ending in ``Answer:``."""
    head = ""
    if ex.subject:
        head = MMLU_HEADER.format(subject=ex.subject.replace("_", " ").strip())
    return head + "".join(format_mmlu_question(s, True) + "\n\n" for s in shots) + \
        format_mmlu_question(ex, False)


def mmlu_letter_ids(tokenizer: Any, n: int) -> list[int]:
    """The token id of `` X`` after ``Answer:`` for the first ``n`` letters."""
    base = token_ids(tokenizer, "Answer:", False)
    out = []
    for letter in LETTERS[:n]:
        full = token_ids(tokenizer, f"Answer: {letter}", False)
        if full[:len(base)] == base and len(full) > len(base):
            out.append(full[len(base)])
        else:
            out.append(token_ids(tokenizer, f" {letter}", False)[-1])
    if len(set(out)) != len(out):
        raise ValueError("the tokenizer does not give distinct tokens to the answer letters")
    return out


def select_shots(ex: MMLUExample, dev: Sequence[MMLUExample], k: int) -> list[MMLUExample]:
    """The first k dev questions of the same subject (all dev questions if none match or the
    question has no subject); fewer if the dev set has fewer."""
    if k <= 0 or not dev:
        return []
    same = [d for d in dev if ex.subject and d.subject == ex.subject]
    return list((same or list(dev))[:k])


def score_mmlu(forward: ForwardFn, tokenizer: Any, examples: Sequence[MMLUExample],
               dev: Sequence[MMLUExample] = (), shots: int = 0, batch_size: int = 8,
               max_len: int = 2048, device: Any = None, name: str = "mmlu",
               layout: str = "packed") -> GeneralScore:
    """Multiple-choice accuracy (percent): the option whose letter token has the highest
    log-probability after ``Answer:`` wins (k-shot with ``shots`` dev questions). Prompts longer
    than ``max_len`` tokens keep their end (the question). ``packed`` runs the LM head on each
    prompt's last position only; ``rows`` computes the full logits."""
    check_layout(layout)
    if not examples:
        raise ValueError("no multiple-choice questions to score")
    nmax = max(len(ex.options) for ex in examples)
    letter_ids = mmlu_letter_ids(tokenizer, nmax)
    sources = [encode_source(tokenizer, build_mmlu_prompt(ex, select_shots(ex, dev, shots)),
                             max_len, "tail") for ex in examples]
    pad = pad_id(tokenizer)

    def run(batch: list[int]) -> list[list[float]]:
        ids, mask = (t.to(device) for t in pad_rows([sources[j] for j in batch], pad))
        last = torch.tensor([r * ids.shape[1] + len(sources[j]) - 1 for r, j in enumerate(batch)],
                            dtype=torch.long, device=ids.device)
        if layout == "packed":
            at_last = logits_at(forward, ids, mask, last)
        else:
            logits = forward(ids, mask)
            at_last = logits.flatten(0, 1)[last.to(logits.device)]
        out = []
        for r, j in enumerate(batch):
            lp = torch.log_softmax(at_last[r].float(), dim=-1)
            out.append([float(lp[t]) for t in letter_ids[:len(examples[j].options)]])
        return out

    with torch.no_grad():
        scores = run_sharded(list(range(len(examples))), batch_size, run,
                             size=lambda j: len(sources[j]))
    preds = [argmax_first(s) for s in scores]
    correct = [p == ex.answer for p, ex in zip(preds, examples)]
    return GeneralScore(name=name, kind="mmlu", value=100.0 * sum(correct) / len(correct),
                        n=len(correct), extra={"shots": shots, "correct": correct,
                                               "predictions": [LETTERS[p] for p in preds]})


def load_texts(path: str, max_examples: int = 0, seed: int = 42,
               text_field: str = "text") -> list[str]:
    """Load held-out texts (JSONL ``{"text": str}``); empty texts are skipped."""
    out: list[str] = []
    for located in read_rows(path, what="text"):
        row = located.data
        t = row.get(text_field)
        if not isinstance(t, str):
            raise located.error(path, text_field, "missing text (a string)")
        if t.strip():
            out.append(t)
    if not out:
        raise InputError("no non-empty text", file=path)
    return sample_rows(out, max_examples, seed)


def _text_nlls_packed(forward: ForwardFn, encoded: Sequence[Sequence[int]], batch: list[int],
                      pad: int, device: Any) -> list[tuple[float, int]]:
    """(summed NLL, predicted tokens) of each text of one batch: the LM head runs on the predicting
    positions only (no logits for padding), log-softmax in fp32 a chunk of positions at a time."""
    seqs = [list(encoded[j]) if encoded[j] else [pad] for j in batch]
    ids = pad_rows(seqs, pad)[0].to(device)  # no mask: see the forward below
    width = ids.shape[1]
    counts = [max(len(encoded[j]) - 1, 0) for j in batch]
    flat = [r * width + t for r, n in enumerate(counts) for t in range(n)]
    targets = torch.tensor([encoded[j][t + 1] for j, n in zip(batch, counts) for t in range(n)],
                           dtype=torch.long)
    # no attention mask: the rows are right-padded and attention is causal, so no read position
    # sees a pad; without a mask sdpa takes its fused causal kernel, not the masked math path
    logits = logits_at(forward, ids, None, torch.tensor(flat, dtype=torch.long, device=ids.device))
    targets = targets.to(logits.device)
    token_lp = torch.empty(len(flat), dtype=torch.float32, device=logits.device)
    for s in range(0, len(flat), NLL_CHUNK):
        lp = torch.log_softmax(logits[s:s + NLL_CHUNK].float(), dim=-1)
        token_lp[s:s + NLL_CHUNK] = lp.gather(-1, targets[s:s + NLL_CHUNK, None])[:, 0]
    out, start = [], 0
    for n in counts:
        out.append((float(-token_lp[start:start + n].sum()), n) if n else (0.0, 0))
        start += n
    return out


def score_perplexity(forward: ForwardFn, tokenizer: Any, texts: Sequence[str],
                     batch_size: int = 8, max_len: int = 1024, device: Any = None,
                     add_special_tokens: bool = True, name: str = "perplexity",
                     layout: str = "packed") -> GeneralScore:
    """Perplexity = exp(token-level mean NLL over all predicted tokens of all texts).

    Each text is tokenized (with special tokens by default) and cut to its first ``max_len``
    tokens; in a text of L tokens the tokens 2..L are predicted (L - 1 terms). The mean is over
    all tokens of the corpus, not over texts. ``packed`` (the default) plans batches by tokens
    (:func:`~gere_ds.evaluation.batching.plan_batches`: texts of a few hundred to two thousand
    tokens no longer pad fifteen others to the longest, and the ranks get equal work) and runs
    the LM head on real positions only; ``rows`` is the former fixed-size batching with full
    logits.
    """
    check_layout(layout)
    encoded = [token_ids(tokenizer, t, add_special_tokens)[:max_len] for t in texts]
    pad = pad_id(tokenizer)

    def run(batch: list[int]) -> list[tuple[float, int]]:
        seqs = [encoded[j] if encoded[j] else [pad] for j in batch]
        ids, mask = (t.to(device) for t in pad_rows(seqs, pad))
        logits = forward(ids, mask)
        out = []
        for r, j in enumerate(batch):
            n = len(encoded[j])
            if n < 2:
                out.append((0.0, 0))
                continue
            lp = torch.log_softmax(logits[r, :n - 1].float(), dim=-1)
            tok = ids[r, 1:n].to(lp.device)
            out.append((float(-lp.gather(-1, tok[:, None]).sum()), n - 1))
        return out

    def run_packed(batch: list[int]) -> list[tuple[float, int]]:
        return _text_nlls_packed(forward, encoded, batch, pad, device)

    with torch.no_grad():
        if layout == "packed":
            parts = run_sharded(list(range(len(encoded))), batch_size, run_packed,
                                size=lambda j: max(len(encoded[j]), 1),
                                max_tokens=MAX_BATCH_TOKENS)
        else:
            parts = run_sharded(list(range(len(encoded))), batch_size, run,
                                size=lambda j: len(encoded[j]))
    total = sum(p[0] for p in parts)
    count = sum(p[1] for p in parts)
    if count == 0:
        raise ValueError("no text has 2 or more tokens: perplexity is undefined")
    nll = total / count
    return GeneralScore(name=name, kind="perplexity", value=math.exp(nll), n=len(encoded),
                        extra={"nll": nll, "tokens": count, "text_nll": [p[0] for p in parts],
                               "text_tokens": [p[1] for p in parts]})
