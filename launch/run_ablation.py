"""Run the paper's controlled comparison: every replay strategy, one after another, one folder.

Usage::

    python launch/run_ablation.py [--base configs/ablation/base.yaml] [--results runs/ablation]
        [--num_gpus 2] [--rows none,replay,replay_tm_w100] [--dry-run] [--keep-going] [--force]
        [--launcher-args "--hostfile hostfile"] [key=value ...]

Each row is the base config plus overrides (ROWS below), launched as
``deepspeed --num_gpus N launch/train.py --config BASE replay.strategy=kl replay.weight=100
output_dir=<results>/<row> replay.teacher_cache=<results>/teacher [key=value ...]``, so every
row trains on the same tasks, data order, replay set and schedule; only the replay strategy and
its weight change. The rows share one teacher cache folder: the w = 1 / 100 / dy rows of a
strategy reuse one teacher pass (the weight is not part of the teacher fingerprint).

``<results>/ablation.json`` records each row's command, exit code and time, written after every
row; paths in the base config and ``--results`` are relative to the current directory (the
rows run there). A row already recorded as done is skipped (``--force`` removes its run folder and
trains it again from scratch; the shared teacher cache is kept), and a row
that failed or was interrupted is relaunched and resumes from its latest checkpoint
(``resume: auto``).
When every selected row has its metrics, ``eval/compare.py`` writes ``<results>/compare.md``.

``--write-presets DIR`` writes each row as a run config that extends the base (``base:``) with
the row's keys only (``DIR/<row>.yaml``), which is how ``configs/ablation/`` is generated.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from gere_ds.storage.atomic import write_json_atomic
from gere_ds.strategies import STRATEGIES, term_strategies

REPO = Path(__file__).resolve().parents[1]

# the paper's rows: Baseline (sequential fine-tuning), BaselineR (replay CE), and BaselineR plus
# each imitation term (KL on logits, L1 / L2 on final-norm features, TM on activation states)
# at w = 1, 100 and dy (docs/method.md, "The strategies compared")
WEIGHTS = (("w1", "1"), ("w100", "100"), ("wdy", "dy"))
ROWS: dict[str, list[str]] = {name: [f"replay.strategy={name}"]
                              for name, cls in STRATEGIES.items() if not cls.has_term}
for _strategy in sorted(term_strategies()):  # every strategy with a term, in name order
    for _tag, _w in WEIGHTS:
        ROWS[f"replay_{_strategy}_{_tag}"] = [f"replay.strategy={_strategy}",
                                             f"replay.weight={_w}"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="configs/ablation/base.yaml", help="base run config")
    p.add_argument("--results", default="runs/ablation", help="one folder for all rows")
    p.add_argument("--num_gpus", type=int, default=2, help="ranks per node (deepspeed)")
    p.add_argument("--rows", default="all", help=f"comma-separated subset of: {', '.join(ROWS)}")
    p.add_argument("--launcher-args", default="",
                   help="extra deepspeed launcher arguments, e.g. '--hostfile hostfile'")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--keep-going", action="store_true", help="continue after a failed row")
    p.add_argument("--force", action="store_true",
                   help="rerun rows already recorded as done, from scratch (their run folders "
                        "are removed first)")
    p.add_argument("--write-presets", metavar="DIR",
                   help="write <DIR>/<row>.yaml (complete configs) and exit")
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to every row")
    return p.parse_args(argv)


def select_rows(spec: str) -> list[str]:
    if spec == "all":
        return list(ROWS)
    rows = [r.strip() for r in spec.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"error: --rows: unknown row(s) {', '.join(unknown)}; "
                         f"rows: {', '.join(ROWS)}")
    return rows


def row_overrides(row: str, results: Path, extra: list[str]) -> list[str]:
    return [*ROWS[row], f"output_dir={results / row}",
            f"replay.teacher_cache={results / 'teacher'}", *extra]


def row_command(args: argparse.Namespace, row: str, results: Path) -> list[str]:
    venv = Path(sys.executable).parent / "deepspeed"
    launcher = str(venv) if venv.is_file() else (shutil.which("deepspeed") or "deepspeed")
    return [launcher, "--num_gpus", str(args.num_gpus), *shlex.split(args.launcher_args),
            str(REPO / "launch" / "train.py"), "--config", args.base,
            *row_overrides(row, results, args.overrides)]


def write_presets(base: str, folder: Path, rows: list[str], extra: list[str]) -> list[Path]:
    """Each row as a run config that extends the base (``base:``) with only the row's keys
    (validated by loading the written file: base + row == base + the row's overrides)."""
    import os

    import yaml

    from gere_ds.config.loading import load_config
    from gere_ds.config.overrides import apply_override, parse_override
    from gere_ds.config.source import Marks

    folder.mkdir(parents=True, exist_ok=True)
    relative = os.path.relpath(Path(base).resolve(), folder.resolve())
    written = []
    for row in rows:
        raw: dict = {"base": relative}
        for item in [*ROWS[row], f"output_dir=runs/ablation/{row}", *extra]:
            keys, value = parse_override(item)
            apply_override(raw, keys, value, Marks(base))
        lines = [f"# Ablation row '{row}': {base} with {' '.join(ROWS[row])}",
                 f"# Generated by: python launch/run_ablation.py --write-presets {folder}"]
        path = folder / f"{row}.yaml"
        path.write_text("\n".join(lines) + "\n" + yaml.safe_dump(raw, sort_keys=False,
                                                                  width=100))
        load_config(path)  # a complete, valid run config
        written.append(path)
    return written


def clear_finished_row(run_dir: Path) -> bool:
    """``--force`` on a finished row: remove its run folder so the row trains from scratch
    (with the folder left in place, ``resume: auto`` would just resume the finished run). A
    folder a live job holds (its run.lock) is left alone; False then."""
    from gere_ds.checkpointing.run_lock import LOCK_FILE, describe, holder_alive, read_holder

    holder = read_holder(run_dir / LOCK_FILE)
    if holder is not None and holder_alive(holder) is not False:
        print(f"error: {run_dir} is in use by {describe(holder)}; not removed", file=sys.stderr)
        return False
    if run_dir.exists():
        print(f"[ablation] --force: removing the finished run {run_dir}", flush=True)
        shutil.rmtree(run_dir)
    return True


def run_row(cmd: list[str], log_path: Path) -> int:
    """Run one row, streaming its output to the console and to its launch log."""
    with open(log_path, "a", buffering=1) as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        return proc.wait()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = select_rows(args.rows)
    if not Path(args.base).is_file():
        print(f"error: {args.base}: base config not found", file=sys.stderr)
        return 2
    if args.write_presets:
        from gere_ds.errors import InputError

        try:
            for path in write_presets(args.base, Path(args.write_presets), rows,
                                      args.overrides):
                print(path)
        except InputError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0
    results = Path(args.results)
    if not args.dry_run:
        # check every row's config before launching anything: one bad override, one line
        from gere_ds.config.loading import load_config
        from gere_ds.errors import InputError

        try:
            for row in rows:
                load_config(args.base, row_overrides(row, results, args.overrides))
        except InputError as err:
            print(f"error: row {row}: {err}", file=sys.stderr)
            return 2
        results.mkdir(parents=True, exist_ok=True)
    status_path = results / "ablation.json"
    status = json.loads(status_path.read_text()) if status_path.is_file() else {}
    failed = []
    for i, row in enumerate(rows):
        cmd = row_command(args, row, results)
        if args.dry_run:
            print(shlex.join(cmd))
            continue
        done_before = status.get(row, {}).get("status") == "done"
        if done_before and not args.force:
            print(f"[ablation] {i + 1}/{len(rows)} {row}: done before, skipped", flush=True)
            continue
        if done_before and not clear_finished_row(results / row):
            failed.append(row)
            if not args.keep_going:
                break
            continue
        print(f"[ablation] {i + 1}/{len(rows)} {row}: {shlex.join(cmd)}", flush=True)
        start = time.time()
        rc = run_row(cmd, results / f"{row}.launch.log")
        status[row] = {"status": "done" if rc == 0 else "failed", "returncode": rc,
                       "seconds": round(time.time() - start, 1), "command": cmd}
        write_json_atomic(status_path, status)
        print(f"[ablation] {row}: {'done' if rc == 0 else f'FAILED (exit {rc})'} in "
              f"{status[row]['seconds']:.0f} s", flush=True)
        if rc != 0:
            failed.append(row)
            if not args.keep_going:
                break
    if args.dry_run:
        return 0
    done = [r for r in rows if (results / r / "metrics.json").is_file()]
    if done and len(done) == len(rows):
        subprocess.run([sys.executable, str(REPO / "eval" / "compare.py"),
                        *[str(results / r) for r in done], "--out", str(results),
                        "--names", ",".join(done)], check=False)
    if failed:
        print(f"[ablation] failed rows: {', '.join(failed)} (see {results}/<row>.launch.log)",
              file=sys.stderr)
        return 1
    print(f"[ablation] complete: {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
