"""Step time and peak RSS per rank of LoRA against full fine-tuning, side by side.

Each round launches one `deepspeed --num_gpus 2` worker per kind (full, lora), in a rotating
order (interleaved rounds: load drifts hit both kinds alike); a worker builds ONE engine of its
kind (ZeRO-3, CPU ranks over gloo, bf16, tm with w = 100, the trainer's own TrainStep on the
same rows), runs warm-up steps, times the optimizer steps and reports each rank's peak RSS
(ru_maxrss: the whole process, engine build included). Reported: median step time and peak RSS
per kind and the per-round ratios LoRA / full.

    python bench/bench_lora.py            # full: hidden 384, 6 layers, seq 128, 3 rounds x 6 steps
    python bench/bench_lora.py --smoke    # tiny model, one round of 2 steps (for the tests)
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import common  # bench/ is the script's folder, hence on sys.path

NAME = "bench_lora"
KINDS = ("full", "lora")
# every linear layer of the attention and the MLP, rank 16: the usual "all-linear" LoRA
LORA = {"r": 16, "alpha": 32.0, "dropout": 0.0, "continual": "carry",
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                           "down_proj"]}


def worker(args: argparse.Namespace) -> None:
    from gere_ds.runtime import dist
    from gere_ds.training.trainer import ContinualTrainer

    cfg, inputs, rank = common.start_worker(args.config)
    tr = ContinualTrainer(cfg)
    tr.setup(inputs)
    tr.prepare_teacher()
    B = cfg.train.micro_batch_size
    rows = [(False, rank * B + j) for j in range(B - B // 2)]
    rows += [(True, sid) for sid in tr.batches.shard[:B // 2]]

    def step() -> None:
        tr.step.apply(tr.step.compute_loss(0, rows))

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    module = tr.engine.module
    trainable = sum(int(getattr(p, "ds_numel", p.numel())) for p in module.parameters()
                    if p.requires_grad)
    total = sum(int(getattr(p, "ds_numel", p.numel())) for p in module.parameters())
    local = {"rank": rank, "step_s": times, "max_rss_mib": common.max_rss_bytes() / common.MIB}
    gathered = dist.all_gather_object(local)
    if rank == 0:
        Path(args.result).write_text(json.dumps({"ranks": gathered, "trainable": trainable,
                                                 "parameters": total}))
    dist.barrier()


def summarise(rounds: list[dict[str, dict]]) -> dict:
    out: dict = {}
    for kind in KINDS:
        step = [common.median(x for r in rd[kind]["ranks"] for x in r["step_s"]) for rd in rounds]
        rss = [max(r["max_rss_mib"] for r in rd[kind]["ranks"]) for rd in rounds]
        out[kind] = {"step_s": common.spread(step), "peak_rss_mib": common.spread(rss),
                     "per_round_step_s": step, "per_round_rss_mib": rss,
                     "trainable": rounds[0][kind]["trainable"],
                     "parameters": rounds[0][kind]["parameters"]}
    out["lora_vs_full"] = {
        "step_time": common.paired_ratio(out["lora"]["per_round_step_s"],
                                         out["full"]["per_round_step_s"]),
        "peak_rss": common.paired_ratio(out["lora"]["per_round_rss_mib"],
                                        out["full"]["per_round_rss_mib"])}
    return out


def report(s: dict) -> str:
    rows = [[k, f"{s[k]['trainable']:,} / {s[k]['parameters']:,}",
             f"{s[k]['step_s']['median'] * 1e3:.0f}", f"{s[k]['peak_rss_mib']['median']:.0f}"]
            for k in KINDS]
    r = s["lora_vs_full"]
    rows.append(["lora / full", "", f"{r['step_time']['median_of_ratios']:.3f}",
                 f"{r['peak_rss']['median_of_ratios']:.3f}"])
    return common.table(["kind", "trainable / parameters", "step ms (median)",
                         "peak RSS MiB (max rank)"], rows)


def main() -> int:
    p = common.bench_parser(__doc__, "tiny model, one round of 2 steps")
    p.add_argument("--steps", type=int, default=None, help="timed steps per worker (default 6)")
    p.add_argument("--kind", choices=KINDS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        common.run_worker_and_exit(worker, args)

    run = common.bench_run(NAME, args)
    reps = args.reps or (1 if args.smoke else 3)
    steps = args.steps or (2 if args.smoke else 6)
    rounds: list[dict[str, dict]] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        tmp = Path(tmp)
        for r in range(reps):
            order = KINDS if r % 2 == 0 else KINDS[::-1]
            found: dict[str, dict] = {}
            for kind in order:
                cfg = common.run_config(run.paths, run.spec, tmp / f"run-{kind}-{r}", "tm",
                                        teacher_cache=tmp / "teacher")
                if kind == "lora":
                    cfg["train"]["lora"] = LORA
                path = common.write_config(cfg, tmp / f"{kind}.yaml")
                result = tmp / f"result-{kind}-{r}.json"
                code, tail = common.launch(
                    Path(__file__), ["--worker", "--config", str(path), "--result", str(result),
                                     "--warmup", str(run.warmup), "--steps", str(steps)],
                    nproc=common.WORLD, log=run.out_dir / "logs" / f"{run.log_tag}-{kind}.log")
                if code != 0 or not result.is_file():
                    print(tail, file=sys.stderr)
                    print(f"error: the {kind} worker failed (exit {code})", file=sys.stderr)
                    return 1
                found[kind] = json.loads(result.read_text())
            rounds.append(found)
    summary = summarise(rounds)
    payload = run.payload(time.perf_counter() - t0, "deepspeed --num_gpus 2 (CPU ranks, gloo), "
                          "ZeRO-3, bf16, torch AdamW, one launch per kind and round",
                          lora=LORA, steps=steps, summary=summary, raw=rounds)
    run.reps = reps
    path = common.write_result(NAME, args.smoke, payload, run.out_dir)
    print(run.header())
    print(report(summary))
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
