"""Launched by tests under `deepspeed --num_gpus {1,2}`: teacher thresholds, then one global
micro-batch's loss value and full parameter gradients, saved by rank 0 for comparison.

The global batch is fixed (global_batch.GLOBAL_ROWS, split over the ranks), so 1 process sees
exactly the union of the 2 ranks' micro-batches.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from deepspeed.utils import safe_get_full_grad  # noqa: E402

from gere_ds import dist  # noqa: E402
from gere_ds.capture import lm_head_on_positions  # noqa: E402
from gere_ds.losses import LocalTerms, combine, supervised_positions  # noqa: E402
from gere_ds.teacher_cache import TeacherStates  # noqa: E402
from global_batch import encode_whole_replay_set, parse_args, trainer_on_global_batch  # noqa: E402,I001


def main() -> None:
    args = parse_args()
    cfg, inputs, tr, rows = trainer_on_global_batch(args, [])
    tr.prepare_teacher()
    encode_whole_replay_set(tr, cfg, inputs)
    # random teacher states (seeded, identical on every rank) so TM is far from zero
    g = torch.Generator().manual_seed(0)
    states = {i: torch.randint(-1, 2, (len(ids), tr.hidden_size), generator=g, dtype=torch.int8)
              for i, ids in sorted(tr._replay_ids.items())}
    real = tr.teacher

    class FakeStates(TeacherStates):
        def get(self, sid: int) -> torch.Tensor:
            return states[sid]

    tr.teacher = FakeStates(torch.stack([real.lo, real.hi, real.mu, real.sigma]), {}, None)
    results = {"thresholds": torch.stack([real.lo, real.hi])}
    engine = tr.engine.engine
    for mode in ("tm_only", "full"):
        mb, replay_ids = tr.make_batch(0, rows)
        picked = supervised_positions(mb.labels)  # the trainer's path: LM head where targets are
        with lm_head_on_positions(tr.engine.module, picked[0]):
            logits = tr.engine.forward(mb.input_ids, mb.attention_mask)
        terms = tr.local_terms(logits, tr.capture.pop(), mb, replay_ids, picked)
        if mode == "tm_only":
            zero = terms.task_sum * 0
            terms = LocalTerms(zero, terms.task_count * 0, zero, terms.replay_count * 0,
                               terms.reg_sum, terms.reg_count, terms.reg_elems, terms.tokens)
        sl = combine(terms, cfg.replay.weight)
        engine.backward(sl.local_loss)
        grads = {}
        for name, param in engine.module.named_parameters():
            grad = safe_get_full_grad(param)  # collective: every rank calls it
            grads[name] = grad.detach().float().cpu().clone()
        results[mode] = {"loss": sl.loss.detach().cpu(), "tm": sl.reg.detach().cpu(),
                         "task_ce": sl.task_ce.detach().cpu(),
                         "replay_ce": sl.replay_ce.detach().cpu(), "grads": grads}
        engine.step()  # lr ~ 0: parameters do not move; gradients are cleared
    if dist.is_main():
        torch.save(results, args.out)
    dist.barrier()


if __name__ == "__main__":
    main()
