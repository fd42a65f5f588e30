"""gere-ds side by side with the GeRe authors' own trainer, on that trainer's own work.

The authors publish a DeepSpeed ZeRO-2 trainer (``train_demo_multi_gpu.py``: GeReTrainer, w=100,
replay documents shuffled into the task data). This benchmark runs it and gere-ds on the same
work, interleaved round by round (reference, then each gere-ds variant), and reports, per round,
gere-ds' tok/s, teacher-pass time and peak RSS per rank as ratios to the reference's.

The work (the authors' harness, shortened): a Llama with SmolLM2-135M's shape on the Llama-3
tokenizer (128,256 vocabulary, 180M parameters, random weights), bf16, 2 ranks x 1 thread,
micro-batch 1, accumulation 4, the first 240 Yelp reviews of the authors' ``yelp_train.json``
and their 1,000-document replay set shuffled in, TM w=100, k=1, lr 3e-6, 10 optimizer steps.
gere-ds runs the same rows through its own sampler (each side draws its own row mix, so tokens
per step differ: compare tok/s, not seconds per step).

None of the authors' code is in this repository. ``--reference-git`` is a bare git snapshot
of their public repository (``Qznan/GeRe``) that the user provides; ``bench/peer/reference.sh``
exports it, builds the files the snapshot lacks (README.md there), installs the authors'
pinned stack in its own venv and wraps their script for measurement only.

    python bench/bench_peer.py --reference-git DIR --work DIR [--rounds 2] [--steps 10]
    python bench/bench_peer.py --smoke [--reference-git DIR --work DIR]

``--smoke``: the tiny model, one round of 3 steps; both sides when a snapshot is given, gere-ds
alone (on the bench's own tiny model) otherwise. ``--variants`` picks gere-ds configurations
(VARIANTS below; ``name:key=value,key=value`` adds one, where ``ds.<dotted key>=<JSON>`` sets a
key of the DeepSpeed JSON). ``--gere-only`` runs the variants without the reference (to measure
gere-ds' levers against each other on the same work).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import common  # bench/ is the script's folder, hence on sys.path

NAME = "bench_peer"
PEER = common.REPO / "bench" / "peer"
WARM = 3  # steps dropped before the medians (smoke: 1)
N_TASK = 240

# gere-ds configurations compared with the reference (run-config overrides)
VARIANTS: dict[str, dict[str, str]] = {
    "zero3": {"deepspeed": "ds_configs/zero3.json"},
    "zero2": {"deepspeed": "ds_configs/zero2.json"},
    # the split chosen by memory (auto: each rank's 4 rows per step in as few micro-batches as
    # fit) and packed rows; the gradient is the shipped variants' (the per-row loss)
    "zero2_levers": {"deepspeed": "ds_configs/zero2.json", "train.micro_batch_size": "auto",
                     "train.packing": "true"},
    "zero3_levers": {"deepspeed": "ds_configs/zero3.json", "train.micro_batch_size": "auto",
                     "train.packing": "true"},
}


def export_snapshot(git_dir: Path, dest: Path) -> Path:
    """The snapshot's tree as files, blob by blob (``git archive`` stops at the first blob a
    partial snapshot lacks; those are rebuilt by the reference's ``assets`` stage)."""
    if (dest / "train_demo_multi_gpu.py").is_file():
        return dest
    tree = subprocess.run(["git", "--git-dir", str(git_dir), "ls-tree", "-r", "HEAD"],
                          check=True, capture_output=True, text=True).stdout
    for line in tree.splitlines():
        meta, path = line.split("\t", 1)
        sha = meta.split()[2]
        blob = subprocess.run(["git", "--git-dir", str(git_dir), "cat-file", "blob", sha],
                              capture_output=True)
        if blob.returncode == 0:
            (dest / path).parent.mkdir(parents=True, exist_ok=True)
            (dest / path).write_bytes(blob.stdout)
    if not (dest / "train_demo_multi_gpu.py").is_file():
        sys.exit(f"{git_dir}: no train_demo_multi_gpu.py at HEAD; is it a snapshot of Qznan/GeRe?")
    return dest


def reference_env(work: Path, **extra: Any) -> dict[str, str]:
    env = dict(os.environ, GERE_REF_WORK=str(work / "reference"))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_reference(src: Path, work: Path, stages: list[str], **knobs: Any) -> None:
    cmd = ["bash", str(PEER / "reference.sh"), str(src), *stages]
    log = work / "reference.log"
    with open(log, "a") as fh:
        code = subprocess.call(cmd, env=reference_env(work, **knobs), stdout=fh,
                               stderr=subprocess.STDOUT)
    if code != 0:
        sys.exit(f"reference stage(s) {' '.join(stages)} failed (exit {code}); see {log}")


# ----------------------------------------------------------------------------- the gere-ds side


def work_assets(src: Path | None, work: Path, smoke: bool) -> dict[str, str]:
    """Model, task file (the first 240 Yelp rows as a JSON array) and replay file of the work."""
    if src is None:  # gere-ds alone: the bench's tiny model and data
        paths = common.build_assets(common.SMOKE, work / "assets", n_task=N_TASK, n_replay=64)
        return {"model": paths["model"], "task": paths["train"], "replay": paths["replay"],
                "text_field": "sentence"}
    rows = json.loads((src / "yelp_train.json").read_text())[:N_TASK]
    task = work / f"yelp{N_TASK}.json"
    task.write_text(json.dumps(rows))
    model = "llama-3.1-tiny-random" if smoke else "llama-smollm2-135m-shape-random"
    return {"model": str(src / "base_llms" / model), "task": str(task),
            "replay": str(src / "gere" / "slimpajama" / "slimpajama_6B_chunk0_head1k.jsonl"),
            "text_field": "sentence"}


def gere_config(assets: dict[str, str], steps: int, out: Path) -> dict[str, Any]:
    """The authors' harness settings as a gere-ds run config."""
    n_replay = sum(1 for ln in Path(assets["replay"]).read_text().splitlines() if ln.strip())
    return {
        "model": assets["model"], "output_dir": str(out), "deepspeed": "ds_configs/zero3.json",
        "resume": "never",
        "tasks": [{"name": "yelp", "train": assets["task"],
                   "instruction": "What is the sentiment of the following paragraph? Choose one "
                                  "from the option.",
                   "labels": ["very negative", "negative", "neutral", "positive",
                              "very positive"],
                   "text_field": assets["text_field"], "label_field": "label"}],
        "replay": {"data": assets["replay"], "num_samples": n_replay, "max_len": 563,
                   "strategy": "tm", "weight": 100, "threshold_k": 1.0, "per_batch": 0},
        "train": {"epochs": 3, "lr": 3.0e-6, "warmup_steps": 10, "micro_batch_size": 1,
                  "grad_accum": 4, "max_source_len": 512, "max_target_len": 50,
                  "max_steps_per_task": steps, "seed": 42, "bf16": True,
                  "gradient_checkpointing": True, "log_every": 1},
        "eval": {"enabled": False},
        "checkpoint": {"every_steps": 0},
    }


def run_gere(name: str, overrides: dict[str, str], cfg: dict[str, Any], out: Path,
             timeout: int) -> Path:
    """One launch of launch/train.py under the probe, with a fresh run folder and teacher
    cache (so the teacher pass is measured every time)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    overrides = dict(overrides)
    ds_keys = {k[3:]: v for k, v in overrides.items() if k.startswith("ds.")}
    if ds_keys:  # a copy of the DeepSpeed JSON with these keys set (ZeRO knobs)
        ds = json.loads((common.REPO / overrides.get("deepspeed", cfg["deepspeed"])).read_text())
        for dotted, value in ds_keys.items():
            *parents, leaf = dotted.split(".")
            node = ds
            for key in parents:
                node = node.setdefault(key, {})
            node[leaf] = json.loads(value)
        (out / "ds.json").write_text(json.dumps(ds, indent=1))
        overrides = {k: v for k, v in overrides.items() if not k.startswith("ds.")}
        overrides["deepspeed"] = str(out / "ds.json")
    config = common.write_config({**cfg, "output_dir": str(out / "run")}, out / "config.yaml")
    args = ["--config", str(config), *[f"{k}={v}" for k, v in overrides.items()]]
    code, tail = common.launch(PEER / "probe.py", args, timeout=timeout, log=out / "stdout.log",
                               env={"PROBE_OUT": str(out)})
    (out / "rc").write_text(f"{code}\n")
    if code != 0:
        print(f"gere-ds {name} failed (exit {code}):\n{tail[-2000:]}", file=sys.stderr)
    shutil.rmtree(out / "run" / "checkpoints", ignore_errors=True)
    return out


# ----------------------------------------------------------------------------- summaries


def summarize(ranks: list[dict[str, Any]], tokens_global: bool, teacher_key: str,
              warm: int) -> dict[str, Any]:
    """Step median (slowest rank), tok/s over the steps after ``warm``, teacher seconds (slowest
    rank) and peak RSS per rank (GiB) of one run's per-rank probe records."""
    n = min(len(r["steps"]) for r in ranks)
    dts = [max(r["steps"][i]["dt"] for r in ranks) for i in range(n)]
    toks = [ranks[0]["steps"][i]["tokens"] if tokens_global
            else sum(r["steps"][i]["tokens"] for r in ranks) for i in range(n)]
    post = range(min(warm, max(n - 1, 0)), n)
    teacher = [r.get(teacher_key) for r in ranks if r.get(teacher_key) is not None]
    peak = [max([s["hwm"] for s in r["steps"]] + [v["hwm"] for v in r["phases"].values()])
            / 2**30 for r in ranks]
    return {"steps": n, "step_s_median": statistics.median(dts[i] for i in post),
            "tokens_per_step_median": statistics.median(toks[i] for i in post),
            "tok_s": sum(toks[i] for i in post) / sum(dts[i] for i in post),
            "teacher_s": max(teacher) if teacher else None,
            "peak_rss_gib": max(peak), "peak_rss_gib_per_rank": peak,
            "step_s": dts, "tokens": toks}


def read_reference(run_dir: Path, warm: int) -> dict[str, Any] | None:
    ranks = [json.loads(p.read_text()) for p in sorted(run_dir.glob("rank*.json"))]
    if not ranks or not all(r.get("ok") for r in ranks):
        return None
    return summarize(ranks, tokens_global=False, teacher_key="presave_s", warm=warm)


def read_gere(out: Path, warm: int) -> dict[str, Any] | None:
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("probe_rank*.json"))]
    if not ranks or any(r.get("rc") for r in ranks) or not ranks[0]["steps"]:
        return None
    return summarize(ranks, tokens_global=True, teacher_key="teacher_s", warm=warm)


def ratios(ours: dict[str, Any], ref: dict[str, Any]) -> dict[str, float | None]:
    return {"tok_s": ours["tok_s"] / ref["tok_s"],
            "teacher_s": (ours["teacher_s"] / ref["teacher_s"]
                          if ours["teacher_s"] and ref["teacher_s"] else None),
            "peak_rss": ours["peak_rss_gib"] / ref["peak_rss_gib"]}


def parse_variants(names: list[str]) -> dict[str, dict[str, str]]:
    out = {}
    for item in names:
        name, _, spec = item.partition(":")
        if spec:
            out[name] = dict(kv.split("=", 1) for kv in spec.split(","))
        elif name in VARIANTS:
            out[name] = VARIANTS[name]
        else:
            sys.exit(f"unknown variant {name!r}; known: {', '.join(VARIANTS)} "
                     f"(or name:key=value,...)")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference-git", type=Path, default=None,
                   help="a bare git snapshot of the authors' repository (Qznan/GeRe)")
    p.add_argument("--work", type=Path, default=None,
                   help="scratch folder (reference venv, runs); default: a folder in /tmp")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 2)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (10)")
    p.add_argument("--variants", nargs="+", default=["zero3", "zero2"],
                   help="gere-ds configurations: names of VARIANTS or name:key=value,...")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for the JSON (default: results/, or bench/results/ in smoke mode)")
    p.add_argument("--smoke", action="store_true", help="tiny model, one round of 3 steps")
    p.add_argument("--gere-only", action="store_true",
                   help="run only the gere-ds variants on the work (levers measured against "
                        "each other; the snapshot still provides the model and data)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per launch")
    a = p.parse_args()
    work = (a.work or Path(f"/tmp/gere-ds-bench-peer{'-smoke' if a.smoke else ''}")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    rounds = a.rounds or (1 if a.smoke else 2)
    steps = a.steps or (3 if a.smoke else 10)
    warm = 1 if a.smoke else WARM
    variants = parse_variants(a.variants)

    src = None
    if a.reference_git is not None:
        src = export_snapshot(a.reference_git.resolve(), work / "reference" / "src")
        run_reference(src, work, ["assets"] if a.gere_only else ["setup", "assets"])
    assets = work_assets(src, work, a.smoke)
    cfg = gere_config(assets, steps, work / "runs")
    model_key = "tiny" if a.smoke else "smol"

    runs: list[dict[str, Any]] = []
    for r in range(1, rounds + 1):
        ref = None
        if src is not None and not a.gere_only:
            load = os.getloadavg()[0]
            run_reference(src, work, ["bench"], MODELS=model_key, PRECS="bf16", VARIANTS="a",
                          REPEATS=r, SKIP_DONE=1, MAX_STEPS=steps,
                          **{f"PER_MODEL_{model_key}_CACHE": "fresh"})
            ref = read_reference(work / "reference" / "runs" / f"{model_key}_bf16_a_r{r}", warm)
            runs.append({"round": r, "impl": "reference", "load_before": load, **(ref or {})})
            print(f"round {r} reference: {json.dumps(_short(ref))}", flush=True)
        for name, overrides in variants.items():
            load = os.getloadavg()[0]
            out = run_gere(name, overrides, cfg, work / "runs" / f"{name}_r{r}", a.timeout)
            ours = read_gere(out, warm)
            row: dict[str, Any] = {"round": r, "impl": f"gere-ds {name}",
                                   "overrides": overrides, "load_before": load, **(ours or {})}
            if ours and ref:
                row["ratio_to_reference"] = ratios(ours, ref)
            runs.append(row)
            print(f"round {r} gere-ds {name}: {json.dumps(_short(ours))} "
                  f"{json.dumps(row.get('ratio_to_reference'))}", flush=True)

    report = {"work": {"model": Path(assets["model"]).name, "steps": steps, "warm_up": warm,
                       "rounds": rounds, "ranks": 2, "micro_batch": 1, "grad_accum": 4,
                       "bf16": True, "task_rows": N_TASK},
              "machine": common.machine_info(), "command": common.command_line(),
              "runs": runs, "summary": summary(runs, variants)}
    print(render(report))
    path = common.write_result(NAME, a.smoke, out_dir=a.out or common.result_dir(a.smoke),
                        payload=report)
    print(f"written {path}")
    if any(not r.get("steps") for r in runs):
        sys.exit("some runs failed; see the run folders under " + str(work))


def _short(s: dict[str, Any] | None) -> dict[str, Any] | None:
    if not s:
        return None
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in s.items()
            if k in ("tok_s", "step_s_median", "teacher_s", "peak_rss_gib")}


def summary(runs: list[dict[str, Any]], variants: dict[str, dict[str, str]]
            ) -> dict[str, Any]:
    """Per variant: the mean over rounds of each ratio to the same round's reference."""
    out: dict[str, Any] = {}
    for name in variants:
        rs = [r["ratio_to_reference"] for r in runs
              if r["impl"] == f"gere-ds {name}" and r.get("ratio_to_reference")]
        if rs:
            out[name] = {k: (statistics.mean(x[k] for x in rs)
                             if all(x[k] is not None for x in rs) else None)
                         for k in ("tok_s", "teacher_s", "peak_rss")}
            out[name]["rounds"] = len(rs)
    return out


def render(report: dict[str, Any]) -> str:
    rows = []
    for r in report["runs"]:
        ratio = r.get("ratio_to_reference") or {}
        rows.append([r["round"], r["impl"], r.get("tok_s", float("nan")),
                     r.get("step_s_median", float("nan")),
                     r.get("tokens_per_step_median", float("nan")),
                     r.get("teacher_s") or float("nan"), r.get("peak_rss_gib", float("nan")),
                     ratio.get("tok_s") or float("nan"), ratio.get("teacher_s") or float("nan"),
                     ratio.get("peak_rss") or float("nan")])
    return common.table(["round", "implementation", "tok/s", "s/step", "tokens/step",
                         "teacher s", "peak RSS GiB", "tok/s ratio", "teacher ratio",
                         "RSS ratio"], rows)


if __name__ == "__main__":
    main()
