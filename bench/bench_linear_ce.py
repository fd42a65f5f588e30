"""The LM head and its CE over the supervised positions: the plain path (the head's [N, V]
logits, then ``losses.row_ce_sums``) against the chunked one (``train.chunked_ce``:
``gere_ds.training.linear_ce``), forward and backward, one process, one thread.

Shapes: a Llama-3 vocabulary (128,256) on SmolLM2-135M's hidden size (576) in bf16, N
supervised positions (``--positions``, default 4,096: about 7 replay rows of 563 tokens).
Reported per variant: the median time over interleaved repetitions, and the peak RSS above the
start of one untimed repetition (the memory the logits and their gradient take); values and
gradients are checked to agree first.

    python bench/bench_linear_ce.py              # results/bench_linear_ce.json
    python bench/bench_linear_ce.py --smoke
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import common  # bench/ is the script's folder, hence on sys.path
import torch

NAME = "bench_linear_ce"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="small shapes, 2 repetitions")
    p.add_argument("--positions", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--assets", default=None, help="unused (same interface as the others)")
    args = p.parse_args()
    from gere_ds.training.linear_ce import CHUNK, linear_cross_entropy
    from gere_ds.training.losses import row_ce_sums

    torch.set_num_threads(1)
    vocab, dim = (5000, 64) if args.smoke else (128256, 576)
    n = args.positions or (300 if args.smoke else 4096)
    reps = args.reps or (2 if args.smoke else 5)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, dim, generator=g).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=g) * 0.05).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=g)
    row_of = torch.arange(n) // 563

    def plain() -> torch.Tensor:
        logits = hidden @ weight.t()  # what the head module computes on the picked positions
        return row_ce_sums(logits, targets, row_of, int(row_of[-1]) + 1)[0]

    def chunked() -> torch.Tensor:
        ce = linear_cross_entropy(hidden, weight, targets)
        return ce.new_zeros(int(row_of[-1]) + 1).index_add(0, row_of, ce)

    variants = {"plain": plain, "chunked": chunked}
    grads = {}
    for name, fn in variants.items():
        hidden.grad = weight.grad = None
        value = fn()
        value.sum().backward()
        grads[name] = (value.detach(), hidden.grad.float(), weight.grad.float())
    diff = {k: float((grads["plain"][i] - grads["chunked"][i]).abs().max()
                     / grads["plain"][i].abs().max()) for i, k in enumerate(("value", "d_hidden",
                                                                            "d_weight"))}
    peak = {}
    for name, fn in variants.items():
        hidden.grad = weight.grad = None
        with common.RssPeak() as rss:
            fn().sum().backward()
        peak[name] = rss.peak - rss.start
    seconds: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(reps):
        for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            hidden.grad = weight.grad = None
            t0 = time.process_time()
            variants[name]().sum().backward()
            seconds[name].append(time.process_time() - t0)
    payload = {
        "what": "LM head + CE forward and backward on N positions: plain vs chunked",
        "vocab": vocab, "hidden": dim, "positions": n, "chunk": CHUNK, "reps": reps,
        "relative_difference": diff,
        "cpu_seconds": {k: round(statistics.median(v), 3) for k, v in seconds.items()},
        "peak_rss_mib": {k: round(v / common.MIB) for k, v in peak.items()},
        "logits_mib": round(n * vocab * 2 / common.MIB),
        "machine": common.machine_info(), "command": common.command_line(),
    }
    out_dir = Path(args.out) if args.out else common.result_dir(args.smoke)
    path = common.write_result(NAME, args.smoke, payload, out_dir)
    print(common.table(["variant", "CPU s", "peak RSS above start MiB"],
                       [[k, payload["cpu_seconds"][k], payload["peak_rss_mib"][k]]
                        for k in variants]))
    print(f"relative differences {diff}; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
