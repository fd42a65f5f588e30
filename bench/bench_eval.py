"""One evaluation point of the continual benchmark: the former scoring paths against the packed one.

``rows``: one row per (example, label) in rank mode and per (question, choice) in cloze,
fixed-size batches, full [B, T, V] logits (also for perplexity): ``layout="rows"``.
``tree``: what the benchmark ran before the LM head was restricted: every choice of a context in
one tree-masked row but full [B, T, V] logits, and perplexity as in ``rows``.
``packed``: every choice of a context in one row, batches planned by tokens and balanced over
ranks, the LM head on scored positions only (gere_ds.evaluation.packing, .batching).
Same model, same examples, one process and one thread (what one CPU rank has), the variants
scored set by set in rotating order, round after round; reported: seconds per set and variant
(median over rounds), the ratios to ``packed``, against each former variant the largest score
difference, the predictions that differ and the perplexities, and the work per rank that the
former and the planned batching give two ranks.

The suite is configs/bench/continual.yaml's (3 tasks x 300 examples, 5 cloze sets x 300
questions, 2 perplexity sets x 100 texts) on SmolLM2-135M-Instruct in bf16 when
``gere-ds prepare-assets`` has built them; ``--smoke`` (and a machine without them) uses the tiny
Llama and a tiny suite of the same kinds.

    python bench/bench_eval.py                       # the whole suite, 2 rounds
    python bench/bench_eval.py --max-examples 64     # a sample of every set
    python bench/bench_eval.py --smoke
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import common  # bench/ is the script's folder, hence on sys.path
import torch

NAME = "bench_eval"
CONFIG = common.REPO / "configs/bench/continual.yaml"
VARIANTS = ("rows", "tree", "packed")


class FullLogits:
    """The packed forward without its model: the tree path then reads full [B, T, V] logits."""

    def __init__(self, forward: Any) -> None:
        self.forward = forward
        self.tree = forward.tree

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.forward(ids, mask)


def _real_suite(max_examples: int) -> tuple[Any, Any, Any, bool]:
    """(suite, model, tokenizer, bf16) of the benchmark's config; None if assets are missing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gere_ds.config import load_config
    from gere_ds.evaluation.scoring import EvalSuite

    cfg = load_config(CONFIG)
    cfg.model = str(common.REPO / cfg.model)
    for task in cfg.tasks:
        task.test = str(common.REPO / task.test)
    for g in cfg.eval.general:
        g.path = str(common.REPO / g.path)
        if max_examples:
            g.max_examples = min(g.max_examples or max_examples, max_examples)
    if not Path(cfg.model).is_dir() or not all(Path(t.test).is_file() for t in cfg.tasks):
        return None
    cfg.eval.max_examples = max_examples
    suite = EvalSuite(cfg.tasks, cfg.eval, seed=cfg.eval.sample_seed,
                      max_source_len=cfg.train.max_source_len,
                      max_target_len=cfg.train.max_target_len,
                      truncate_source=cfg.train.truncate_source)
    dtype = torch.bfloat16 if cfg.train.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype).eval()
    return suite, model, AutoTokenizer.from_pretrained(cfg.model), cfg.train.bf16


def _tiny_suite(root: Path) -> tuple[Any, Any, Any, bool]:
    """The tiny Llama and a suite of the benchmark's kinds: 2 rank tasks, a cloze set, texts."""
    import random

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gere_assets.tiny import make_tiny_assets, tiny_config_dict
    from gere_ds.config import GeneralEvalConfig, TaskConfig
    from gere_ds.evaluation.scoring import EvalSuite

    paths = make_tiny_assets(root, n_test=24, n_replay=24)
    rng = random.Random(0)
    texts = [json.loads(line)["text"] for line in Path(paths["replay"]).read_text().splitlines()]
    cloze = root / "cloze.jsonl"
    cloze.write_text("".join(json.dumps({"context": t, "choices": rng.sample(texts, 3),
                                         "gold": rng.randrange(3)}) + "\n" for t in texts))
    news = root / "texts.jsonl"
    news.write_text("".join(json.dumps({"text": " ".join(rng.sample(texts, rng.randint(1, 6)))})
                            + "\n" for _ in texts))
    raw = tiny_config_dict(paths, str(root / "run"))
    tasks = [TaskConfig(**t) for t in raw["tasks"]]
    general = [GeneralEvalConfig(name="cloze", kind="cloze", path=str(cloze)),
               GeneralEvalConfig(name="texts_ppl", kind="perplexity", path=str(news))]
    cfg = SimpleNamespace(mode="rank", max_examples=0, batch_size=4, max_new_tokens=4,
                          general=general)
    suite = EvalSuite(tasks, cfg, seed=0, max_source_len=64, max_target_len=4)
    model = AutoModelForCausalLM.from_pretrained(paths["model"]).eval()
    return suite, model, AutoTokenizer.from_pretrained(paths["model"]), False


def _scorers(suite: Any, tok: Any, forward: Any) -> dict[str, Callable[[str], Any]]:
    """Set name -> score(variant), as EvalSuite.evaluate scores it."""
    from gere_ds.evaluation.general_kinds import score_general
    from gere_ds.evaluation.scoring import score_task

    c = suite.cfg
    full = FullLogits(forward)

    def task_scorer(t: Any) -> Callable[[str], Any]:
        return lambda v: score_task(
            full if v == "tree" else forward, tok, suite.examples[t.name], t, mode="rank",
            batch_size=c.batch_size, max_source_len=suite.max_source_len,
            max_target_len=suite.max_target_len, truncate_source=suite.truncate_source,
            layout="rows" if v == "rows" else "packed")

    def general_scorer(d: Any) -> Callable[[str], Any]:
        def score(v: str) -> Any:
            layout = "packed" if v == "packed" or (v == "tree" and d.cfg.kind != "perplexity") \
                else "rows"
            return score_general(full if v == "tree" else forward, tok, d, c.batch_size,
                                 suite.general_max_len, None, layout)
        return score

    out = {task.name: task_scorer(task) for task in suite.tasks}
    out.update({data.cfg.name: general_scorer(data) for data in suite.general})
    return out


def _kind(suite: Any, name: str) -> str:
    """rank for a task, else the general set's kind."""
    kinds = {d.cfg.name: d.cfg.kind for d in suite.general}
    return kinds.get(name, "rank")


def _compare(a: Any, b: Any) -> dict[str, Any]:
    """How two layouts' results of one set differ (scores, predictions, perplexity)."""
    if hasattr(a, "label_scores"):  # a task in rank mode
        diff = max(abs(x - y) for ra, rb in zip(a.label_scores, b.label_scores)
                   for x, y in zip(ra, rb))
        return {"accuracy": [a.accuracy, b.accuracy], "max_score_difference": diff,
                "predictions_differing": sum(x != y for x, y in zip(a.predictions, b.predictions))}
    if a.kind == "perplexity":
        return {"value": [a.value, b.value], "relative_difference": abs(a.value / b.value - 1)}
    flips = sum(x != y for x, y in zip(a.extra["correct_norm"], b.extra["correct_norm"]))
    return {"value": [a.value, b.value], "outcomes_differing": flips}


def _rank_balance(suite: Any, tok: Any) -> dict[str, float]:
    """Perplexity sets on two ranks: the busier rank's estimated work over an even split, for the
    former batching (round robin, fixed batches) and the planned one."""
    from gere_ds.evaluation.batching import (MAX_BATCH_TOKENS, batch_cost, num_batches,
                                             plan_batches, token_ids)

    out = {}
    bs = suite.cfg.batch_size
    for data in suite.general:
        if data.cfg.kind != "perplexity":
            continue
        sizes = [max(1, len(token_ids(tok, t, True)[:suite.general_max_len])) for t in data.items]
        old = []
        for r in range(2):
            local = sorted(range(r, len(sizes), 2), key=lambda j: -sizes[j])
            old.append(sum(batch_cost(len(ch), sizes[ch[0]]) for b in
                           range(num_batches(len(sizes), 2, bs))
                           if (ch := local[b * bs:(b + 1) * bs])))
        new = [sum(batch_cost(len(ch), sizes[ch[0]]) for ch in plan if ch)
               for plan in plan_batches(sizes, 2, bs, MAX_BATCH_TOKENS)]
        real = sum(s * (1 + s / 4096) for s in sizes) / 2
        out[data.cfg.name] = {"former": max(old) / real, "planned": max(new) / real}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny model and suite, one round")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--max-examples", type=int, default=0, help="a sample of every set (0: all)")
    p.add_argument("--kinds", default="rank,cloze,perplexity",
                   help="which sets to score: rank (the tasks), cloze, perplexity")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated, among " + ", ".join(VARIANTS))
    p.add_argument("--out", default=None)
    p.add_argument("--assets", default=None, help="unused (same interface as the others)")
    args = p.parse_args()
    from gere_ds.model.engine import model_forward

    torch.set_num_threads(1)
    rounds = args.rounds or (1 if args.smoke else 2)
    tmp = tempfile.TemporaryDirectory()
    loaded = None if args.smoke else _real_suite(args.max_examples)
    suite, model, tok, bf16 = loaded or _tiny_suite(Path(tmp.name))
    forward = model_forward(model)
    variants = tuple(v for v in VARIANTS if v in args.variants.split(","))
    if "packed" not in variants or len(variants) < 2:
        p.error("--variants: packed and at least one former path")
    kinds = set(args.kinds.split(","))
    scorers = {name: score for name, score in _scorers(suite, tok, forward).items()
               if _kind(suite, name) in kinds}
    seconds: dict[str, dict[str, list[float]]] = {s: {k: [] for k in variants} for s in scorers}
    results: dict[str, dict[str, Any]] = {s: {} for s in scorers}
    t_start = time.perf_counter()
    for r in range(rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for name, score in scorers.items():
            for v in order:
                t0 = time.perf_counter()
                results[name][v] = score(v)
                seconds[name][v].append(time.perf_counter() - t0)
            print(f"round {r + 1} {name}: " + ", ".join(
                f"{k} {seconds[name][k][-1]:.1f} s" for k in variants), flush=True)
    former = [v for v in variants if v != "packed"]
    sets = {}
    rows_out = []
    for name in scorers:
        med = {k: common.median(v) for k, v in seconds[name].items()}
        sets[name] = {"n": suite.sizes()[name], "seconds": med,
                      "speedup": {v: med[v] / med["packed"] for v in former},
                      "against": {v: _compare(results[name][v], results[name]["packed"])
                                  for v in former}}
        rows_out.append([name, sets[name]["n"], *(med[v] for v in variants),
                         *(sets[name]["speedup"][v] for v in former)])
    total = {k: sum(s["seconds"][k] for s in sets.values()) for k in variants}
    speedup = {v: total[v] / total["packed"] for v in former}
    per_round = {v: [sum(seconds[s][v][i] for s in sets) /
                     sum(seconds[s]["packed"][i] for s in sets) for i in range(rounds)]
                 for v in former}
    rows_out.append(["one evaluation point", sum(s["n"] for s in sets.values()),
                     *(total[v] for v in variants), *(speedup[v] for v in former)])
    machine = common.machine_info()
    machine["load_average_end"] = os.getloadavg()
    payload = {"benchmark": NAME, "smoke": args.smoke, "machine": machine, "world_size": 1,
               "threads": 1, "model": "smollm2-135m-instruct" if loaded else "tiny llama",
               "bf16": bf16, "rounds": rounds, "max_examples": args.max_examples,
               "wall_s": time.perf_counter() - t_start, "sets": sets,
               "variants": list(variants), "kinds": sorted(kinds), "total_seconds": total, "speedup": speedup,
               "speedup_per_round": per_round,
               "perplexity_busiest_rank_of_two": _rank_balance(suite, tok),
               "command": common.command_line()}
    path = common.write_result(NAME, args.smoke, payload,
                               Path(args.out) if args.out else common.result_dir(args.smoke))
    print(f"{NAME}: {payload['model']}, {'bf16' if bf16 else 'fp32'}, 1 thread, {rounds} "
          f"interleaved round(s); load average {machine['load_average'][0]:.2f} -> "
          f"{machine['load_average_end'][0]:.2f}")
    print(common.table(["set", "examples", *(f"{v} s" for v in variants),
                        *(f"{v} / packed" for v in former)], rows_out))
    print(f"\nwritten: {path}")
    tmp.cleanup()
    flips = {n: sum(c.get("predictions_differing", 0) + c.get("outcomes_differing", 0)
                    for c in s["against"].values()) for n, s in sets.items()}
    if not bf16 and any(flips.values()):
        print(f"error: fp32 predictions differ between the paths: {flips}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
