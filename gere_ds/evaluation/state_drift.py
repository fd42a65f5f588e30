"""How far a model's final-norm activation states have moved from the base model's.

GeRe's TM loss holds each element of the final-norm output of the replay texts in the state the
base model gave it: below ``lo = mu - k*sigma`` (-1), between the thresholds (0), or above
``hi = mu + k*sigma`` (+1), per hidden dimension. This module measures, for any model folder,
how many of those states have flipped, from which state to which, and by how much the
activations moved, on the replay texts and on held-out texts. It answers "which states does
fine-tuning flip, and does replay or TM keep them" for rows that have no teacher in the loop
(``none``, ``replay``) as well as for the TM rows.

Everything runs in one plain process in float32 (no kernel rounds by batch shape there), with
thresholds fitted on the base model's outputs of the same replay texts the measurement uses.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from gere_ds.training import losses
from gere_ds.data.collate import pad_rows
from gere_ds.model.capture import FinalNormCapture
from gere_ds.strategies.tm import thresholds_from_sums

STATES = (-1, 0, 1)


@dataclass(frozen=True)
class Thresholds:
    """Per hidden dimension [D], float32."""
    lo: torch.Tensor
    hi: torch.Tensor
    mu: torch.Tensor
    sigma: torch.Tensor


@torch.no_grad()
def final_norm_outputs(model: torch.nn.Module, rows: Sequence[Sequence[int]], pad_id: int,
                       batch_size: int = 8) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(final-norm output [B, T, D] float32, mask [B, T] bool) per batch of token rows, right
    padded (causal attention: padding never changes a real token's output), on the host
    whatever device the model runs on (a base model's outputs are kept for every batch)."""
    device = next(model.parameters()).device
    capture = FinalNormCapture(model)
    try:
        for start in range(0, len(rows), batch_size):
            ids, mask = pad_rows(rows[start:start + batch_size], pad_id)
            model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            yield capture.pop().float().cpu(), mask.bool()
    finally:
        capture.remove()


def fit_thresholds(outputs: Sequence[tuple[torch.Tensor, torch.Tensor]], k: float) -> Thresholds:
    """mu and population sigma per dimension over every real token (float64 sums), as the
    teacher pass computes them."""
    s1 = s2 = None
    count = 0
    for hidden, mask in outputs:
        h = hidden[mask].double()
        s1 = h.sum(0) if s1 is None else s1 + h.sum(0)
        s2 = (h * h).sum(0) if s2 is None else s2 + (h * h).sum(0)
        count += h.shape[0]
    if not count:
        raise ValueError("no tokens to fit thresholds on")
    lo, hi, mu, sigma = thresholds_from_sums(s1, s2, count, k)
    return Thresholds(lo=lo, hi=hi, mu=mu, sigma=sigma)


def tri_states(hidden: torch.Tensor, t: Thresholds) -> torch.Tensor:
    """+1 at or above hi, -1 at or below lo, else 0 (int8): the teacher's rule."""
    return losses.tri_states(hidden, t.lo, t.hi)


def _violation(hidden: torch.Tensor, base_states: torch.Tensor, t: Thresholds) -> torch.Tensor:
    """The TM penalty per element (how far outside the base state's interval), in raw units."""
    return losses.tm_violations(hidden, base_states, t.lo, t.hi, hidden.new_ones(hidden.shape[0]))


@dataclass
class Drift:
    """Counts over the real tokens' elements of one text set."""
    elements: int = 0
    # transitions[a][b]: elements in base state STATES[a] and model state STATES[b]
    transitions: list[list[int]] = field(default_factory=lambda: [[0] * 3 for _ in range(3)])
    violation_sigmas: float = 0.0  # sum over elements of violation / sigma_d
    shift_sigmas: float = 0.0      # sum over elements of |h - h_base| / sigma_d

    def add(self, base: torch.Tensor, hidden: torch.Tensor, t: Thresholds) -> None:
        """base, hidden: [N, D] float32 of the same real tokens."""
        s0, s1 = tri_states(base, t), tri_states(hidden, t)
        pair = (s0.long() + 1) * 3 + (s1.long() + 1)
        counts = torch.bincount(pair.reshape(-1), minlength=9).tolist()
        for a in range(3):
            for b in range(3):
                self.transitions[a][b] += int(counts[a * 3 + b])
        sigma = t.sigma.clamp_min(torch.finfo(torch.float32).tiny)
        self.violation_sigmas += float((_violation(hidden, s0, t) / sigma).double().sum())
        self.shift_sigmas += float(((hidden - base).abs() / sigma).double().sum())
        self.elements += base.numel()

    @property
    def flipped(self) -> int:
        return self.elements - sum(self.transitions[i][i] for i in range(3))

    def summary(self) -> dict[str, Any]:
        """Fractions in percent of all elements (``flipped``, ``from_0``: 0 -> +-1,
        ``to_0``: +-1 -> 0, ``sign``: +-1 -> -+1), the base state shares, the mean violation of
        a flipped element and the mean shift of any element, both in sigma units."""
        n = max(self.elements, 1)
        tr = self.transitions
        return {
            "elements": self.elements,
            "flipped_pct": 100.0 * self.flipped / n,
            "from_0_pct": 100.0 * (tr[1][0] + tr[1][2]) / n,
            "to_0_pct": 100.0 * (tr[0][1] + tr[2][1]) / n,
            "sign_pct": 100.0 * (tr[0][2] + tr[2][0]) / n,
            "base_state_pct": {str(s): 100.0 * sum(tr[i]) / n for i, s in enumerate(STATES)},
            "violation_per_flip_sigma": self.violation_sigmas / max(self.flipped, 1),
            "mean_shift_sigma": self.shift_sigmas / n,
            "transitions": [row[:] for row in tr],
        }


def measure(model: torch.nn.Module, rows: Sequence[Sequence[int]],
            base_outputs: Sequence[tuple[torch.Tensor, torch.Tensor]], t: Thresholds,
            pad_id: int, batch_size: int = 8) -> Drift:
    """The drift of ``model`` from the base outputs of the same rows (same batching)."""
    drift = Drift()
    for (hidden, mask), (base, base_mask) in zip(
            final_norm_outputs(model, rows, pad_id, batch_size), base_outputs):
        if not torch.equal(mask, base_mask):
            raise ValueError("the base outputs were computed on other rows")
        drift.add(base[mask], hidden[mask], t)
    return drift
