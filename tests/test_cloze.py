"""Cloze multiple choice (gere_ds.evaluation.cloze): lm-evaluation-harness's scoring, checked
against a brute-force per-option log-likelihood on a tiny real Llama, and 2 ranks == 1 process."""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch

from gere_ds.errors import InputError
from gere_ds.evaluation import cloze as C
from gere_ds.model.engine import model_forward

QUESTIONS = [C.ClozeQuestion("Question: Where do fish live?\nAnswer:", ("in water", "on trees"), 0),
             C.ClozeQuestion("The sky is", ("blue", "a very long and unlikely answer", "green"), 2),
             C.ClozeQuestion("Q: Pick one.\nA: ", ("yes", "no"), 1),   # trailing space moves
             C.ClozeQuestion("A", ("b", "c", "d", "e"), 3),
             C.ClozeQuestion("One more context", ("x y z", "w"), 0)]


@pytest.fixture(scope="module")
def tok(gpt2_tokenizer_dir):
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast.from_pretrained(str(gpt2_tokenizer_dir))


@pytest.fixture(scope="module")
def llama(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def test_encode_pair_splits_the_whole_string_after_the_context(tok):
    ctx, cont = C.encode_pair(tok, "Q: Pick one.\nA: ", " yes")
    whole = tok("Q: Pick one.\nA:  yes", add_special_tokens=False)["input_ids"]
    assert ctx + cont == list(tok("", add_special_tokens=True)["input_ids"]) + whole
    assert tok.decode(cont) == "  yes"           # the context's trailing space moved over
    assert tok.decode(ctx).endswith("A:")


def _brute_force(model, tok, q):
    """Each choice alone, unpadded: sum of log p(continuation token | everything before)."""
    out = []
    for choice in q.choices:
        ctx, cont = C.encode_pair(tok, q.context, " " + choice)
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
        out.append(sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)))
    return out


def test_loglikelihoods_match_brute_force_on_a_tiny_llama(tok, llama):
    ll = C.choice_loglikelihoods(model_forward(llama), tok, QUESTIONS, batch_size=3)
    for q, got in zip(QUESTIONS, ll):
        assert got == pytest.approx(_brute_force(llama, tok, q), abs=1e-4)
    s = C.score_cloze(model_forward(llama), tok, QUESTIONS, batch_size=3)
    want = [max(range(len(v)), key=v.__getitem__) == q.gold for q, v in zip(QUESTIONS, ll)]
    assert s.correct == want and s.acc == pytest.approx(100 * sum(want) / len(want))


def test_acc_and_acc_norm_by_hand():
    # " ab" is 3 bytes, " abcdefghi" 10: sums -6 and -10 -> acc picks the short one,
    # per byte -2.0 and -1.0 -> acc_norm picks the long one
    assert C.predictions([-6.0, -10.0], ["ab", "abcdefghi"]) == (0, 1)
    assert C.predictions([-1.0, -1.0], ["x", "y"]) == (0, 0)          # ties: the first
    assert C.predictions([-9.0, -3.0, -8.0], ["é", "b", "cc"]) == (1, 1)  # bytes, not chars


def test_load_cloze_is_file_order_and_names_bad_rows(tmp_path):
    path = tmp_path / "q.jsonl"
    rows = [{"context": f"c{i}", "choices": ["a", "b"], "gold": i % 2} for i in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [q.context for q in C.load_cloze(str(path), 3)] == ["c0", "c1", "c2"]
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({**rows[1], "gold": 2}) + "\n")
    with pytest.raises(InputError, match=r"q.jsonl:2.*gold"):
        C.load_cloze(str(path))
    path.write_text('{"context": "x"}\n')
    with pytest.raises(InputError, match=r"q.jsonl:1"):
        C.load_cloze(str(path))


def _dist_worker(rank, world, port, tok_dir, out_dir):
    import torch.distributed as dist
    from transformers import GPT2TokenizerFast, LlamaConfig, LlamaForCausalLM

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        tok = GPT2TokenizerFast.from_pretrained(tok_dir)
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)).eval()
        calls = []
        forward = model_forward(model)

        def counted(ids, mask):
            calls.append(ids.shape[0])
            return forward(ids, mask)

        ll = C.choice_loglikelihoods(counted, tok, QUESTIONS, batch_size=2)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
            json.dump({"ll": ll, "forwards": len(calls)}, fh)
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process(tok, llama, gpt2_tokenizer_dir, tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_dist_worker, args=(2, port, str(gpt2_tokenizer_dir), str(tmp_path)), nprocs=2)
    outs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    single = C.choice_loglikelihoods(model_forward(llama), tok, QUESTIONS, batch_size=2)
    # 13 (question, choice) rows: 7 and 6 per rank, batch 2 -> 4 forwards on both ranks
    assert outs[0]["forwards"] == outs[1]["forwards"] == 4
    for got in (outs[0]["ll"], outs[1]["ll"]):
        for a, b in zip(got, single):
            assert a == pytest.approx(b, abs=1e-4)  # other batch shapes: equal up to rounding
