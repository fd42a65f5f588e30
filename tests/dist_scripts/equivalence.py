"""Launched by tests under `deepspeed --num_gpus {1,2}`: teacher thresholds, then one global
micro-batch's loss value and full parameter gradients, saved by rank 0 for comparison.

The global batch is fixed: GLOBAL_ROWS rows; with W ranks, rank r takes rows r*n/W .. (r+1)*n/W,
so 1 process sees exactly the union of the 2 ranks' micro-batches.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from deepspeed.utils import safe_get_full_grad  # noqa: E402

from gere_ds import dist  # noqa: E402
from gere_ds.config import load_config  # noqa: E402
from gere_ds.capture import lm_head_on_positions  # noqa: E402
from gere_ds.losses import LocalTerms, combine, supervised_positions  # noqa: E402
from gere_ds.teacher_cache import TeacherStates  # noqa: E402
from gere_ds.trainer import ContinualTrainer, validate_inputs  # noqa: E402

# (is_replay, index): task rows and replay rows mixed, replay ids from every shard
GLOBAL_ROWS = [(False, 0), (True, 0), (True, 3), (False, 5),
               (True, 1), (False, 2), (True, 8), (True, 4)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--local_rank", type=int, default=0)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    W = dist.world_size()
    n = len(GLOBAL_ROWS) // W
    cfg = load_config(args.config, args.overrides + [f"train.micro_batch_size={n}",
                                                     "train.grad_accum=1", "train.lr=1e-30"])
    inputs = validate_inputs(cfg, W)
    dist.init()
    tr = ContinualTrainer(cfg)
    tr.setup(inputs)
    tr.prepare_teacher()
    rows = GLOBAL_ROWS[dist.rank() * n:(dist.rank() + 1) * n]
    # every replay id must be encodable on this rank: encode the whole replay set
    from gere_ds.data.encode import encode_replay
    tr._replay_ids = {i: encode_replay(tr.tokenizer, t, cfg.replay.max_len)
                      for i, t in enumerate(inputs.replay_texts)}
    # random teacher states (seeded, identical on every rank) so TM is far from zero
    g = torch.Generator().manual_seed(0)
    states = {i: torch.randint(-1, 2, (len(ids), tr.hidden_size), generator=g, dtype=torch.int8)
              for i, ids in sorted(tr._replay_ids.items())}
    real = tr.teacher

    class FakeStates(TeacherStates):
        def get(self, sid: int) -> torch.Tensor:
            return states[sid]

    tr.teacher = FakeStates(real.lo, real.hi, real.mu, real.sigma, real.hidden_size, {}, None)
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
