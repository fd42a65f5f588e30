"""Launched by tests under `deepspeed --num_gpus {1,2}`: for kl, l1 and l2, one global
micro-batch's loss values and full parameter gradients, saved by rank 0 for comparison.

Modelled on equivalence.py. The global batch is fixed: GLOBAL_ROWS rows; with W ranks, rank r
takes rows r*n/W .. (r+1)*n/W, so 1 process sees exactly the union of the 2 ranks' micro-batches.
The teacher data is random (seeded, identical on every rank) so every term is far from zero.
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
from gere_ds.data.encode import encode_replay  # noqa: E402
from gere_ds.losses import LocalTerms, combine  # noqa: E402
from gere_ds.teacher_cache import TeacherFeatures, TeacherTopK  # noqa: E402
from gere_ds.trainer import ContinualTrainer, validate_inputs  # noqa: E402

# (is_replay, index): task rows and replay rows mixed, replay ids from every shard
GLOBAL_ROWS = [(False, 0), (True, 0), (True, 3), (False, 5),
               (True, 1), (False, 2), (True, 8), (True, 4)]
TOPK = 16
# (name, weight, keep the CE terms)
MODES = (("reg_only", 1.0, False), ("full_w100", 100.0, True), ("full_dy", "dy", True))


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
                                                     "train.grad_accum=1", "train.lr=1e-30",
                                                     "replay.strategy=kl"])
    inputs = validate_inputs(cfg, W)
    dist.init()
    tr = ContinualTrainer(cfg)
    tr.setup(inputs)
    rows = GLOBAL_ROWS[dist.rank() * n:(dist.rank() + 1) * n]
    # every replay id must be encodable on this rank: encode the whole replay set
    tr._replay_ids = {i: encode_replay(tr.tokenizer, t, cfg.replay.max_len)
                      for i, t in enumerate(inputs.replay_texts)}
    vocab = int(tr.engine.module.config.vocab_size)
    g = torch.Generator().manual_seed(0)
    topk, feats = {}, {}
    for sid, ids in sorted(tr._replay_ids.items()):
        top_ids = torch.rand(len(ids), vocab, generator=g).topk(TOPK, dim=-1).indices
        logp = -(torch.rand(len(ids), TOPK, generator=g) * 8).sort(dim=-1).values
        topk[sid] = (top_ids.to(torch.int32), logp.to(torch.float16))
        feats[sid] = torch.randn(len(ids), tr.hidden_size, generator=g).to(torch.bfloat16)

    class FakeTopK(TeacherTopK):
        def get(self, sid: int):
            return topk[sid]

    class FakeFeatures(TeacherFeatures):
        def get(self, sid: int):
            return feats[sid]

    teachers = {"kl": FakeTopK(TOPK, {}, None, None),
                "l1": FakeFeatures(tr.hidden_size, {}, None),
                "l2": FakeFeatures(tr.hidden_size, {}, None)}
    engine = tr.engine.engine
    results: dict = {}
    for strategy, teacher in teachers.items():
        tr.cfg.replay.strategy = strategy
        tr.teacher = teacher
        for mode, weight, with_ce in MODES:
            mb, replay_ids = tr.make_batch(0, rows)
            logits = tr.engine.forward(mb.input_ids, mb.attention_mask)
            terms = tr.local_terms(logits, tr.capture.pop(), mb, replay_ids)
            if not with_ce:
                zero = terms.task_sum * 0
                terms = LocalTerms(zero, terms.task_count * 0, zero, terms.replay_count * 0,
                                   terms.reg_sum, terms.reg_count, terms.reg_elems, terms.tokens)
            sl = combine(terms, weight)
            engine.backward(sl.local_loss)
            grads = {}
            for name, param in engine.module.named_parameters():
                grad = safe_get_full_grad(param)  # collective: every rank calls it
                grads[name] = grad.detach().float().cpu().clone()
            results[f"{strategy}/{mode}"] = {
                "loss": sl.loss.detach().cpu(), "reg": sl.reg.detach().cpu(),
                "reg_weight": sl.reg_weight.detach().cpu(),
                "task_ce": sl.task_ce.detach().cpu(), "replay_ce": sl.replay_ce.detach().cpu(),
                "grads": grads}
            engine.step()  # lr ~ 0: parameters do not move; gradients are cleared
    if dist.is_main():
        torch.save(results, args.out)
    dist.barrier()


if __name__ == "__main__":
    main()
