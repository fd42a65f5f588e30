"""The teacher pass's forwards alone, one process, one thread (one CPU rank's shard): the two
levers of the pass measured on their own and together, interleaved, median of rounds.

  file order + LM head   batches in shard order, the full forward (logits [B, T, V] computed and
                         thrown away): the pass before both levers
  grouped + LM head      batches grouped by length (teacher._batches), full forward
  file order, no head    shard order, the forward with the LM head on no position
                         (Engine.features_forward): only the final-norm output the TM/l1/l2
                         teacher needs
  grouped, no head       both (the trainer's pass), at the same batch size
  grouped, no head, 16   both at the default teacher_batch_size

Every variant sees the same samples; the captured final-norm features of the variants are
checked equal (up to bf16 rounding of different batch shapes) before anything is reported.

    python bench/bench_teacher_pass.py [--smoke] [--model DIR --replay FILE] [--docs N]

Without --model: the bench's tiny Llama and synthetic replay texts (--smoke) or the ~30M bench
model. bench/bench_peer.py's work uses the 135M-shape model with a 128k vocabulary
(``--model <work>/reference/src/base_llms/llama-smollm2-135m-shape-random --replay
<work>/reference/src/gere/slimpajama/slimpajama_6B_chunk0_head1k.jsonl``), where the LM head is
over a third of the forward's FLOPs.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import common  # bench/ is the script's folder, hence on sys.path
import torch

NAME = "bench_teacher_pass"


def _load(model_dir: str, replay: str, n_docs: int, max_len: int):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    texts = [json.loads(ln)["text"] for ln in Path(replay).read_text().splitlines()
             if ln.strip()][:n_docs]
    ids = {i: tok(t, add_special_tokens=True)["input_ids"][:max_len] for i, t in enumerate(texts)}
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return model, ids, pad


def _run(model, capture, ids: dict[int, list[int]], pad: int, batch: int, grouped: bool,
         head: bool) -> tuple[float, dict[int, torch.Tensor], float]:
    """Seconds for the pass, each sample's features, and the padding share of the tokens."""
    from gere_ds.data.collate import collate
    from gere_ds.data.encode import Encoded
    from gere_ds.model.capture import lm_head_on_positions
    from gere_ds.teaching.teacher import _batches

    shard = list(ids)
    batches = [b for b in _batches(shard, batch, 0, ids if grouped else None) if b]
    feats: dict[int, torch.Tensor] = {}
    real = padded = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for b in batches:
            mb = collate([Encoded(ids[s], ids[s]) for s in b], b, pad)
            ctx = contextlib.nullcontext() if head else lm_head_on_positions(
                model, torch.zeros(0, dtype=torch.long))
            with ctx:
                model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False)
            h = capture.pop()
            for k, s in enumerate(b):
                feats[s] = h[k, :len(ids[s])].float()
            real += int(mb.attention_mask.sum())
            padded += mb.attention_mask.numel()
    return time.perf_counter() - t0, feats, 1.0 - real / padded


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None,
                   help="folder for the JSON (default: results/, or bench/results/ in smoke mode)")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--model", default=None)
    p.add_argument("--replay", default=None)
    p.add_argument("--docs", type=int, default=None, help="samples in the shard (128)")
    p.add_argument("--max-len", type=int, default=563)
    p.add_argument("--batch", type=int, default=4, help="the batch size before the levers")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (3; smoke 1)")
    a = p.parse_args()
    torch.set_num_threads(1)
    from gere_ds.model.capture import FinalNormCapture

    if a.model is None:
        spec = common.SMOKE if a.smoke else common.FULL
        paths = common.build_assets(spec, Path("/tmp/gere-ds-bench-assets"), n_task=8,
                                    n_replay=a.docs or 128)
        a.model, a.replay = paths["model"], paths["replay"]
    n_docs = a.docs or (16 if a.smoke else 128)
    rounds = a.rounds or (1 if a.smoke else 3)
    model, ids, pad = _load(a.model, a.replay, n_docs, a.max_len)
    capture = FinalNormCapture(model)
    variants = {"file order + LM head": (a.batch, False, True),
                "grouped + LM head": (a.batch, True, True),
                "file order, no head": (a.batch, False, False),
                "grouped, no head": (a.batch, True, False),
                "grouped, no head, 16": (16, True, False)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    padding: dict[str, float] = {}
    ref: dict[int, torch.Tensor] | None = None
    worst = 0.0
    for _ in range(rounds):
        for name, (batch, grouped, head) in variants.items():
            sec, feats, pad_share = _run(model, capture, ids, pad, batch, grouped, head)
            times[name].append(sec)
            padding[name] = pad_share
            if ref is None:
                ref = feats
            else:  # same features whatever the batching (bf16 rounding by shape aside)
                for s, f in feats.items():
                    scale = ref[s].abs().max().clamp(min=1.0)
                    worst = max(worst, float((f - ref[s]).abs().max() / scale))
    if worst > 0.1:
        sys.exit(f"variants disagree: max relative feature difference {worst:.3f}")
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["file order + LM head"]
    rows = [[k, f"{v:.2f}", f"{v / base:.2f}", f"{100 * padding[k]:.0f} %"]
            for k, v in med.items()]
    tokens = sum(len(v) for v in ids.values())
    print(common.table(["teacher pass", "s (median)", "ratio", "padding"], rows))
    print(f"{len(ids)} samples, {tokens:,} tokens, model {Path(a.model).name}, "
          f"{rounds} interleaved round(s); max feature difference {worst:.2e} (relative)")
    common.write_result(NAME, a.smoke, out_dir=a.out or common.result_dir(a.smoke),
                        payload={
        "model": Path(a.model).name, "samples": len(ids), "tokens": tokens,
        "batch_before": a.batch, "rounds": rounds, "median_s": med,
        "ratio_to_before": {k: v / base for k, v in med.items()}, "padding_share": padding,
        "max_relative_feature_diff": worst, "times_s": times,
        "machine": common.machine_info(), "command": common.command_line()})


if __name__ == "__main__":
    main()
