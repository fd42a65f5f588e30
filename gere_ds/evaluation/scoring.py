"""Model-agnostic scorers: task accuracy (rank / generate), MMLU-style multiple choice, perplexity.

Every scorer takes

* ``forward(input_ids: LongTensor[B, T], attention_mask: LongTensor[B, T]) -> FloatTensor[B, T, V]``
  returning next-token logits (position p predicts token p+1), e.g. ``model_forward(engine)`` for
  a DeepSpeed engine or ``model_forward(model)`` for a plain Hugging Face model, and
* a Hugging Face tokenizer (anything with ``__call__(text, add_special_tokens=...)`` giving
  ``input_ids``, ``eos_token_id``, ``pad_token_id`` and ``decode``).

Batches are right-padded (pad id = ``tokenizer.pad_token_id``, else the eos id) with an attention
mask; with causal attention and right padding the real positions never see the padding, so no
position ids are needed. Scorers run under ``torch.no_grad()``; putting the model in eval mode is
the caller's job.

Prompts (docs/method.md, "Tasks, prompts and metrics")
----------------------------------------------
``prompt = build_prompt(instruction, labels, text, option_line)`` =
``{instruction}\\nOption: {", ".join(labels)}\\n{text}\\nAnswer:`` and ``target = {label}<eos>``.
The source is tokenized WITH the tokenizer's special tokens (a BOS if the tokenizer adds one), the
target WITHOUT, and the eos id is appended to the target. A source longer than
``max_source_len`` tokens keeps its special prefix (BOS) and, as in training
(``train.truncate_source``), either the LAST tokens of the prompt (``tail``, the default here: the
instruction, options and start of the text are dropped so that the end of the text and
``Answer:`` always survive) or its FIRST tokens (``head``, the reference: the end of the text and
``Answer:`` are lost).

Modes
-----
* ``rank`` (default): every (example, label) pair is one row ``source + label_ids + [eos]``; the
  score of a label is the mean log-probability of its target tokens (eos included) given the
  source (length-normalised log-likelihood). The prediction is the best label (first on ties).
* ``generate``: greedy decoding of ``max_new_tokens`` tokens, stopping per row at eos; the
  prediction is read as O-LoRA does (:func:`extract_answer`: prompt + continuation decoded with
  ``skip_special_tokens``, the text after the LAST ``Answer:``, stripped; empty if a cut prompt
  and its continuation have no ``Answer:``) and compared to the gold label by O-LoRA's
  normalised exact match (:func:`normalize_answer`: lower-case, ASCII punctuation removed,
  whitespace collapsed and stripped).
  Without a ``generate_fn`` the decoding loop calls ``forward`` on the whole growing sequence at
  every step (no KV cache: simple, works for any callable and is ZeRO-3 safe because every batch
  runs exactly ``max_new_tokens`` forwards, even when all rows have finished early). With a
  ``generate_fn(input_ids, attention_mask, max_new_tokens) -> LongTensor[B, T + new]`` (e.g.
  ``model.generate`` with ``synced_gpus=True`` under ZeRO-3) the prompts are LEFT-padded, the
  returned sequences are expected to include the prompt (Hugging Face convention), and keeping
  the ranks in step is the callable's job.

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
import os
import random
import string
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, TypeVar

import torch

from gere_ds.data.encode import encode_source as _train_encode_source
from gere_ds.data.encode import encode_target as _train_encode_target
from gere_ds.data.files import read_rows
from gere_ds.data.prompts import build_prompt
from gere_ds.data.tasks import Example, read_examples
from gere_ds.errors import InputError

ForwardFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
GenerateFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
EVAL_MODES = ("rank", "generate")
LETTERS = string.ascii_uppercase
ANSWER_PREFIX = "Answer:"  # O-LoRA's: a generated answer is the text after the last one
MMLU_HEADER = "The following are multiple choice questions (with answers) about {subject}.\n\n"

_T = TypeVar("_T")


# ============================================================================ data and loading


TaskExample = Example  # one example type for training and evaluation


@dataclass
class MMLUExample:
    """One multiple-choice question; ``answer`` is the 0-based index of the right option."""

    question: str
    options: list[str]
    answer: int
    subject: str = ""
    line: Optional[int] = None


def _sample(items: list[_T], max_examples: int, seed: int) -> list[_T]:
    """A seeded sample of ``max_examples`` items in file order (all of them if 0 or more)."""
    if max_examples and 0 < max_examples < len(items):
        keep = sorted(random.Random(seed).sample(range(len(items)), max_examples))
        return [items[i] for i in keep]
    return list(items)


def load_task_examples(path: str, task_cfg: Any, max_examples: int = 0,
                       seed: int = 42) -> list[TaskExample]:
    """Load and validate a task's test split (``task_cfg``: a :class:`~gere_ds.config.TaskConfig`).

    Rows are read and validated exactly as for training (:func:`gere_ds.data.tasks.read_examples`:
    bad rows name the file, the 1-based line and the field); then ``max_examples > 0`` keeps a
    seeded sample (``random.Random(seed)``) in file order.
    """
    return _sample(read_examples(path, task_cfg, what="test", test=True), max_examples, seed)


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
    return _sample(out, max_examples, seed)


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
    return _sample(out, max_examples, seed)


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


# ============================================================================ tokens and batches


def _ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def eos_id(tokenizer: Any) -> int:
    eid = tokenizer.eos_token_id
    if eid is None:
        raise ValueError("the tokenizer has no eos token")
    return int(eid)


def pad_id(tokenizer: Any) -> int:
    """``pad_token_id``, else the eos id, else 0 (padding is masked and never scored)."""
    pid = tokenizer.pad_token_id
    if pid is None:
        pid = tokenizer.eos_token_id
    return int(pid) if pid is not None else 0


def encode_source(tokenizer: Any, prompt: str, max_len: int, truncate: str = "tail") -> list[int]:
    """Prompt ids exactly as in training: the special prefix and the END (``tail``) or the
    START (``head``) of a too-long prompt (:func:`gere_ds.data.encode.encode_source`)."""
    if max_len < 1:
        raise ValueError("max_source_len must be >= 1")
    return _train_encode_source(tokenizer, prompt, max_len, truncate)


def encode_target(tokenizer: Any, label: str, max_len: Optional[int] = None) -> list[int]:
    """``label`` ids (no special tokens) + eos id, exactly as in training."""
    eos_id(tokenizer)
    return _train_encode_target(tokenizer, label, max_len or 1 << 30)


def pad_batch(seqs: Sequence[Sequence[int]], pad: int, device: Any = None,
              left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token lists to a LongTensor batch and its attention mask (right padding by default)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        if left:
            ids[r, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[r, width - len(s):] = 1
        else:
            ids[r, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask[r, :len(s)] = 1
    return ids.to(device), mask.to(device)


def model_forward(model: Any) -> ForwardFn:
    """A forward callable for a Hugging Face model or a DeepSpeed engine wrapping one."""

    def forward(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits if hasattr(out, "logits") else out[0]

    return forward


# ============================================================================ distribution


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialized process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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
    rank, world = dist_info()
    n = len(items)
    if n == 0:
        return []
    local = list(range(rank, n, world))
    if size is not None:
        local.sort(key=lambda j: -size(items[j]))
    results: dict[int, Any] = {}
    for b in range(num_batches(n, world, batch_size)):
        chunk = local[b * batch_size:(b + 1) * batch_size]
        if not chunk:
            run_batch([items[0]])  # dummy batch: keeps the ZeRO-3 collectives in step
            continue
        outs = run_batch([items[j] for j in chunk])
        if len(outs) != len(chunk):
            raise RuntimeError("run_batch returned a wrong number of results")
        results.update(zip(chunk, outs))
    if world > 1:
        import torch.distributed as dist

        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, sorted(results.items()))
        results = {}
        for part in gathered:
            results.update(dict(part))
    return [results[j] for j in range(n)]


# ============================================================================ task scoring


@dataclass
class TaskScore:
    """Accuracy of one task's test set (percent) and the per-example predictions."""

    task: str
    mode: str
    accuracy: float
    n: int
    predictions: list[str]
    correct: list[bool]
    label_scores: Optional[list[list[float]]] = None  #: rank mode: [example][label] scores


def normalize_answer(text: str) -> str:
    """O-LoRA's (SQuAD without article removal): lower-case, remove ASCII punctuation
    (``string.punctuation``; other characters stay), collapse and strip whitespace."""
    exclude = set(string.punctuation)
    return " ".join("".join(ch for ch in text.lower() if ch not in exclude).split())


def extract_answer(tokenizer: Any, source: Sequence[int], new: Sequence[int]) -> str:
    """The generated answer as O-LoRA reads it: prompt + continuation decoded together
    (``skip_special_tokens``, ``clean_up_tokenization_spaces``), the text after the LAST
    ``Answer:``, stripped; ``""`` when there is none (a prompt cut before its ``Answer:`` whose
    continuation does not write one)."""
    text = tokenizer.decode(list(source) + list(new), skip_special_tokens=True,
                            clean_up_tokenization_spaces=True)
    return text.split(ANSWER_PREFIX)[-1].strip() if ANSWER_PREFIX in text else ""


def rank_scores(forward: ForwardFn, tokenizer: Any, sources: Sequence[Sequence[int]],
                targets: Sequence[Sequence[int]], batch_size: int = 8,
                device: Any = None) -> list[list[float]]:
    """``scores[e][l]`` = mean log p(targets[l] | sources[e]) over the target tokens."""
    rows = [(e, l) for e in range(len(sources)) for l in range(len(targets))]
    pad = pad_id(tokenizer)

    def run(batch: list[tuple[int, int]]) -> list[float]:
        seqs = [list(sources[e]) + list(targets[l]) for e, l in batch]
        ids, mask = pad_batch(seqs, pad, device)
        logits = forward(ids, mask)
        out = []
        for r, (e, l) in enumerate(batch):
            s, tgt = len(sources[e]), targets[l]
            lp = torch.log_softmax(logits[r, s - 1:s - 1 + len(tgt)].float(), dim=-1)
            tok = torch.tensor(tgt, dtype=torch.long, device=lp.device)
            out.append(float(lp.gather(-1, tok[:, None]).mean()))
        return out

    with torch.no_grad():
        flat = run_sharded(rows, batch_size, run,
                           size=lambda el: len(sources[el[0]]) + len(targets[el[1]]))
    scores = [[0.0] * len(targets) for _ in sources]
    for (e, l), v in zip(rows, flat):
        scores[e][l] = v
    return scores


def greedy_decode(forward: ForwardFn, tokenizer: Any, sources: Sequence[Sequence[int]],
                  max_new_tokens: int, batch_size: int = 8, device: Any = None,
                  generate_fn: Optional[GenerateFn] = None) -> list[list[int]]:
    """Greedy continuations (eos excluded, at most ``max_new_tokens``) of every source.

    Without ``generate_fn``: a KV-less loop of exactly ``max_new_tokens`` forwards per batch on
    the right-padded growing sequences (see the module doc).
    """
    eos = tokenizer.eos_token_id
    pad = pad_id(tokenizer)
    idx = list(range(len(sources)))

    def run_loop(batch: list[int]) -> list[list[int]]:
        seqs = [list(sources[j]) for j in batch]
        lens = [len(s) for s in seqs]
        width = max(lens) + max_new_tokens
        buf = torch.full((len(batch), width), pad, dtype=torch.long)
        for r, s in enumerate(seqs):
            buf[r, :len(s)] = torch.tensor(s, dtype=torch.long)
        done = [False] * len(batch)
        new: list[list[int]] = [[] for _ in batch]
        for _ in range(max_new_tokens):  # always max_new_tokens forwards (ZeRO-3)
            w = max(lens)
            mask = (torch.arange(w)[None, :] < torch.tensor(lens)[:, None]).long()
            logits = forward(buf[:, :w].to(device), mask.to(device))
            last = torch.tensor([n - 1 for n in lens], device=logits.device)
            nxt = logits[torch.arange(len(batch), device=logits.device), last].argmax(-1).tolist()
            for r, t in enumerate(nxt):
                if done[r]:
                    continue
                if eos is not None and t == eos:
                    done[r] = True
                    continue
                buf[r, lens[r]] = t
                lens[r] += 1
                new[r].append(int(t))
        return new

    def run_gen(batch: list[int]) -> list[list[int]]:
        ids, mask = pad_batch([sources[j] for j in batch], pad, device, left=True)
        out = generate_fn(ids, mask, max_new_tokens)
        res = []
        for row in out[:, ids.shape[1]:].tolist():
            toks = []
            for t in row[:max_new_tokens]:
                if eos is not None and t == eos:
                    break
                toks.append(int(t))
            res.append(toks)
        return res

    with torch.no_grad():
        return run_sharded(idx, batch_size, run_gen if generate_fn is not None else run_loop,
                           size=lambda j: len(sources[j]))


def score_task(forward: ForwardFn, tokenizer: Any, examples: Sequence[TaskExample],
               task_cfg: Any, mode: str = "rank", batch_size: int = 8,
               max_source_len: int = 512, max_target_len: Optional[int] = None,
               max_new_tokens: int = 8, generate_fn: Optional[GenerateFn] = None,
               device: Any = None, truncate_source: str = "tail") -> TaskScore:
    """Accuracy (percent) of the model on ``examples`` of the task ``task_cfg``.

    ``task_cfg`` needs ``name``, ``instruction`` and ``labels`` (a TaskConfig; ``option_line``
    is read when present). ``mode`` is ``rank`` or ``generate`` (module doc);
    ``truncate_source`` is ``train.truncate_source``. The result is the same on every rank.
    """
    if mode not in EVAL_MODES:
        raise ValueError(f"unknown eval mode {mode!r}; one of {', '.join(EVAL_MODES)}")
    if not examples:
        raise ValueError(f"task {task_cfg.name!r}: no examples to score")
    labels = [str(x) for x in task_cfg.labels]
    option_line = getattr(task_cfg, "option_line", True)
    sources = [encode_source(tokenizer, build_prompt(task_cfg.instruction, labels, ex.text,
                                                     option_line),
                             max_source_len, truncate_source) for ex in examples]
    golds = [ex.label for ex in examples]
    if mode == "rank":
        targets = [encode_target(tokenizer, lab, max_target_len) for lab in labels]
        scores = rank_scores(forward, tokenizer, sources, targets, batch_size, device)
        preds = [labels[max(range(len(labels)), key=lambda l: (s[l], -l))] for s in scores]
        correct = [p == g for p, g in zip(preds, golds)]
    else:
        new = greedy_decode(forward, tokenizer, sources, max_new_tokens, batch_size, device,
                            generate_fn)
        preds = [extract_answer(tokenizer, src, t) for src, t in zip(sources, new)]
        correct = [normalize_answer(p) == normalize_answer(g) for p, g in zip(preds, golds)]
        scores = None
    acc = 100.0 * sum(correct) / len(correct)
    return TaskScore(task=task_cfg.name, mode=mode, accuracy=acc, n=len(correct),
                     predictions=preds, correct=correct, label_scores=scores)


# ============================================================================ general abilities


@dataclass
class GeneralScore:
    """One general-ability number: MMLU accuracy (percent) or perplexity."""

    name: str
    kind: str
    value: float
    n: int
    extra: dict[str, Any] = field(default_factory=dict)


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
    base = _ids(tokenizer, "Answer:", False)
    out = []
    for letter in LETTERS[:n]:
        full = _ids(tokenizer, f"Answer: {letter}", False)
        if full[:len(base)] == base and len(full) > len(base):
            out.append(full[len(base)])
        else:
            out.append(_ids(tokenizer, f" {letter}", False)[-1])
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
               max_len: int = 2048, device: Any = None, name: str = "mmlu") -> GeneralScore:
    """Multiple-choice accuracy (percent): the option whose letter token has the highest
    log-probability after ``Answer:`` wins (k-shot with ``shots`` dev questions). Prompts longer
    than ``max_len`` tokens keep their end (the question)."""
    if not examples:
        raise ValueError("no multiple-choice questions to score")
    nmax = max(len(ex.options) for ex in examples)
    letter_ids = mmlu_letter_ids(tokenizer, nmax)
    sources = [encode_source(tokenizer, build_mmlu_prompt(ex, select_shots(ex, dev, shots)),
                             max_len) for ex in examples]
    pad = pad_id(tokenizer)

    def run(batch: list[int]) -> list[list[float]]:
        ids, mask = pad_batch([sources[j] for j in batch], pad, device)
        logits = forward(ids, mask)
        out = []
        for r, j in enumerate(batch):
            lp = torch.log_softmax(logits[r, len(sources[j]) - 1].float(), dim=-1)
            out.append([float(lp[t]) for t in letter_ids[:len(examples[j].options)]])
        return out

    with torch.no_grad():
        scores = run_sharded(list(range(len(examples))), batch_size, run,
                             size=lambda j: len(sources[j]))
    preds = [max(range(len(s)), key=lambda i: (s[i], -i)) for s in scores]
    correct = [p == ex.answer for p, ex in zip(preds, examples)]
    return GeneralScore(name=name, kind="mmlu", value=100.0 * sum(correct) / len(correct),
                        n=len(correct), extra={"shots": shots,
                                               "predictions": [LETTERS[p] for p in preds]})


def score_perplexity(forward: ForwardFn, tokenizer: Any, texts: Sequence[str],
                     batch_size: int = 8, max_len: int = 1024, device: Any = None,
                     add_special_tokens: bool = True, name: str = "perplexity") -> GeneralScore:
    """Perplexity = exp(token-level mean NLL over all predicted tokens of all texts).

    Each text is tokenized (with special tokens by default) and cut to its first ``max_len``
    tokens; in a text of L tokens the tokens 2..L are predicted (L - 1 terms). The mean is over
    all tokens of the corpus, not over texts.
    """
    encoded = [_ids(tokenizer, t, add_special_tokens)[:max_len] for t in texts]
    pad = pad_id(tokenizer)

    def run(batch: list[int]) -> list[tuple[float, int]]:
        seqs = [encoded[j] if encoded[j] else [pad] for j in batch]
        ids, mask = pad_batch(seqs, pad, device)
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

    with torch.no_grad():
        parts = run_sharded(list(range(len(encoded))), batch_size, run,
                            size=lambda j: len(encoded[j]))
    total = sum(p[0] for p in parts)
    count = sum(p[1] for p in parts)
    if count == 0:
        raise ValueError("no text has 2 or more tokens: perplexity is undefined")
    nll = total / count
    return GeneralScore(name=name, kind="perplexity", value=math.exp(nll), n=len(encoded),
                        extra={"nll": nll, "tokens": count})


GENERAL_KINDS = ("mmlu", "perplexity", "cloze")


@dataclass
class GeneralData:
    """A general evaluation loaded and validated (see :func:`load_general`)."""

    cfg: Any
    mmlu: list[MMLUExample] = field(default_factory=list)
    dev: list[MMLUExample] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    cloze: list[Any] = field(default_factory=list)  # ClozeQuestion (gere_ds.evaluation.cloze)


def load_general(gcfg: Any, seed: int = 42, dev_path: Optional[str] = None) -> GeneralData:
    """Load a :class:`~gere_ds.config.GeneralEvalConfig`'s data.

    For ``mmlu`` with ``shots > 0`` the dev file is ``dev_path``, else ``gcfg.dev`` if the config
    has such a field, else :func:`find_dev_file` next to ``gcfg.path``.
    """
    if gcfg.kind not in GENERAL_KINDS:
        raise InputError(f"unknown general eval kind {gcfg.kind!r}; one of "
                         f"{', '.join(GENERAL_KINDS)}", field=f"eval.general.{gcfg.name}.kind")
    if gcfg.kind == "perplexity":
        return GeneralData(cfg=gcfg, texts=load_texts(gcfg.path, gcfg.max_examples, seed))
    if gcfg.kind == "cloze":
        from gere_ds.evaluation.cloze import load_cloze

        return GeneralData(cfg=gcfg, cloze=load_cloze(gcfg.path, gcfg.max_examples))
    rows = load_mmlu(gcfg.path, gcfg.max_examples, seed)
    dev: list[MMLUExample] = []
    if gcfg.shots > 0:
        dev_path = dev_path or getattr(gcfg, "dev", "") or find_dev_file(gcfg.path)
        if not dev_path:
            raise InputError(f"{gcfg.shots}-shot needs a dev file (e.g. "
                             f"{os.path.basename(gcfg.path).replace('test', 'dev')} next to it)",
                             file=gcfg.path, field="shots")
        dev = load_mmlu(dev_path)
    return GeneralData(cfg=gcfg, mmlu=rows, dev=dev)


def score_general(forward: ForwardFn, tokenizer: Any, data: GeneralData, batch_size: int = 8,
                  max_len: int = 2048, device: Any = None) -> GeneralScore:
    """Score one loaded general evaluation."""
    g = data.cfg
    if g.kind == "perplexity":
        return score_perplexity(forward, tokenizer, data.texts, batch_size, max_len, device,
                                name=g.name)
    if g.kind == "cloze":
        from gere_ds.evaluation.cloze import score_cloze

        c = score_cloze(forward, tokenizer, data.cloze, batch_size, max_len, device, name=g.name)
        return GeneralScore(name=g.name, kind="cloze", value=c.acc_norm, n=c.n,
                            extra={"acc": c.acc, "acc_norm": c.acc_norm, "correct": c.correct,
                                   "correct_norm": c.correct_norm})
    return score_mmlu(forward, tokenizer, data.mmlu, data.dev, g.shots, batch_size, max_len,
                      device, name=g.name)


# ============================================================================ whole evaluation


@dataclass
class EvalRow:
    """One row of the accuracy matrix plus the general scores of the same model."""

    accuracy: dict[str, float]  #: task name -> accuracy in percent, in task order
    general: dict[str, float]  #: general name -> value
    task_scores: dict[str, TaskScore] = field(default_factory=dict)
    general_scores: dict[str, GeneralScore] = field(default_factory=dict)

    def row(self) -> list[float]:
        return list(self.accuracy.values())


class EvalSuite:
    """Every test set and general evaluation of a run, loaded and validated up front.

    ``EvalSuite(cfg.tasks, cfg.eval, seed=cfg.train.seed, max_source_len=cfg.train.max_source_len,
    truncate_source=cfg.train.truncate_source)``
    raises :class:`InputError` before any training if a file is bad; then
    ``suite.evaluate(forward, tokenizer, device=...)`` gives one :class:`EvalRow` (identical on
    every rank; every rank must call it).
    """

    def __init__(self, tasks: Sequence[Any], eval_cfg: Any, seed: int = 42,
                 max_source_len: int = 512, max_target_len: Optional[int] = None,
                 general_max_len: int = 2048, truncate_source: str = "tail") -> None:
        self.tasks = list(tasks)
        self.cfg = eval_cfg
        self.max_source_len, self.max_target_len = max_source_len, max_target_len
        self.truncate_source = truncate_source
        self.general_max_len = general_max_len
        self.examples: dict[str, list[TaskExample]] = {}
        for i, task in enumerate(self.tasks):
            if not task.test:
                raise InputError(f"task {task.name!r} has no test file (needed by eval)",
                                 field=f"tasks.{i}.test")
            self.examples[task.name] = load_task_examples(task.test, task,
                                                          eval_cfg.max_examples, seed)
        self.general = [load_general(g, seed) for g in eval_cfg.general]

    def evaluate(self, forward: ForwardFn, tokenizer: Any, device: Any = None,
                 generate_fn: Optional[GenerateFn] = None,
                 tasks: Optional[Sequence[str]] = None) -> EvalRow:
        """Score every task (or only the names in ``tasks``) and every general evaluation."""
        c = self.cfg
        row = EvalRow(accuracy={}, general={})
        for task in self.tasks:
            if tasks is not None and task.name not in tasks:
                continue
            s = score_task(forward, tokenizer, self.examples[task.name], task, mode=c.mode,
                           batch_size=c.batch_size, max_source_len=self.max_source_len,
                           max_target_len=self.max_target_len, max_new_tokens=c.max_new_tokens,
                           generate_fn=generate_fn, device=device,
                           truncate_source=self.truncate_source)
            row.accuracy[task.name] = s.accuracy
            row.task_scores[task.name] = s
        for data in self.general:
            g = score_general(forward, tokenizer, data, c.batch_size, self.general_max_len, device)
            row.general[g.name] = g.value
            row.general_scores[g.name] = g
        return row
