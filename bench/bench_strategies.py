"""(a) tokens/s and peak RSS per rank of one gere-ds optimizer step, per strategy, side by side.

One `deepspeed --num_gpus 2` process tree, ONE engine (ZeRO-3, CPU ranks over gloo, bf16): the
teacher data of tm / kl / l2 is prepared once (each strategy's own teacher pass), then every
round runs one optimizer step of every strategy in a rotating order, on the same model and the
same rows (`none`: task rows only; the others: the same task rows with half of them replaced by
replay rows of the same length, as in a GeRe global batch). The strategy only changes the loss,
so switching `trainer.cfg.replay.strategy` between steps measures exactly its cost. Reported:
median step time over the rounds, tokens/s, the per-round ratio to `replay` (TM's overhead), a
per-phase breakdown (make_batch / forward / loss / backward / optimizer step), and the RSS peak of
one extra (untimed) step per strategy. Also measured: proposal P1 of bench/proposals.py (LM head
only on supervised positions) on none / replay / tm, with its loss checked equal first.

    python bench/bench_strategies.py            # full: hidden 384, 6 layers, seq 128, 5 rounds
    python bench/bench_strategies.py --smoke    # tiny model, one short round (for the tests)
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NAME = "bench_strategies"
WANTED = ["none", "replay", "tm", "kl", "l2"]
TEACHER_STRATEGIES = ("tm", "kl", "l2")
PICK = ["none", "replay", "tm"]  # strategies measured with proposal P1 too


# ============================================================================ worker


def worker(args: argparse.Namespace) -> None:
    import torch

    from gere_ds import dist
    from gere_ds.config import STRATEGIES, load_config
    from gere_ds.trainer import ContinualTrainer, validate_inputs
    import gere_ds.trainer as trainer_mod
    import proposals

    cfg = load_config(args.config)
    W = dist.world_size()
    inputs = validate_inputs(cfg, W)
    dist.init()
    rank = dist.rank()
    tr = ContinualTrainer(cfg)
    tr.setup(inputs)
    B = cfg.train.micro_batch_size
    notes: list[str] = []

    # ---------------------------------------------------------------- teacher data per strategy
    teachers: dict[str, dict] = {}
    teacher_s: dict[str, float] = {}
    for s in TEACHER_STRATEGIES:
        if s not in STRATEGIES:
            notes.append(f"{s}: skipped, replay.strategy does not accept it "
                         f"(gere_ds.config.STRATEGIES = {STRATEGIES})")
            continue
        tr.cfg.replay.strategy = s
        dist.barrier()
        t0 = time.perf_counter()
        try:
            tr.prepare_teacher()
        except Exception as err:  # noqa: BLE001 -- reported; every rank fails the same way
            notes.append(f"{s}: skipped, teacher pass failed: {type(err).__name__}: {err}")
            continue
        teacher_s[s] = time.perf_counter() - t0
        teachers[s] = {"teacher": tr.teacher, "lo": getattr(tr, "_lo", None),
                       "hi": getattr(tr, "_hi", None)}
    strategies = [s for s in WANTED
                  if s in ("none", "replay") and s in STRATEGIES or s in teachers]

    # ---------------------------------------------------------------- the fixed rows of a step
    task_rows = [(False, rank * B + j) for j in range(B)]
    n_rep = B // 2
    mixed_rows = task_rows[:B - n_rep] + [(True, sid) for sid in tr.shard[:n_rep]]

    def use(strategy: str) -> None:
        tr.cfg.replay.strategy = strategy
        if strategy in teachers:
            t = teachers[strategy]
            tr.teacher = t["teacher"]
            if t["lo"] is not None:
                tr._lo, tr._hi = t["lo"], t["hi"]

    variants: dict[str, tuple[str, list, bool]] = {}
    for s in strategies:
        variants[s] = (s, task_rows if s == "none" else mixed_rows, False)
    if not args.no_proposals:
        for s in PICK:
            if s in strategies:
                variants[f"{s}+P1"] = (s, task_rows if s == "none" else mixed_rows, True)

    # ---------------------------------------------------------------- phase timers (real code)
    timer = common.Timer()
    eng = tr.engine
    tr.make_batch = timer.wrap("make_batch", tr.make_batch)
    eng.forward = timer.wrap("forward", eng.forward)
    tr.local_terms = timer.wrap("loss_terms", tr.local_terms)
    trainer_mod.combine = timer.wrap("combine", trainer_mod.combine)
    raw_backward, raw_step = eng.engine.backward, eng.engine.step
    eng.engine.backward = timer.wrap("backward", raw_backward)
    eng.engine.step = timer.wrap("optimizer_step", raw_step)
    for t in teachers.values():
        t["teacher"].batch = timer.wrap("teacher_fetch", t["teacher"].batch)

    def step(name: str):
        strategy, rows, pick = variants[name]
        use(strategy)
        tr._bad_micro_steps = 0
        if pick:
            return proposals.pick_micro_step(tr, rows)
        return tr.micro_step(0, rows)

    # ---------------------------------------------------------------- P1 gives the same loss
    checks = {}
    if not args.no_proposals:
        with torch.no_grad():
            for s in PICK:
                if s not in strategies:
                    continue
                use(s)
                rows = variants[s][1]
                mb, rid = tr.make_batch(0, rows)
                logits = eng.forward(mb.input_ids, mb.attention_mask)
                full = trainer_mod.combine(tr.local_terms(logits, tr.capture.pop(), mb, rid),
                                           tr.cfg.replay.weight)
                picked = trainer_mod.combine(proposals.pick_forward(tr, rows),
                                             tr.cfg.replay.weight)
                checks[s] = {"loss": float(full.loss), "loss_P1": float(picked.loss),
                             "rel_diff": abs(float(full.loss) - float(picked.loss))
                             / max(abs(float(full.loss)), 1e-12)}
        timer.reset()

    # ---------------------------------------------------------------- warm-up, then rounds
    names = list(variants)
    for _ in range(args.warmup):
        for name in names:
            step(name)
    timer.reset()
    times: dict[str, list[float]] = {n: [] for n in names}
    phases: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    tokens: dict[str, float] = {}
    for r in range(args.reps):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate: no fixed position
        for name in order:
            dist.barrier()
            timer.reset()
            t0 = time.perf_counter()
            sl = step(name)
            times[name].append(time.perf_counter() - t0)
            phases[name].append(timer.reset())
            tokens[name] = float(sl.tokens)

    # ---------------------------------------------------------------- memory: one untimed step
    memory: dict[str, dict[str, float]] = {}
    for name in names:
        dist.barrier()
        with common.RssPeak() as m:
            step(name)
        memory[name] = {"rss_start_mib": m.start / common.MIB, "rss_peak_mib": m.peak / common.MIB,
                        "step_extra_mib": (m.peak - m.start) / common.MIB}

    # ---------------------------------------------------------------- per-step collective cost
    dist.barrier()
    n_calls = 20
    t0 = time.perf_counter()
    for _ in range(n_calls):
        dist.any_rank(False)
    any_rank_ms = (time.perf_counter() - t0) / n_calls * 1e3

    local = {"rank": rank, "times": times, "phases": phases, "memory": memory,
             "max_rss_mib": common.max_rss_bytes() / common.MIB, "teacher_s": teacher_s,
             "any_rank_ms": any_rank_ms}
    gathered = dist.all_gather_object(local)
    if rank == 0:
        out = {"world_size": W, "micro_batch": B, "rows": {"none": task_rows, "mixed": mixed_rows},
               "variants": {n: {"strategy": v[0], "P1": v[2]} for n, v in variants.items()},
               "tokens_per_step": tokens, "ranks": gathered, "notes": notes,
               "P1_checks": checks, "teacher_manifests": manifests(tr, teachers)}
        Path(args.result).write_text(json.dumps(out, default=str))
    dist.barrier()  # clean exit without destroy_process_group (docs/platform.md)


def manifests(tr, teachers: dict) -> dict:
    """Rank 0's cache manifest per strategy (bytes per token)."""
    from gere_ds.teacher_cache import rank_dir  # noqa: F401

    root = Path(tr.cfg.replay.teacher_cache)
    out = {}
    for path in sorted(root.glob("*/rank00000-of-*/manifest.json")):
        m = json.loads(path.read_text())
        out[m.get("kind", "states")] = {k: m.get(k) for k in
                                        ("kind", "tokens", "samples", "data_bytes",
                                         "bytes_per_token", "row_width", "hidden_size")}
    return out


# ============================================================================ driver


def summarise(raw: dict) -> dict:
    """Per variant: step time = the slowest rank's time of that round; medians; ratios."""
    names = list(raw["variants"])
    ranks = raw["ranks"]
    per_round = {n: [max(r["times"][n][i] for r in ranks) for i in range(len(ranks[0]["times"][n]))]
                 for n in names}
    rows = {}
    for n in names:
        med = common.median(per_round[n])
        phase_names = sorted({k for r in ranks for ph in r["phases"][n] for k in ph})
        phase = {k: common.median(ph.get(k, 0.0) for ph in ranks[0]["phases"][n])
                 for k in phase_names}
        rows[n] = {"step_s": common.spread(per_round[n]), "tokens": raw["tokens_per_step"][n],
                   "tokens_per_s": raw["tokens_per_step"][n] / med if med else float("nan"),
                   "phases_rank0_s": phase,
                   "rss_peak_mib_per_rank": [r["memory"][n]["rss_peak_mib"] for r in ranks],
                   "step_extra_mib_per_rank": [r["memory"][n]["step_extra_mib"] for r in ranks]}
        for base in ("replay", "none"):
            if base in per_round and n != base:
                rows[n][f"vs_{base}"] = common.paired_ratio(per_round[n], per_round[base])
    for s in PICK:
        if f"{s}+P1" in per_round:
            rows[f"{s}+P1"]["vs_same_strategy"] = common.paired_ratio(per_round[f"{s}+P1"],
                                                                       per_round[s])
    return {"variants": rows, "per_round_s": per_round,
            "max_rss_mib_per_rank": [r["max_rss_mib"] for r in ranks],
            "teacher_pass_s_rank0": ranks[0]["teacher_s"],
            "any_rank_ms": common.median(r["any_rank_ms"] for r in ranks)}


def report(summary: dict, raw: dict) -> str:
    v = summary["variants"]
    head = ["variant", "step s (median)", "min-max", "tokens/s", "x replay", "x none",
            "peak RSS MiB r0/r1", "step extra MiB r0/r1"]
    rows = []
    for n, s in v.items():
        rows.append([n, s["step_s"]["median"], f"{s['step_s']['min']:.3f}-{s['step_s']['max']:.3f}",
                     s["tokens_per_s"],
                     s.get("vs_replay", {}).get("median_of_ratios", float("nan")),
                     s.get("vs_none", {}).get("median_of_ratios", float("nan")),
                     "/".join(f"{x:.0f}" for x in s["rss_peak_mib_per_rank"]),
                     "/".join(f"{x:.0f}" for x in s["step_extra_mib_per_rank"])])
    out = [common.table(head, rows)]
    phases = sorted({k for s in v.values() for k in s["phases_rank0_s"]})
    out.append("\nper-phase time, rank 0, median s:")
    out.append(common.table(["variant", *phases],
                            [[n, *(s["phases_rank0_s"].get(k, 0.0) for k in phases)]
                             for n, s in v.items()]))
    p1 = [[s, v[f"{s}+P1"]["vs_same_strategy"]["median_of_ratios"],
           raw["P1_checks"].get(s, {}).get("rel_diff", float("nan"))]
          for s in PICK if f"{s}+P1" in v]
    if p1:
        out.append("\nproposal P1 (LM head on supervised positions only), step time vs as is:")
        out.append(common.table(["strategy", "P1 / as-is (median of rounds)", "loss rel. diff"],
                                p1))
    out.append(f"\nprocess peak RSS (ru_maxrss) MiB per rank: "
               f"{', '.join(f'{x:.0f}' for x in summary['max_rss_mib_per_rank'])}")
    out.append(f"dist.any_rank (one all-reduce + host sync, run every optimizer step by "
               f"train_task's pre-emption check): {summary['any_rank_ms']:.3f} ms per call")
    for note in raw["notes"]:
        out.append(f"note: {note}")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny model, one short round")
    p.add_argument("--reps", type=int, default=None, help="timed rounds (default 7; smoke 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 1)")
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    p.add_argument("--assets", default=None, help="assets folder (default bench/results/assets)")
    p.add_argument("--no-proposals", action="store_true", help="skip the P1 variants")
    # worker side
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0

    spec = common.SMOKE if args.smoke else common.FULL
    reps = args.reps or (1 if args.smoke else 7)
    warmup = args.warmup if args.warmup is not None else 1
    out_dir = Path(args.out) if args.out else common.RESULTS
    assets = Path(args.assets) if args.assets else common.RESULTS / "assets"
    machine = common.machine_info()
    W = 2
    paths = common.build_assets(spec, assets, n_task=2 * spec.micro_batch * W,
                                n_replay=2 * spec.micro_batch * W)
    with tempfile.TemporaryDirectory(prefix="bench-strat-") as tmp:
        tmp = Path(tmp)
        cfg = common.write_config(common.run_config(paths, spec, tmp / "run", "tm"),
                                  tmp / "cfg.yaml")
        result = tmp / "result.json"
        wargs = ["--worker", "--config", str(cfg), "--result", str(result), "--reps", str(reps),
                 "--warmup", str(warmup)] + (["--no-proposals"] if args.no_proposals else [])
        t0 = time.perf_counter()
        code, tail = common.launch(Path(__file__), wargs, nproc=W,
                                   log=out_dir / "logs" / f"{NAME}{'-smoke' if args.smoke else ''}.log")
        wall = time.perf_counter() - t0
        if code != 0 or not result.is_file():
            print(tail, file=sys.stderr)
            print(f"error: the worker failed (exit {code})", file=sys.stderr)
            return 1
        raw = json.loads(result.read_text())
    summary = summarise(raw)
    machine["load_average_end"] = __import__("os").getloadavg()
    payload = {"benchmark": NAME, "smoke": args.smoke, "machine": machine, "model": spec.__dict__,
               "world_size": W, "reps": reps, "warmup": warmup, "wall_s": wall,
               "command": common.command_line(args.smoke, "bench/bench_strategies.py"),
               "launcher": "deepspeed --num_gpus 2 (CPU ranks, gloo), ZeRO-3, bf16, torch AdamW",
               "summary": summary, "raw": raw}
    path = common.write_result(NAME, args.smoke, payload, out_dir)
    print(f"{NAME}: {machine['cpu_model']}, {machine['usable_cpus']} cpus, torch "
          f"{machine['torch']}, deepspeed {machine['deepspeed']}, transformers "
          f"{machine['transformers']}; model {spec.tag}, seq {spec.seq}, micro batch "
          f"{spec.micro_batch} x {W} ranks; {reps} rounds (+{warmup} warm-up); load average "
          f"{machine['load_average'][0]:.2f} -> {machine['load_average_end'][0]:.2f}")
    print(report(summary, raw))
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
