"""The GPU acceptance check: gere-ds's real training path end to end, one JSON of what it saw.

    python bench/gpu_check.py [--cpu] [--dry-run] [--configs auto,zero2,zero3] [--model DIR]
                              [--out bench/results/gpu_check.json]

For each DeepSpeed config (``deepspeed: auto`` and the shipped ZeRO-2 and ZeRO-3 files: the
``*_gpu.json`` ones on GPUs, the CPU ones with ``--cpu``), in bf16 on every visible GPU (2 CPU
ranks with ``--cpu``), a 2-task run of 3 optimizer steps per task with a checkpoint every 2
steps and TM replay:

1. the uninterrupted run (the reference);
2. the same run killed (SIGKILL of the whole job) in step 3 of task 1, then re-run: it resumes
   from the step-2 checkpoint, and its step losses are compared with the reference's;
3. multi-rank evaluation of the finished run (``eval/evaluate.py --run``) in rank and generate
   mode;
4. the Hugging Face export of the last task end.

The JSON holds, per config: the stage chosen and why, TM and the violating fraction at step 1,
tokens/s, peak GPU and host memory per rank, checkpoint time and size, resume equality, and the
evaluations' and the export's outcome. The model is the tiny Llama of ``gere_assets.tiny``
(built here, no download) unless ``--model`` names a Hugging Face folder. ``--dry-run`` prints
the commands without running anything (no CUDA call). Exit status 0 when every step passed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"cpu": {"auto": "auto", "zero2": "ds_configs/zero2.json",
                   "zero3": "ds_configs/zero3.json"},
           "cuda": {"auto": "auto", "zero2": "ds_configs/zero2_gpu.json",
                    "zero3": "ds_configs/zero3_gpu.json"}}
KILL_AT = "a micro-step:5:0"  # 2 micro-steps per step: step 3's first, after the step-2 save
LOSS_KEYS = ("global_step", "task", "step_in_task", "train/loss", "train/task_ce",
             "train/replay_ce", "train/tm", "train/tm_violation_frac", "train/grad_norm")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="2 CPU ranks over gloo (the path only)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--configs", default="auto,zero2,zero3", help="which of auto,zero2,zero3")
    p.add_argument("--model", default="", help="a Hugging Face model folder (default: tiny)")
    p.add_argument("--work", default=str(REPO / ".cache" / "gpu_check"), help="scratch folder")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "gpu_check.json"))
    args = p.parse_args(argv)
    unknown = set(args.configs.split(",")) - set(CONFIGS["cpu"])
    if unknown:
        p.error(f"--configs: unknown {', '.join(sorted(unknown))} (auto, zero2, zero3)")
    return args


class Runner:
    """Runs (or with ``dry`` prints) commands in their own session, so a job killed as a whole
    by the test hook takes nothing else with it."""

    def __init__(self, dry: bool, env: dict[str, str]) -> None:
        self.dry, self.env = dry, env

    def __call__(self, cmd: list[str], extra_env: dict[str, str] | None = None,
                 timeout: int = 3600) -> tuple[int, float, str]:
        """(exit status, seconds, the output's tail). A `deepspeed` launch gets a port the
        system has just handed out: other jobs on the machine may hold DeepSpeed's default."""
        if Path(cmd[0]).name == "deepspeed":
            cmd = [cmd[0], "--master_port", str(free_port()), *cmd[1:]]
        shown = " ".join(f"{k}={shlex.quote(v)}" for k, v in (extra_env or {}).items())
        print(f"+ {shown + ' ' if shown else ''}{' '.join(shlex.quote(c) for c in cmd)}",
              flush=True)
        if self.dry:
            return 0, 0.0, ""
        tick = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env={**self.env, **(extra_env or {})},
                              capture_output=True, text=True, timeout=timeout,
                              start_new_session=True)
        return proc.returncode, time.perf_counter() - tick, (proc.stdout + proc.stderr)[-3000:]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ranks(cpu: bool, dry: bool) -> int:
    """Ranks of the check: 2 CPU ranks, or every visible GPU (the first CUDA call)."""
    if cpu:
        return 2
    if dry:
        return 0  # printed as-is: a dry run makes no CUDA call
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device is visible (use --cpu for the CPU path)")
    return torch.cuda.device_count()


def run_config(paths: dict[str, str], out_dir: Path, deepspeed: str, model: str) -> dict:
    from gere_assets.tiny import tiny_config_dict

    cfg = tiny_config_dict(paths, str(out_dir), "tm")
    cfg["deepspeed"] = deepspeed if deepspeed == "auto" else str(REPO / deepspeed)
    if model:
        cfg["model"] = model
    cfg["train"].update(bf16=True, max_steps_per_task=3, epochs=3, log_every=1)
    cfg["checkpoint"] = {"every_steps": 2, "keep_last": 2}
    cfg["replay"]["per_batch"] = 2  # replay rows in every step: TM is measured at step 1
    return cfg


def _log_floats(log: str, prefix: str) -> list[float]:
    """The per-rank GiB values of a 'prefix: rank 0 x GiB, rank 1 y GiB' log line."""
    line = next((ln for ln in log.splitlines() if prefix in ln), "")
    return [float(x) for x in re.findall(r"rank \d+ ([0-9.]+) GiB", line)]


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def summarize(run: Path, ref: Path, deepspeed: str) -> dict[str, Any]:
    """What one config's runs logged: stage and why, step 1's TM, speed, memory, checkpoints,
    and whether the resumed run repeats the reference's steps."""
    log = (run / "train.log").read_text()
    auto = re.search(r"deepspeed: auto -> ds_configs/(\S+) \((.*); name a file to choose\)", log)
    if auto:
        file, why = auto.group(1), auto.group(2)
    else:
        file, why = Path(deepspeed).name, "named in the config"
    stage = json.loads((REPO / "ds_configs" / file).read_text())["zero_optimization"]["stage"] \
        if (REPO / "ds_configs" / file).is_file() else None
    steps = [json.loads(x) for x in (run / "train_steps.jsonl").read_text().splitlines()]
    again = [json.loads(x) for x in (ref / "train_steps.jsonl").read_text().splitlines()]
    ours = [[s.get(k) for k in LOSS_KEYS] for s in steps]
    theirs = [[s.get(k) for k in LOSS_KEYS] for s in again]
    diff = max((abs(a - b) for x, y in zip(ours, theirs) for a, b in zip(x, y)
                if isinstance(a, float) and isinstance(b, float)), default=0.0)
    saves = [float(x) for x in re.findall(r"checkpoint task\d+-step\d+ \(([0-9.]+) s\)", log)]
    kept = sorted(p for p in (run / "checkpoints").iterdir() if p.is_dir())
    first = steps[0] if steps else {}
    return {
        "ds_config": file, "stage": stage, "why": why,
        "step1_tm": first.get("train/tm"), "step1_violating_frac": first.get(
            "train/tm_violation_frac"),
        # at step 1 the model is the teacher, so TM is 0 there; the later steps show it move
        "tm_by_step": [s.get("train/tm") for s in steps],
        "tokens_per_s_mean": (sum(s["train/tokens_per_s"] for s in steps) / len(steps)
                              if steps else None),
        "peak_host_gib_per_rank": _log_floats(log, "peak memory per rank (RSS)"),
        "peak_gpu_gib_per_rank": _log_floats(log, "peak GPU memory per rank"),
        "checkpoint_save_s": saves,
        "checkpoint_bytes": {p.name: _folder_bytes(p) for p in kept},
        "resumed": "resumed from" in log,
        "resume_equal": ours == theirs and len(ours) == 6,
        "resume_max_abs_diff": diff,
    }


def check_config(name: str, deepspeed: str, n: int, paths: dict[str, str], work: Path,
                 model: str, run: Runner) -> dict[str, Any]:
    """The four steps of the module doc for one DeepSpeed config."""
    launcher = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(n or "<GPUs>")]
    result: dict[str, Any] = {"deepspeed": deepspeed, "ranks": n}
    dirs = {"ref": work / name / "reference", "run": work / name / "run"}
    for key, folder in dirs.items():
        cfg_file = work / name / f"{key}.yaml"
        if not run.dry:
            import yaml

            cfg_file.parent.mkdir(parents=True, exist_ok=True)
            cfg_file.write_text(yaml.safe_dump(run_config(paths, folder, deepspeed, model),
                                               sort_keys=False))
    train = [*launcher, "launch/train.py", "--config"]
    rc, secs, tail = run([*train, str(work / name / "ref.yaml")])
    result["reference"] = {"rc": rc, "s": round(secs, 1)}
    rc_cut, _, _ = run([*train, str(work / name / "run.yaml")], {"GERE_DS_KILL_AT": KILL_AT})
    rc, secs, tail2 = run([*train, str(work / name / "run.yaml")])
    result["killed_rc"], result["resumed_run"] = rc_cut, {"rc": rc, "s": round(secs, 1)}
    if run.dry:
        ok = True
    elif result["reference"]["rc"] or rc:
        result["error"] = (tail or tail2)[-1500:]
        return {**result, "ok": False}
    else:
        result.update(summarize(dirs["run"], dirs["ref"], deepspeed))
        ok = result["resume_equal"] and result["resumed"] and rc_cut != 0
    evaluate = [*launcher, "eval/evaluate.py", "--config", str(dirs["run"] / "config.yaml"),
                "--run", str(dirs["run"])]
    for mode in ("rank", "generate"):
        out = work / name / f"eval_{mode}"
        rc, secs, tail = run([*evaluate, "--out", str(out), f"eval.mode={mode}"])
        entry: dict[str, Any] = {"rc": rc, "s": round(secs, 1)}
        if not run.dry and rc == 0:
            entry["matrix"] = json.loads((out / "metrics.json").read_text())["matrix"]
        elif rc:
            entry["error"] = tail[-1500:]
        result[f"evaluate_{mode}"] = entry
        ok = ok and rc == 0
    export = work / name / "export"
    rc, secs, tail = run([sys.executable, "launch/export.py", str(dirs["run"]), "--task", "2",
                          "--out", str(export), "--force"])
    entry = {"rc": rc, "s": round(secs, 1)}
    if not run.dry and rc == 0:
        conf = json.loads((export / "config.json").read_text())
        entry.update(dtype=conf.get("dtype") or conf.get("torch_dtype"),
                     bytes=_folder_bytes(export))
    elif rc:
        entry["error"] = tail[-1500:]
    result["export"] = entry
    return {**result, "ok": bool(ok and rc == 0)}


def environment(cpu: bool, n: int) -> dict[str, Any]:
    import deepspeed
    import torch
    import transformers

    env: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__,
                           "deepspeed": deepspeed.__version__,
                           "transformers": transformers.__version__,
                           "accelerator": "cpu" if cpu else "cuda", "ranks": n}
    if not cpu:
        env.update(device=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                   gpu_memory_bytes=torch.cuda.get_device_properties(0).total_memory)
    return env


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    kind = "cpu" if args.cpu else "cuda"
    n = ranks(args.cpu, args.dry_run)
    work = Path(args.work)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               DS_ACCELERATOR=kind)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    run = Runner(args.dry_run, env)
    paths: dict[str, str] = {}
    if not args.dry_run:
        from gere_assets.tiny import make_tiny_assets

        work.mkdir(parents=True, exist_ok=True)
        paths = make_tiny_assets(work / "assets")
    report: dict[str, Any] = {"environment": {} if args.dry_run else environment(args.cpu, n),
                              "configs": {}}
    for name in args.configs.split(","):
        print(f"== {name}: {CONFIGS[kind][name]} on {n or '<GPUs>'} {kind} rank(s)", flush=True)
        report["configs"][name] = check_config(name, CONFIGS[kind][name], n, paths, work,
                                               args.model, run)
    report["ok"] = all(c["ok"] for c in report["configs"].values())
    if args.dry_run:
        return 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({name: {k: c.get(k) for k in ("ok", "stage", "why", "resume_equal")}
                      for name, c in report["configs"].items()}, indent=1))
    print(f"wrote {out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
