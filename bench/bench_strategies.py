"""(a) tokens/s and peak RSS per rank of one gere-ds optimizer step, per strategy, side by side.

One `deepspeed --num_gpus 2` process tree, ONE engine (ZeRO-3, CPU ranks over gloo, bf16): the
teacher data of tm / kl / l2 is prepared once (each strategy's own teacher pass), then every
round runs one optimizer step of every strategy in a rotating order, on the same model and the
same rows (`none`: task rows only; the others: the same task rows with half of them replaced by
replay rows of the same length, as in a GeRe global batch). The strategy only changes the loss,
so switching `trainer.cfg.replay.strategy` between steps measures exactly its cost. Reported:
median step time over the rounds, tokens/s, the per-round ratio to `replay` (TM's overhead), a
per-phase breakdown (TrainStep's phases: make_batch / forward / row_terms / reduce_rows /
backward / optimizer_step), and the RSS peak of one extra (untimed) step per strategy. Also
checked first: the trainer's path (LM head only on supervised positions, every strategy whose
term does not read every logit) gives the loss of the full logits (path_checks).

    python bench/bench_strategies.py            # full: hidden 384, 6 layers, seq 128, 5 rounds
    python bench/bench_strategies.py --smoke    # tiny model, one short round (for the tests)
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import common  # bench/ is the script's folder, hence on sys.path

NAME = "bench_strategies"
WANTED = ["none", "replay", "tm", "kl", "l2"]


# ============================================================================ worker


def worker(args: argparse.Namespace) -> None:
    import torch

    from gere_ds.training.losses import STAT_NAMES
    from gere_ds.runtime import dist
    from gere_ds.training.step import TrainStep
    from gere_ds.strategies import make_term
    from gere_ds.training.trainer import ContinualTrainer

    cfg, inputs, rank = common.start_worker(args.config)
    W = dist.world_size()
    tr = ContinualTrainer(cfg)
    tr.setup(inputs)
    B = cfg.train.micro_batch_size
    notes: list[str] = []

    # ---------------------------------------------------------------- teacher data per strategy
    terms = {}
    teacher_s: dict[str, float] = {}
    for s in WANTED:
        cfg.replay.strategy = s
        term = make_term(cfg)
        if term.needs_teacher:
            tr.use_term(term)
            dist.barrier()
            t0 = time.perf_counter()
            try:
                tr.prepare_teacher()  # the term's own teacher pass
            except Exception as err:  # noqa: BLE001 -- reported; every rank fails the same way
                notes.append(f"{s}: skipped, teacher pass failed: {type(err).__name__}: {err}")
                continue
            teacher_s[s] = time.perf_counter() - t0
        terms[s] = term
    strategies = [s for s in WANTED if s in terms]

    # ---------------------------------------------------------------- the fixed rows of a step
    task_rows = [(False, rank * B + j) for j in range(B)]
    n_rep = B // 2
    mixed_rows = task_rows[:B - n_rep] + [(True, sid) for sid in tr.batches.shard[:n_rep]]
    variants = {s: task_rows if s == "none" else mixed_rows for s in strategies}

    # ------------------------------------- the real step per strategy, its phases timed
    timer = common.Timer()
    steps = {s: TrainStep(cfg, tr.engine, tr.capture, tr.batches, terms[s], W,
                          phases=timer.phase) for s in strategies}

    def step(name: str):
        sl = steps[name].compute_loss(0, variants[name])
        steps[name].apply(sl)
        return sl

    # ------------------------- the trainer's path (LM head on supervised positions) vs the full
    # logits, same rows: a term that does not read every logit must give the same loss
    checks = {}
    with torch.no_grad():
        for s in strategies:
            if terms[s].needs_full_logits:
                continue
            full = float(steps[s].compute_loss(0, variants[s], full_logits=True).local_loss)
            picked = float(steps[s].compute_loss(0, variants[s]).local_loss)
            checks[s] = {"loss": full, "loss_trainer_path": picked,
                         "rel_diff": abs(full - picked) / max(abs(full), 1e-12)}
    timer.reset()

    # ---------------------------------------------------------------- warm-up, then rounds
    names = list(variants)
    for _ in range(args.warmup):
        for name in names:
            step(name)
    timer.reset()
    times: dict[str, list[float]] = {n: [] for n in names}
    phases: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    tokens: dict[str, float] = {}  # this rank's non-pad tokens of the step
    for r in range(args.reps):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate: no fixed position
        for name in order:
            dist.barrier()
            timer.reset()
            t0 = time.perf_counter()
            sl = step(name)
            times[name].append(time.perf_counter() - t0)
            phases[name].append(timer.reset())
            tokens[name] = float(sl.stats[STAT_NAMES.index("tokens")])

    # ---------------------------------------------------------------- memory: one untimed step
    memory: dict[str, dict[str, float]] = {}
    for name in names:
        dist.barrier()
        with common.RssPeak() as m:
            step(name)
        memory[name] = {"rss_start_mib": m.start / common.MIB, "rss_peak_mib": m.peak / common.MIB,
                        "step_extra_mib": (m.peak - m.start) / common.MIB}

    # ---------------------------------------------------------------- each term in isolation
    # the strategy term alone (teacher fetch + loss forward + its backward) on the real shapes of
    # the mixed batch, many repetitions interleaved: a precise number for the overhead that the
    # step-level ratios above measure only within the machine's noise
    term_ms = term_costs(tr, terms, mixed_rows, args.term_reps)

    # ---------------------------------------------------------------- (c) teacher pass vs epoch
    # rounds of [tm teacher pass into a fresh cache folder, one real epoch of train_task(0) with
    # tm]; the engine keeps training (the timing does not depend on the weights)
    tr.use_term(terms["tm"] if "tm" in terms else terms["replay"])
    _ = tr.log.tb  # create the TensorBoard writer now, not inside the first timed epoch
    cache0 = tr.cfg.replay.teacher_cache
    teacher_vs_epoch = []
    for r in range(args.epoch_reps):
        tr.cfg.replay.teacher_cache = f"{cache0}-epochbench{r}"
        dist.barrier()
        t0 = time.perf_counter()
        if "tm" in terms:
            tr.prepare_teacher()
        t_teacher = time.perf_counter() - t0
        tr.progress = type(tr.progress)()
        dist.barrier()
        t0 = time.perf_counter()
        tr.train_task(0)
        t_epoch = time.perf_counter() - t0
        teacher_vs_epoch.append({"teacher_s": t_teacher, "epoch_s": t_epoch,
                                 "steps": tr.progress.step_in_task})
    tr.cfg.replay.teacher_cache = cache0
    epoch_shape = {"task_rows": len(inputs.train_sets[0]), "replay_rows": len(inputs.replay_texts),
                   "steps_per_epoch": tr.sampler(0).steps_per_epoch(),
                   "replay_tokens_rank": sum(len(tr.batches.replay_ids[i])
                                             for i in tr.batches.shard),
                   "task_tokens_rank": sum(len(tr.batches.encode(0, i).input_ids)
                                           for i in range(rank, len(inputs.train_sets[0]), W)),
                   "teacher_batch_size": tr.cfg.replay.teacher_batch_size}

    # ---------------------------------------------------------------- per-step collective cost
    dist.barrier()
    n_calls = 20
    t0 = time.perf_counter()
    for _ in range(n_calls):
        dist.any_rank(False)
    any_rank_ms = (time.perf_counter() - t0) / n_calls * 1e3

    local = {"rank": rank, "times": times, "phases": phases, "memory": memory,
             "max_rss_mib": common.max_rss_bytes() / common.MIB, "teacher_s": teacher_s,
             "any_rank_ms": any_rank_ms, "teacher_vs_epoch": teacher_vs_epoch,
             "term_ms": term_ms, "tokens": tokens,
             "epoch_shape": epoch_shape}
    gathered = dist.all_gather_object(local)
    if rank == 0:
        out = {"world_size": W, "micro_batch": B, "rows": {"none": task_rows, "mixed": mixed_rows},
               "variants": {n: {"strategy": n} for n in variants},
               "tokens_per_step": {n: sum(r["tokens"][n] for r in gathered) for n in variants},
               "ranks": gathered, "notes": notes,
               "path_checks": checks, "teacher_manifests": manifests(tr)}
        Path(args.result).write_text(json.dumps(out, default=str))
    dist.barrier()  # clean exit without destroy_process_group, which sometimes aborts at exit on CPU


def term_costs(tr, terms: dict, rows, reps: int) -> dict[str, float]:
    """Median ms of each loss term's own work (teacher fetch + forward + backward), this rank:
    the ReplayTerm's local_sums on the real shapes of the mixed batch."""
    import torch

    from gere_ds.strategies import ReplayRows
    from gere_ds.training.losses import token_ce_sum

    mb, rid = tr.batches.make(0, rows)
    with torch.no_grad():
        logits = tr.engine.forward(mb.input_ids, mb.attention_mask)
        hidden = tr.capture.pop()
    picked = [i for i, sid in enumerate(rid) if sid >= 0]
    sel = torch.tensor(picked)
    replay = ReplayRows(sel, [rid[i] for i in picked], mb.attention_mask.index_select(0, sel),
                        mb.input_ids.shape[1])

    def leaf(t: torch.Tensor) -> torch.Tensor:
        return t.detach().clone().requires_grad_(True)

    def replay_ce() -> None:
        token_ce_sum(leaf(logits), mb.labels, mb.is_replay)[0].backward()

    def term_fn(term):
        return lambda: term.local_sums(replay, leaf(logits), leaf(hidden)).sum.sum().backward()

    fns = {"replay CE (all strategies but none)": replay_ce}
    fns.update({f"{name} term": term_fn(term) for name, term in terms.items()
                if term.needs_teacher})
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: 1e3 * common.median(v[1:]) for k, v in times.items()}


def manifests(tr) -> dict:
    """Rank 0's cache manifest per strategy (bytes per token)."""
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
    return {"variants": rows, "per_round_s": per_round,
            "max_rss_mib_per_rank": [r["max_rss_mib"] for r in ranks],
            "teacher_pass_s_rank0": ranks[0]["teacher_s"],
            "term_ms": {k: max(r["term_ms"][k] for r in ranks) for k in ranks[0]["term_ms"]},
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
    if raw["path_checks"]:
        out.append("\nloss of the trainer's path (LM head on supervised positions) vs the full "
                   "logits, same rows:")
        out.append(common.table(["strategy", "full logits", "trainer", "rel. diff"],
                                [[s, c["loss"], c["loss_trainer_path"], c["rel_diff"]]
                                 for s, c in raw["path_checks"].items()]))
    base = v.get("replay", {}).get("step_s", {}).get("median", float("nan"))
    out.append("\neach loss term alone (teacher fetch + forward + backward, real shapes; slowest "
               "rank's median), as a share of the median `replay` step:")
    out.append(common.table(["term", "ms", "% of replay step"],
                            [[k, ms, 100 * ms / 1e3 / base]
                             for k, ms in summary["term_ms"].items()]))
    out.append(f"\nprocess peak RSS (ru_maxrss) MiB per rank: "
               f"{', '.join(f'{x:.0f}' for x in summary['max_rss_mib_per_rank'])}")
    out.append(f"dist.any_rank (one all-reduce + host sync, run every optimizer step by "
               f"train_task's pre-emption check): {summary['any_rank_ms']:.3f} ms per call")
    for note in raw["notes"]:
        out.append(f"note: {note}")
    return "\n".join(out)


def teacher_vs_epoch_summary(raw: dict) -> dict:
    """(c): per round, the slowest rank's teacher pass and epoch; ratio medians over rounds."""
    ranks = raw["ranks"]
    n = len(ranks[0]["teacher_vs_epoch"])
    teacher = [max(r["teacher_vs_epoch"][i]["teacher_s"] for r in ranks) for i in range(n)]
    epoch = [max(r["teacher_vs_epoch"][i]["epoch_s"] for r in ranks) for i in range(n)]
    shape = ranks[0]["epoch_shape"]
    replay_tokens = sum(r["epoch_shape"]["replay_tokens_rank"] for r in ranks)
    task_tokens = sum(r["epoch_shape"]["task_tokens_rank"] for r in ranks)
    t_med, e_med = common.median(teacher), common.median(epoch)
    return {"teacher_pass_s": common.spread(teacher), "epoch_s": common.spread(epoch),
            "ratio": common.paired_ratio(teacher, epoch), "shape": shape,
            "epoch_steps": ranks[0]["teacher_vs_epoch"][0]["steps"] if n else 0,
            "replay_tokens": replay_tokens, "task_tokens": task_tokens,
            "teacher_s_per_replay_token": t_med / max(replay_tokens, 1),
            "epoch_s_per_token": e_med / max(replay_tokens + task_tokens, 1),
            "first_pass_s_rank0": ranks[0]["teacher_s"]}


def teacher_bytes(raw: dict, spec: common.ModelSpec) -> dict:
    """(d): bytes of teacher data per replay token, measured from the cache manifests (data
    files only) and by formula, at the bench width and at Llama-3.1-8B's; the reference stores
    one torch.save'd fp32 [tokens, D] file per sample (its size measured here)."""
    import io

    import torch

    D, k = spec.hidden, 64
    measured = {kind: m["bytes_per_token"] for kind, m in raw["teacher_manifests"].items()}

    def ref_file_bytes(tokens: int, d: int) -> int:
        buf = io.BytesIO()
        torch.save({"hidden_states": torch.zeros(tokens, d)}, buf)
        return buf.getbuffer().nbytes

    def formula(d: int, vocab: int, tokens: int) -> dict:
        return {"tm (2-bit states)": d / 4, "kl (top-64 int32 id + fp16 log-prob)": 6 * k,
                "l1/l2 (bf16 features)": 2 * d,
                "reference (fp32 hidden-state .pt per sample)": ref_file_bytes(tokens, d) / tokens,
                "full-vocabulary fp32 logits (naive kl)": 4 * vocab}
    big = common.LLAMA_8B
    at_8b = formula(big["hidden"], big["vocab"], big["replay_len"])
    total_8b = {name: v * big["replay_samples"] * big["replay_len"] for name, v in at_8b.items()}
    return {"bench": {"hidden": D, "vocab": 50257, "formula": formula(D, 50257, spec.seq),
                      "measured_manifest": {{"states": "tm", "topk": "kl",
                                             "features": "l1/l2"}.get(kk, kk): v
                                            for kk, v in measured.items()}},
            "llama_3_1_8b": {"hidden": big["hidden"], "vocab": big["vocab"], "per_token": at_8b,
                             "total_bytes_1000x563": total_8b}}


def report_teacher(summary: dict) -> str:
    c, d = summary["teacher_vs_epoch"], summary["teacher_bytes"]
    out = ["\n(c) teacher pass (tm, fresh cache) vs one epoch of training (tm), same run:",
           common.table(["teacher pass s", "epoch s", "teacher/epoch (median of rounds)",
                         "epoch steps", "replay tokens", "task tokens",
                         "teacher ms/replay token", "epoch ms/token"],
                        [[c["teacher_pass_s"]["median"], c["epoch_s"]["median"],
                          c["ratio"]["median_of_ratios"], c["epoch_steps"], c["replay_tokens"],
                          c["task_tokens"], 1e3 * c["teacher_s_per_replay_token"],
                          1e3 * c["epoch_s_per_token"]]])]
    out.append("first teacher pass per strategy, rank 0 s: " + ", ".join(
        f"{k} {v:.2f}" for k, v in c["first_pass_s_rank0"].items()))
    b, big = d["bench"], d["llama_3_1_8b"]
    out.append(f"\n(d) teacher bytes per replay token (bench: D={b['hidden']}; Llama-3.1-8B: "
               f"D={big['hidden']}, V={big['vocab']:,}; total for 1000 samples x 563 tokens):")
    rows = []
    meas = b["measured_manifest"]
    for name, v in b["formula"].items():
        key = name.split(" ")[0]
        rows.append([name, v, meas.get(key, float("nan")), big["per_token"][name],
                     f"{big['total_bytes_1000x563'][name] / 1e9:.2f} GB"])
    out.append(common.table(["teacher data", "B/token bench (formula)",
                             "B/token bench (manifest)", "B/token 8B", "8B total"], rows))
    return "\n".join(out)


def main() -> int:
    p = common.bench_parser(__doc__, "tiny model, one short round")
    p.add_argument("--term-reps", type=int, default=None,
                   help="repetitions of each isolated loss term (default 30; smoke 2)")
    p.add_argument("--epoch-reps", type=int, default=None,
                   help="rounds of [teacher pass, one epoch] (default 3; smoke 1)")
    args = p.parse_args()
    if args.worker:
        common.run_worker_and_exit(worker, args)

    run = common.bench_run(NAME, args)
    epoch_reps = args.epoch_reps or (1 if args.smoke else 3)
    term_reps = args.term_reps or (2 if args.smoke else 30)
    with tempfile.TemporaryDirectory(prefix="bench-strat-") as tmp:
        tmp = Path(tmp)
        cfg = common.write_config(common.run_config(run.paths, run.spec, tmp / "run", "tm"),
                                  tmp / "cfg.yaml")
        result = tmp / "result.json"
        wargs = ["--worker", "--config", str(cfg), "--result", str(result), "--reps",
                 str(run.reps), "--warmup", str(run.warmup), "--epoch-reps", str(epoch_reps),
                 "--term-reps", str(term_reps)]
        t0 = time.perf_counter()
        code, tail = common.launch(Path(__file__), wargs, nproc=common.WORLD,
                                   log=run.out_dir / "logs" / f"{run.log_tag}.log")
        wall = time.perf_counter() - t0
        if code != 0 or not result.is_file():
            print(tail, file=sys.stderr)
            print(f"error: the worker failed (exit {code})", file=sys.stderr)
            return 1
        raw = json.loads(result.read_text())
    summary = summarise(raw)
    summary["teacher_vs_epoch"] = teacher_vs_epoch_summary(raw)
    summary["teacher_bytes"] = teacher_bytes(raw, run.spec)
    payload = run.payload(wall, "deepspeed --num_gpus 2 (CPU ranks, gloo), ZeRO-3, bf16, "
                          "torch AdamW", summary=summary, raw=raw)
    path = common.write_result(NAME, args.smoke, payload, run.out_dir)
    print(run.header())
    print(report(summary, raw))
    print(report_teacher(summary))
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
