"""Task accuracy (rank / generate) and the whole evaluation of a model (:class:`EvalSuite`).

Every scorer takes

* ``forward(input_ids: LongTensor[B, T], attention_mask: LongTensor[B, T]) -> FloatTensor[B, T, V]``
  returning next-token logits (position p predicts token p+1), e.g. ``Engine.forward`` or
  :func:`gere_ds.model.engine.model_forward` of a plain Hugging Face model, and
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
* ``rank`` (default): the score of a label is the mean log-probability of its target tokens
  ``label_ids + [eos]`` (eos included) given the source (length-normalised log-likelihood). The
  prediction is the best label (first on ties). All labels of an example are scored from one
  packed row (:mod:`gere_ds.evaluation.packing`); ``layout="rows"`` scores one row
  ``source + label_ids + [eos]`` per (example, label) as before.
* ``generate``: greedy decoding of ``max_new_tokens`` tokens, stopping per row at eos; the
  prediction is read as O-LoRA does (:func:`extract_answer`: prompt + continuation decoded with
  ``skip_special_tokens``, the text after the LAST ``Answer:``, stripped; empty if a cut prompt
  and its continuation have no ``Answer:``) and compared to the gold label by O-LoRA's
  normalised exact match (:func:`normalize_answer`: lower-case, ASCII punctuation removed,
  whitespace collapsed and stripped).
  Without a ``generate_fn`` the decoding loop of a model's forward
  (gere_ds.model.engine.ModelForward) runs the left-padded prompts once and then one token per row
  and step from the model's KV cache, with the LM head on the last position only; any other callable
  gets the whole growing sequence at every step (and with ``at_positions`` the logits of each row's
  last token only, not [B, T, V]). Either loop stops once every row of the batch on every rank has
  ended (one all-reduced flag, so ZeRO-3's collective forwards stay in step). With a
  ``generate_fn(input_ids, attention_mask, max_new_tokens) -> LongTensor[B, T + new]`` (e.g.
  ``model.generate`` with ``synced_gpus=True`` under ZeRO-3) the prompts are LEFT-padded, the
  returned sequences are expected to include the prompt (Hugging Face convention), and keeping
  the ranks in step is the callable's job.

Rows are sharded over ranks by :func:`gere_ds.evaluation.batching.run_sharded`; the general
evaluations (MMLU, perplexity, cloze) are kinds of :mod:`gere_ds.evaluation.general_kinds`.
"""
from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from gere_ds.runtime import dist
from gere_ds.constants import EVAL_MODES
from gere_ds.data.collate import pad_rows
from gere_ds.data.encode import encode_source, encode_target
from gere_ds.data.prompts import build_prompt
from gere_ds.data.tasks import Example, read_examples
from gere_ds.errors import InputError
from gere_ds.evaluation.batching import ForwardFn, argmax_first, pad_id, run_sharded, sample_rows
from gere_ds.evaluation.packing import Choices, score_continuations
from gere_ds.evaluation.general import GeneralScore
from gere_ds.evaluation.general_kinds import GeneralData, load_general, score_general

GenerateFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
ANSWER_PREFIX = "Answer:"  # O-LoRA's: a generated answer is the text after the last one
NO_TARGET_CAP = 1 << 30  # score_task without max_target_len: labels are never cut


def load_task_examples(path: str, task_cfg: Any, max_examples: int = 0,
                       seed: int = 42) -> list[Example]:
    """Load and validate a task's test split (``task_cfg``: a :class:`~gere_ds.config.sections.TaskConfig`).

    Rows are read and validated exactly as for training (:func:`gere_ds.data.tasks.read_examples`:
    bad rows name the file, the 1-based line and the field); then ``max_examples > 0`` keeps a
    seeded sample (``random.Random(seed)``) in file order.
    """
    return sample_rows(read_examples(path, task_cfg, what="test", test=True), max_examples, seed)


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
                device: Any = None, layout: str = "packed") -> list[list[float]]:
    """``scores[e][l]`` = mean log p(targets[l] | sources[e]) over the target tokens (all labels
    of an example in one packed row when the forward allows it and ``layout`` is ``packed``;
    ``rows``: one row per (example, label))."""
    items = [Choices(tuple(src), tuple(tuple(t) for t in targets)) for src in sources]
    logprobs = score_continuations(forward, items, batch_size, pad_id(tokenizer), device, layout)
    return [[sum(tokens) / len(tokens) for tokens in per_label] for per_label in logprobs]


def _rows_left(done: list[bool]) -> bool:
    """Whether a row of this batch on any rank is still decoding (one small all-reduce under a
    process group, so ZeRO-3's collective forwards stay in step)."""
    left = not all(done)
    return dist.any_rank_host(left)


def _take(tokens: list[int], done: list[bool], new: list[list[int]], eos: int | None) -> None:
    """Each unfinished row's next token: the end of the row at eos, else one more new token."""
    for r, t in enumerate(tokens):
        if done[r]:
            continue
        if eos is not None and t == eos:
            done[r] = True
            continue
        new[r].append(int(t))


def greedy_decode(forward: ForwardFn, tokenizer: Any, sources: Sequence[Sequence[int]],
                  max_new_tokens: int, batch_size: int = 8, device: Any = None,
                  generate_fn: Optional[GenerateFn] = None,
                  kv_cache: bool = True) -> list[list[int]]:
    """Greedy continuations (eos excluded, at most ``max_new_tokens``) of every source.

    Without ``generate_fn``, at most ``max_new_tokens`` forwards per batch, until every row of
    the batch on every rank ended (see the module doc). A forward that exposes its ``model``
    (gere_ds.model.engine.ModelForward) decodes with the model's KV cache: the left-padded prompts
    once, then one token per row and step, the LM head on the last position only. Any other
    forward (or ``kv_cache=False``) runs the whole right-padded growing sequence every step; one
    with ``at_positions`` runs the LM head on the last tokens only.
    """
    eos = tokenizer.eos_token_id
    pad = pad_id(tokenizer)
    idx = list(range(len(sources)))
    at_positions = getattr(forward, "at_positions", None)
    model = getattr(forward, "model", None) if kv_cache else None

    def run_cached(batch: list[int]) -> list[list[int]]:
        ids, mask = (t.to(device) for t in pad_rows([sources[j] for j in batch], pad, left=True))
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens from 0
        done = [False] * len(batch)
        new: list[list[int]] = [[] for _ in batch]
        cache = None
        for _ in range(max_new_tokens):
            if not _rows_left(done):  # every rank's rows ended: the ranks stop together
                break
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                        use_cache=True, logits_to_keep=1)
            cache, nxt = out.cache, out.logits[:, -1].argmax(-1)
            _take(nxt.tolist(), done, new, eos)
            ids, positions = nxt[:, None], positions[:, -1:] + 1  # ended rows: ignored tokens
            mask = torch.cat([mask, mask.new_ones((len(batch), 1))], dim=1)
        return new

    def run_loop(batch: list[int]) -> list[list[int]]:
        seqs = [list(sources[j]) for j in batch]
        lens = [len(s) for s in seqs]
        width = max(lens) + max_new_tokens
        buf = torch.full((len(batch), width), pad, dtype=torch.long)
        for r, s in enumerate(seqs):
            buf[r, :len(s)] = torch.tensor(s, dtype=torch.long)
        done = [False] * len(batch)
        new: list[list[int]] = [[] for _ in batch]
        for _ in range(max_new_tokens):
            if not _rows_left(done):  # every rank's rows ended: the ranks stop together
                break
            w = max(lens)
            mask = (torch.arange(w)[None, :] < torch.tensor(lens)[:, None]).long()
            if at_positions is not None:  # the LM head on each row's last token only
                flat = torch.tensor([r * w + n - 1 for r, n in enumerate(lens)], device=device)
                nxt = at_positions(buf[:, :w].to(device), mask.to(device), flat).argmax(-1)
            else:
                logits = forward(buf[:, :w].to(device), mask.to(device))
                last = torch.tensor([n - 1 for n in lens], device=logits.device)
                nxt = logits[torch.arange(len(batch), device=logits.device), last].argmax(-1)
            nxt = nxt.tolist()
            for r, t in enumerate(nxt):
                if not done[r] and not (eos is not None and t == eos):
                    buf[r, lens[r]] = t
                    lens[r] += 1
            _take(nxt, done, new, eos)
        return new

    def run_gen(batch: list[int]) -> list[list[int]]:
        ids, mask = (t.to(device) for t in pad_rows([sources[j] for j in batch], pad, left=True))
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

    run = run_gen if generate_fn is not None else run_cached if model is not None else run_loop
    with torch.no_grad():
        return run_sharded(idx, batch_size, run, size=lambda j: len(sources[j]))


def score_task(forward: ForwardFn, tokenizer: Any, examples: Sequence[Example],
               task_cfg: Any, mode: str = "rank", batch_size: int = 8,
               max_source_len: int = 512, max_target_len: Optional[int] = None,
               max_new_tokens: int = 8, generate_fn: Optional[GenerateFn] = None,
               device: Any = None, truncate_source: str = "tail",
               layout: str = "packed") -> TaskScore:
    """Accuracy (percent) of the model on ``examples`` of the task ``task_cfg``.

    ``task_cfg`` needs ``name``, ``instruction`` and ``labels`` (a TaskConfig; ``option_line``
    is read when present). ``mode`` is ``rank`` or ``generate`` (module doc);
    ``truncate_source`` is ``train.truncate_source``; ``layout`` (rank mode) is ``packed`` or
    ``rows`` (:func:`rank_scores`). The result is the same on every rank.
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
        targets = [encode_target(tokenizer, lab, max_target_len or NO_TARGET_CAP) for lab in labels]
        scores = rank_scores(forward, tokenizer, sources, targets, batch_size, device, layout)
        preds = [labels[argmax_first(s)] for s in scores]
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
        self.examples: dict[str, list[Example]] = {}
        for i, task in enumerate(self.tasks):
            if not task.test:
                raise InputError(f"task {task.name!r} has no test file (needed by eval)",
                                 field=f"tasks.{i}.test")
            self.examples[task.name] = load_task_examples(task.test, task,
                                                          eval_cfg.max_examples, seed)
        self.general: list[GeneralData] = [load_general(g, seed) for g in eval_cfg.general]

    def sizes(self) -> dict[str, int]:
        """Examples (questions, texts) of every test set, by name: the units of progress."""
        out = {task.name: len(self.examples[task.name]) for task in self.tasks}
        for data in self.general:
            out[data.cfg.name] = len(data.items)
        return out

    def evaluate(self, forward: ForwardFn, tokenizer: Any, device: Any = None,
                 generate_fn: Optional[GenerateFn] = None,
                 tasks: Optional[Sequence[str]] = None,
                 progress: Optional[Callable[[int], None]] = None,
                 layout: str = "packed") -> EvalRow:
        """Score every task (or only the names in ``tasks``) and every general evaluation;
        ``progress(n)`` after each test set with its number of examples (:meth:`sizes`).
        ``layout="rows"`` scores as before packing (one row per choice, fixed-size batches, full
        logits): the reference the packed default is compared against."""
        c = self.cfg
        sizes = self.sizes()
        done = progress or (lambda n: None)
        row = EvalRow(accuracy={}, general={})
        for task in self.tasks:
            if tasks is not None and task.name not in tasks:
                continue
            s = score_task(forward, tokenizer, self.examples[task.name], task, mode=c.mode,
                           batch_size=c.batch_size, max_source_len=self.max_source_len,
                           max_target_len=self.max_target_len, max_new_tokens=c.max_new_tokens,
                           generate_fn=generate_fn, device=device,
                           truncate_source=self.truncate_source, layout=layout)
            row.accuracy[task.name] = s.accuracy
            row.task_scores[task.name] = s
            done(sizes[task.name])
        for data in self.general:
            g = score_general(forward, tokenizer, data, c.batch_size, self.general_max_len, device,
                              layout)
            row.general[g.name] = g.value
            row.general_scores[g.name] = g
            done(sizes[data.cfg.name])
        return row
