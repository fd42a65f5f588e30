"""Training micro-batches padded against packed (``train.packing``): padding and step time.

The rows are the continual benchmark's (configs/bench/continual.yaml: its three tasks, replay
rows mixed in as its sampler plans them, every micro-batch of both ranks for the first
``--steps`` optimizer steps of each task); the forward is the trainer's own
(``TrainStep.compute_loss``: the LM head on supervised positions, the final-norm capture, the
replay term) followed by the backward of its loss, on SmolLM2-135M-Instruct in bf16, one
process, one thread (what one CPU rank has). Both layouts run the same micro-batches, in
alternating order, round after round. Reported: the padding fraction of each layout (token
slots the forward computes that hold no row's token), seconds per micro-batch (median over
rounds) of the process's CPU time, which other jobs on a shared machine disturb far less than
wall time (both are kept), the per-round ratio padded / packed, the largest difference of the
step loss, the model-FLOPs utilisation (the training FLOPs the rows need, 6 x the body's
parameters per real token and 6 x the LM head's per supervised position, per CPU second, over
the rate this thread multiplies the model's matrices at, measured here), and a profile of a few
micro-batches: the share of CPU time in matrix products, attention, norms, softmax / CE,
indexing, elementwise work and the rest.
``--smoke`` (and a machine without the benchmark's assets) uses the bench's tiny Llama and its
synthetic task, in fp32.

    python bench/bench_packing.py                 # 10 steps per task, 3 rounds
    python bench/bench_packing.py --smoke
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common  # bench/ is the script's folder, hence on sys.path
import torch

NAME = "bench_packing"
CONFIG = common.REPO / "configs/bench/continual.yaml"
WORLD = 2  # the benchmark's ranks: the sampler plans both ranks' rows
LAYOUTS = ("padded", "packed")


def _config(smoke: bool, root: Path) -> tuple[Any, bool]:
    from gere_ds.config.loading import load_config

    if not smoke and (common.REPO / "assets/models/smollm2-135m-instruct").is_dir():
        return load_config(str(CONFIG), ["replay.strategy=replay", f"output_dir={root}/run"]), True
    paths = common.build_assets(common.SMOKE, root / "assets", n_task=32, n_replay=8)
    cfg = common.run_config(paths, common.SMOKE, root / "run", "replay")
    cfg["replay"]["per_batch"] = 1
    cfg["train"]["bf16"] = False  # fp32: the layouts' losses then agree to summation order
    return load_config(str(common.write_config(cfg, root / "smoke.yaml"))), False


def _micro_batches(cfg: Any, inputs: Any, steps: int) -> list[tuple[int, int, list]]:
    """(rank, task, rows) of every micro-batch of the first ``steps`` steps of each task."""
    from gere_ds.data.sampler import ContinualSampler

    t, out = cfg.train, []
    for task in range(len(cfg.tasks)):
        for rank in range(WORLD):
            s = ContinualSampler(len(inputs.train_sets[task]), len(inputs.replay_texts), WORLD,
                                 rank, t.micro_batch_size, t.grad_accum, cfg.replay.per_batch,
                                 t.seed, task)
            for step in range(min(steps, s.steps_per_epoch())):
                out += [(rank, task, rows) for rows in s.step_micro_batches(0, step)]
    return out


# operator name -> the part of a step it belongs to (the rest is "other")
PARTS = (("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")),
         ("attention", ("scaled_dot_product", "attention")),
         ("norm", ("rsqrt", "aten::pow", "aten::mean")),
         ("softmax / CE", ("softmax", "nll_loss", "cross_entropy")),
         ("embedding / index", ("embedding", "index_select", "index_add", "gather",
                                "index_put", "scatter")),
         ("elementwise", ("aten::mul", "aten::add", "aten::silu", "aten::sub", "aten::neg",
                          "aten::cat", "aten::where", "aten::relu", "aten::copy_", "aten::to",
                          "aten::_to_copy", "aten::div")))


def _profile(steps: dict[int, Any], model: Any, plan: list) -> dict[str, float]:
    """Share of the self CPU time of a few micro-batches' forward and backward per part."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for rank, task, rows in plan:
            steps[rank].compute_loss(task, rows).local_loss.backward()
    model.zero_grad(set_to_none=True)
    totals: dict[str, float] = {}
    other: dict[str, float] = {}
    for event in prof.key_averages():
        name = event.key
        part = next((p for p, keys in PARTS if any(k in name for k in keys)), "other")
        totals[part] = totals.get(part, 0.0) + event.self_cpu_time_total
        if part == "other":
            other[name] = event.self_cpu_time_total
    whole = sum(totals.values()) or 1.0
    shares = {k: round(v / whole, 3) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}
    top = sorted(other.items(), key=lambda kv: -kv[1])[:6]
    return shares | {"other, largest": {k: round(v / whole, 3) for k, v in top}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny model, one round")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per task")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--assets", default=None, help="unused (same interface as the others)")
    args = p.parse_args()
    from gere_ds.training.batches import BatchMaker
    from gere_ds.training.inputs import validate_inputs
    from gere_ds.model.capture import FinalNormCapture
    from gere_ds.model.engine import Engine, _load_model, load_tokenizer
    from gere_ds.training.step import TrainStep
    from gere_ds.strategies import make_term

    torch.set_num_threads(1)
    torch.manual_seed(0)
    rounds = args.rounds or (1 if args.smoke else 3)
    steps = args.steps or (2 if args.smoke else 10)
    tmp = tempfile.TemporaryDirectory()
    cfg, real = _config(args.smoke, Path(tmp.name))
    inputs = validate_inputs(cfg, WORLD)
    tok = load_tokenizer(cfg, lambda m: None)
    model, _ = _load_model(cfg, {})
    if cfg.train.bf16:
        model = model.to(torch.bfloat16)  # what DeepSpeed's bf16 trains on a CPU rank
    model.train()
    engine = Engine(engine=model, tokenizer=tok, ds_config={}, hf_ds_config=None)
    capture = FinalNormCapture(model)
    term = make_term(cfg)
    plan = _micro_batches(cfg, inputs, steps)
    makers = {r: BatchMaker(cfg, tok, torch.device("cpu"), inputs.train_sets,
                            inputs.replay_texts, term.uses_replay, WORLD, r) for r in range(WORLD)}
    trainers = {}
    for layout in LAYOUTS:
        c = copy.deepcopy(cfg)
        c.train.packing = layout == "packed"
        trainers[layout] = {r: TrainStep(c, engine, capture, makers[r], term, WORLD)
                            for r in range(WORLD)}
    slots = {layout: 0 for layout in LAYOUTS}
    real_tokens = supervised = 0
    for rank, task, rows in plan:
        mb, _ = makers[rank].make(task, rows, trainers["packed"][rank].pack_capacity)
        real_tokens += int(mb.attention_mask.sum())
        supervised += len(mb.positions)
        slots["padded"] += mb.input_ids.numel()
        slots["packed"] += mb.packed.input_ids.numel()
    seconds: dict[str, list[float]] = {k: [] for k in LAYOUTS}  # CPU time of this process
    wall: dict[str, list[float]] = {k: [] for k in LAYOUTS}
    losses: dict[str, list[float]] = {k: [] for k in LAYOUTS}
    for r in range(rounds):
        for layout in (LAYOUTS if r % 2 == 0 else LAYOUTS[::-1]):
            got = []
            t0, c0 = time.perf_counter(), time.process_time()
            for rank, task, rows in plan:
                sl = trainers[layout][rank].compute_loss(task, rows)
                sl.local_loss.backward()
                got.append(float(sl.local_loss.detach()))
            model.zero_grad(set_to_none=True)
            seconds[layout].append((time.process_time() - c0) / len(plan))
            wall[layout].append((time.perf_counter() - t0) / len(plan))
            losses[layout] = got
        print(f"round {r + 1}: " + ", ".join(f"{k} {seconds[k][-1]:.3f} s (CPU) per micro-batch"
                                             for k in LAYOUTS), flush=True)
    ratios = [a / b for a, b in zip(seconds["padded"], seconds["packed"])]
    shape, dtype = model.config, next(model.parameters()).dtype
    rate = common.gemm_rate(512, shape.hidden_size, shape.intermediate_size, dtype,
                            seconds=0.5 if args.smoke else 3.0)
    # the work the rows need: every matrix of the body on every real token, the LM head on the
    # supervised positions only (the trainer runs it nowhere else)
    head = model.get_output_embeddings().weight.numel()
    body = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    if not model.config.tie_word_embeddings:
        body -= head
    flops_per_micro_batch = 6.0 * (body * real_tokens + head * supervised) / len(plan)
    tokens_per_s = {k: real_tokens / len(plan) / statistics.median(v) for k, v in seconds.items()}
    profile = {k: _profile(trainers[k], model, plan[:4]) for k in LAYOUTS}
    payload = {
        "what": "TrainStep.compute_loss + backward per micro-batch, padded vs packed rows",
        "model": str(cfg.model), "bf16": cfg.train.bf16, "real_assets": real,
        "micro_batches": len(plan), "steps_per_task": steps, "rounds": rounds,
        "micro_batch_size": cfg.train.micro_batch_size,
        "padding_fraction": {k: round(1 - real_tokens / slots[k], 4) for k in LAYOUTS},
        "token_slots": slots, "real_tokens": real_tokens,
        "seconds_per_micro_batch": {k: round(statistics.median(v), 4)
                                    for k, v in seconds.items()},
        "wall_seconds_per_micro_batch": {k: round(statistics.median(v), 4)
                                         for k, v in wall.items()},
        "rounds_cpu_seconds": seconds,
        "speedup_padded_over_packed": {"median": round(statistics.median(ratios), 3),
                                       "min": round(min(ratios), 3),
                                       "max": round(max(ratios), 3)},
        "gemm_flops_per_s": rate, "body_parameters": body, "head_parameters": head,
        "supervised_positions": supervised,
        "real_tokens_per_cpu_s": {k: round(v, 1) for k, v in tokens_per_s.items()},
        "mfu": {k: round(flops_per_micro_batch / statistics.median(v) / rate, 4)
                for k, v in seconds.items()},
        "profile_share": profile,
        "max_loss_difference": max(abs(a - b) for a, b in zip(losses["padded"],
                                                              losses["packed"])),
        "machine": common.machine_info(), "command": common.command_line(),
    }
    out_dir = Path(args.out) if args.out else common.result_dir(args.smoke)
    path = common.write_result(NAME, args.smoke, payload, out_dir)
    print(common.table(["layout", "padding", "CPU s per micro-batch"],
                       [[k, f"{payload['padding_fraction'][k]:.1%}",
                         f"{payload['seconds_per_micro_batch'][k]:.3f}"] for k in LAYOUTS]))
    print("share of CPU time by part: " + "; ".join(
        f"{k}: " + ", ".join(f"{p} {v:.0%}" for p, v in profile[k].items()
                             if not isinstance(v, dict)) for k in LAYOUTS))
    print("largest in other: " + ", ".join(f"{p} {v:.0%}" for p, v in
                                           profile["packed"]["other, largest"].items()))
    print(f"MFU against {rate / 1e9:.0f} GFLOP/s (one thread, {dtype}): " + ", ".join(
        f"{k} {v:.1%}" for k, v in payload["mfu"].items()))
    print(f"padded / packed: {payload['speedup_padded_over_packed']['median']:.2f}x "
          f"(rounds {payload['speedup_padded_over_packed']['min']:.2f}-"
          f"{payload['speedup_padded_over_packed']['max']:.2f}); largest loss difference "
          f"{payload['max_loss_difference']:.2e}; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
