"""`gere-ds states`: which final-norm activation states a fine-tuned model has flipped.

    gere-ds states --config runs/demo/config.yaml --out runs/demo_states \\
        task1=runs/demo_task1 task2=runs/demo_task2   # folders written by gere-ds export

For each NAME=MODEL folder (Hugging Face, e.g. `gere-ds export` output) it compares the model's
final-norm output with the base model's (the config's `model`) on the first `--samples` replay
texts of the config (tokenized as replay rows: no BOS, cut to `replay.max_len`) and, with
`--heldout`, on texts the replay set does not hold. States are the TM loss's tri-states with
thresholds mu +- k*sigma fitted on the base model's outputs of those replay texts
(k = `replay.threshold_k`, or `--threshold-k`). Per model and text set it reports the percentage of elements whose
state flipped (0 -> +-1, +-1 -> 0, sign), the mean violation of a flipped element and the mean
shift of every element, in units of the dimension's sigma. `OUT/states.json` holds every count,
`OUT/states.md` the table and `OUT/states.png` the flipped percentages.

One plain process, no launcher: on the GPU when one is visible, else the CPU (`--device`), in
float32 or, for a model that float32 does not fit (8B on one card), bfloat16 (`--dtype`; the
states are then those bf16 kernels give, and rounding alone flips a few near a threshold).
Outputs are kept on the host. Exit status 0, or 2 with one `error:` line for bad input.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from gere_ds.errors import InputError
from gere_ds.storage.atomic import write_bytes_atomic, write_json_atomic, write_text_atomic


def parse_models(specs: Sequence[str]) -> list[tuple[str, str]]:
    """``NAME=FOLDER`` pairs, in order; names unique, folders Hugging Face model folders."""
    out: list[tuple[str, str]] = []
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise InputError(f"{spec!r} is not NAME=MODEL_FOLDER", field="models")
        if name in dict(out):
            raise InputError(f"the name {name!r} is given twice", field="models")
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise InputError("not a Hugging Face model folder (no config.json)", file=folder,
                             field=name)
        out.append((name, folder))
    return out


def table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Markdown: one line per model and text set."""
    lines = ["| model | texts | flipped % | 0 -> +-1 % | +-1 -> 0 % | sign % | "
             "violation per flip (sigma) | mean shift (sigma) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, sets in results.items():
        for texts, s in sets.items():
            lines.append(f"| {name} | {texts} | {s['flipped_pct']:.2f} | {s['from_0_pct']:.2f} | "
                         f"{s['to_0_pct']:.2f} | {s['sign_pct']:.3f} | "
                         f"{s['violation_per_flip_sigma']:.3f} | {s['mean_shift_sigma']:.3f} |")
    return "\n".join(lines) + "\n"


def figure(results: dict[str, dict[str, dict[str, Any]]]) -> bytes:
    """PNG: flipped percentage per model, one bar per text set."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend

    names = list(results)
    sets = sorted({t for s in results.values() for t in s})
    fig = Figure(figsize=(max(4.0, 1.2 * len(names) + 2), 3.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(len(sets), 1)
    for j, texts in enumerate(sets):
        xs = [i + j * width for i in range(len(names))]
        ax.bar(xs, [results[n].get(texts, {}).get("flipped_pct", 0.0) for n in names],
               width=width, label=texts)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=30,
                  ha="right", fontsize=8)
    ax.set_ylabel("states flipped (% of elements)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="run config: base model, replay set, k")
    p.add_argument("--out", required=True, help="folder for states.json/md/png")
    p.add_argument("--heldout", default="", help="JSONL of other texts ({\"text\": ...})")
    p.add_argument("--samples", type=int, default=256,
                   help="replay texts (the first of the set) and held-out texts to use")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="weights and compute of every model measured")
    p.add_argument("--device", default="auto",
                   help="torch device (auto: cuda when visible, else cpu)")
    p.add_argument("--threshold-k", type=float, default=None,
                   help="k of the thresholds mu +- k*sigma (default: the config's "
                        "replay.threshold_k)")
    p.add_argument("models", nargs="+", metavar="NAME=MODEL", help="model folders to measure")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.samples < 1 or args.batch_size < 1:
            raise InputError("--samples and --batch-size must be at least 1", field="arguments")
        if args.threshold_k is not None and not 0 < args.threshold_k < float("inf"):
            raise InputError(f"{args.threshold_k} is not a positive number", field="--threshold-k")
        models = parse_models(args.models)
        from gere_ds.config.loading import load_config  # lazy: the CLI starts without torch

        cfg = load_config(args.config)
        if args.threshold_k is not None:
            cfg.replay.threshold_k = args.threshold_k
        results = measure_models(cfg, models, args.heldout, args.samples, args.batch_size,
                                 dtype=args.dtype, device=args.device)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "states.json", {
        "base": cfg.model, "replay": cfg.replay.data, "heldout": args.heldout,
        "samples": args.samples, "max_len": cfg.replay.max_len,
        "threshold_k": cfg.replay.threshold_k, "models": results})
    text = table(results)
    write_text_atomic(out / "states.md", text)
    write_bytes_atomic(out / "states.png", figure(results))
    print(text, end="")
    print(f"wrote {out / 'states.md'}")
    return 0


def measure_models(cfg: Any, models: list[tuple[str, str]], heldout: str, samples: int,
                   batch_size: int, dtype: str = "float32",
                   device: str = "auto") -> dict[str, dict[str, dict[str, Any]]]:
    """{name: {"replay" | "heldout": Drift.summary()}} against the config's base model."""
    import torch  # lazy: the CLI starts without torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gere_ds.data.encode import encode_replay
    from gere_ds.data.replay import load_replay_texts
    from gere_ds.evaluation.batching import pad_id
    from gere_ds.evaluation.general import load_texts
    from gere_ds.evaluation.state_drift import final_norm_outputs, fit_thresholds, measure
    from gere_ds.monitoring.progress_bar import progress_bar

    trust = cfg.trust_remote_code
    tok = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.model, trust_remote_code=trust)
    pad = pad_id(tok)
    text_sets = {"replay": load_replay_texts(cfg.replay.data, samples)}
    if heldout:
        text_sets["heldout"] = load_texts(heldout, samples)
    rows = {k: [r for r in (encode_replay(tok, t, cfg.replay.max_len) for t in texts) if r]
            for k, texts in text_sets.items()}

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        target = torch.device(device)
    except RuntimeError as err:
        raise InputError(f"{device!r} is not a torch device ({err})", field="--device") from None

    def load(folder: str) -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype),
                                                    trust_remote_code=trust).to(target).eval()

    bar = progress_bar(len(models) + 1, "models (base first)")
    base = load(cfg.model)
    base_out = {k: list(final_norm_outputs(base, r, pad, batch_size)) for k, r in rows.items()}
    del base
    bar.update(1)
    thresholds = fit_thresholds(base_out["replay"], cfg.replay.threshold_k)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for name, folder in models:
        model = load(folder)
        results[name] = {k: measure(model, rows[k], base_out[k], thresholds, pad,
                                    batch_size).summary() for k in rows}
        del model
        bar.update(1)
    bar.close()
    return results
