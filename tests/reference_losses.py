"""Reference implementations the tests compare the library's loss terms against."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gere_ds.training.losses import TM_EPS, tm_violations


def tm_reference(hidden: torch.Tensor, states: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
    """The reference's TM of one micro-batch: sum(v) / (count_nonzero(v) + 1e-8), no dead-band."""
    v = tm_violations(hidden, states, lo, hi, mask)
    return v.sum() / (torch.count_nonzero(v) + TM_EPS)


def full_kl_per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """Exact KL(teacher || student) at temperature T over the whole vocabulary, per position
    (the reference's ``calc_kl`` before its mean)."""
    t = float(temperature)

    def fp32(x: torch.Tensor) -> torch.Tensor:
        return x if x.dtype == torch.float64 else x.float()

    log_q = F.log_softmax(fp32(student_logits) / t, dim=-1)
    log_p = F.log_softmax(fp32(teacher_logits) / t, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)
