"""General evaluations behind one protocol, in a registry keyed by ``eval.general.<i>.kind``.

A kind loads its test set, scores a model on it, gives the per-example outcomes that paired
statistics need and names the number it reports. Adding a kind means one class with those four
methods and one line in :data:`GENERAL_KINDS`; the suite, the outcomes file and the reports ask
the kind, never its name.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

from gere_ds.errors import InputError
from gere_ds.evaluation.batching import ForwardFn
from gere_ds.evaluation.cloze import load_cloze, score_cloze
from gere_ds.evaluation.general import (
    GeneralScore,
    find_dev_file,
    load_mmlu,
    load_texts,
    score_mmlu,
    score_perplexity,
)

# per series, one value per scored example: bool (right or wrong) or a number
Outcomes = dict[str, list[Any]]


@dataclass
class GeneralData:
    """A general evaluation loaded and validated (see :func:`load_general`)."""

    cfg: Any  # its GeneralEvalConfig
    items: list[Any]  # what is scored, in order: questions or texts
    dev: list[Any] = field(default_factory=list)  # solved examples a prompt may show (k-shot)


class GeneralKind(Protocol):
    """What the suite needs of one kind of general evaluation."""

    name: str  # the config's ``kind``
    metric: str  # what its value is, as tables label it
    paired: bool  # its outcomes are compared example by example between runs (test_sets)

    def load(self, gcfg: Any, seed: int, dev_path: Optional[str]) -> GeneralData: ...

    def score(self, forward: ForwardFn, tokenizer: Any, data: GeneralData, batch_size: int,
              max_len: int, device: Any) -> GeneralScore: ...  # may also take layout=...

    def outcomes(self, score: GeneralScore) -> Outcomes: ...

    def fingerprint(self, data: GeneralData) -> list[Any]: ...


class MultipleChoice:
    """MMLU-style lettered questions, k-shot from a dev file (accuracy in percent)."""

    name, metric, paired = "mmlu", "acc", True

    def load(self, gcfg: Any, seed: int, dev_path: Optional[str]) -> GeneralData:
        rows = load_mmlu(gcfg.path, gcfg.max_examples, seed)
        dev = []
        if gcfg.shots > 0:
            dev_path = dev_path or getattr(gcfg, "dev", "") or find_dev_file(gcfg.path)
            if not dev_path:
                raise InputError(f"{gcfg.shots}-shot needs a dev file (e.g. "
                                 f"{os.path.basename(gcfg.path).replace('test', 'dev')} next to "
                                 f"it)", file=gcfg.path, field="shots")
            dev = load_mmlu(dev_path)
        return GeneralData(cfg=gcfg, items=rows, dev=dev)

    def score(self, forward: ForwardFn, tokenizer: Any, data: GeneralData, batch_size: int,
              max_len: int, device: Any, layout: str = "packed") -> GeneralScore:
        return score_mmlu(forward, tokenizer, data.items, data.dev, data.cfg.shots, batch_size,
                          max_len, device, name=data.cfg.name, layout=layout)

    def outcomes(self, score: GeneralScore) -> Outcomes:
        return {"acc": [bool(c) for c in score.extra["correct"]]}

    def fingerprint(self, data: GeneralData) -> list[Any]:
        return [(q.question, list(q.options), q.answer) for q in data.items]


class Perplexity:
    """Held-out texts: exp of the corpus's token-level mean NLL (lower is better)."""

    name, metric, paired = "perplexity", "ppl", False  # a corpus number, reported as a point

    def load(self, gcfg: Any, seed: int, dev_path: Optional[str]) -> GeneralData:
        return GeneralData(cfg=gcfg, items=load_texts(gcfg.path, gcfg.max_examples, seed))

    def score(self, forward: ForwardFn, tokenizer: Any, data: GeneralData, batch_size: int,
              max_len: int, device: Any, layout: str = "packed") -> GeneralScore:
        return score_perplexity(forward, tokenizer, data.items, batch_size, max_len, device,
                                name=data.cfg.name, layout=layout)

    def outcomes(self, score: GeneralScore) -> Outcomes:
        return {"nll": [float(v) for v in score.extra["text_nll"]],
                "tokens": [int(n) for n in score.extra["text_tokens"]]}

    def fingerprint(self, data: GeneralData) -> list[Any]:
        return list(data.items)


class Cloze:
    """Answer texts scored as continuations, as lm-evaluation-harness does (acc_norm, percent)."""

    name, metric, paired = "cloze", "acc_norm", True

    def load(self, gcfg: Any, seed: int, dev_path: Optional[str]) -> GeneralData:
        return GeneralData(cfg=gcfg, items=load_cloze(gcfg.path, gcfg.max_examples))

    def score(self, forward: ForwardFn, tokenizer: Any, data: GeneralData, batch_size: int,
              max_len: int, device: Any, layout: str = "packed") -> GeneralScore:
        c = score_cloze(forward, tokenizer, data.items, batch_size, max_len, device,
                        name=data.cfg.name, layout=layout)
        return GeneralScore(name=c.name, kind=self.name, value=c.acc_norm, n=c.n,
                            extra={"acc": c.acc, "acc_norm": c.acc_norm, "correct": c.correct,
                                   "correct_norm": c.correct_norm})

    def outcomes(self, score: GeneralScore) -> Outcomes:
        return {"acc_norm": [bool(c) for c in score.extra["correct_norm"]],
                "acc": [bool(c) for c in score.extra["correct"]]}

    def fingerprint(self, data: GeneralData) -> list[Any]:
        return [(q.context, list(q.choices), q.gold) for q in data.items]


GENERAL_KINDS: dict[str, GeneralKind] = {k.name: k for k in (MultipleChoice(), Perplexity(),
                                                                 Cloze())}


def general_kind(name: str, where: str = "") -> GeneralKind:
    """The registered kind ``name``; one line naming the choices if there is none."""
    if name not in GENERAL_KINDS:
        raise InputError(f"unknown general eval kind {name!r}; one of "
                         f"{', '.join(GENERAL_KINDS)}", field=where or None)
    return GENERAL_KINDS[name]


def load_general(gcfg: Any, seed: int = 42, dev_path: Optional[str] = None) -> GeneralData:
    """Load a :class:`~gere_ds.config.sections.GeneralEvalConfig`'s data.

    For ``mmlu`` with ``shots > 0`` the dev file is ``dev_path``, else ``gcfg.dev`` if the config
    has such a field, else :func:`~gere_ds.evaluation.general.find_dev_file` next to ``gcfg.path``.
    """
    return general_kind(gcfg.kind, f"eval.general.{gcfg.name}.kind").load(gcfg, seed, dev_path)


def score_general(forward: ForwardFn, tokenizer: Any, data: GeneralData, batch_size: int = 8,
                  max_len: int = 2048, device: Any = None, layout: str = "packed") -> GeneralScore:
    """Score one loaded general evaluation. ``layout`` (gere_ds.evaluation.batching) reaches the
    kinds whose ``score`` takes it; a kind without the argument scores its one way."""
    kind = general_kind(data.cfg.kind)
    extra = {"layout": layout} if "layout" in inspect.signature(kind.score).parameters else {}
    return kind.score(forward, tokenizer, data, batch_size, max_len, device, **extra)
