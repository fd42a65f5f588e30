"""`gere-ds export`: a run's ZeRO-3 checkpoint as a Hugging Face folder (safetensors + tokenizer).

    gere-ds export RUN_DIR --out DIR            # end of the last completed task
    gere-ds export RUN_DIR --task 1 --out DIR   # end of task 1 (1-based)
    gere-ds export RUN_DIR --tag task002-step000010 --out DIR
    gere-ds export --verify DIR                 # only check an existing export

One plain process, no launcher and no GPU needed; it reads every rank's files. The folder is
written next to DIR under a temporary name, checked (every tensor the model config implies is
there with its shape, nothing empty, parameter count) and only then renamed to DIR.
Exit status: 0 done, 2 refused or failed (one `error:` line).
"""
from __future__ import annotations

import argparse
import os
import sys

from gere_ds.errors import InputError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", nargs="?", help="the run's output_dir (holds config.yaml, "
                   "checkpoints/)")
    p.add_argument("--out", help="destination folder of the Hugging Face export")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--task", type=int, help="export the end of task N (1-based)")
    which.add_argument("--tag", help="export this checkpoint tag (e.g. task002-step000010)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="saved dtype (default: the dtype of the original model config)")
    p.add_argument("--force", action="store_true", help="replace an existing DIR")
    p.add_argument("--verify", metavar="DIR", help="only verify an existing export folder")
    args = p.parse_args(argv)
    if not args.verify and (not args.run_dir or not args.out):
        p.error("RUN_DIR and --out are required (or --verify DIR)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # silences DeepSpeed's detection warning
    from gere_ds.model.export import export_checkpoint, inspect_export  # lazy: after DS_ACCELERATOR

    try:
        if args.verify:
            info = inspect_export(args.verify)
            print(f"ok: {args.verify} ({info['parameters']:,} parameters, {info['tensors']} "
                  f"tensors, {'/'.join(info['dtypes'])})")
            return 0
        export_checkpoint(args.run_dir, args.out, task=args.task, tag=args.tag,
                          dtype=args.dtype, force=args.force,
                          log=lambda msg: print(msg, flush=True))
    except InputError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0
