"""Launched by tests under `deepspeed --num_gpus {1,2}`: the teacher thresholds, then for every
strategy term and reduction, one optimizer step's logged values and every parameter gradient
over the fixed global batch (global_batch.GLOBAL_ROWS), saved by rank 0 for comparison.

The step is the trainer's own: TrainStep.compute_loss and TrainStep.apply over GRAD_ACCUM
micro-steps, with each strategy's own ReplayTerm (so l1/l2 take the trainer's path: the LM head
on the supervised positions only, and kl the full logits). The teacher data is random (seeded, identical on every rank, held for
the whole replay set so any rank can read any row): the student is far from it, so every term and
every gradient is far from zero, and nothing sits on a kink of |h - t| or of a TM threshold where
rounding decides the sign.

With ``train.lora=...`` among the overrides the same step runs on LoRA adapters (ZeRO-3 over the
PEFT model): the adapters are first moved to a seeded random point (fresh ones have B = 0, where
A's gradient is exactly 0), the modes are LORA_MODES and the gradients are the adapters' only.
"""
from __future__ import annotations

import torch
from deepspeed.utils import safe_get_full_grad

from gere_ds.runtime import dist
from gere_ds.strategies import make_term
from gere_ds.teaching.teacher_cache import TeacherFeatures, TeacherStates, TeacherTopK
from gere_ds.training.step import StepStats, TrainStep
from global_batch import encode_whole_replay_set, parse_args, trainer_on_global_batch  # noqa: I001

TOPK = 16
# (strategy, reduction, weight)
MODES = (("tm", "row", 100.0), ("tm", "row", "dy"), ("tm", "global_micro_batch", 100.0),
         ("tm", "global_micro_batch", "dy"), ("kl", "row", 100.0), ("kl", "row", "dy"),
         ("l1", "row", 100.0), ("l1", "row", "dy"), ("l2", "row", 100.0), ("l2", "row", "dy"))
LORA_MODES = (("tm", "row", 100.0), ("tm", "row", "dy"), ("tm", "global_micro_batch", 100.0),
              ("kl", "row", 100.0), ("kl", "row", "dy"))
LOGGED = ("loss", "task_ce", "replay_ce", "reg", "reg_weight", "violation_frac")


def fake_teachers(tr, real_states: TeacherStates) -> dict:
    config = tr.engine.module.config
    vocab, hidden = int(config.vocab_size), int(config.hidden_size)
    g = torch.Generator().manual_seed(0)
    states, topk, feats = {}, {}, {}
    for sid, ids in sorted(tr.batches.replay_ids.items()):
        states[sid] = torch.randint(-1, 2, (len(ids), hidden), generator=g, dtype=torch.int8)
        top_ids = torch.rand(len(ids), vocab, generator=g).topk(TOPK, dim=-1).indices
        logp = -(torch.rand(len(ids), TOPK, generator=g) * 8).sort(dim=-1).values
        topk[sid] = (top_ids.to(torch.int32), logp.to(torch.float16))
        feats[sid] = torch.randn(len(ids), hidden, generator=g).to(torch.bfloat16)

    class FakeStates(TeacherStates):
        def get(self, sid: int) -> torch.Tensor:
            return states[sid]

    class FakeTopK(TeacherTopK):
        def get(self, sid: int):
            return topk[sid]

    class FakeFeatures(TeacherFeatures):
        def get(self, sid: int):
            return feats[sid]

    r = real_states
    return {"tm": FakeStates(torch.stack([r.lo, r.hi, r.mu, r.sigma]), {}, None),
            "kl": FakeTopK(TOPK, {}, None, None), "l1": FakeFeatures(hidden, {}, None),
            "l2": FakeFeatures(hidden, {}, None)}


def perturb_adapters(module) -> None:
    """A seeded point away from B = 0 (the same on every rank and world size)."""
    from gere_ds.model.lora import fresh_adapter_values, set_adapter_values

    values = fresh_adapter_values(module, seed=7, task_index=0)
    g = torch.Generator().manual_seed(1)
    for key in values:
        if key.endswith(".B"):
            values[key] = torch.randn(values[key].shape, generator=g) * 0.2
    set_adapter_values(module, values)


def main() -> None:
    args = parse_args()
    cfg, inputs, tr, micro = trainer_on_global_batch(args, ["replay.strategy=tm"])
    tr.prepare_teacher()  # the real pass: thresholds and the dead-band
    encode_whole_replay_set(tr, cfg, inputs)
    teachers = fake_teachers(tr, tr.teacher)
    results: dict = {"thresholds": torch.stack([tr.teacher.lo, tr.teacher.hi])}
    engine = tr.engine.engine
    lora = cfg.train.lora is not None
    if lora:
        perturb_adapters(engine.module)
    for strategy, reduction, weight in LORA_MODES if lora else MODES:
        cfg.replay.strategy, cfg.replay.reduction, cfg.replay.weight = strategy, reduction, weight
        term = make_term(cfg)
        term.attach(teachers[strategy], tr.device)
        step = TrainStep(cfg, tr.engine, tr.capture, tr.batches, term, dist.world_size())
        stats, grads = StepStats(), {}

        def read_grads() -> None:
            for name, param in engine.module.named_parameters():
                if not param.requires_grad:  # LoRA: the frozen base has none
                    continue
                grad = safe_get_full_grad(param)  # collective: every rank calls it
                grads[name] = grad.detach().float().cpu().clone()

        for m, rows in enumerate(micro):
            sl = step.compute_loss(0, rows)
            stats.add(sl)
            # the last micro-step is the boundary: read the gradients before its optimizer
            # step (lr ~ 0: parameters do not move; the step clears the gradients)
            step.apply(sl, before_step=read_grads if m + 1 == len(micro) else None)
        values = stats.reduce()
        results["packed"] = torch.tensor(step.pack_capacity is not None)
        results["chunked"] = torch.tensor(step.chunked_ce)
        results[f"{strategy}/{reduction}/{weight}"] = {
            **{k: torch.tensor(values[k]) for k in LOGGED if k in values}, "grads": grads}
    if dist.is_main():
        torch.save(results, args.out)
    dist.barrier()


if __name__ == "__main__":
    dist.exit_process(main())  # no interpreter teardown after the last barrier
