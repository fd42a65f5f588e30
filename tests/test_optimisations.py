"""Each performance shortcut computes exactly what the plain computation does.

- chunked, supervised-positions-only CE (gere_ds.training.losses.token_ce_sum) ==
  F.cross_entropy over the full logits: value and gradient, fp32 and bf16 logits, chunk boundaries
  inside a batch;
- the hook-captured final-norm output (gere_ds.model.capture.FinalNormCapture) ==
  output_hidden_states[-1] (tiny Llama: model.norm; tiny GPT-2: transformer.ln_f), and it is the
  very tensor the LM head consumes (so gradients through it are the model's);
- the trainer's path (LM head only on the positions that carry a loss:
  capture.lm_head_on_positions + losses.row_ce_sums) gives the same CE and the same parameter
  gradients as the full-logits path.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gere_ds.training import losses
from gere_ds.data.encode import IGNORE
from gere_ds.model.capture import FinalNormCapture, lm_head_on_positions


def _batch(seed: int, B: int = 4, T: int = 9, V: int = 37):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 3
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :5] = IGNORE  # a task row: prompt positions carry no target
    labels[1, 7:] = IGNORE  # padding
    labels[3, :] = IGNORE  # a row with no target at all
    rows = torch.tensor([True, False, True, True])
    return logits, labels, rows


def _plain_ce(logits, labels, rows):
    shift_labels = labels[:, 1:].masked_fill(~rows[:, None], IGNORE)
    flat = shift_labels.reshape(-1)
    total = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), flat,
                            ignore_index=IGNORE, reduction="sum")
    return total, (flat != IGNORE).sum().float()


@pytest.mark.parametrize("chunk", [1, 3, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_ce_equals_plain_ce_value_and_gradient(monkeypatch, chunk, dtype):
    monkeypatch.setattr(losses, "CE_CHUNK", chunk)
    for seed in range(3):
        base, labels, rows = _batch(seed)
        for select in (rows, ~rows, torch.ones_like(rows)):
            a = base.to(dtype).requires_grad_(True)
            b = base.to(dtype).requires_grad_(True)
            s1, n1 = losses.token_ce_sum(a, labels, select)
            s2, n2 = _plain_ce(b, labels, select)
            assert s1.dtype == torch.float32
            assert n1 == n2
            torch.testing.assert_close(s1, s2, rtol=1e-5, atol=1e-5)
            if n2 == 0:
                continue
            (s1 * 0.7).backward()
            (s2 * 0.7).backward()
            tol = 1e-6 if dtype == torch.float32 else 1e-2
            torch.testing.assert_close(a.grad.float(), b.grad.float(), rtol=tol, atol=tol)


def test_chunked_ce_with_no_target_is_zero_with_zero_gradient():
    logits, labels, rows = _batch(0)
    logits.requires_grad_(True)
    s, n = losses.token_ce_sum(logits, torch.full_like(labels, IGNORE), rows)
    assert float(s) == 0.0 and float(n) == 0.0
    (s + logits.sum() * 0).backward()
    assert torch.count_nonzero(logits.grad) == 0


def _tiny_llama(tied: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval()


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=101, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def _inputs(V: int = 101, B: int = 3, T: int = 11):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 8:] = 0  # right padding
    return ids, mask


@pytest.mark.parametrize("make", [_tiny_llama, _tiny_gpt2], ids=["llama", "gpt2"])
def test_hook_capture_equals_output_hidden_states_last(make):
    model = make()
    capture = FinalNormCapture(model)
    ids, mask = _inputs()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    captured = capture.pop()
    assert torch.equal(captured, out.hidden_states[-1])
    # the captured tensor is what the LM head turns into the logits
    assert torch.equal(model.get_output_embeddings()(captured), out.logits)
    with pytest.raises(RuntimeError):
        capture.pop()  # handed over once
    capture.remove()


def test_hook_capture_carries_the_model_gradient():
    model = _tiny_llama().train()
    capture = FinalNormCapture(model)
    ids, mask = _inputs()
    model(input_ids=ids, attention_mask=mask)
    h = capture.pop()
    (h.float() ** 2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    (out.hidden_states[-1].float() ** 2).mean().backward()
    for n, p in model.named_parameters():
        if p.grad is None:
            assert n not in grads
            continue
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-7)
    capture.remove()


@pytest.mark.parametrize("tied", [True, False])
def test_head_on_supervised_positions_equals_full_logits(tied, monkeypatch):
    """CE from the LM head applied to the gathered supervised positions only == CE from the
    full logits; same parameter gradients (fp32 CE chunks of 5 positions: boundaries inside)."""
    monkeypatch.setattr(losses, "CE_CHUNK", 5)
    model = _tiny_llama(tied).train()
    ids, mask = _inputs()
    labels = ids.masked_fill(mask == 0, IGNORE)
    labels[0, :7] = IGNORE  # a task row: only its answer tokens are targets
    rows = torch.ones(ids.shape[0], dtype=torch.bool)

    out = model(input_ids=ids, attention_mask=mask)
    full_sum, full_n = losses.token_ce_sum(out.logits, labels, rows)
    full_sum.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    pos, targets = losses.supervised_positions(labels)
    assert pos.numel() == int(full_n)
    with lm_head_on_positions(model, pos):
        picked = model(input_ids=ids, attention_mask=mask).logits
    assert picked.shape[-2:] == (pos.numel(), model.config.vocab_size)
    ce, _ = losses.row_ce_sums(picked.reshape(-1, picked.shape[-1]), targets,
                               pos // ids.shape[1], ids.shape[0])
    torch.testing.assert_close(ce.sum(), full_sum, rtol=1e-5, atol=1e-5)
    ce.sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-4, atol=1e-6)
    # the hook is gone afterwards: the next forward gives full logits again
    assert model(input_ids=ids, attention_mask=mask).logits.shape == (*ids.shape,
                                                                      model.config.vocab_size)


def test_lm_head_on_supervised_positions_gives_the_same_loss_and_gradients():
    """The trainer's path (LM head only where a target is) == CE on the full logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from gere_ds.training.losses import IGNORE, row_ce_sums, supervised_positions, token_ce_sum
    from gere_ds.model.capture import lm_head_on_positions

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, tie_word_embeddings=True))
    ids = torch.randint(0, 97, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = ids.clone()
    labels[0, :5] = IGNORE  # a task row: prompt unsupervised
    labels[1, 6:] = IGNORE  # padding
    labels[2, :7] = IGNORE
    replay = torch.tensor([False, True, False])

    def grads_of(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    logits = model(input_ids=ids, attention_mask=mask).logits
    ts, tc = token_ce_sum(logits, labels, ~replay)
    rs, rc = token_ce_sum(logits, labels, replay)
    full = grads_of(ts / tc + rs / rc)
    pos, targets = supervised_positions(labels)
    with lm_head_on_positions(model, pos):
        picked_logits = model(input_ids=ids, attention_mask=mask).logits
    assert picked_logits.shape[-2] == pos.numel() < ids.numel()
    sums, counts = row_ce_sums(picked_logits.reshape(-1, 97), targets, pos // ids.shape[1], 3)
    pts, ptc = sums[~replay].sum(), counts[~replay].sum()
    prs, prc = sums[replay].sum(), counts[replay].sum()
    assert (float(ptc), float(prc)) == (float(tc), float(rc))
    for row in range(3):  # and row by row
        assert torch.allclose(sums[row], token_ce_sum(logits, labels, torch.arange(3) == row)[0],
                              rtol=1e-6)
    assert torch.allclose(pts, ts, rtol=1e-6) and torch.allclose(prs, rs, rtol=1e-6)
    picked = grads_of(pts / ptc + prs / prc)
    for a, b in zip(picked, full):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
