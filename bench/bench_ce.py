"""The cross-entropy term alone, one process, one thread (what one CPU rank runs): the current
gere_ds.training.losses.token_ce_sum against the proposed variants, interleaved, median of repetitions.

  as-is        token_ce_sum: boolean-mask gather of the supervised positions of [B, T, V] bf16
               logits, fp32 F.cross_entropy in chunks (forward + backward to the logits)
  P2           the same positions gathered with index_select on the flat [B*T, V] view (no
               boolean mask on a sliced view: its backward writes [B, T, V] twice), fp32
               F.cross_entropy in chunks
  + fused CE   FusedCE below instead of F.cross_entropy (fp32 logsumexp; backward = softmax -
               one-hot written in place)
  trainer      the trainer's path: the LM head already produced only the supervised rows
               ([N, V], capture.lm_head_on_positions), losses.row_ce_sums on them (no gather,
               no [B, T, V] gradient)
  HF           what transformers' ForCausalLMLoss does: fp32 upcast of ALL logits, CE with
               ignore_index over every position

Shapes: the bench model's (vocab 50,257), micro-batch 4 x seq 128 with half the rows replay rows
(CE on every position) and half task rows (CE on the last 2 positions). Values and gradients are
checked equal before timing.

    python bench/bench_ce.py [--smoke]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import common  # bench/ is the script's folder, hence on sys.path
import torch

NAME = "bench_ce"


class FusedCE(torch.autograd.Function):
    """Per-row CE of bf16/fp32 logits [N, V] with fp32 maths and a hand-written backward
    (softmax - one-hot, computed in place in one fp32 buffer), instead of F.cross_entropy on an
    fp32 copy whose log_softmax backward is the slowest kernel of the CE term on CPU."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = logits.float()
        lse = torch.logsumexp(x, dim=-1)
        loss = lse - x.gather(1, targets[:, None]).squeeze(1)
        ctx.save_for_backward(logits, targets, lse)
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        p = logits.float().sub_(lse[:, None]).exp_()
        p[torch.arange(p.shape[0], device=p.device), targets] -= 1
        p.mul_(grad[:, None].float())
        return p.to(logits.dtype), None


def fused_ce_sum(logits: torch.Tensor, targets: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """FusedCE applied ``chunk`` rows at a time (the fp32 buffer is at most chunk x V)."""
    total = logits.new_zeros((), dtype=torch.float32)
    for s in range(0, logits.shape[0], chunk):
        total = total + FusedCE.apply(logits[s:s + chunk], targets[s:s + chunk]).sum()
    return total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--assets", default=None, help="unused (same interface as the others)")
    args = p.parse_args()
    import torch.nn.functional as F

    from gere_ds.training.losses import row_ce_sums, supervised_positions, token_ce_sum

    torch.set_num_threads(1)
    B, T, V = (4, 128, 50257) if not args.smoke else (2, 32, 50257)
    reps = args.reps or (2 if args.smoke else 15)
    torch.manual_seed(0)
    base = (torch.randn(B, T, V) * 2).to(torch.bfloat16)
    labels = torch.randint(0, V, (B, T))
    labels[: B // 2, :-2] = -100  # task rows: CE on the answer only
    rows = torch.ones(B, dtype=torch.bool)
    pos, targets = supervised_positions(labels.masked_fill(~rows[:, None], -100))
    row_of = pos // T

    def ce_sum(logits: torch.Tensor) -> torch.Tensor:
        return row_ce_sums(logits, targets, row_of, B)[0].sum()
    picked_base = base.view(-1, V).index_select(0, pos)

    def as_is():
        lg = base.clone().requires_grad_(True)
        s = token_ce_sum(lg, labels, rows)[0]
        s.backward()
        return s, lg.grad

    def p2():
        lg = base.clone().requires_grad_(True)
        s = ce_sum(lg.view(-1, V).index_select(0, pos))
        s.backward()
        return s, lg.grad

    def p2_fused():
        lg = base.clone().requires_grad_(True)
        s = fused_ce_sum(lg.view(-1, V).index_select(0, pos), targets)
        s.backward()
        return s, lg.grad

    def trainer():
        lg = picked_base.clone().requires_grad_(True)
        s = ce_sum(lg)
        s.backward()
        return s, lg.grad

    def trainer_fused():
        lg = picked_base.clone().requires_grad_(True)
        s = fused_ce_sum(lg, targets)
        s.backward()
        return s, lg.grad

    def hf():
        lg = base.clone().requires_grad_(True)
        shift = labels[:, 1:].reshape(-1)
        s = F.cross_entropy(lg.float()[:, :-1].reshape(-1, V), shift, ignore_index=-100,
                            reduction="sum")
        s.backward()
        return s, lg.grad

    fns = {"as-is (token_ce_sum)": as_is, "P2 (flat index_select gather)": p2,
           "P2 + fused CE (FusedCE)": p2_fused, "trainer (head on supervised rows)": trainer,
           "trainer + fused CE": trainer_fused, "HF ForCausalLMLoss-style": hf}
    ref_s, ref_g = as_is()
    ref_s = ref_s.detach()
    checks = {}
    for name, fn in fns.items():
        s, g = fn()
        full = g if g.shape == ref_g.shape else torch.zeros_like(ref_g).view(-1, V).index_copy(
            0, pos, g).view_as(ref_g)
        s = s.detach()
        checks[name] = {"value_rel_diff": abs(float(s) - float(ref_s)) / abs(float(ref_s)),
                        "grad_max_abs_diff": float((full.float() - ref_g.float()).abs().max())}
    times = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    rows_out = []
    result = {}
    for name in fns:
        med = common.median(times[name])
        ratio = common.paired_ratio(times[name], times["as-is (token_ce_sum)"])
        result[name] = {"ms": common.spread(1e3 * t for t in times[name]), "vs_as_is": ratio,
                        **checks[name]}
        rows_out.append([name, 1e3 * med, ratio["median_of_ratios"],
                         checks[name]["value_rel_diff"], checks[name]["grad_max_abs_diff"]])
    machine = common.machine_info()
    machine["load_average_end"] = __import__("os").getloadavg()
    payload = {"benchmark": NAME, "smoke": args.smoke, "machine": machine, "world_size": 1,
               "shape": {"B": B, "T": T, "V": V, "ce_positions": int(pos.numel())},
               "reps": reps, "wall_s": 0.0, "results": result,
               "command": common.command_line()}
    path = common.write_result(NAME, args.smoke, payload, Path(args.out) if args.out else None)
    print(f"{NAME}: {machine['cpu_model']}, 1 thread, torch {machine['torch']}; logits "
          f"[{B}, {T}, {V}] bf16, {int(pos.numel())} CE positions; {reps} interleaved reps; "
          f"load average {machine['load_average'][0]:.2f} -> {machine['load_average_end'][0]:.2f}")
    print(common.table(["variant", "ms fwd+bwd (median)", "x as-is (median of reps)",
                        "value rel. diff", "grad max abs diff"], rows_out))
    print(f"\nwritten: {path}")
    bad = [n for n, c in checks.items() if c["value_rel_diff"] > 1e-4 or c["grad_max_abs_diff"] > 1e-3]
    if bad:
        print(f"error: {bad} do not match the as-is CE", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
