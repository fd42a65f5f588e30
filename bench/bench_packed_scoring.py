"""Multiple-choice scoring, one row per choice against all choices packed in one row, side by side.

One process, the real SmolLM2-135M-Instruct in bf16 (built by `gere-ds prepare-assets`), the
continual benchmark's test files: a 10-label task in rank mode (colour from RGB) and a 5-choice
cloze set (CommonsenseQA). For each, the same examples are scored by both layouts in alternating
rounds; reported: seconds per layout (median over rounds), the ratio, the largest difference of
a score, and how many predictions differ (other matrix shapes round differently in bf16, so a
near-tie may flip; the benchmark never compares numbers across layouts, see SCORER_VERSION).

    python bench/bench_packed_scoring.py              # 96 examples each, 3 rounds
    python bench/bench_packed_scoring.py --n 32 --rounds 1
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "assets/models/smollm2-135m-instruct"))
    p.add_argument("--n", type=int, default=96, help="examples per set")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default=str(ROOT / "results/packed_scoring.json"))
    args = p.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gere_ds.config import TaskConfig
    from gere_ds.data.encode import encode_source, encode_target
    from gere_ds.data.prompts import build_prompt
    from gere_ds.evaluation.cloze import choice_loglikelihoods, load_cloze
    from gere_ds.evaluation.scoring import load_task_examples, rank_scores
    from gere_ds.model.engine import model_forward

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval()
    packed = model_forward(model)
    rows = lambda ids, mask: packed(ids, mask)  # noqa: E731  (no `tree`: one row per choice)

    labels = ["black", "blue", "brown", "gray", "green", "orange", "purple", "red", "white",
              "yellow"]
    task = TaskConfig(name="color", train="", instruction="Name the colour closest to the RGB value.",
                      labels=labels)
    examples = load_task_examples(str(ROOT / "assets/data/cl/color/test.jsonl"), task, args.n)
    sources = [encode_source(tok, build_prompt(task.instruction, labels, ex.text, True), 128,
                             "tail") for ex in examples]
    targets = [encode_target(tok, lab, 4) for lab in labels]
    questions = load_cloze(str(ROOT / "assets/data/general_suite/commonsenseqa.jsonl"), args.n)

    sets = {
        "rank, 10 labels (colour)": lambda fwd: rank_scores(fwd, tok, sources, targets,
                                                           args.batch_size),
        "cloze, 5 choices (CommonsenseQA)": lambda fwd: choice_loglikelihoods(
            fwd, tok, questions, args.batch_size),
    }
    report = {}
    for name, score in sets.items():
        times: dict[str, list[float]] = {"per choice": [], "packed": []}
        results = {}
        for r in range(args.rounds):
            order = [("per choice", rows), ("packed", packed)]
            for label, fwd in (order if r % 2 == 0 else order[::-1]):
                t0 = time.perf_counter()
                results[label] = score(fwd)
                times[label].append(time.perf_counter() - t0)
        a, b = results["per choice"], results["packed"]
        diff = max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))
        flips = sum(max(range(len(ra)), key=ra.__getitem__) != max(range(len(rb)), key=rb.__getitem__)
                    for ra, rb in zip(a, b))
        med = {k: statistics.median(v) for k, v in times.items()}
        report[name] = {"examples": len(a), "seconds": med,
                        "speedup": med["per choice"] / med["packed"],
                        "max_score_difference": diff, "predictions_differing": flips}
        print(f"{name}: {len(a)} examples | per choice {med['per choice']:.1f} s | packed "
              f"{med['packed']:.1f} s | {report[name]['speedup']:.2f}x | max |score diff| "
              f"{diff:.2e} | predictions differing {flips}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": Path(args.model).name, "bf16": True,
                                          "rounds": args.rounds, "batch_size": args.batch_size,
                                          "sets": report}, indent=1) + "\n")


if __name__ == "__main__":
    main()
