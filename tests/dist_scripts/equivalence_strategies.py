"""Launched by tests under `deepspeed --num_gpus {1,2}`: for kl, l1 and l2, one global
micro-batch's loss values and full parameter gradients, saved by rank 0 for comparison.

Modelled on equivalence.py, on the same fixed global batch (global_batch.GLOBAL_ROWS).
The teacher data is random (seeded, identical on every rank) so every term is far from zero.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from deepspeed.utils import safe_get_full_grad  # noqa: E402

from gere_ds import dist  # noqa: E402
from gere_ds.losses import LocalTerms, combine  # noqa: E402
from gere_ds.teacher_cache import TeacherFeatures, TeacherTopK  # noqa: E402
from global_batch import encode_whole_replay_set, parse_args, trainer_on_global_batch  # noqa: E402,I001

TOPK = 16
# (name, weight, keep the CE terms)
MODES = (("reg_only", 1.0, False), ("full_w100", 100.0, True), ("full_dy", "dy", True))


def main() -> None:
    args = parse_args()
    cfg, inputs, tr, rows = trainer_on_global_batch(args, ["replay.strategy=kl"])
    encode_whole_replay_set(tr, cfg, inputs)
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
