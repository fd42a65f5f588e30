"""General evaluations behind one protocol (gere_ds.evaluation.general_kinds): every registered
kind loads, scores and writes per-example outcomes, and a kind registered outside the package is
scored and recorded with no edit to the suite or the outcomes file."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import pytest
import torch

from gere_ds.errors import InputError
from gere_ds.evaluation import general_kinds as K
from gere_ds.evaluation.general import GeneralScore
from gere_ds.evaluation.outcomes import record_outcomes
from gere_ds.evaluation.scoring import EvalSuite


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# One small test set per registered kind: a new kind must bring one (test below).
SETS = {
    "mmlu": lambda d: _jsonl(d / "mc.jsonl", [
        {"question": "1 + 1?", "options": ["2", "3"], "answer": "A"},
        {"question": "2 + 2?", "options": ["3", "4", "5"], "answer": "B"},
        {"question": "3 + 3?", "options": ["6", "7"], "answer": 0}]),
    "perplexity": lambda d: _jsonl(d / "texts.jsonl", [
        {"text": "A held-out sentence about rivers."}, {"text": "Short."},
        {"text": "Another, somewhat longer held-out sentence about mountains."}]),
    "cloze": lambda d: _jsonl(d / "cloze.jsonl", [
        {"context": "The sky is", "choices": ["blue", "a carrot"], "gold": 0},
        {"context": "Fish live in", "choices": ["trees", "water", "clouds"], "gold": 1}]),
}


@pytest.fixture(scope="module")
def tok(gpt2_tokenizer_dir):
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast.from_pretrained(str(gpt2_tokenizer_dir))


def _forward(vocab: int):
    """Logits that depend on the input ids, so answers differ between questions."""
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(64, vocab, generator=gen)

    def forward(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return table[ids % 64]
    return forward


def _suite(tmp_path: Path, kinds: list[str]) -> EvalSuite:
    general = [SimpleNamespace(name=f"{k}_set", kind=k, path=SETS[k](tmp_path), shots=0,
                               max_examples=0) for k in kinds]
    cfg = SimpleNamespace(mode="rank", max_examples=0, batch_size=2, max_new_tokens=4,
                          general=general)
    return EvalSuite([], cfg, seed=0)


def test_every_registered_kind_has_a_test_set_here():
    assert set(SETS) == set(K.GENERAL_KINDS)


def test_every_kind_writes_its_outcomes(tmp_path, tok):
    suite = _suite(tmp_path, list(K.GENERAL_KINDS))
    row = suite.evaluate(_forward(len(tok)), tok)
    record_outcomes(tmp_path, 0, row, suite)
    doc = json.loads((tmp_path / "outcomes.json").read_text())
    [written] = doc["rows"]
    for data in suite.general:
        name, kind = data.cfg.name, K.general_kind(data.cfg.kind)
        series = kind.outcomes(row.general_scores[name])
        assert series, f"{data.cfg.kind} gives no outcomes"
        for key, values in series.items():
            assert len(values) == len(data.items) == row.general_scores[name].n
            stored = written["general" if key == "acc_norm" else f"general_{key}"][name]
            if all(isinstance(v, bool) for v in values):
                assert stored == "".join("1" if v else "0" for v in values)
            else:
                assert stored == pytest.approx(values)
        assert (name in doc["test_sets"]) == kind.paired


def test_outcomes_agree_with_the_reported_value(tmp_path, tok):
    suite = _suite(tmp_path, list(K.GENERAL_KINDS))
    row = suite.evaluate(_forward(len(tok)), tok)
    mc, ppl, cloze = (row.general_scores[f"{k}_set"] for k in ("mmlu", "perplexity", "cloze"))
    acc = K.general_kind("mmlu").outcomes(mc)["acc"]
    assert mc.value == pytest.approx(100 * sum(acc) / len(acc))
    per_text = K.general_kind("perplexity").outcomes(ppl)
    assert math.exp(sum(per_text["nll"]) / sum(per_text["tokens"])) == pytest.approx(ppl.value)
    norm = K.general_kind("cloze").outcomes(cloze)["acc_norm"]
    assert cloze.value == pytest.approx(100 * sum(norm) / len(norm))


def test_unknown_kind_is_one_line_naming_the_kinds(tmp_path):
    gcfg = SimpleNamespace(name="x", kind="mmlu_cloze", path=str(tmp_path / "x.jsonl"), shots=0,
                           max_examples=0)
    with pytest.raises(InputError, match="eval.general.x.kind: unknown general eval kind "
                                         "'mmlu_cloze'; one of mmlu, perplexity, cloze"):
        K.load_general(gcfg)


@dataclass
class LongWords:
    """A kind defined here only: a text is 'right' when its mean word is over 4 letters."""

    name: str = "long_words"
    metric: str = "share"
    paired: bool = True

    def load(self, gcfg: Any, seed: int, dev_path: Optional[str]) -> K.GeneralData:
        texts = [json.loads(line)["text"] for line in Path(gcfg.path).read_text().splitlines()]
        return K.GeneralData(cfg=gcfg, items=texts)

    def score(self, forward, tokenizer, data, batch_size, max_len, device) -> GeneralScore:
        long = [sum(map(len, t.split())) / len(t.split()) > 4 for t in data.items]
        return GeneralScore(data.cfg.name, self.name, 100.0 * sum(long) / len(long), len(long),
                            {"long": long})

    def outcomes(self, score: GeneralScore) -> K.Outcomes:
        return {"long": [bool(v) for v in score.extra["long"]]}

    def fingerprint(self, data: K.GeneralData) -> list[Any]:
        return list(data.items)


def test_a_kind_registered_from_outside_is_scored_and_recorded(tmp_path, monkeypatch):
    monkeypatch.setitem(K.GENERAL_KINDS, "long_words", LongWords())
    path = _jsonl(tmp_path / "words.jsonl", [{"text": "tiny cat"}, {"text": "enormous elephants"}])
    cfg = SimpleNamespace(mode="rank", max_examples=0, batch_size=2, max_new_tokens=4, general=[
        SimpleNamespace(name="words", kind="long_words", path=path, shots=0, max_examples=0)])
    suite = EvalSuite([], cfg, seed=0)
    row = suite.evaluate(lambda ids, mask: None, tokenizer=None)
    assert suite.sizes() == {"words": 2} and row.general == {"words": 50.0}
    record_outcomes(tmp_path, 0, row, suite)
    doc = json.loads((tmp_path / "outcomes.json").read_text())
    assert doc["rows"][0]["general_long"] == {"words": "01"} and "words" in doc["test_sets"]
