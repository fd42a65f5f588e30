"""(b) gere-ds against the Hugging Face Trainer people use today, in ONE process tree.

Under one `deepspeed --num_gpus 2` launch (CPU ranks, gloo) each rank holds two ZeRO-3 engines
built from the same model folder and the same filled DeepSpeed JSON (bf16, torch AdamW, same lr,
clipping and batch): the gere-ds engine, and a `transformers.Trainer` given
`deepspeed=<that dict>`. The Trainer's own training loop runs; a TrainerCallback runs gere-ds
steps between its steps, so every round is, interleaved on the same rows:

  hf_plain   Trainer step, plain CE on the task rows (the baseline users would otherwise use)
  gere_none  gere-ds `none` step on the same task rows
  hf_ref     "reference-style GeRe": a Trainer subclass doing what the reference implementation
             does on the mixed rows (task rows + replay rows): one forward of the replay rows
             with output_hidden_states=True and fp32 full-vocabulary logits, CE with .item(),
             one fp32 hidden-state file per replay sample read with torch.load by the collator at
             every step, TM from those states against mean +- std, then a second forward for the
             task rows through Trainer.compute_loss; w = 100
  gere_tm    gere-ds `tm` step on the same mixed rows (2-bit memory-mapped teacher states)

The gere-ds steps are TrainStep.compute_loss + TrainStep.apply as training runs them (LM head
only on the positions that carry a loss).

Step time = the slowest rank's wall time; an HF step is measured from the end of the previous
callback to `on_step_end` (data loading, forward, backward, optimizer step, HF bookkeeping).
Ratios are medians of per-round ratios. Memory: the RSS peak of one untimed step per variant in
this run (both engines resident), and, in full mode, `--solo` launches (alternating, one per
variant, one engine each) for the process peak RSS per rank that a user of each would see.

    python bench/bench_vs_hf_trainer.py           # full
    python bench/bench_vs_hf_trainer.py --smoke   # tiny model, one round, no solo launches
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import common  # bench/ is the script's folder, hence on sys.path

NAME = "bench_vs_hf_trainer"
IGNORE = -100
W_TM = 100.0
GERE_OF = {"plain": ["gere_none"], "ref": ["gere_tm"]}
SOLO = ["hf_plain", "gere_none", "hf_ref", "gere_tm"]


# ============================================================================ reference style


def pad_right(seqs: list[list[int]], value: int):
    import torch

    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    return out, mask


class Collator:
    """Plain rows -> input_ids / attention_mask / labels. Reference-style rows -> the task rows
    (same tensors, under 'ori') and the replay rows tokenized from text at every call with their
    fp32 teacher hidden states loaded from one torch.save file per sample (under 'gere'), as the
    reference's GeReDataCollator does."""

    def __init__(self, tokenizer, max_len: int, hidden_dir: Path, rank: int) -> None:
        self.tok, self.max_len, self.hidden_dir, self.rank = tokenizer, max_len, hidden_dir, rank

    def task_tensors(self, rows: list[dict]) -> dict:
        ids, mask = pad_right([r["input_ids"] for r in rows], self.tok.pad_token_id)
        labels, _ = pad_right([r["labels"] for r in rows], IGNORE)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        assert all(r["rank"] == self.rank for r in rows), "dataset order is not the expected one"
        if rows[0]["mode"] == "plain":
            return self.task_tensors(rows)
        task = [r for r in rows if r["kind"] == "task"]
        gere = [r for r in rows if r["kind"] == "gere"]
        out: dict = {"ori": self.task_tensors(task) if task else None, "gere": None}
        if gere:
            ids = [self.tok(r["text"], add_special_tokens=False)["input_ids"][:self.max_len]
                   for r in gere]
            input_ids, mask = pad_right(ids, self.tok.pad_token_id)
            labels, _ = pad_right(ids, IGNORE)
            states = [torch.load(self.hidden_dir / f"SlimRedpajama_train_{r['id']}.pt")
                      ["hidden_states"] for r in gere]
            hidden = torch.zeros((len(states), input_ids.shape[1], states[0].shape[-1]))
            for i, h in enumerate(states):
                hidden[i, :h.shape[0]] = h
            out["gere"] = {"input_ids": input_ids, "attention_mask": mask, "labels": labels,
                           "hidden_states": hidden}
        return out


def make_trainer_class():
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import Trainer

    class RefStyleTrainer(Trainer):
        """Plain batches: Trainer.compute_loss unchanged. Reference-style batches: the
        reference's GeRe loss (see the module docstring)."""

        thresholds: tuple = ()
        last_terms: dict | None = None

        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if "gere" not in inputs:
                out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                           num_items_in_batch=num_items_in_batch)
                self.last_terms = {"loss": (out[0] if return_outputs else out).detach()}
                return out
            total_ce = torch.zeros((), requires_grad=True)
            loss = None
            g, ori = inputs["gere"], inputs["ori"]
            margin = None
            if g is not None:
                out = model(input_ids=g["input_ids"], attention_mask=g["attention_mask"],
                            output_hidden_states=True)
                logits = out.logits.float()  # transformers 4.44 (the reference's) upcast here
                shift_logits = logits[..., :-1, :].contiguous().view(-1, logits.shape[-1])
                shift_labels = g["labels"][..., 1:].contiguous().view(-1)
                ce = torch.nn.functional.cross_entropy(shift_logits, shift_labels,
                                                       reduction="none")
                ce = ce.sum() / ((shift_labels != IGNORE).sum().item() + 1e-8)
                total_ce = total_ce + ce
                teacher = g["hidden_states"]
                pred = out.hidden_states[-1]
                hi, lo = self.thresholds
                neg = teacher <= lo
                neu = (teacher > lo) & (teacher < hi)
                pos = teacher >= hi
                m = (torch.relu(pred - lo) * neg + torch.relu(pred - hi) * neu
                     + torch.relu(lo - pred) * neu + torch.relu(hi - pred) * pos)
                m = m * g["attention_mask"].unsqueeze(-1)
                margin = m.sum() / ((m != 0).sum() + 1e-8)
            if ori is not None:
                total_ce = total_ce + super().compute_loss(model, ori)
            if g is not None and ori is not None:
                total_ce = total_ce / 2
            loss = total_ce + W_TM * margin if margin is not None else total_ce
            self.last_terms = {"loss": loss.detach(), "ce": total_ce.detach(),
                               "tm": margin.detach() if margin is not None else None}
            return (loss, None) if return_outputs else loss

    return RefStyleTrainer


# ============================================================================ worker


def build_rows(tr_or_tok, cfg, rank: int, world: int, replay_texts: list[str], train_sets):
    """This rank's fixed rows, as gere-ds Rows and as Trainer dataset rows (same tokens)."""
    from gere_ds.data.encode import encode_example
    from gere_ds.data.sampler import replay_shard

    B = cfg.train.micro_batch_size
    task_rows = [(False, rank * B + j) for j in range(B)]
    shard = replay_shard(len(replay_texts), world, rank, cfg.train.seed)
    n_rep = B // 2
    mixed_rows = task_rows[:B - n_rep] + [(True, sid) for sid in shard[:n_rep]]
    task = cfg.tasks[0]

    def enc(i: int):
        ex = train_sets[0][i]
        return encode_example(tr_or_tok, task.instruction, task.labels, ex.text, ex.label,
                              cfg.train.max_source_len, cfg.train.max_target_len,
                              truncate_source=cfg.train.truncate_source,
                              option_line=task.option_line)

    def hf_row(mode: str, is_replay: bool, idx: int) -> dict:
        if is_replay:
            return {"mode": mode, "kind": "gere", "text": replay_texts[idx], "id": idx,
                    "rank": rank}
        e = enc(idx)
        return {"mode": mode, "kind": "task", "input_ids": e.input_ids, "labels": e.labels,
                "rank": rank}

    hf = {"plain": [hf_row("plain", *r) for r in task_rows],
          "ref": [hf_row("ref", *r) for r in mixed_rows]}
    return task_rows, mixed_rows, hf


def write_reference_teacher(tr, rows, hidden_dir: Path) -> None:
    """The reference's presaved data for this rank's replay rows: one fp32 final-norm state file
    per sample (torch.save({'hidden_states': [tokens, D]})) from the base model."""
    import torch

    from gere_ds.data.collate import collate
    from gere_ds.data.encode import Encoded

    sids = [i for is_rep, i in rows if is_rep]
    hidden_dir.mkdir(parents=True, exist_ok=True)
    eng = tr.engine
    eng.engine.eval()
    with torch.no_grad():
        mb = collate([Encoded(tr.batches.replay_ids[s], tr.batches.replay_ids[s]) for s in sids], sids,
                     tr.tokenizer.pad_token_id)
        eng.forward(mb.input_ids, mb.attention_mask)
        h = tr.capture.pop().float()
    eng.engine.train()
    for b, s in enumerate(sids):
        n = len(tr.batches.replay_ids[s])
        torch.save({"hidden_states": h[b, :n].clone()}, hidden_dir / f"SlimRedpajama_train_{s}.pt")


def worker(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM, TrainerCallback, TrainingArguments

    from gere_ds.model.engine import resolve_ds_config
    from gere_ds.runtime import dist
    from gere_ds.training.step import StepStats, TrainStep
    from gere_ds.strategies import NoReplay
    from gere_ds.training.trainer import ContinualTrainer

    cfg, inputs, rank = common.start_worker(args.config)
    W = dist.world_size()
    work = Path(args.work)
    hidden_dir = work / "ref_hidden"
    stats_file = work / "ref_stats.pt"
    solo = args.solo
    want_gere = solo is None or solo.startswith("gere")

    # ------------------------------------------------------------------ gere-ds engine
    tr = None
    if want_gere:
        tr = ContinualTrainer(cfg)
        tr.setup(inputs)
        tr.prepare_teacher()  # tm (reuses the cache of the main launch in solo launches)
        tok = tr.tokenizer
    else:
        from gere_ds.model.engine import load_tokenizer

        tok = load_tokenizer(cfg, lambda m: None)
    task_rows, mixed_rows, _ = build_rows(tok, cfg, rank, W, inputs.replay_texts,
                                          inputs.train_sets)
    if solo is None:
        write_reference_teacher(tr, mixed_rows, hidden_dir)
        if rank == 0:
            t = tr.teacher
            torch.save({"mean": t.mu, "std": t.sigma, "var": t.sigma ** 2}, stats_file)
    dist.barrier()

    # ------------------------------------------------------------------ the schedule
    rounds = args.warmup + args.reps + 1  # + one memory round
    if solo is None:
        modes = ["plain", "ref"] * rounds
    else:
        modes = [("plain" if solo in ("hf_plain", "gere_none") else "ref")] * rounds
    notes = []

    # ------------------------------------------------------------------ gere-ds steps
    first_losses: dict[str, dict] = {}

    steps = {}
    if tr is not None:  # the trainer's own step: tm, and none on the task rows
        steps = {"gere_tm": tr.step,
                 "gere_none": TrainStep(cfg, tr.engine, tr.capture, tr.batches,
                                        NoReplay(cfg.replay, cfg.train.bf16), W)}

    def gere_step(name: str):
        step = steps[name]
        sl = step.compute_loss(0, task_rows if name == "gere_none" else mixed_rows)
        step.apply(sl)
        if name not in first_losses:  # global values (one all-reduce; identical on every rank)
            stats = StepStats()
            stats.add(sl)
            v = stats.reduce()
            rows = v["task_rows"] + v["replay_rows"]  # CE: the row mean the loss optimises
            first_losses[name] = {"loss": v["loss"], "tm": v["reg"],
                                  "ce": (v["task_ce"] * v["task_rows"]
                                         + v["replay_ce"] * v["replay_rows"]) / rows}
        return sl

    times: dict[str, list[float]] = {}
    memory: dict[str, dict[str, float]] = {}

    def record(name: str, seconds: float, rnd: int) -> None:
        if args.warmup <= rnd < args.warmup + args.reps:
            times.setdefault(name, []).append(seconds)

    if solo is not None and solo.startswith("gere"):
        # ------------------------------------------------------------ solo gere-ds: no Trainer
        for rnd in range(rounds):
            dist.barrier()
            if rnd == rounds - 1:
                with common.RssPeak() as m:
                    gere_step(solo)
                memory[solo] = {"rss_peak_mib": m.peak / common.MIB,
                                "step_extra_mib": (m.peak - m.start) / common.MIB}
            else:
                t0 = time.perf_counter()
                gere_step(solo)
                record(solo, time.perf_counter() - t0, rnd)
    else:
        # ------------------------------------------------------------ the HF Trainer
        ds = copy.deepcopy(resolve_ds_config(cfg, W))
        t = cfg.train
        if t.bf16 and not torch.cuda.is_available():
            # TrainingArguments refuses bf16 without a GPU; DeepSpeed runs bf16 on these CPU
            # ranks (as the gere-ds engine does), so only that check is bypassed
            import transformers.training_args as hf_args

            hf_args.is_torch_bf16_gpu_available = lambda *a, **k: True
        # accelerate picks no backend for CPU ranks under the deepspeed launcher (each rank then
        # believes it is alone): configure its state on the existing gloo group first
        # (accelerate + DeepSpeed on CPU needs backend="gloo": otherwise every rank thinks it is 0)
        import os

        from accelerate import PartialState

        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        state = PartialState(backend="gloo")
        assert state.num_processes == W, (state.num_processes, W)
        targs = TrainingArguments(
            output_dir=str(work / f"hf-rank{rank}"), per_device_train_batch_size=t.micro_batch_size,
            gradient_accumulation_steps=t.grad_accum, learning_rate=t.lr,
            weight_decay=t.weight_decay, adam_beta1=t.adam_betas[0], adam_beta2=t.adam_betas[1],
            max_grad_norm=t.grad_clip, bf16=t.bf16, max_steps=len(modes),
            lr_scheduler_type="constant", warmup_steps=0, logging_steps=50,
            save_strategy="no", report_to=[], disable_tqdm=True, remove_unused_columns=False,
            dataloader_num_workers=0, deepspeed=ds, seed=t.seed,
            accelerator_config={"use_configured_state": True},
            activation_checkpointing=t.gradient_checkpointing)
        model = AutoModelForCausalLM.from_pretrained(
            cfg.model, dtype=torch.bfloat16 if t.bf16 else torch.float32)
        model.config.use_cache = False
        by_rank = [build_rows(tok, cfg, r, W, inputs.replay_texts, inputs.train_sets)[2]
                   for r in range(W)]
        dataset = []
        for mode in modes:  # item (step s, rank r, j) sits at (s * W + r) * B + j
            for r in range(W):
                dataset.extend(by_rank[r][mode])
        def is_memory_step(step: int) -> bool:  # the last round: RSS sampled, not timed
            return step >= len(modes) - (2 if solo is None else 1)

        Trainer = make_trainer_class()
        if stats_file.is_file():
            st = torch.load(stats_file)
            Trainer.thresholds = ((st["mean"] + st["std"]).float(),
                                  (st["mean"] - st["std"]).float())

        class Interleave(TrainerCallback):
            def __init__(self) -> None:
                self.mark = 0.0
                self.peak: common.RssPeak | None = None

            def _arm(self, next_step: int) -> None:
                dist.barrier()
                if is_memory_step(next_step):  # the memory round: sample the HF step
                    self.peak = common.RssPeak().__enter__()
                self.mark = time.perf_counter()

            def on_train_begin(self, args_, state, control, **kw):
                self._arm(0)

            def on_step_end(self, args_, state, control, **kw):
                elapsed = time.perf_counter() - self.mark
                s = state.global_step - 1
                mode, rnd = modes[s], s // 2 if solo is None else s
                hf_name = f"hf_{mode}"
                if hf_name not in first_losses:  # rank 0's local loss (HF reduces per rank)
                    first_losses[hf_name] = dict(self.trainer.last_terms or {})
                if self.peak is not None:
                    self.peak.__exit__()
                    memory[hf_name] = {"rss_peak_mib": self.peak.peak / common.MIB,
                                       "step_extra_mib": (self.peak.peak - self.peak.start)
                                       / common.MIB}
                    self.peak = None
                else:
                    record(hf_name, elapsed, rnd)
                if solo is None:
                    names = GERE_OF[mode]
                    names = names[rnd % len(names):] + names[:rnd % len(names)]
                    for name in names:
                        dist.barrier()
                        if is_memory_step(s):
                            with common.RssPeak() as m:
                                gere_step(name)
                            memory[name] = {"rss_peak_mib": m.peak / common.MIB,
                                            "step_extra_mib": (m.peak - m.start) / common.MIB}
                        else:
                            t0 = time.perf_counter()
                            gere_step(name)
                            record(name, time.perf_counter() - t0, rnd)
                self._arm(s + 1)

        interleave = Interleave()
        trainer = Trainer(model=model, args=targs, train_dataset=dataset,
                          data_collator=Collator(tok, cfg.replay.max_len, hidden_dir, rank),
                          callbacks=[interleave])
        interleave.trainer = trainer
        trainer.train()
        wrapped = trainer.model_wrapped
        hf_checks = {"is_deepspeed_enabled": bool(trainer.is_deepspeed_enabled),
                     "engine": type(wrapped).__name__,
                     "zero_stage": wrapped.zero_optimization_stage()
                     if hasattr(wrapped, "zero_optimization_stage") else None,
                     "bf16": wrapped.bfloat16_enabled() if hasattr(wrapped, "bfloat16_enabled")
                     else None, "world_size": trainer.args.world_size,
                     "optimizer": type(getattr(wrapped, "optimizer", None)).__name__}
        notes.append(f"HF Trainer engine: {hf_checks}")
        hf_steps = trainer.state.global_step
        if hf_steps != len(modes):
            notes.append(f"rank {rank}: the Trainer ran {hf_steps} steps, {len(modes)} planned")

    first = {n: {k: (float(v) if v is not None else None) for k, v in d.items()}
             for n, d in first_losses.items()}
    local = {"rank": rank, "times": times, "memory": memory, "first_losses": first,
             "max_rss_mib": common.max_rss_bytes() / common.MIB, "notes": notes}
    gathered = dist.all_gather_object(local)
    if rank == 0:
        Path(args.result).write_text(json.dumps({"world_size": W, "ranks": gathered,
                                                 "solo": solo}, default=str))
    dist.barrier()


# ============================================================================ driver


def per_round(raw: dict) -> dict[str, list[float]]:
    ranks = raw["ranks"]
    names = ranks[0]["times"].keys()
    return {n: [max(r["times"][n][i] for r in ranks) for i in range(len(ranks[0]["times"][n]))]
            for n in names}


PAIRS = [("gere_none", "hf_plain", "gere-ds none vs HF Trainer (same task rows)"),
         ("gere_tm", "hf_ref", "gere-ds tm vs reference-style GeRe (same mixed rows)"),
         ("gere_tm", "hf_plain", "gere-ds tm (GeRe) vs HF Trainer plain")]


def summarise(raw: dict, tokens: dict[str, int], solos: dict[str, dict]) -> dict:
    rounds = per_round(raw)
    variants = {}
    for n, vals in rounds.items():
        med = common.median(vals)
        variants[n] = {"step_s": common.spread(vals), "tokens": tokens[n],
                       "tokens_per_s": tokens[n] / med if med else float("nan"),
                       "rss_peak_mib_per_rank": [r["memory"].get(n, {}).get("rss_peak_mib")
                                                 for r in raw["ranks"]],
                       "step_extra_mib_per_rank": [r["memory"].get(n, {}).get("step_extra_mib")
                                                   for r in raw["ranks"]]}
    ratios = {}
    for a, b, label in PAIRS:
        if a in rounds and b in rounds:
            ratio = common.paired_ratio(rounds[a], rounds[b])
            ratio["speedup"] = 1.0 / ratio["median_of_ratios"]
            ratio["label"] = label
            ratios[f"{a}/{b}"] = ratio
    solo = {}
    for name, sraw in solos.items():
        if sraw is None:
            solo[name] = None
            continue
        sr = per_round(sraw)
        solo[name] = {"max_rss_mib_per_rank": [r["max_rss_mib"] for r in sraw["ranks"]],
                      "step_s": common.spread(sr.get(name, [])),
                      "step_rss_peak_mib_per_rank": [r["memory"].get(name, {}).get("rss_peak_mib")
                                                     for r in sraw["ranks"]]}
    notes = sorted({n for r in raw["ranks"] for n in r["notes"]})
    return {"variants": variants, "ratios": ratios, "per_round_s": rounds,
            "first_losses": raw["ranks"][0].get("first_losses", {}), "notes": notes,
            "max_rss_mib_per_rank_interleaved": [r["max_rss_mib"] for r in raw["ranks"]],
            "solo": solo}


def report(s: dict) -> str:
    def mib(xs):
        return "/".join("-" if x is None else f"{x:.0f}" for x in xs)

    rows = [[n, v["step_s"]["median"], f"{v['step_s']['min']:.3f}-{v['step_s']['max']:.3f}",
             v["tokens_per_s"], mib(v["rss_peak_mib_per_rank"]),
             mib(v["step_extra_mib_per_rank"])] for n, v in s["variants"].items()]
    out = ["interleaved in one process tree (both engines resident):",
           common.table(["variant", "step s (median)", "min-max", "tokens/s",
                         "step peak RSS MiB r0/r1", "step extra MiB r0/r1"], rows), ""]
    out.append(common.table(
        ["comparison", "time ratio (median of rounds)", "speed-up", "min-max", "rounds"],
        [[r["label"], r["median_of_ratios"], r["speedup"], f"{r['min']:.3f}-{r['max']:.3f}",
          r["rounds"]] for r in s["ratios"].values()]))
    if s["solo"]:
        out.append("\nsolo launches (one engine per process tree, alternating; process peak RSS "
                   "= ru_maxrss):")
        out.append(common.table(
            ["variant", "process peak RSS MiB r0/r1", "step peak RSS MiB r0/r1",
             "step s (solo, median)"],
            [[n, mib(v["max_rss_mib_per_rank"]), mib(v["step_rss_peak_mib_per_rank"]),
              v["step_s"]["median"]] if v else [n, "failed", "-", "-"]
             for n, v in s["solo"].items()]))
    fl = s.get("first_losses", {})
    if fl:
        out.append("\nloss at each variant's first step (rank 0; same initial weights, lr 1e-5):")
        out.append(common.table(["variant", "loss", "CE", "TM"],
                                [[n, d.get("loss"), d.get("ce", float("nan")),
                                  d.get("tm") if d.get("tm") is not None else float("nan")]
                                 for n, d in fl.items()]))
    for note in s.get("notes", []):
        out.append(f"note: {note}")
    return "\n".join(out)


def count_tokens(paths, spec, W) -> dict[str, int]:
    """Non-pad tokens per global step of each variant (same rows on both sides)."""
    from transformers import AutoTokenizer

    from gere_ds.config import load_config  # noqa: F401
    from gere_ds.data.encode import encode_example, encode_replay
    from gere_ds.data.replay import load_replay_texts
    from gere_ds.data.sampler import replay_shard

    tok = AutoTokenizer.from_pretrained(paths["model"])
    rows = [json.loads(x) for x in Path(paths["train"]).read_text().splitlines()]
    texts = load_replay_texts(paths["replay"], 100000)
    B = spec.micro_batch
    plain = mixed = 0
    for r in range(W):
        lens = [len(encode_example(tok, "What is the sentiment of the review? Choose one option.",
                                   ["positive", "negative"], rows[r * B + j]["sentence"],
                                   rows[r * B + j]["label"], spec.seq - 4, 4).input_ids)
                for j in range(B)]
        plain += sum(lens)
        shard = replay_shard(len(texts), W, r, 1)
        mixed += sum(lens[:B - B // 2]) + sum(len(encode_replay(tok, texts[s], spec.seq))
                                              for s in shard[:B // 2])
    return {"hf_plain": plain, "gere_none": plain, "hf_ref": mixed, "gere_tm": mixed}


def main() -> int:
    p = common.bench_parser(__doc__, "tiny model, one round, no solo launches")
    p.add_argument("--solo", dest="solo_launches", action="store_true", default=None,
                   help="also run the one-engine memory launches (default: on unless --smoke)")
    p.add_argument("--no-solo", dest="solo_launches", action="store_false")
    p.add_argument("--worker-solo", dest="solo", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        common.run_worker_and_exit(worker, args)

    run = common.bench_run(NAME, args)
    solo_launches = (not args.smoke) if args.solo_launches is None else args.solo_launches
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-hf-") as tmp:
        tmp = Path(tmp)
        run_cfg = common.run_config(run.paths, run.spec, tmp / "run", "tm",
                                    teacher_cache=tmp / "teacher_cache")

        def launch(solo: str | None, reps_: int, warmup_: int) -> dict | None:
            c = copy.deepcopy(run_cfg)
            if solo == "gere_none":
                c["replay"]["strategy"] = "none"
            cfg = common.write_config(c, tmp / f"cfg-{solo or 'main'}.yaml")
            result = tmp / f"result-{solo or 'main'}.json"
            wargs = ["--worker", "--config", str(cfg), "--work", str(tmp), "--result",
                     str(result), "--reps", str(reps_), "--warmup", str(warmup_)]
            if solo:
                wargs += ["--worker-solo", solo]
            log = run.out_dir / "logs" / f"{run.log_tag}-{solo or 'main'}.log"
            code, tail = common.launch(Path(__file__), wargs, nproc=common.WORLD, log=log)
            if code != 0 or not result.is_file():
                print(tail, file=sys.stderr)
                print(f"error: worker {solo or 'main'} failed (exit {code})", file=sys.stderr)
                return None
            return json.loads(result.read_text())

        raw = launch(None, run.reps, run.warmup)
        if raw is None:
            return 1
        solos: dict[str, dict | None] = {}
        if solo_launches:
            for name in SOLO:  # alternating: hf, gere, hf, gere
                solos[name] = launch(name, 2, 1)
    wall = time.perf_counter() - t_start
    summary = summarise(raw, count_tokens(run.paths, run.spec, common.WORLD), solos)
    payload = run.payload(wall, "deepspeed --num_gpus 2 (CPU ranks, gloo), ZeRO-3, bf16, torch "
                          "AdamW; HF Trainer and gere-ds engines in the same processes, steps "
                          "interleaved by a TrainerCallback",
                          summary=summary, raw=raw, solo_raw=solos)
    path = common.write_result(NAME, args.smoke, payload, run.out_dir)
    print(run.header())
    print(report(summary))
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
