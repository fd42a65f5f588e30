"""The chunked LM head and cross-entropy (train.chunked_ce): the values and gradients of the
plain head and CE, chunk boundaries anywhere, and the models it refuses in one line. The whole
step with it (every strategy, 2 ranks against 1 process, ZeRO-3) is checked in
tests/test_train_dist.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gere_ds.errors import InputError
from gere_ds.training.linear_ce import linear_cross_entropy


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_values_and_gradients_are_the_plain_heads(chunk):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(300, 16, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 300, (50,), generator=g)
    scale = torch.rand(50, generator=g, dtype=torch.float64)  # a weighted sum, as the rows give
    plain = F.cross_entropy(hidden @ weight.t(), targets, reduction="none")
    (plain * scale).sum().backward()
    want = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    got = linear_cross_entropy(hidden, weight, targets, chunk)
    (got * scale.float()).sum().backward()
    assert torch.allclose(got.double(), plain, rtol=1e-6, atol=1e-6)
    assert torch.allclose(hidden.grad, want[0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(weight.grad, want[1], rtol=1e-5, atol=1e-6)


def test_bf16_stays_within_the_plain_heads_rounding():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(40, 64, generator=g).to(torch.bfloat16)
    weight = (torch.randn(500, 64, generator=g) * 0.1).to(torch.bfloat16)
    targets = torch.randint(0, 500, (40,), generator=g)
    plain = F.cross_entropy((hidden @ weight.t()).float(), targets, reduction="none")
    got = linear_cross_entropy(hidden, weight, targets, chunk=16)
    assert torch.allclose(got, plain, rtol=1e-2, atol=1e-2)


def test_a_head_it_cannot_replace_is_one_line(tiny_config, tiny_paths):
    from transformers import AutoModelForCausalLM

    from gere_ds.config.loading import load_config
    from gere_ds.training.step import chunked_ce

    model = AutoModelForCausalLM.from_pretrained(tiny_paths["model"])
    model.config.final_logit_softcapping = 30.0

    class Engine:
        module = model

    cfg = load_config(tiny_config("tm", train={"chunked_ce": True}))
    with pytest.raises(InputError) as err:
        chunked_ce(cfg, Engine())
    assert str(err.value) == ("train.chunked_ce: the model cannot run its head in chunks: it "
                              "soft-caps its logits")
    model.config.final_logit_softcapping = None
    assert chunked_ce(cfg, Engine()) is True
    cfg.train.chunked_ce = False
    assert chunked_ce(cfg, Engine()) is False
