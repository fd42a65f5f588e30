"""The optimizer step alone, one process, one thread (what one CPU rank runs), interleaved, median
of repetitions:

  torch AdamW foreach   ``"torch_adam": true`` in the DeepSpeed JSON (torch's default kernels)
  torch AdamW fused     ``"torch_adam": true, "fused": true``: torch's single fused kernel (CPU
                        and CUDA; nothing to compile)
  DeepSpeed FusedAdam   ``"torch_adam": false``: DeepSpeed's own op, compiled at first use (the
                        CPU build here, the CUDA build on a GPU; needs a compiler, and nvcc on a
                        GPU machine). Left out of --smoke, whose job is a quick check.

The parameters are fp32 tensors shaped like a ZeRO-2 rank's partition of the 135M-shape Llama
with a 128k vocabulary (180M parameters over 2 ranks: one 90M flat partition) or, with --smoke,
a 2M partition. Both optimizers start from the same state; after the timed steps their weights
are checked equal within fp32 rounding of the update order.

    python bench/bench_optimizer.py [--smoke] [--params N] [--repeats R]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import common  # bench/ is the script's folder, hence on sys.path
import torch

NAME = "bench_optimizer"


def _device() -> torch.device:
    """DeepSpeed's accelerator device (the CPU here, the GPU on a GPU machine)."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().device_name())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _ds_fused(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    from deepspeed.ops.adam import FusedAdam

    return FusedAdam(params, lr=1e-4, weight_decay=0.01, adam_w_mode=True)


def _optimizers(n_params: int, device: torch.device, with_deepspeed: bool
                ) -> dict[str, tuple[torch.optim.Optimizer, torch.Tensor]]:
    torch.manual_seed(0)
    start = torch.randn(n_params, device=device)
    grad = torch.randn(n_params, device=device) * 1e-3
    makers = {"torch AdamW foreach": lambda p: torch.optim.AdamW(p, lr=1e-4, weight_decay=0.01,
                                                                 foreach=True),
              "torch AdamW fused": lambda p: torch.optim.AdamW(p, lr=1e-4, weight_decay=0.01,
                                                               fused=True)}
    if with_deepspeed:
        makers["DeepSpeed FusedAdam"] = _ds_fused
    out = {}
    for name, make in makers.items():
        w = torch.nn.Parameter(start.clone())
        w.grad = grad.clone()
        out[name] = (make([w]), w)
    return out


def measure(n_params: int, repeats: int, device: torch.device, with_deepspeed: bool) -> dict:
    opts = _optimizers(n_params, device, with_deepspeed)
    times: dict[str, list[float]] = {k: [] for k in opts}
    for opt, _ in opts.values():  # warm-up: state allocation, kernel load
        opt.step()
    for _ in range(repeats):  # interleaved
        for name, (opt, _) in opts.items():
            _sync(device)
            t0 = time.perf_counter()
            opt.step()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    weights = [w.detach() for _, w in opts.values()]
    diff = max(float((w - weights[0]).abs().max()) for w in weights[1:])
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["torch AdamW foreach"]
    return {"params": n_params, "repeats": repeats, "median_s": med,
            "ratio_to_foreach": {k: v / base for k, v in med.items()},
            "max_weight_diff": diff, "times_s": times}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None,
                   help="folder for the JSON (default: results/, or bench/results/ in smoke mode)")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--params", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    a = p.parse_args()
    torch.set_num_threads(1)
    device = _device()
    n = a.params or (2_000_000 if a.smoke else 90_000_000)
    r = a.repeats or (3 if a.smoke else 7)
    res = measure(n, r, device, with_deepspeed=not a.smoke)
    if res["max_weight_diff"] > 1e-5:
        sys.exit(f"optimizers disagree: max weight difference {res['max_weight_diff']:.2e}")
    rows = [[k, f"{v * 1e3:.1f}", f"{res['ratio_to_foreach'][k]:.2f}"]
            for k, v in res["median_s"].items()]
    print(common.table(["optimizer", "ms per step (median)", "ratio to foreach"], rows))
    print(f"{n:,} fp32 parameters, {r} interleaved repetitions, max weight difference "
          f"{res['max_weight_diff']:.1e}")
    common.write_result(NAME, a.smoke, out_dir=a.out or common.result_dir(a.smoke),
                        payload=res)


if __name__ == "__main__":
    main()
