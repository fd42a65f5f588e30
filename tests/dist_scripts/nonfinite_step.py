"""One good optimizer step, one whose first micro-step loss is NaN on rank 0 only
(``GERE_DS_NAN_AT``), then a good one, on a set-up trainer; rank 0 writes what each step left:
whether the fp32 master weights and Adam moments changed (bitwise), the logged loss, whether
DeepSpeed applied the step, and whether a checkpoint was written in the bad streak."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

from gere_ds.config.loading import load_config
from gere_ds.training.inputs import validate_inputs
from gere_ds.runtime import dist
from gere_ds.training.trainer import ContinualTrainer


def master(tr: ContinualTrainer, moments: bool) -> dict[str, torch.Tensor]:
    """Every fp32 master weight, and with ``moments`` (once a step made them) both Adam
    moments, gathered (a collective under ZeRO-3)."""
    out = {}
    for name, p in tr.engine.module.named_parameters():
        out[name] = safe_get_full_fp32_param(p).clone()
        for key in ("exp_avg", "exp_avg_sq") if moments else ():
            out[f"{name}/{key}"] = safe_get_full_optimizer_state(p, key).clone()
    return out


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--local_rank", type=int, default=0)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides)
    inputs = validate_inputs(cfg, dist.world_size())
    dist.init()
    tr = ContinualTrainer(cfg)
    tr.setup(inputs)
    tr.prepare_teacher()
    sampler, total = tr.sampler(0), tr.steps_for(0)
    ckpts = tr.out / "checkpoints"
    report = []
    for step in range(3):
        before = master(tr, step > 0)
        if step == 1:
            os.environ["GERE_DS_NAN_AT"] = "a micro-step:1:0"
        values, _ = tr.optimizer_step(0, sampler, 0, step, total)
        os.environ.pop("GERE_DS_NAN_AT", None)
        tr._maybe_checkpoint(0, total)
        after = master(tr, step > 0)
        report.append({"loss": values["loss"], "unchanged": same(before, after),
                       "applied": tr.engine.engine.was_step_applied(),
                       "skipped": tr.step.skipped,
                       "bad_in_a_row": tr.progress.bad_steps_in_a_row,
                       "checkpoints": sorted(x.name for x in ckpts.glob("task*-step*"))
                       if ckpts.is_dir() else []})
    if dist.is_main():
        Path(args.out).write_text(json.dumps(report, indent=1))
    dist.barrier()


if __name__ == "__main__":
    dist.exit_process(main())  # no interpreter teardown after the last barrier
