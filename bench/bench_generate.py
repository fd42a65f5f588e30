"""Generate-mode evaluation: the KV-cache decoding loop against the whole-sequence loop.

The prompts are the continual benchmark's (configs/bench/continual.yaml, ``--examples`` test
examples of each task, cut as its evaluation cuts them), decoded greedily for
``--max-new-tokens`` tokens (the paper recipe's generation length is 50) by
``gere_ds.evaluation.scoring.greedy_decode`` on SmolLM2-135M-Instruct in bf16, one process, one
thread; ``kv_cache=False`` is the former loop (the whole right-padded sequence every step, the
LM head on the last tokens only). Both loops decode the same prompts, in alternating order,
round after round. Reported: CPU seconds per prompt (median over rounds), the per-round ratio,
and how many continuations differ (bf16 rounds the two loops' matrix shapes differently).
``--smoke`` (and a machine without the benchmark's assets) uses the tiny Llama in fp32.

    python bench/bench_generate.py                   # 20 prompts per task, 50 tokens, 3 rounds
    python bench/bench_generate.py --smoke
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import common  # bench/ is the script's folder, hence on sys.path
import torch

NAME = "bench_generate"
CONFIG = common.REPO / "configs/bench/continual.yaml"
LOOPS = ("kv_cache", "whole_sequence")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny model, one round")
    p.add_argument("--examples", type=int, default=None, help="test examples per task")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--assets", default=None, help="unused (same interface as the others)")
    args = p.parse_args()
    from gere_ds.config.loading import load_config
    from gere_ds.data.encode import encode_source
    from gere_ds.data.prompts import build_prompt
    from gere_ds.evaluation.scoring import greedy_decode, load_task_examples
    from gere_ds.model.engine import load_tokenizer, model_forward
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    real = not args.smoke and (common.REPO / "assets/models/smollm2-135m-instruct").is_dir()
    rounds = args.rounds or (1 if args.smoke else 3)
    n_new = args.max_new_tokens or (6 if args.smoke else 50)
    n_ex = args.examples or (3 if args.smoke else 20)
    if real:
        cfg = load_config(str(CONFIG))
    else:
        import tempfile

        from gere_assets.tiny import make_tiny_assets, tiny_config_dict

        tmp = tempfile.mkdtemp()
        paths = make_tiny_assets(Path(tmp) / "tiny")
        cfg = load_config(str(common.write_config(
            tiny_config_dict(paths, str(Path(tmp) / "run"), "none"), Path(tmp) / "tiny.yaml")))
    tok = load_tokenizer(cfg, lambda m: None)
    dtype = torch.bfloat16 if real and cfg.train.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype).eval()
    forward = model_forward(model)
    sources = []
    for task in cfg.tasks:
        for ex in load_task_examples(task.test, task, n_ex):
            prompt = build_prompt(task.instruction, [str(x) for x in task.labels], ex.text,
                                  task.option_line)
            sources.append(encode_source(tok, prompt, cfg.train.max_source_len,
                                         cfg.train.truncate_source))
    seconds: dict[str, list[float]] = {k: [] for k in LOOPS}
    out: dict[str, list[list[int]]] = {}
    for r in range(rounds):
        for loop in (LOOPS if r % 2 == 0 else LOOPS[::-1]):
            c0 = time.process_time()
            out[loop] = greedy_decode(forward, tok, sources, n_new, batch_size=cfg.eval.batch_size,
                                      kv_cache=loop == "kv_cache")
            seconds[loop].append((time.process_time() - c0) / len(sources))
        print(f"round {r + 1}: " + ", ".join(f"{k} {seconds[k][-1]:.3f} s (CPU) per prompt"
                                             for k in LOOPS), flush=True)
    ratios = [a / b for a, b in zip(seconds["whole_sequence"], seconds["kv_cache"])]
    differ = sum(a != b for a, b in zip(out["kv_cache"], out["whole_sequence"]))
    payload = {
        "what": "greedy_decode per prompt: KV cache against the whole-sequence loop",
        "model": str(cfg.model), "dtype": str(dtype), "real_assets": real,
        "prompts": len(sources), "max_new_tokens": n_new, "rounds": rounds,
        "batch_size": cfg.eval.batch_size,
        "new_tokens": sum(len(x) for x in out["kv_cache"]),
        "cpu_seconds_per_prompt": {k: round(statistics.median(v), 4) for k, v in seconds.items()},
        "rounds_cpu_seconds": seconds,
        "speedup_whole_over_kv": {"median": round(statistics.median(ratios), 2),
                                  "min": round(min(ratios), 2), "max": round(max(ratios), 2)},
        "continuations_differing": differ,
        "machine": common.machine_info(), "command": common.command_line(),
    }
    out_dir = Path(args.out) if args.out else common.result_dir(args.smoke)
    path = common.write_result(NAME, args.smoke, payload, out_dir)
    print(f"whole sequence / KV cache: {payload['speedup_whole_over_kv']['median']:.2f}x CPU time "
          f"per prompt; {differ} of {len(sources)} continuations differ; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
