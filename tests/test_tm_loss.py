"""The TM loss against a brute-force elementwise reference (docs/method.md table)."""
from __future__ import annotations

import torch

from gere_ds.training.losses import tm_row_terms, tm_violations
from reference_losses import tm_reference


def brute_force_tm(h, s, lo, hi, mask):
    """Element by element, exactly as the table reads; returns sum/(count_nonzero+1e-8)."""
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    B, T, D = h.shape
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            for d in range(D):
                x, state = h[b, t, d], int(s[b, t, d])
                if state == -1:
                    v = torch.relu(x - lo[d])
                elif state == 1:
                    v = torch.relu(hi[d] - x)
                else:
                    v = torch.relu(x - hi[d]) + torch.relu(lo[d] - x)
                total = total + v
                count += int(v.item() != 0)
    return total / (count + 1e-8)


def _case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, T, D = 3, 5, 7
    h = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    s = torch.randint(-1, 2, (B, T, D), generator=g).to(torch.int8)
    mu = torch.randn(D, generator=g, dtype=torch.float64) * 0.1
    sigma = torch.rand(D, generator=g, dtype=torch.float64) + 0.5
    lo, hi = mu - sigma, mu + sigma
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 3:] = 0  # padding
    mask[2, 1:] = 0
    return h, s, lo, hi, mask


def test_tm_equals_brute_force_with_padding():
    h, s, lo, hi, mask = _case()
    ref = brute_force_tm(h, s, lo, hi, mask)
    ours = tm_reference(h.double(), s, lo, hi, mask)
    # tm_violations works in fp32 (as on real hidden states)
    assert torch.allclose(ours.double(), ref, rtol=1e-5), (ours, ref)
    # padding rows contribute nothing, whatever their hidden values
    h2 = h.clone()
    h2[0, 3:] += 100.0
    assert torch.allclose(tm_reference(h2, s, lo, hi, mask), ours)


def test_tm_gradient_matches_autograd_of_reference():
    h, s, lo, hi, mask = _case(1)
    h1 = h.clone().float().requires_grad_(True)
    h2 = h.clone().requires_grad_(True)
    tm_reference(h1, s, lo.float(), hi.float(), mask).backward()
    brute_force_tm(h2, s, lo, hi, mask).backward()
    assert torch.allclose(h1.grad.double(), h2.grad, rtol=1e-4, atol=1e-7)


def test_tm_zero_with_zero_gradient_when_student_is_teacher():
    h, _, lo, hi, mask = _case(2)
    h = h.float()
    states = (h >= hi.float()).to(torch.int8) - (h <= lo.float()).to(torch.int8)
    x = h.clone().requires_grad_(True)
    value = tm_reference(x, states, lo.float(), hi.float(), mask)
    value.backward()
    assert value.item() == 0.0
    assert torch.count_nonzero(x.grad) == 0


def test_row_terms_sum_to_the_reference_ratio():
    """Per-row sums and violating counts add up to the reference's sum(v) / count_nonzero(v)."""
    h, s, lo, hi, mask = _case(3)
    total, count, elems, ignored = tm_row_terms(h.float(), s, lo.float(), hi.float(), mask)
    ref = tm_reference(h.float(), s, lo.float(), hi.float(), mask)
    assert torch.allclose(total.sum() / (count.sum() + 1e-8), ref, rtol=1e-6)
    assert torch.equal(elems, mask.sum(1).float() * h.shape[-1])
    assert float(ignored.sum()) == 0  # no dead-band given


def test_violations_are_masked_and_nonnegative():
    h, s, lo, hi, mask = _case(4)
    v = tm_violations(h, s, lo, hi, mask)
    assert (v >= 0).all()
    assert (v[mask == 0] == 0).all()
