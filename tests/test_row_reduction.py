"""The per-row weighing of the loss (docs/method.md, "Weighing rows") against an independent
computation, for several layouts of ranks x rows x accumulation steps, and the TM dead-band."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gere_ds.training.losses import (RowTerms, reduce_global_micro_batch, reduce_per_row,
                                     rounding_step, row_ce_sums, step_means, tm_dead_band,
                                     tm_row_terms, tm_violations)
from reference_losses import tm_reference

V, D, T = 11, 6, 7


def _rows(n_rows: int, replay: set[int], seed: int = 0):
    """Random logits [B, T, V], targets (task rows: the last 2 positions; replay rows: every
    real position), hidden [B, T, D], teacher states, thresholds and a padding mask."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n_rows, T, V, generator=g, dtype=torch.float64)
    hidden = torch.randn(n_rows, T, D, generator=g, dtype=torch.float64)
    states = torch.randint(-1, 2, (n_rows, T, D), generator=g).to(torch.int8)
    lengths = torch.randint(3, T + 1, (n_rows,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    targets = torch.randint(0, V, (n_rows, T), generator=g)
    supervised = mask.bool().clone()
    for r in range(n_rows):
        if r not in replay:  # a task row: CE on its answer (last two real positions) only
            supervised[r, :int(lengths[r]) - 2] = False
    mu = torch.randn(D, generator=g, dtype=torch.float64) * 0.1
    sigma = torch.rand(D, generator=g, dtype=torch.float64) + 0.5
    return logits, hidden, states, mask, targets, supervised, mu - sigma, mu + sigma


def reference_loss(logits, hidden, states, mask, targets, supervised, lo, hi, replay, weight):
    """Written from the definition, row by row: mean over rows of CE_r (+ w_r * TM_r)."""
    losses = []
    for r in range(logits.shape[0]):
        ce = F.cross_entropy(logits[r][supervised[r]], targets[r][supervised[r]])
        if r in replay:
            tm = tm_reference(hidden[r:r + 1], states[r:r + 1], lo, hi, mask[r:r + 1])
            w = (ce / (tm + 1e-8)).detach() if weight == "dy" else weight
            losses.append(ce + w * tm)
        else:
            losses.append(ce)
    return torch.stack(losses).mean()


def row_terms_of(rows, logits, hidden, states, mask, targets, supervised, lo, hi, replay):
    """gere-ds's RowTerms for the rows ``rows`` (one rank's micro-batch)."""
    idx = torch.tensor(rows)
    sup = supervised[idx]
    pos = sup.reshape(-1).nonzero().squeeze(1)
    flat = logits[idx].reshape(-1, V).index_select(0, pos)
    ce_sum, ce_count = row_ce_sums(flat, targets[idx].reshape(-1)[pos], pos // T, len(rows))
    is_replay = torch.tensor([r in replay for r in rows])
    tm_sum, violating, elems, ignored = tm_row_terms(hidden[idx], states[idx], lo, hi, mask[idx])
    zero = torch.zeros(len(rows), dtype=tm_sum.dtype)
    return RowTerms(is_replay, ce_sum, ce_count, torch.where(is_replay, tm_sum, zero),
                    torch.where(is_replay, violating.to(zero.dtype), zero),
                    torch.where(is_replay, elems.to(zero.dtype), zero), ignored,
                    mask[idx].sum().float())


# (ranks, rows per micro-batch, accumulation steps, replay rows of the global batch)
LAYOUTS = [(1, 1, 8, {1, 4, 6}), (2, 2, 2, {2, 5}), (4, 1, 2, {0, 3, 7})]


@pytest.mark.parametrize("weight", [100.0, "dy"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: "x".join(map(str, x[:3])))
def test_per_row_loss_and_gradient_equal_the_definition_on_every_layout(layout, weight):
    """Each rank hands DeepSpeed its local loss; DeepSpeed averages the gradients over ranks and
    accumulation steps. That average must be the definition's value and gradient."""
    world, micro, accum, replay = layout
    B = world * micro * accum
    data = _rows(B, replay)
    logits, hidden = data[0].clone().requires_grad_(True), data[1].clone().requires_grad_(True)
    ref = reference_loss(logits, hidden, *data[2:], replay, weight)
    ref_grads = torch.autograd.grad(ref, (logits, hidden))

    logits2, hidden2 = data[0].clone().requires_grad_(True), data[1].clone().requires_grad_(True)
    total, stats = 0.0, 0.0
    for step in range(accum):
        for rank in range(world):  # rank r's micro-batch at micro-step `step`
            start = (step * world + rank) * micro
            terms = row_terms_of(list(range(start, start + micro)), logits2, hidden2, *data[2:],
                                 replay)
            sl = reduce_per_row(terms, weight, global_rows=B, grad_accum=accum, world=world)
            total = total + sl.local_loss / (world * accum)  # DeepSpeed's mean
            stats = stats + sl.stats
    grads = torch.autograd.grad(total, (logits2, hidden2))
    assert torch.allclose(total, ref, rtol=1e-6)  # the library computes in fp32
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    logged = step_means(stats)
    assert logged["loss"] == pytest.approx(float(ref.detach()), rel=1e-6)
    assert logged["replay_rows"] == len(replay) and logged["task_rows"] == B - len(replay)
    if weight == "dy":  # per row, the term weighs as much as that row's CE
        assert logged["reg_weight"] > 0


def test_a_replay_row_weighs_one_row_of_the_global_batch():
    """At the reference's layout (1 row per rank and micro-step) the TM of one replay row enters
    the step's loss with weight w / B, whatever the other rows hold."""
    B, replay = 8, {3}
    data = _rows(B, replay, seed=5)
    hidden = data[1].clone().requires_grad_(True)
    terms = [row_terms_of([r], data[0], hidden, *data[2:], replay) for r in range(B)]
    total = sum(reduce_per_row(t, 100.0, global_rows=B, grad_accum=B, world=1).local_loss / B
                for t in terms)
    (g,) = torch.autograd.grad(total, hidden)
    tm = data[1][3:4].clone().requires_grad_(True)
    (g_tm,) = torch.autograd.grad(tm_reference(tm, data[2][3:4], data[6], data[7],
                                               data[3][3:4]), tm)
    assert torch.allclose(g[3], 100.0 / B * g_tm[0], rtol=1e-6)
    assert torch.count_nonzero(g[torch.arange(B) != 3]) == 0


def test_dy_makes_a_replay_rows_tm_gradient_that_of_ce_times_log_of_its_violation_sum():
    """With w = dy (CE_r / TM_r, detached) the TM term's gradient is CE_r * grad(log sum v_r):
    the count of violating elements cancels, so the push does not shrink as violations become
    rare, and it grows as their sum shrinks (docs/strategies.md). Checked at a row with many
    violations and at the same row with all but two of its elements moved back inside."""
    B, replay = 2, {1}
    data = _rows(B, replay, seed=7)
    logits, hidden, states, mask, targets, sup, lo, hi = data
    inside = torch.where(states > 0, hi + 0.5, torch.where(states < 0, lo - 0.5, (lo + hi) / 2))
    few = inside.clone()
    out = torch.where(states[1, 0, :2] > 0, lo[:2] - 1.0, hi[:2] + 1.0)
    few[1, 0, :2] = out  # two elements outside their state's interval
    for h0 in (hidden, few):
        h = h0.clone().requires_grad_(True)
        terms = row_terms_of([0, 1], logits, h, states, mask, targets, sup, lo, hi, replay)
        sl = reduce_per_row(terms, "dy", global_rows=B, grad_accum=1, world=1)
        (g,) = torch.autograd.grad(sl.local_loss, h)
        h2 = h0.clone().requires_grad_(True)
        v_sum = tm_violations(h2[1:2], states[1:2], lo, hi, mask[1:2]).sum()
        ce = F.cross_entropy(logits[1][sup[1]], targets[1][sup[1]])
        (g_ref,) = torch.autograd.grad(ce.detach() * torch.log(v_sum) / B, h2)
        assert float(v_sum) > 0
        if h0 is few:
            assert int((tm_violations(h0, states, lo, hi, mask)[1] > 0).sum()) == 2
        assert torch.allclose(g[1], g_ref[1], rtol=1e-5, atol=1e-9)


def test_global_micro_batch_reduction_is_the_old_mix_on_one_process():
    """The documented alternative: 1/2 CE_task + 1/2 CE_replay (token means over the micro-batch)
    + w * TM over all replay elements."""
    replay = {1, 2}
    data = _rows(4, replay, seed=3)
    terms = row_terms_of([0, 1, 2, 3], *data, replay)
    sl = reduce_global_micro_batch(terms, 100.0, grad_accum=1, world=1)
    logits, hidden, states, mask, targets, sup, lo, hi = data
    task = torch.tensor([r not in replay for r in range(4)])
    ce_t = F.cross_entropy(logits[task][sup[task]], targets[task][sup[task]])
    ce_r = F.cross_entropy(logits[~task][sup[~task]], targets[~task][sup[~task]])
    tm = tm_reference(hidden[~task], states[~task], lo, hi, mask[~task])
    assert torch.allclose(sl.local_loss, 0.5 * ce_t + 0.5 * ce_r + 100.0 * tm, rtol=1e-6)


# ----------------------------------------------------------------------------- dead-band


def test_rounding_step_is_the_grid_spacing():
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        x = torch.tensor([0.3, 1.0, 1.7, 2.0, 5.5, 100.0])
        up = torch.nextafter(x.to(dtype).float().to(dtype), torch.tensor(1e9, dtype=dtype))
        assert torch.equal(rounding_step(x.to(dtype), dtype), (up - x.to(dtype)).float()), dtype


def test_guard_keeps_small_violations_in_value_and_count_but_passes_them_no_gradient():
    lo, hi = torch.tensor([-1.0, -1.0]), torch.tensor([1.0, 1.0])
    band = torch.tensor([0.1, 0.1])
    states = torch.tensor([[[1, 0]]], dtype=torch.int8)  # element 0 must stay >= hi
    mask = torch.ones(1, 1, dtype=torch.long)
    small = torch.tensor([[[0.95, 0.0]]], requires_grad=True)  # violates by 0.05 <= band
    large = torch.tensor([[[0.5, 0.0]]], requires_grad=True)  # violates by 0.5 > band
    s, c, e, inside = tm_row_terms(small, states, lo, hi, mask, band)
    assert float(s) == pytest.approx(0.05) and float(c) == 1 and float(inside) == 1
    assert float(e) == 2
    s.sum().backward()
    assert torch.count_nonzero(small.grad) == 0
    s, c, _, inside = tm_row_terms(large, states, lo, hi, mask, band)
    assert float(s) == pytest.approx(0.5) and float(c) == 1 and float(inside) == 0
    s.sum().backward()
    assert large.grad.tolist() == [[[-1.0, 0.0]]]


def _worked_row(band: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One replay row of 100 elements that must stay >= hi = 1: 99 violate by 0.05 and one by
    1.0; CE = 2. Returns the gradient of the row's loss on its hidden at w = dy and w = 100."""
    hidden = torch.full((1, 100, 1), 0.95, dtype=torch.float64)
    hidden[0, 0, 0] = 0.0
    hidden.requires_grad_(True)
    states = torch.ones(1, 100, 1, dtype=torch.int8)
    lo, hi = torch.tensor([-1.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)
    mask = torch.ones(1, 100, dtype=torch.long)
    guard = None if band is None else torch.tensor([band], dtype=torch.float64)
    s, c, e, inside = tm_row_terms(hidden, states, lo, hi, mask, guard)
    ce = torch.tensor([2.0], dtype=torch.float64)
    grads = []
    for weight in ("dy", 100.0):
        terms = RowTerms(torch.tensor([True]), ce * 1, torch.ones(1, dtype=torch.float64), s, c,
                         e, inside, torch.tensor(100.0))
        loss = reduce_per_row(terms, weight, global_rows=1, grad_accum=1, world=1).local_loss
        grads.append(torch.autograd.grad(loss, hidden, retain_graph=True)[0][0, :, 0])
    return grads[0], grads[1]


def test_worked_example_the_guard_gives_a_kept_violation_the_exact_tests_gradient():
    """99 violations of 0.05 and one of 1.0 in one row, CE = 2, a guard of 0.375 (the former
    'auto' band in sigma units). The reference normalises by all 100 violating elements: at
    w = 100 the 1.0 violation's gradient is 100 / 100 = 1.0; at dy, w = 2 / (5.95 / 100) and
    its gradient is w / 100 = 2 / 5.95 = 0.336. The guard keeps both, and cuts the 0.05 ones."""
    exact_dy, exact_100 = _worked_row(None)
    guard_dy, guard_100 = _worked_row(0.375)
    assert float(exact_100[0]) == pytest.approx(-1.0, rel=1e-9)
    assert float(exact_dy[0]) == pytest.approx(-2.0 / 5.95, rel=1e-6)
    assert float(guard_100[0]) == float(exact_100[0])
    assert float(guard_dy[0]) == float(exact_dy[0])
    assert torch.count_nonzero(guard_dy[1:]) == 0 and torch.count_nonzero(guard_100[1:]) == 0
    assert torch.count_nonzero(exact_dy[1:]) == 99


def test_guard_leaves_the_loss_continuous_at_the_band_edge():
    """A violation moving across the band's edge changes neither the row's TM value nor its
    count: the guard cuts gradients, not values."""
    lo, hi = torch.tensor([-1.0]), torch.tensor([1.0])
    band = torch.tensor([0.1])
    states = torch.ones(1, 2, 1, dtype=torch.int8)
    mask = torch.ones(1, 2, dtype=torch.long)
    for just in (0.1 - 1e-6, 0.1 + 1e-6):
        x = torch.tensor([[[1.0 - just], [0.5]]])
        guarded = tm_row_terms(x, states, lo, hi, mask, band)
        exact = tm_row_terms(x, states, lo, hi, mask)
        assert float(guarded[0]) == float(exact[0]) and float(guarded[1]) == float(exact[1])


def _teacher_case(dtype: torch.dtype, seed: int = 0):
    """bf16/fp32 'final-norm outputs' of a teacher, with many elements right at a threshold."""
    g = torch.Generator().manual_seed(seed)
    B, Tn, Dn = 4, 16, 64
    h = torch.randn(B, Tn, Dn, generator=g) * (torch.rand(Dn, generator=g) * 3 + 0.2) + \
        torch.randn(Dn, generator=g)
    h = h.to(dtype)
    flat = h.float().reshape(-1, Dn)
    mu, sigma = flat.mean(0), flat.std(0, unbiased=False)
    lo, hi = mu - sigma, mu + sigma
    # put a quarter of the elements exactly on a threshold's grid neighbourhood
    on_edge = torch.rand(h.shape, generator=g) < 0.25
    h = torch.where(on_edge, hi.expand_as(h).to(dtype), h)
    states = torch.where(h.float() >= hi, 1, torch.where(h.float() <= lo, -1, 0)).to(torch.int8)
    return h, states, lo, hi, sigma, torch.ones(B, Tn, dtype=torch.long), g


# the former 'auto' band, in rounding units: still the measured rounding noise of
# bench/tm_dead_band.py (22-37 bf16 units x sigma, 57-311 fp32 units) with some room
GUARD_UNITS = {torch.bfloat16: 48.0, torch.float32: 1024.0}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_guard_passes_no_gradient_at_the_base_model_under_rounding_perturbations(dtype):
    """Stand-in for kernels that round by shape: the student is the teacher moved by one grid
    step (random sign), and by noise of a few rounding units x sigma from the layers below.
    The reference's test reports violations and pushes on them; with the opt-in guard they
    keep their value (the logged TM is the reference's) but pass no gradient."""
    h, states, lo, hi, sigma, mask, g = _teacher_case(dtype)
    sign = torch.randint(0, 2, h.shape, generator=g) * 2 - 1
    one_step = (h.float() + sign * rounding_step(h, dtype)).to(dtype)
    eps = torch.finfo(dtype).eps
    # the largest differences measured on the real model: 37 (bf16) / 311 (fp32) units x sigma
    measured = {torch.bfloat16: 37.0, torch.float32: 311.0}[dtype]
    noisy = (h.float() + (torch.rand(h.shape, generator=g) * 2 - 1) * measured * eps
             * sigma).to(dtype)
    band = tm_dead_band(lo, hi, sigma, GUARD_UNITS[dtype], dtype)
    for student in (one_step, noisy):
        reference = float(tm_reference(student, states, lo, hi, mask))
        assert reference > 0  # the perturbation bites
        x = student.float().requires_grad_(True)
        s, c, _, inside = tm_row_terms(x, states, lo, hi, mask, band)
        assert float(s.detach().sum() / (c.sum() + 1e-8)) == pytest.approx(reference, rel=1e-5)
        assert float(inside.sum()) == float(c.sum()) > 0  # every violation is inside the band
        s.sum().backward()
        assert torch.count_nonzero(x.grad) == 0


def test_dead_band_is_zero_when_switched_off_and_tiny_in_fp32():
    sigma, lo, hi = torch.ones(3), -torch.ones(3), torch.ones(3)
    assert torch.equal(tm_dead_band(lo, hi, sigma, 0, torch.bfloat16), torch.zeros(3))
    assert float(tm_dead_band(lo, hi, sigma, 1024, torch.float32).max()) < 2e-4
    assert float(tm_dead_band(lo, hi, sigma, 32, torch.bfloat16).max()) == \
        pytest.approx(32 * 2 ** -7 + 2 ** -7)
