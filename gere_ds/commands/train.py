"""`gere-ds train`: one run of the continual loop, under the `deepspeed` launcher.

    deepspeed --num_gpus N launch/train.py --config X.yaml [key=value ...]

Every rank validates its own inputs first (nodes may differ) and the ranks agree before any
work; then the job takes `<output_dir>/run.lock` (one job per output_dir; see
gere_ds.checkpointing.run_lock, `--force-unlock`). A bad input or a held lock is one `error:` line
(exit 2), a run that cannot go on exit 1, a pre-empted run exits 0 after its checkpoint.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys

from gere_ds.runtime import dist
from gere_ds.checkpointing.run_lock import acquire_run_lock
from gere_ds.config.loading import load_config
from gere_ds.config.sections import RunConfig
from gere_ds.errors import InputError
from gere_ds.training.inputs import Inputs, validate_inputs
from gere_ds.training.progress import TrainingError
from gere_ds.runtime.stop import Preempted
from gere_ds.training.trainer import ContinualTrainer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", required=True, help="run config YAML")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                   help="set by the deepspeed launcher")
    p.add_argument("--force-unlock", action="store_true",
                   help="take over output_dir/run.lock even if it names a job of another host "
                        "(only when that job is known to be gone)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (base files and overrides applied), every key "
                        "with its one-line doc, and exit")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=1e-5")
    return p.parse_args(argv)


def _report(errors: list[tuple[str, str | None]]) -> bool:
    """Rank 0 prints each distinct error once (naming the hosts when they differ)."""
    bad = [(host, msg) for host, msg in errors if msg]
    if bad and dist.rank() == 0:
        distinct = sorted({msg for _, msg in bad})
        for msg in distinct:
            hosts = sorted({host for host, m in bad if m == msg})
            where = f" (on {', '.join(hosts)})" if len(distinct) > 1 or len(hosts) < len(
                {h for h, _ in errors}) else ""
            print(f"error{where}: {msg}", file=sys.stderr, flush=True)
    return bool(bad)


def print_config(args: argparse.Namespace) -> int:
    from gere_ds.config.commented import documented_yaml

    try:
        cfg = load_config(args.config, args.overrides)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    print(documented_yaml(cfg), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.print_config:
        return print_config(args)
    if not dist.launched():  # `python launch/train.py`: one rank, no launcher needed
        dist.single_rank_environment()
    error, cfg, inputs = None, None, None
    try:
        cfg = load_config(args.config, args.overrides)
        inputs = validate_inputs(cfg, dist.world_size())
    except InputError as err:
        error = str(err)
    timeout = cfg.train.collective_timeout_s if cfg else 1800.0
    if dist.world_size() > 1:
        # every rank validated its own files (nodes may differ): agree before any work
        dist.init(timeout_s=timeout)
        if _report(dist.all_gather_object((socket.gethostname(), error))):
            return 2
    elif error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    dist.init(timeout_s=timeout)
    if "auto" in (cfg.deepspeed, cfg.train.micro_batch_size):
        # every rank's auto then sees the same memory: one stage, one split
        from gere_ds.model.ds_config import agree_on_memory

        agree_on_memory()
    try:  # one job per output_dir, before anything there is read or written
        lock = acquire_run_lock(cfg.output_dir, args.force_unlock)
    except InputError as err:
        if dist.rank() == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    try:
        return _train(cfg, inputs)
    finally:
        lock.release()  # also on error; a killed job's lock is found stale next time


def _train(cfg: RunConfig, inputs: Inputs) -> int:
    trainer = ContinualTrainer(cfg)
    try:
        trainer.run(inputs)
    except InputError as err:
        if dist.rank() == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except Preempted as stop:
        trainer.log.info(str(stop))
        dist.barrier()
        return 0  # documented: a pre-empted run exits 0 after its checkpoint
    except TrainingError as err:
        if dist.rank() == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        trainer.log.close()
    dist.barrier()  # a clean exit without destroy_process_group (see docs/platform notes)
    return 0
