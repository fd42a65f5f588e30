"""gere-ds's own test of a non-finite optimizer step, and the skip of that step.

DeepSpeed's ZeRO optimizers skip a step on overflow reliably only in fp16; in bf16 whether a
non-finite gradient norm stops the update depends on the stage, the clipping setting and the
DeepSpeed version. So at each accumulation boundary every rank tests its own share (this
optimizer step's micro-step losses and its gradient partition), one all-reduce makes the verdict
common, and a bad step goes through DeepSpeed's own overflow path: gradients dropped, no
optimizer update, ``was_step_applied()`` False, the engine's counters advanced as for any step.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from gere_ds.runtime import dist


def _gradient_tensors(engine: Any) -> list[torch.Tensor]:
    """This rank's gradients as the optimizer will read them: the ZeRO partitions (stages 1-3,
    offloaded or not), else the module's own ``.grad``."""
    opt = engine.optimizer
    found: list[torch.Tensor] = []
    for grads in (getattr(opt, "averaged_gradients", None) or {}).values():
        found += [g for g in (grads or []) if torch.is_tensor(g)]
    for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):
        found += [p.grad for p in getattr(opt, name, None) or [] if getattr(p, "grad", None)
                  is not None]
    if not found:
        found = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return found


def local_nonfinite(engine: Any, losses_bad: torch.Tensor | None) -> torch.Tensor:
    """1.0 on this rank's device when a loss of this step or a gradient here is not finite
    (no host sync)."""
    device = dist.device()
    bad = torch.zeros((), dtype=torch.float32, device=device)
    if losses_bad is not None:
        bad = bad + losses_bad.to(device=device, dtype=torch.float32)
    grads = _gradient_tensors(engine)
    if grads:
        norms = torch.stack([n.float() for n in torch._foreach_norm(grads)]).to(device)
        bad = bad + (~torch.isfinite(norms)).any().float()
    return (bad > 0).float()


def step_is_nonfinite(engine: Any, losses_bad: torch.Tensor | None) -> bool:
    """The common verdict of every rank (a collective: every rank calls it at the same
    accumulation boundary)."""
    return bool(dist.all_reduce_max(local_nonfinite(engine, losses_bad).reshape(1)).item() > 0)


@contextlib.contextmanager
def skipped_step(engine: Any) -> Iterator[None]:
    """Within this block the optimizer's next ``step`` takes DeepSpeed's overflow path."""
    opt = engine.optimizer
    saved: dict[str, Any] = {}

    def patch(name: str, value: Any) -> None:
        saved[name] = opt.__dict__.get(name, _MISSING)
        setattr(opt, name, value)

    if hasattr(opt, "_loss_scale_update_and_overflow_cleanup"):  # ZeRO-3
        def overflow(update_scale: bool = True) -> bool:
            opt.overflow = True
            return opt._loss_scale_update_and_overflow_cleanup() if update_scale else True

        patch("_overflow_check_and_loss_scale_update", overflow)
    elif hasattr(opt, "check_grad_overflow"):  # ZeRO-1/2
        patch("check_grad_overflow", True)
        patch("check_overflow", lambda partition_gradients=True: setattr(opt, "overflow", True))
    else:  # a plain optimizer: drop the gradients, report the overflow to the engine
        def step(closure: Any = None) -> None:
            opt.zero_grad(set_to_none=True)
            opt.overflow = True

        patch("overflow", False)
        patch("step", step)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is _MISSING:
                opt.__dict__.pop(name, None)
            else:
                setattr(opt, name, value)


_MISSING = object()
