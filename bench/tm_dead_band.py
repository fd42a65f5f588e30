#!/usr/bin/env python
"""Is TM exactly 0 at the base model? Step-0 TM and violation fraction, with and without the
dead-band, when the teacher pass and training see the same replay texts in different shapes.

The teacher's states come from padded batches of ``teacher_batch_size`` replay rows; training
sees each replay row inside a micro-batch of 1, 2 or 4 rows mixed with task rows (another
padded width). Kernels that round by shape (oneDNN with AMX, cuBLAS) then move a few elements
across a threshold. This CPU may round identically for every shape, so three stand-ins for such
kernels are measured too:

  native     the shapes above, this machine's kernels
  one-ulp    the student's final-norm output moved by one step of its dtype's grid, random sign
  split-k    every linear layer computes its matmul in two halves of the input dimension, added
             in fp32 and rounded once (another accumulation order, as a differently blocked
             GEMM has): rounding differences then travel through every layer above

For each case: TM of the reference (mean over violating elements), violating fraction, and the
smallest dead-band (in rounding units of the dtype times sigma_d, on top of one rounding step)
that makes TM exactly 0.

    python bench/tm_dead_band.py --dtypes bfloat16 --docs 32             # ~25 min, 2 cores
    python bench/tm_dead_band.py --dtypes float32 --docs 8 --teacher-batch 1 8 --micro 1 2 \\
        --append                                                          # fp32 next to it
    python bench/tm_dead_band.py --dtypes bfloat16 --docs 32 --variants native \\
        --out results/tm_dead_band_amx.json             # on an Intel CPU with AMX: its own kernels
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import common  # bench/ is the script's folder, hence on sys.path
from gere_ds.model.capture import FinalNormCapture
from gere_ds.data.collate import collate
from gere_ds.data.encode import Encoded, encode_example, encode_replay
from gere_ds.data.files import read_rows
from gere_ds.training.losses import rounding_step, tm_dead_band, tm_violations
from gere_ds.storage.atomic import write_json_atomic

VARIANTS = ("native", "one-ulp", "split-k")
UNITS = (8, 16, 32, 48, 64, 1024)  # dead-bands tried, in rounding units of the dtype x sigma_d


def load_model(path: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def final_norm(model, capture, rows: list[list[int]], pad_id: int) -> list[torch.Tensor]:
    mb = collate([Encoded(r, r) for r in rows], [-1] * len(rows), pad_id)  # the trainer's padding
    model(input_ids=mb.input_ids, attention_mask=mb.attention_mask)
    h = capture.pop()
    return [h[b, :len(r)].clone() for b, r in enumerate(rows)]


@contextlib.contextmanager
def split_k_linears(model):
    """Every nn.Linear computes x @ W.T as two halves of the input dimension, summed in fp32."""
    def forward(self, x):
        k = x.shape[-1] // 2
        out = F.linear(x[..., :k].float(), self.weight[:, :k].float()) + \
            F.linear(x[..., k:].float(), self.weight[:, k:].float())
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(x.dtype)

    saved = []
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            saved.append((m, m.forward))
            m.forward = forward.__get__(m)
    try:
        yield
    finally:
        for m, f in saved:
            m.forward = f


def one_ulp(h: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    step = rounding_step(h, h.dtype)
    sign = torch.randint(0, 2, h.shape, generator=gen).float() * 2 - 1
    return (h.float() + sign * step).to(h.dtype)


def measure(args: argparse.Namespace, dtype: torch.dtype) -> list[dict]:
    model, tok = load_model(args.model, dtype)
    capture = FinalNormCapture(model)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    texts = [r.data["text"] for r in read_rows(args.replay)][:args.docs]
    replay = [encode_replay(tok, t, args.max_len) for t in texts]
    tasks = [encode_example(tok, "Read the passage and answer the question with True or False.",
                            ["True", "False"], r.data["sentence"], r.data["label"], 256, 4).input_ids
             for r in read_rows(args.task)[:64]]
    rows = []
    teacher_h: dict[int, list[torch.Tensor]] = {}
    for tb in args.teacher_batch:
        teacher_h[tb] = [h for i in range(0, len(replay), tb)
                         for h in final_norm(model, capture, replay[i:i + tb], pad_id)]
    # thresholds from the largest teacher batch (all shapes give the same to fp32 sums' noise)
    allh = torch.cat(teacher_h[max(args.teacher_batch)]).float()
    mu, sigma = allh.mean(0), allh.std(0, unbiased=False)
    lo, hi = mu - args.k * sigma, mu + args.k * sigma
    gen = torch.Generator().manual_seed(0)
    for variant in args.variants:
        for micro in args.micro:
            # each replay row with micro-1 task rows (another padded width than the teacher's)
            student: list[torch.Tensor] = []
            ctx = split_k_linears(model) if variant == "split-k" else contextlib.nullcontext()
            with ctx:
                for i, r in enumerate(replay):
                    mates = [tasks[(i * 3 + j) % len(tasks)] for j in range(micro - 1)]
                    student.append(final_norm(model, capture, [r] + mates, pad_id)[0])
            if variant == "one-ulp":
                student = [one_ulp(h, gen) for h in student]
            for tb, teach in teacher_h.items():
                rows.append(case(dtype, variant, tb, micro, teach, student, lo, hi, sigma))
                print(json.dumps(rows[-1]), flush=True)
    return rows


def case(dtype, variant, tb, micro, teach, student, lo, hi, sigma) -> dict:
    h_t = torch.cat(teach).float()
    h_s = torch.cat(student).float()
    states = torch.where(h_t >= hi, 1, torch.where(h_t <= lo, -1, 0)).to(torch.int8)
    mask = torch.ones(1, h_t.shape[0])
    v = tm_violations(h_s[None], states[None], lo, hi, mask)[0]
    viol = v > 0
    step = rounding_step(torch.maximum(lo.abs(), hi.abs()), dtype)
    eps = torch.finfo(dtype).eps
    need = ((v - step) / (eps * sigma)).clamp(min=0)  # band (units) each element needs
    out = {"dtype": str(dtype).replace("torch.", ""), "variant": variant, "teacher_batch": tb,
           "micro_batch": micro, "elements": int(v.numel()),
           "max_abs_diff": float((h_s - h_t).abs().max()),
           "max_diff_units": float(((h_s - h_t).abs() / (eps * sigma)).max()),
           "violating_frac": float(viol.float().mean()),
           "tm": float(v.sum() / (viol.sum() + 1e-8)),
           "needed_units": float(need[viol].max()) if bool(viol.any()) else 0.0}
    for units in UNITS:
        kept = v > tm_dead_band(lo, hi, sigma, units, dtype)
        out[f"violating_frac@{units}"] = float(kept.float().mean())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="assets/models/smollm2-135m-instruct")
    p.add_argument("--replay", default="assets/data/general/replay.jsonl")
    p.add_argument("--task", default="assets/data/boolq/train.jsonl")
    p.add_argument("--docs", type=int, default=48)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--k", type=float, default=1.0)
    p.add_argument("--teacher-batch", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--micro", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                   help="native only on a machine whose own kernels are the question (e.g. AMX)")
    p.add_argument("--out", type=Path, default=Path("results/tm_dead_band.json"))
    p.add_argument("--append", action="store_true",
                   help="keep the cases of other dtypes already in --out (e.g. fp32 at fewer docs)")
    args = p.parse_args()
    torch.manual_seed(0)
    start = time.time()
    rows = [r for name in args.dtypes for r in measure(args, getattr(torch, name))]
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    for r in rows:
        r["settings"] = {k: settings[k] for k in ("docs", "max_len", "k")}
    if args.append and args.out.is_file():
        old = json.loads(args.out.read_text())["cases"]
        rows = [r for r in old if r["dtype"] not in {x["dtype"] for x in rows}] + rows
    needed = {d: max(r["needed_units"] for r in rows if r["dtype"] == d)
              for d in sorted({r["dtype"] for r in rows})}
    write_json_atomic(args.out, {"seconds_last_run": round(time.time() - start, 1),
                                 "machine": common.machine_info(), "needed_units": needed,
                                 "cases": rows})
    print(f"dead-band needed for TM == 0, rounding units x sigma (max over cases): {needed}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
