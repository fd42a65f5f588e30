"""`gere-ds evaluate`: score Hugging Face model folders or a finished run's checkpoints.

One process::

    gere-ds evaluate --config configs/demo.yaml --model assets/models/smollm2-135m-instruct --out runs/eval_base
    gere-ds evaluate --config runs/demo/config.yaml --run runs/demo --out runs/demo_eval

Many ranks (ZeRO-3, data sharded, results all-gathered; the launcher runs a script)::

    deepspeed --num_gpus 2 eval/evaluate.py --config runs/demo/config.yaml --run runs/demo --out DIR

The config gives the tasks, the `eval` section (mode, caps, general sets) and the DeepSpeed
settings; `--model` evaluates one folder (one matrix row); `--run` evaluates the base model and
every complete end-of-task checkpoint (consolidated with gere_ds.model.export first), giving the
whole accuracy matrix, metrics.json/md and the heatmap, like the run itself; each consolidated
export is deleted once scored (an 8B export is 16 GB) unless `--keep-exports` is given.

It runs on DeepSpeed's accelerator: the GPU of the rank when there is one, else the CPU.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from gere_ds.runtime import dist
from gere_ds.config.loading import load_config
from gere_ds.config.sections import RunConfig
from gere_ds.errors import InputError
from gere_ds.storage.atomic import write_json_atomic


def _launched() -> bool:
    return "LOCAL_RANK" in os.environ and "MASTER_ADDR" in os.environ


def evaluate_models(cfg: RunConfig, models: list[tuple[str, str]], out: Path,
                    delete: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Evaluate each (label, folder); rows in order; writes the report on rank 0. Folders in
    ``delete`` are removed once scored (every rank has finished with them)."""
    import torch  # lazy: the CLI starts without torch

    from gere_ds.evaluation.report import write_report
    from gere_ds.evaluation.scoring import EvalSuite
    from gere_ds.model.engine import build_eval_engine

    suite = EvalSuite(cfg.tasks, cfg.eval, seed=cfg.train.seed,
                      max_source_len=cfg.train.max_source_len,
                      max_target_len=cfg.train.max_target_len,
                      truncate_source=cfg.train.truncate_source)
    matrix, general, labels = [], {}, []
    for label, folder in models:
        tick = time.perf_counter()
        cfg.model = folder
        engine = build_eval_engine(cfg, lambda m: None)
        with torch.no_grad():
            row = suite.evaluate(engine.scorer(), engine.tokenizer, device=dist.device())
        del engine
        if folder in delete:
            dist.barrier()
            if dist.is_main():
                shutil.rmtree(folder, ignore_errors=True)
        matrix.append(row.row())
        for name, value in row.general.items():
            general.setdefault(name, []).append(value)
        labels.append(label)
        if dist.is_main():
            scores = ", ".join(f"{k} {v:.2f}" for k, v in {**row.accuracy, **row.general}.items())
            print(f"{label}: {scores} ({time.perf_counter() - tick:.0f} s)", flush=True)
    names = [task.name for task in cfg.tasks]
    results: dict[str, Any] = {}
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        results = write_report(str(out), names, matrix, general)
        (out / "evaluated_models.json").write_text(
            json.dumps(dict(zip(labels, [m[1] for m in models])), indent=1))
    return results


SOURCE_FILE = "gere_source.json"  # in an exported folder: which checkpoint it was made from
RUN_FOLDER_MARKS = ("checkpoints", "train_steps.jsonl", "train.log", "run.lock")


def checkpoint_source(run_dir: Path, tag: str) -> dict[str, str]:
    """What identifies a checkpoint: its run folder, its tag and a checksum of its completion
    markers and trainer state (bytes and modification times: a re-saved tag differs)."""
    folder = run_dir / "checkpoints" / tag
    h = hashlib.sha256()
    for path in sorted([*folder.glob("COMPLETE.rank*"), folder / "trainer_state.json"]):
        if path.is_file():
            h.update(f"{path.name}:{path.stat().st_mtime_ns}:".encode() + path.read_bytes())
    return {"run_dir": str(run_dir.resolve()), "tag": tag, "markers_sha256": h.hexdigest()}


def _exported_from(target: Path, source: dict[str, str]) -> bool:
    """Whether ``target`` is a finished export of exactly this checkpoint."""
    try:
        recorded = json.loads((target / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (target / "config.json").is_file() and recorded == source


def run_models(cfg: RunConfig, run_dir: Path, out: Path) -> list[tuple[str, str]]:
    """The base model and every complete end-of-task checkpoint, consolidated into out/hf/.

    An earlier export there is reused only if it records this very checkpoint (run folder, tag,
    marker checksum); anything else (another run's, an older save of the tag) is re-exported."""
    # lazy: the CLI starts without torch
    from gere_ds.model.export import checkpoint_problem, export_checkpoint

    models = [("base", cfg.model)]
    for t in range(1, len(cfg.tasks) + 1):
        folder = run_dir / "checkpoints" / f"task{t:03d}-end"
        if not folder.is_dir() or checkpoint_problem(folder):
            break  # a partial run: the matrix stops at the last complete task
        target = out / "hf" / folder.name
        source = checkpoint_source(run_dir, folder.name)
        if dist.is_main() and not _exported_from(target, source):
            export_checkpoint(run_dir, target, tag=folder.name, force=True, log=lambda m: None)
            write_json_atomic(target / SOURCE_FILE, source)  # last: a finished export
        dist.barrier()
        models.append((f"after task {t}", str(target)))
    return models


def check_out(out: Path, run: Path | None) -> None:
    """``--out`` must not be a run folder: the evaluation's metrics.json would replace the
    run's own."""
    marks = [m for m in RUN_FOLDER_MARKS if (out / m).exists()]
    if (run is not None and out.resolve() == run.resolve()) or marks:
        raise InputError(f"{out} is a run folder (it holds {', '.join(marks) or 'the run'}); "
                         f"its metrics.json would be overwritten: choose another --out, e.g. "
                         f"{out / 'eval'}", field="--out")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="run config: tasks, eval and DeepSpeed settings")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", action="append", help="HF model folder (repeatable: rows)")
    what.add_argument("--run", help="a run directory: base model + every end-of-task checkpoint")
    p.add_argument("--out", required=True, help="where metrics.json/md and the heatmap go (not a "
                                                "run folder: its metrics.json would be replaced)")
    p.add_argument("--keep-exports", action="store_true",
                   help="with --run: keep each task-end export (OUT/hf/<tag>) after scoring it")
    p.add_argument("--local_rank", type=int, default=0, help="set by the deepspeed launcher")
    p.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    # the rank's GPU when there is one, else the CPU (DeepSpeed's detection, made explicit)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    try:
        check_out(Path(args.out), Path(args.run) if args.run else None)
        cfg = load_config(args.config, args.overrides)
        cfg.eval.enabled = True
        if _launched():
            dist.init()
            if cfg.deepspeed == "auto":  # one stage on every rank (ZeRO-3 is collective)
                # lazy: the CLI starts without torch
                from gere_ds.model.ds_config import agree_on_memory

                agree_on_memory()
        models = ([(Path(m).name, m) for m in args.model] if args.model
                  else run_models(cfg, Path(args.run), Path(args.out)))
        delete = frozenset(folder for _, folder in models[1:]) \
            if args.run and not args.keep_exports else frozenset()
        if dist.is_main():
            print(f"evaluating {len(models)} model(s) on {dist.device()}", flush=True)
        evaluate_models(cfg, models, Path(args.out), delete)
    except InputError as err:
        if dist.rank() == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    if dist.is_main():
        print(f"wrote {Path(args.out) / 'metrics.md'}")
    dist.barrier()
    return 0
