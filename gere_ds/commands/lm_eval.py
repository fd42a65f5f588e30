"""`gere-ds lm-eval`: score an exported model (or a run's task-end exports) with
lm-evaluation-harness on local task files.

    gere-ds lm-eval --model runs/demo_eval/hf/task001-end --tasks gere_piqa,gere_siqa --out DIR
    gere-ds lm-eval --run runs/demo --tasks gere_piqa --out DIR     # every task end, exported first

Tasks are read from ``--include-path`` (default ``eval/lm_eval_tasks``: the benchmark's general
suite as lm-eval task YAMLs over the local jsonl files), so nothing is downloaded. Results go
to ``DIR/lm_eval_results.json`` (one entry per model), next to gere-ds's own metrics.json.
Needs the ``lmeval`` extra (``pip install -e '.[lmeval]'``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from gere_ds.errors import InputError

REPO = Path(__file__).resolve().parents[2]
RESULTS = "lm_eval_results.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gere-ds lm-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", action="append", help="exported HF folder (repeatable)")
    what.add_argument("--run", help="a run directory: every complete task-end checkpoint")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--include-path", default=str(REPO / "eval" / "lm_eval_tasks"),
                   help="folder of lm-eval task YAMLs")
    p.add_argument("--out", required=True, help=f"folder for {RESULTS}")
    p.add_argument("--batch-size", default="8")
    p.add_argument("--limit", type=int, default=None, help="examples per task (default: all)")
    p.add_argument("--keep-exports", action="store_true", help="with --run: keep the exports")
    return p.parse_args(argv)


def export_dtype(folder: str) -> str:
    """The dtype the folder's config.json declares, as lm-eval's ``dtype=`` takes it: an 8B
    bf16 export loads in bf16 (16 GB), not upcast to fp32 (32 GB); float32 when undeclared."""
    from transformers import AutoConfig  # lazy: the CLI starts without torch

    from gere_ds.model.hf_folder import config_dtype

    return str(config_dtype(AutoConfig.from_pretrained(folder))).removeprefix("torch.")


def score(folder: str, tasks: list[str], include_path: str, batch_size: str,
          limit: int | None) -> dict[str, Any]:
    """lm-eval's results for one model folder ({task: {metric: value}})."""
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    device = "cuda" if torch.cuda.is_available() else "cpu"
    args = f"pretrained={folder},dtype={export_dtype(folder)}"
    out = simple_evaluate(model="hf", model_args=args,
                          tasks=tasks, task_manager=TaskManager(include_path=include_path),
                          batch_size=batch_size, device=device, limit=limit,
                          log_samples=False)
    return {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            for task, metrics in out["results"].items()}


def run_exports(run_dir: Path, out: Path) -> list[tuple[str, str]]:
    # lazy: the CLI starts without torch
    from gere_ds.model.export import checkpoint_problem, export_checkpoint

    models = []
    for folder in sorted((run_dir / "checkpoints").glob("task*-end")):
        if checkpoint_problem(folder):
            break
        target = out / "hf" / folder.name
        if not (target / "config.json").is_file():
            export_checkpoint(run_dir, target, tag=folder.name, force=True, log=lambda m: None)
        models.append((folder.name, str(target)))
    return models


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        print("error: lm-evaluation-harness is not installed (pip install -e '.[lmeval]')",
              file=sys.stderr)
        return 2

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local task files only
    try:
        models = ([(Path(m).name, m) for m in args.model] if args.model
                  else run_exports(Path(args.run), out))
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    results: dict[str, Any] = {}
    for label, folder in models:
        results[label] = {"model": folder, "results": score(folder, tasks, args.include_path,
                                                            args.batch_size, args.limit)}
        (out / RESULTS).write_text(json.dumps(results, indent=1) + "\n")
        if args.run and not args.keep_exports:
            shutil.rmtree(folder, ignore_errors=True)
        print(f"{label}: " + ", ".join(f"{t} acc {m.get('acc,none', float('nan')):.3f}"
                                       for t, m in results[label]["results"].items()), flush=True)
    print(f"wrote {out / RESULTS}")
    return 0
