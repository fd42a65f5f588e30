"""Launched by tests/test_export.py under `deepspeed --num_gpus 2`: rebuild the engine as the
trainer does, load a checkpoint, save the logits of a fixed input (rank 0), then run the in-run
export (`export_from_engine`, all ranks) and check the engine is untouched by it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from gere_ds.config.loading import load_config
from gere_ds.model.engine import build_engine
from gere_ds.model.export import export_from_engine
from gere_ds.runtime import dist

TEXTS = ["The film was wonderful and the hotel was lovely.",
         "Yesterday's news was all about quantum physics."]


def fixed_input(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of different length: right padding and a real attention mask."""
    enc = tokenizer(TEXTS, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True, help="the run's resolved config.yaml")
    p.add_argument("--tag", required=True)
    p.add_argument("--out", required=True, help="logits file written by rank 0")
    p.add_argument("--export-dir", required=True)
    p.add_argument("--local_rank", type=int, default=0)
    args = p.parse_args()
    cfg = load_config(args.config)
    dist.init()
    log = print if dist.is_main() else (lambda msg: None)
    eng = build_engine(cfg, dist.world_size(), log)
    root = Path(cfg.output_dir) / "checkpoints"
    if cfg.train.lora is not None:  # as the trainer resumes: the merged base, then the adapters
        from gere_ds.checkpointing.checkpoint import load_trainer_state
        from gere_ds.model.lora import LoraRun

        LoraRun(cfg).restore(eng.module, load_trainer_state(root / args.tag), root / args.tag)
    path, _ = eng.engine.load_checkpoint(str(root), tag=args.tag,
                                         load_module_strict=cfg.train.lora is None)
    assert path is not None, f"checkpoint {root / args.tag} not loaded"
    eng.engine.eval()
    ids, mask = fixed_input(eng.tokenizer)
    dev = dist.device()
    with torch.no_grad():
        logits = eng.forward(ids.to(dev), mask.to(dev)).float().cpu()
    info = export_from_engine(eng.module, eng.tokenizer, args.export_dir, log=log)
    with torch.no_grad():
        after = eng.forward(ids.to(dev), mask.to(dev)).float().cpu()
    if dist.is_main():
        torch.save({"input_ids": ids, "attention_mask": mask, "logits": logits,
                    "logits_after_export": after, "info": info}, args.out)
    dist.barrier()


if __name__ == "__main__":
    dist.exit_process(main())  # no interpreter teardown after the last barrier
