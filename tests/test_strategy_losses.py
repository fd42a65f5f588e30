"""The kl / l1 / l2 strategy terms: brute-force values, zero value and gradient at student ==
teacher, padding, the top-k KL approximation against full-vocabulary KL on a tiny model, and the
bad-input checks of the strategy settings."""
from __future__ import annotations

import random

import pytest
import torch

from gere_ds.errors import InputError
from gere_ds.training.losses import (feature_diff_rows, reduce_per_row, teacher_topk,
                                     topk_kl_per_token, topk_kl_rows)
from reference_losses import full_kl_per_token

# The stated tolerance of the top-k approximation (k=64, T=2, a teacher whose top-64 tokens hold
# >= 90% of its T=2 probability): |KL_k - KL_full| / KL_full <= 10% (measured: 2.5%; see
# docs/strategies.md for how the error follows the kept mass).
TOPK_REL_TOL = 0.10


def _logits(seed: int, B: int = 3, T: int = 6, V: int = 40, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, V, generator=g) * 2.0).to(dtype)


def _mask(B: int = 3, T: int = 6) -> torch.Tensor:
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 4:] = 0
    mask[2, 1:] = 0
    return mask


def _topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, V = logits.shape
    ids, logp = teacher_topk(logits.reshape(-1, V), k)
    return ids.reshape(B, T, k), logp.reshape(B, T, k)


# ----------------------------------------------------------------------------- kl


def brute_force_topk_kl(student, ids, logp, mask, temperature):
    """Token by token, from the definition: both distributions restricted to the kept ids and
    renormalised; student from its full-vocabulary log-softmax at T."""
    total, count = 0.0, 0
    B, T, _ = student.shape
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            full_q = torch.log_softmax(student[b, t].double() / temperature, -1)
            q = full_q[ids[b, t].long()]
            q = q - torch.logsumexp(q, -1)
            p = logp[b, t].double() / temperature
            p = p - torch.logsumexp(p, -1)
            total = total + (p.exp() * (p - q)).sum()
            count += 1
    return total, count


def test_topk_kl_equals_brute_force_with_padding():
    teacher, student, mask = _logits(0), _logits(1), _mask()
    ids, logp = _topk(teacher, 7)
    s, c = (x.sum() for x in topk_kl_rows(student, ids, logp, mask, 2.0))
    ref, ref_c = brute_force_topk_kl(student, ids, logp, mask, 2.0)
    assert c.item() == ref_c == int(mask.sum())
    assert torch.allclose(s.double(), ref, rtol=1e-5), (s, ref)
    # padding contributes nothing, whatever the student and teacher hold there
    student2, logp2 = student.clone(), logp.clone()
    student2[0, 4:] += 50.0
    logp2[2, 1:] = -3.0
    s2, _ = (x.sum() for x in topk_kl_rows(student2, ids, logp2, mask, 2.0))
    assert torch.allclose(s2, s)


def test_topk_kl_with_all_ids_kept_is_the_full_kl():
    teacher, student = _logits(2), _logits(3)
    ids, logp = _topk(teacher, teacher.shape[-1])
    for temperature in (1.0, 2.0, 3.5):
        ours = topk_kl_per_token(student, ids, logp, temperature)
        full = full_kl_per_token(student, teacher, temperature)
        assert torch.allclose(ours, full, rtol=1e-5, atol=1e-6)
    # and the reference's formula: kl_div(log q, log p, log_target=True).sum(-1)
    ref = torch.nn.functional.kl_div(torch.log_softmax(student / 2, -1),
                                     torch.log_softmax(teacher / 2, -1), reduction="none",
                                     log_target=True).sum(-1)
    assert torch.allclose(full_kl_per_token(student, teacher, 2.0), ref, rtol=1e-5, atol=1e-6)


def test_topk_kl_gradient_is_q_minus_p_over_t_on_the_kept_ids():
    teacher, mask = _logits(4), _mask()
    student = _logits(5).requires_grad_(True)
    ids, logp = _topk(teacher, 5)
    T = 2.0
    s, _ = (x.sum() for x in topk_kl_rows(student, ids, logp, mask, T))
    s.backward()
    with torch.no_grad():
        z = student.gather(-1, ids.long()) / T
        q = torch.softmax(z, -1)
        p = torch.softmax(logp / T, -1)
        expected = torch.zeros_like(student).scatter(-1, ids.long(), (q - p) / T)
        expected = expected * mask[..., None]
    assert torch.allclose(student.grad, expected, atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_topk_kl_zero_with_zero_gradient_when_student_is_teacher(dtype, tol):
    teacher, mask = _logits(6, dtype=dtype), _mask()
    ids, logp = _topk(teacher, 8)
    if dtype == torch.float64:  # keep the teacher's log-probs in float64 too
        logp = torch.log_softmax(teacher, -1).gather(-1, ids.long())
    student = teacher.clone().requires_grad_(True)
    s, c = (x.sum() for x in topk_kl_rows(student, ids, logp, mask, 2.0))
    (s / c).backward()
    assert abs(float((s / c).detach())) <= tol
    assert float(student.grad.abs().max()) <= tol
    # the cache keeps float16 log-probs: the value at step 0 is then rounding-sized, not 0
    s16, c16 = (x.sum() for x in topk_kl_rows(teacher.float(), ids, logp.half(), mask, 2.0))
    assert 0 <= float(s16 / c16) < 1e-5


# ----------------------------------------------------------------------------- l1 / l2


def _features(seed: int, B: int = 3, T: int = 6, D: int = 9):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, D, generator=g)


@pytest.mark.parametrize("p", [1, 2])
def test_feature_loss_equals_brute_force_with_padding(p):
    h, teacher, mask = _features(0), _features(1).to(torch.bfloat16), _mask()
    s, c = (x.sum() for x in feature_diff_rows(h, teacher, mask, p))
    total, count = 0.0, 0
    for b in range(h.shape[0]):
        for t in range(h.shape[1]):
            if mask[b, t]:
                for d in range(h.shape[2]):
                    diff = float(h[b, t, d]) - float(teacher[b, t, d])
                    total += abs(diff) if p == 1 else diff * diff
                    count += 1
    assert c.item() == count
    assert abs(s.item() - total) <= 1e-4 * max(total, 1.0)
    h2 = h.clone()
    h2[2, 1:] += 100.0  # padding
    assert torch.allclose(feature_diff_rows(h2, teacher, mask, p)[0].sum(), s)


@pytest.mark.parametrize("p", [1, 2])
def test_feature_loss_zero_with_zero_gradient_when_student_is_teacher(p):
    teacher = _features(2).to(torch.bfloat16)
    mask = _mask()
    h = teacher.float().clone().requires_grad_(True)  # fp32 student == bf16 teacher
    s, c = (x.sum() for x in feature_diff_rows(h, teacher, mask, p))
    (s / c).backward()
    assert s.item() == 0.0
    assert torch.count_nonzero(h.grad) == 0


@pytest.mark.parametrize("p", [1, 2])
def test_feature_loss_gradient(p):
    h = _features(3).requires_grad_(True)
    teacher, mask = _features(4).to(torch.bfloat16), _mask()
    s, c = (x.sum() for x in feature_diff_rows(h, teacher, mask, p))
    (s / c).backward()
    diff = h.detach() - teacher.float()
    expected = (diff.sign() if p == 1 else 2 * diff) * mask[..., None] / c
    assert torch.allclose(h.grad, expected, atol=1e-7)


def test_per_row_reduction_with_a_strategy_term():
    """kl/l1/l2 fit RowTerms.reg_*: REG_r = reg_sum / reg_count per row; dy weighs each replay
    row's REG like that row's CE."""
    from gere_ds.training.losses import RowTerms, step_means

    h = _features(5).requires_grad_(True)
    teacher, mask = _features(6).to(torch.bfloat16), _mask()
    s, c = feature_diff_rows(h, teacher, mask, 2)
    is_replay = torch.tensor([False, True, True])
    zero = torch.zeros(3)
    terms = RowTerms(is_replay, torch.tensor([6.0, 20.0, 9.0]), torch.tensor([3.0, 10.0, 3.0]),
                     torch.where(is_replay, s, zero), torch.where(is_replay, c, zero),
                     torch.where(is_replay, c, zero), zero, torch.tensor(15.0))
    reg = (s / c).detach()
    out = reduce_per_row(terms, 100.0, global_rows=3, grad_accum=1, world=1)
    want = (2.0 + (2.0 + 100.0 * reg[1]) + (3.0 + 100.0 * reg[2])) / 3
    assert torch.allclose(out.local_loss, want, rtol=1e-6)
    dy = reduce_per_row(terms, "dy", global_rows=3, grad_accum=1, world=1)
    assert torch.allclose(dy.local_loss, torch.tensor((2.0 + 4.0 + 6.0) / 3), rtol=1e-5)
    logged = step_means(dy.stats)
    assert logged["reg"] == pytest.approx(float(reg[1:].mean()), rel=1e-5)
    assert logged["reg_weight"] == pytest.approx(float((torch.tensor([2.0, 3.0]) / reg[1:]).mean()),
                                                 rel=1e-5)


# ----------------------------------------------------------------------------- tiny model


@pytest.fixture(scope="module")
def tiny_teacher_student(gpt2_tokenizer_dir):
    """A tiny Llama trained briefly on template sentences (the teacher), and the 'trained'
    model = the teacher with every weight perturbed; their logits on held-out sentences."""
    from transformers import GPT2TokenizerFast, LlamaConfig, LlamaForCausalLM

    from gere_assets.tiny import _sentence

    torch.manual_seed(0)
    tok = GPT2TokenizerFast.from_pretrained(str(gpt2_tokenizer_dir))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=True)
    teacher = LlamaForCausalLM(cfg)
    rng = random.Random(0)
    ids = [tok(" ".join(_sentence(rng) for _ in range(3)))["input_ids"] for _ in range(72)]
    width = min(len(i) for i in ids)
    data = torch.tensor([i[:width] for i in ids])
    train, held_out = data[:64], data[64:]
    opt = torch.optim.Adam(teacher.parameters(), lr=5e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(15):
        b = train[torch.randint(0, len(train), (4,), generator=g)]
        loss = teacher(input_ids=b, labels=b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    teacher.eval()
    with torch.no_grad():
        # sharpen: 15 steps leave a flat tail over the 50k unused GPT-2 tokens; a pretrained LM
        # keeps most of its mass on few tokens (here the top 64 hold ~96% at T=2)
        teacher.model.norm.weight.mul_(2.0)
        student = LlamaForCausalLM(cfg)
        student.load_state_dict(teacher.state_dict())
        for p in student.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
        return teacher(input_ids=held_out).logits, student(input_ids=held_out).logits


def test_topk_kl_close_to_full_kl_on_a_tiny_model(tiny_teacher_student):
    zt, zs = tiny_teacher_student
    T, k = 2.0, 64
    mask = torch.ones(zt.shape[:2], dtype=torch.long)
    full = full_kl_per_token(zs, zt, T).mean()
    ids, logp = _topk(zt, k)
    s, c = (x.sum() for x in topk_kl_rows(zs, ids, logp.half(), mask, T))  # float16 as in the cache
    approx = s / c
    kept = torch.softmax(zt / T, -1).gather(-1, ids.long()).sum(-1).mean()
    rel = float((approx - full).abs() / full)
    # the gradients w.r.t. the student logits point the same way
    zs1, zs2 = zs.clone().requires_grad_(True), zs.clone().requires_grad_(True)
    topk_kl_per_token(zs1, ids, logp.half(), T).mean().backward()
    full_kl_per_token(zs2, zt, T).mean().backward()
    cos = float(torch.nn.functional.cosine_similarity(zs1.grad.flatten(), zs2.grad.flatten(), 0))
    print(f"\ntop-{k} KL at T={T}: {float(approx):.6f} vs full {float(full):.6f}: relative "
          f"error {rel:.2%}; teacher mass kept {float(kept):.3f}; gradient cosine {cos:.3f}")
    assert float(kept) >= 0.90
    assert rel <= TOPK_REL_TOL
    assert cos >= 0.9
    # more kept ids, smaller error; all ids kept: exact
    ids_all, logp_all = _topk(zt, zt.shape[-1])
    exact = topk_kl_per_token(zs, ids_all, logp_all, T).mean()
    assert torch.allclose(exact, full, rtol=1e-4)


# ----------------------------------------------------------------------------- bad input


def test_kl_topk_larger_than_the_vocabulary_is_one_line():
    from gere_ds.config.sections import ReplayConfig
    from gere_ds.strategies import STRATEGIES

    STRATEGIES["kl"](ReplayConfig(kl_topk=64)).check_model(64, "m")
    with pytest.raises(InputError) as err:
        STRATEGIES["kl"](ReplayConfig(kl_topk=65)).check_model(64, "models/tiny")
    msg = str(err.value)
    assert "\n" not in msg and "replay.kl_topk" in msg and "64 tokens" in msg


@pytest.mark.parametrize("override,needle", [
    ("replay.strategy=kll", "unknown strategy 'kll' (did you mean 'kl'?)"),
    ("replay.strategy=l3", "unknown strategy 'l3'"),
    ("replay.weight=heavy", "must be a number or 'dy'"),
    ("replay.kl_topk=0", "replay.kl_topk: must be >= 1"),
    ("replay.kl_temperature=0", "replay.kl_temperature: must be > 0"),
])
def test_bad_strategy_settings_stop_with_one_line(tiny_config, override, needle):
    from gere_ds.config.loading import load_config

    with pytest.raises(InputError) as err:
        load_config(tiny_config("kl"), [override])
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("strategy", ["kl", "l1", "l2"])
def test_per_batch_not_below_the_global_batch_stops(tiny_config, strategy):
    from gere_ds.config.loading import load_config
    from gere_ds.training.inputs import validate_inputs

    # tiny config: micro 2 x accum 2 x 2 ranks = global batch 8
    cfg = load_config(tiny_config(strategy), ["replay.per_batch=8"])
    with pytest.raises(InputError) as err:
        validate_inputs(cfg, 2)
    assert "replay.per_batch" in str(err.value) and "global batch (8)" in str(err.value)
    validate_inputs(load_config(tiny_config(strategy), ["replay.per_batch=7"]), 2)


@pytest.mark.parametrize("weight", ["1", "100", "dy", "2.5e1"])
def test_weight_number_or_dy_is_accepted(tiny_config, weight):
    from gere_ds.config.loading import load_config

    cfg = load_config(tiny_config("l2"), [f"replay.weight={weight}"])
    assert cfg.replay.weight == ("dy" if weight == "dy" else float(weight))


# ----------------------------------------------------------------------------- ReplayTerm objects


def test_every_strategy_is_one_replay_term():
    from gere_ds.config.sections import ReplayConfig
    from gere_ds.strategies import STRATEGIES

    assert list(STRATEGIES) == ["none", "replay", "tm", "kl", "l1", "l2"]
    assert {n: c.teacher_kind for n, c in STRATEGIES.items()} == {
        "none": None, "replay": None, "tm": "states", "kl": "topk", "l1": "features",
        "l2": "features"}
    assert [n for n, c in STRATEGIES.items() if c.uses_replay] == ["replay", "tm", "kl", "l1",
                                                                  "l2"]
    assert [n for n, c in STRATEGIES.items() if c.needs_full_logits] == ["kl"]
    replay = ReplayConfig(weight=7.0, threshold_k=1.5, kl_topk=8)
    means = {"reg": 0.5, "reg_weight": 7.0, "violation_frac": 0.25, "ignored_frac": 0.125}
    logged = {n: c(replay).log_values(means) for n, c in STRATEGIES.items()}
    assert logged["none"] == logged["replay"] == {}
    for n in ("kl", "l1", "l2"):
        assert logged[n] == {f"train/{n}": 0.5, f"train/{n}_weight": 7.0}
    assert logged["tm"] == {"train/tm": 0.5, "train/tm_weight": 7.0,
                            "train/tm_violation_frac": 0.25, "train/tm_ignored_frac": 0.125}
    assert "train/l2_weight" not in STRATEGIES["l2"](replay).log_values({"reg": 0.0})
    assert STRATEGIES["tm"](replay).teacher_settings() == {"threshold_k": 1.5}
    assert STRATEGIES["kl"](replay).teacher_settings() == {"kl_topk": 8}
    assert STRATEGIES["l1"](replay).teacher_settings() == {}
    assert all(c(replay).weight == 7.0 for c in STRATEGIES.values())


@pytest.mark.parametrize("name,p", [("l1", 1), ("l2", 2)])
def test_feature_terms_read_their_rows_of_the_micro_batch(name, p):
    """local_sums picks the replay rows of the batch and the teacher's features of their
    samples: the same numbers as feature_diff_rows on those rows."""
    from gere_ds.config.sections import ReplayConfig
    from gere_ds.strategies import STRATEGIES, ReplayRows

    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(4, 5, 6, generator=g)
    feats = {10: torch.randn(5, 6, generator=g), 11: torch.randn(3, 6, generator=g)}

    class Features:
        def batch(self, ids, width):
            out = torch.zeros(len(ids), width, 6)
            for b, sid in enumerate(ids):
                out[b, :len(feats[sid])] = feats[sid][:width]
            return out

    term = STRATEGIES[name](ReplayConfig())
    term.attach(Features())
    rows = torch.tensor([1, 3])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    s, c, e, ignored = term.local_sums(ReplayRows(rows, [10, 11], mask, 5), None, hidden)
    want_s, want_c = feature_diff_rows(hidden[rows], Features().batch([10, 11], 5), mask, p)
    assert torch.equal(s, want_s) and torch.equal(c, want_c) and torch.equal(e, want_c)
    assert torch.equal(ignored, torch.zeros(2))
