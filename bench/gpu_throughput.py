"""A short bf16 training-throughput run on one device: tokens/s, MFU and peak memory.

    python bench/gpu_throughput.py [--cpu] [--steps 20] [--layers 24 --hidden 1024 --seq 1024]

A Llama-shaped model built from a config (no download), AdamW, gradient checkpointing, bf16, as
gere-ds trains; MFU = 6 x parameters x tokens/s / the device's peak bf16 FLOP/s (from the
table below by device name, or GPU_PEAK_TFLOPS). ``--cpu`` runs a tiny model for a few steps
(the path, not a measurement). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import time

# dense bf16 peak TFLOP/s by device-name fragment (vendor data sheets)
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0,
               "L4": 121.0, "RTX 4090": 165.0}


def peak_tflops(name: str) -> float | None:
    if os.environ.get("GPU_PEAK_TFLOPS"):
        return float(os.environ["GPU_PEAK_TFLOPS"])
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="tiny model on the CPU (a dry run)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args(argv)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.cpu:
        args.layers, args.hidden, args.seq, args.batch = 2, 64, 32, 2
        args.steps = min(args.steps, 3)
    device = torch.device("cpu" if args.cpu else "cuda")
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device (use --cpu for a dry run)")
    config = LlamaConfig(vocab_size=32000, hidden_size=args.hidden,
                         intermediate_size=int(args.hidden * 8 / 3) // 64 * 64,
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                         num_key_value_heads=max(1, args.hidden // 256),
                         max_position_embeddings=args.seq)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=not args.cpu)
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)
    if not args.cpu:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.steps + 1):  # step 0 warms up (kernels, allocator)
        if not args.cpu:
            torch.cuda.synchronize()
        tick = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if not args.cpu:
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - tick)
    tokens_per_s = args.batch * args.seq / (sum(times) / len(times))
    name = torch.cuda.get_device_name() if not args.cpu else "cpu"
    peak = peak_tflops(name) if not args.cpu else None
    mfu = 6 * n_params * tokens_per_s / (peak * 1e12) if peak else None
    print(json.dumps({"device": name, "parameters": n_params, "batch": args.batch,
                      "seq": args.seq, "steps": len(times), "tokens_per_s": round(tokens_per_s, 1),
                      "mfu": round(mfu, 4) if mfu is not None else None,
                      "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
                      if not args.cpu else None, "loss": round(float(loss), 4)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
