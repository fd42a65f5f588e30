"""Packed multiple-choice rows (gere_ds.evaluation.packing): the layout by hand, and on a tiny real
Llama (sdpa and eager kernels) the same log-probabilities as one unpadded row per choice."""
from __future__ import annotations

import pytest
import torch

from gere_ds.evaluation import packing as P
from gere_ds.evaluation.scoring import rank_scores
from gere_ds.model.engine import model_forward

# contexts of different lengths; continuations of 1, 2 and 3 tokens (a 1-token one adds nothing)
ITEMS = [P.Choices((5, 6, 7), ((8, 9, 10), (11, 12))),
         P.Choices((20, 21, 22, 23, 24, 25), ((30,), (31,), (32, 33))),
         P.Choices((40,), ((41, 42), (43,), (44, 45, 46))),
         P.Choices((50, 51), ((52,), (53,)))]


def test_pack_lays_out_the_docstring_example():
    row = P.pack(P.Choices((1, 2, 3), ((10, 11, 12), (20, 21))))
    assert row.tokens == [1, 2, 3, 10, 11, 20]
    assert row.positions == [0, 1, 2, 3, 4, 3]
    assert row.segments == [0, 0, 0, 1, 1, 2]
    assert row.reads == [[2, 3, 4], [2, 5]]
    ids, allowed, pos = P.tree_batch([row, P.pack(P.Choices((7,), ((8,),)))], pad=0)
    assert ids.tolist() == [[1, 2, 3, 10, 11, 20], [7, 0, 0, 0, 0, 0]]
    a = allowed[0].int().tolist()
    assert a[4] == [1, 1, 1, 1, 1, 0]   # a1 sees the context and a0, not b
    assert a[5] == [1, 1, 1, 0, 0, 1]   # b0 sees the context and itself only
    assert a[1] == [1, 1, 0, 0, 0, 0]   # the context is causal
    assert allowed[1].int().tolist()[3] == [0, 0, 0, 1, 0, 0]  # padding attends only itself
    assert pos[0].tolist() == [0, 1, 2, 3, 4, 3]


def test_pack_refuses_empty_parts():
    with pytest.raises(ValueError):
        P.pack(P.Choices((), ((1,),)))
    with pytest.raises(ValueError):
        P.pack(P.Choices((1,), ((),)))


def _llama(kernel: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg._attn_implementation = kernel
    return LlamaForCausalLM(cfg).eval()


def _brute_force(model, item):
    """Each continuation alone, unpadded: log p of each of its tokens."""
    out = []
    for cont in item.continuations:
        ids = torch.tensor([list(item.context) + list(cont)])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
        n = len(item.context)
        out.append([float(logp[n - 1 + t, tok]) for t, tok in enumerate(cont)])
    return out


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_packed_rows_equal_one_unpadded_row_per_choice(kernel):
    model = _llama(kernel)
    forward = model_forward(model)
    assert hasattr(forward, "tree")
    calls = []

    def counted_tree(ids, allowed, pos):
        calls.append(tuple(ids.shape))
        return forward.tree(ids, allowed, pos)

    class Counted:
        tree = staticmethod(counted_tree)

        def __call__(self, ids, mask):  # never used: every batch is packed
            raise AssertionError("packed scoring ran an unpacked forward")

    got = P.score_continuations(Counted(), ITEMS, batch_size=3, pad=0)
    assert len(calls) == 2 and calls[0][0] == 3  # 4 items, not 10 (item, choice) rows
    for item, lp in zip(ITEMS, got):
        want = _brute_force(model, item)
        for a, b in zip(lp, want):
            assert a == pytest.approx(b, abs=1e-5)


def test_a_forward_without_tree_runs_one_row_per_choice():
    model = _llama("sdpa")
    forward = model_forward(model)
    rows = []

    def plain(ids, mask):
        rows.append(ids.shape[0])
        return forward(ids, mask)

    got = P.score_continuations(plain, ITEMS, batch_size=4, pad=0)
    assert rows == [4, 4, 2]  # the 10 (item, choice) rows
    packed = P.score_continuations(forward, ITEMS, batch_size=4, pad=0)
    for a, b in zip(got, packed):
        for x, y in zip(a, b):
            assert x == pytest.approx(y, abs=1e-5)


def test_a_kernel_without_4d_masks_is_not_packed():
    model = _llama("sdpa")
    model.config._attn_implementation = "flash_attention_2"
    assert not hasattr(model_forward(model), "tree")


def test_rank_scores_are_mean_target_logprobs():
    model = _llama("sdpa")
    sources = [(3, 4, 5, 6), (7, 8)]
    targets = [(10, 2), (11, 12, 2)]
    scores = rank_scores(model_forward(model), _Tok(), sources, targets, batch_size=2)
    for e, src in enumerate(sources):
        want = _brute_force(model, P.Choices(src, targets))
        assert scores[e] == pytest.approx([sum(w) / len(w) for w in want], abs=1e-5)


class _Tok:
    pad_token_id = 0
    eos_token_id = 2
