"""The continual loop: validate inputs -> teacher pass -> for each task: train, checkpoint.

One optimizer step, as data:
  sampler rows (task example ids + replay sample ids) -> collate -> one engine forward per
  micro-step on every rank (the hook keeps the final-norm output) -> losses.combine (one small
  all-reduce) -> engine.backward / engine.step -> scalars to TensorBoard at log steps.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from gere_ds import dist
from gere_ds.capture import FinalNormCapture
from gere_ds.checkpoint import save_checkpoint, task_tag
from gere_ds.config import RunConfig, save_resolved
from gere_ds.data.collate import MicroBatch, collate
from gere_ds.data.encode import Encoded, encode_example, encode_replay
from gere_ds.data.replay import load_replay_texts
from gere_ds.data.sampler import ContinualSampler, Row, replay_shard
from gere_ds.data.tasks import Example, load_examples
from gere_ds.engine import Engine, build_engine, check_model_folder, resolve_ds_config
from gere_ds.errors import InputError
from gere_ds.losses import LocalTerms, StepLoss, combine, tm_sum_count, token_ce_sum
from gere_ds.run_log import RunLogger
from gere_ds.teacher import fingerprint, prepare_teacher_states
from gere_ds.teacher_cache import TeacherStates


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up for `warmup` steps, then cosine to peak*min_ratio at `total` (per task)."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class Inputs:
    """Everything read from disk and validated before any work starts."""

    train_sets: list[list[Example]]
    replay_texts: list[str]


def validate_inputs(cfg: RunConfig, world_size: int) -> Inputs:
    """Read and check every input; raises InputError with file, line and field."""
    check_model_folder(cfg)
    resolve_ds_config(cfg, world_size)
    train_sets = [load_examples(task, "train") for task in cfg.tasks]
    replay: list[str] = []
    if cfg.replay.strategy != "none":
        replay = load_replay_texts(cfg.replay.data, cfg.replay.num_samples)
        if len(replay) < world_size:
            raise InputError(f"{len(replay)} replay documents for {world_size} ranks",
                             file=cfg.replay.data, field="replay.num_samples")
        global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum * world_size
        if cfg.replay.per_batch >= global_batch:
            raise InputError(f"per_batch={cfg.replay.per_batch} must be smaller than the global "
                             f"batch ({global_batch})", field="replay.per_batch")
    return Inputs(train_sets, replay)


@dataclass
class StepStats:
    """Global (rank-identical) values summed over the micro-steps of one optimizer step."""

    n: int = 0
    sums: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, sl: StepLoss) -> None:
        self.n += 1
        for name in ("loss", "task_ce", "replay_ce", "reg", "reg_weight", "violation_frac",
                     "tokens"):
            value = getattr(sl, name).detach()
            self.sums[name] = self.sums.get(name, 0) + value

    def means(self) -> dict[str, float]:
        # the only host sync of a step, and only on logging steps
        return {k: float(v) / (1 if k == "tokens" else self.n) for k, v in self.sums.items()}


class ContinualTrainer:
    def __init__(self, cfg: RunConfig, log: RunLogger | None = None) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.log = log or RunLogger(self.out)
        self.world, self.rank = dist.world_size(), dist.rank()
        self.global_step = 0
        self.engine: Engine | None = None
        self.teacher: TeacherStates | None = None
        self._encoded: dict[tuple[int, int], Encoded] = {}
        self._replay_ids: dict[int, list[int]] = {}

    # ------------------------------------------------------------------ setup
    def setup(self, inputs: Inputs) -> None:
        cfg = self.cfg
        self.inputs = inputs
        if dist.is_main():
            self.out.mkdir(parents=True, exist_ok=True)
            save_resolved(cfg, self.out / "config.yaml")
        torch.manual_seed(cfg.train.seed)
        self.engine = build_engine(cfg, self.world, self.log.info)
        self.device = dist.device()
        self.tokenizer = self.engine.tokenizer
        self.capture = FinalNormCapture(self.engine.module)
        self.hidden_size = int(self.engine.module.config.hidden_size)
        if cfg.replay.strategy != "none":
            shard = replay_shard(len(inputs.replay_texts), self.world, self.rank, cfg.train.seed)
            self.shard = shard
            self._replay_ids = {i: encode_replay(self.tokenizer, inputs.replay_texts[i],
                                                 cfg.replay.max_len) for i in shard}
        self._print_summary()

    def _print_summary(self) -> None:
        c, t = self.cfg, self.cfg.train
        gb = t.micro_batch_size * t.grad_accum * self.world
        self.log.info(f"world size {self.world} | micro batch {t.micro_batch_size} x accum "
                      f"{t.grad_accum} x ranks {self.world} = global batch {gb} | "
                      f"strategy {c.replay.strategy} (w={c.replay.weight}) | bf16 {t.bf16}")
        for i, (task, rows) in enumerate(zip(c.tasks, self.inputs.train_sets)):
            self.log.info(f"task {i + 1}/{len(c.tasks)} {task.name}: {len(rows)} train examples, "
                          f"{self._steps_for(i)} optimizer steps")
        if c.replay.strategy != "none":
            self.log.info(f"replay: {len(self.inputs.replay_texts)} documents, "
                          f"{len(self.shard)} on this rank, per_batch={c.replay.per_batch}")

    # ------------------------------------------------------------------ data
    def _sampler(self, task_index: int) -> ContinualSampler:
        c, t = self.cfg, self.cfg.train
        return ContinualSampler(
            n_task=len(self.inputs.train_sets[task_index]),
            n_replay=len(self.inputs.replay_texts), world_size=self.world, rank=self.rank,
            micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum,
            per_batch=c.replay.per_batch, seed=t.seed, task_index=task_index,
            use_replay=c.replay.strategy != "none")

    def _steps_for(self, task_index: int) -> int:
        total = self.cfg.train.epochs * self._sampler(task_index).steps_per_epoch()
        cap = self.cfg.train.max_steps_per_task
        return min(total, cap) if cap else total

    def _encode(self, task_index: int, example_index: int) -> Encoded:
        key = (task_index, example_index)
        if key not in self._encoded:
            task, ex = self.cfg.tasks[task_index], self.inputs.train_sets[task_index][example_index]
            self._encoded[key] = encode_example(self.tokenizer, task.instruction, task.labels,
                                                ex.text, ex.label, self.cfg.train.max_source_len,
                                                self.cfg.train.max_target_len)
        return self._encoded[key]

    def make_batch(self, task_index: int, rows: list[Row]) -> tuple[MicroBatch, list[int]]:
        encoded, replay_ids = [], []
        for is_replay, idx in rows:
            if is_replay:
                ids = self._replay_ids[idx]
                encoded.append(Encoded(ids, ids))
                replay_ids.append(idx)
            else:
                encoded.append(self._encode(task_index, idx))
                replay_ids.append(-1)
        mb = collate(encoded, replay_ids, self.tokenizer.pad_token_id).to(self.device)
        return mb, replay_ids

    # ------------------------------------------------------------------ teacher
    def prepare_teacher(self) -> None:
        r = self.cfg.replay
        if r.strategy != "tm":
            return
        cache_root = Path(r.teacher_cache) if r.teacher_cache else self.out / "teacher"
        settings = {"strategy": r.strategy, "num_samples": r.num_samples, "max_len": r.max_len,
                    "threshold_k": r.threshold_k, "world_size": self.world,
                    "seed": self.cfg.train.seed, "bf16": self.cfg.train.bf16,
                    "n_replay": len(self.inputs.replay_texts)}
        fp = fingerprint(self.cfg.model, self.cfg.tokenizer or self.cfg.model, r.data, settings)
        self.engine.engine.eval()
        n_fwd = math.ceil(len(self.shard) / r.teacher_batch_size)
        self.log.progress(n_fwd, "teacher pass")
        try:
            self.teacher = prepare_teacher_states(
                self.engine.forward, self.capture, self._replay_ids, self.shard, self.hidden_size,
                r.threshold_k, r.teacher_batch_size, self.tokenizer.pad_token_id, self.device,
                cache_root, fp, self.log.info, lambda i, n: self.log.advance(1))
        finally:
            self.log.close_progress()
            self.engine.engine.train()
        self.teacher_fingerprint = fp
        self._lo = self.teacher.lo.to(self.device)
        self._hi = self.teacher.hi.to(self.device)

    # ------------------------------------------------------------------ one micro-step
    def local_terms(self, logits: torch.Tensor, hidden: torch.Tensor, mb: MicroBatch,
                    replay_ids: list[int]) -> LocalTerms:
        replay_rows = mb.is_replay
        task_sum, task_count = token_ce_sum(logits, mb.labels, ~replay_rows)
        replay_sum, replay_count = token_ce_sum(logits, mb.labels, replay_rows)
        zero = task_sum.new_zeros(())
        reg_sum, reg_count, reg_elems = zero, zero, zero
        picked = [i for i, sid in enumerate(replay_ids) if sid >= 0]
        if self.cfg.replay.strategy == "tm" and picked:
            ids = [replay_ids[i] for i in picked]
            sel = torch.tensor(picked, device=hidden.device)
            states = self.teacher.batch(ids, width=mb.input_ids.shape[1]).to(self.device)
            reg_sum, reg_count, reg_elems = tm_sum_count(
                hidden.index_select(0, sel), states, self._lo, self._hi,
                mb.attention_mask.index_select(0, sel))
        tokens = mb.attention_mask.sum().to(torch.float32)
        return LocalTerms(task_sum, task_count, replay_sum, replay_count, reg_sum, reg_count,
                          reg_elems, tokens)

    def micro_step(self, task_index: int, rows: list[Row]) -> StepLoss:
        mb, replay_ids = self.make_batch(task_index, rows)
        logits = self.engine.forward(mb.input_ids, mb.attention_mask)
        hidden = self.capture.pop()
        sl = combine(self.local_terms(logits, hidden, mb, replay_ids), self.cfg.replay.weight)
        self.engine.engine.backward(sl.local_loss)
        self.engine.engine.step()
        return sl

    # ------------------------------------------------------------------ one task
    def train_task(self, task_index: int) -> None:
        cfg, t = self.cfg, self.cfg.train
        task = cfg.tasks[task_index]
        sampler = self._sampler(task_index)
        total = self._steps_for(task_index)
        if t.reset_optimizer_per_task:
            self.engine.reset_optimizer_state()
        self.log.progress(total, f"task {task_index + 1}/{len(cfg.tasks)} {task.name}")
        step_in_task = 0
        tick = time.perf_counter()
        for epoch in range(t.epochs):
            for step in range(sampler.steps_per_epoch()):
                if step_in_task >= total:
                    break
                lr = lr_at(step_in_task, total, t.lr, t.warmup_steps, t.min_lr_ratio)
                self.engine.set_lr(lr)
                stats = StepStats()
                for rows in sampler.step_micro_batches(epoch, step):
                    stats.add(self.micro_step(task_index, rows))
                step_in_task += 1
                self.global_step += 1
                sampler.state.epoch, sampler.state.step = epoch, step + 1
                if step_in_task % t.log_every == 0 or step_in_task == total:
                    now = time.perf_counter()
                    self._log_step(stats, lr, now - tick, task_index, epoch, step_in_task)
                    tick = now
                self.log.advance(1)
        self.log.close_progress()

    def _log_step(self, stats: StepStats, lr: float, seconds: float, task_index: int,
                  epoch: int, step_in_task: int) -> None:
        m = stats.means()
        grad_norm = self.engine.engine.get_global_grad_norm()
        values = {"train/loss": m["loss"], "train/task_ce": m["task_ce"],
                  "train/replay_ce": m["replay_ce"], "train/lr": lr,
                  "train/grad_norm": float(grad_norm) if grad_norm is not None else 0.0,
                  "train/tokens_per_s": m["tokens"] / max(seconds, 1e-9)}
        if self.cfg.replay.strategy == "tm":
            values.update({"train/tm": m["reg"], "train/tm_violation_frac": m["violation_frac"],
                           "train/tm_weight": m["reg_weight"]})
        self.log.scalars(values, self.global_step,
                         {"task": task_index, "epoch": epoch, "step_in_task": step_in_task})
        self.log.advance(0, loss=f"{m['loss']:.4f}", lr=f"{lr:.2e}")

    # ------------------------------------------------------------------ the sequence
    def trainer_state(self, task_index: int) -> dict[str, Any]:
        return {"task_index": task_index, "tasks_done": task_index + 1,
                "global_step": self.global_step, "world_size": self.world,
                "teacher_fingerprint": getattr(self, "teacher_fingerprint", None)}

    def run(self, inputs: Inputs) -> None:
        self.setup(inputs)
        self.prepare_teacher()
        ckpt_root = self.out / "checkpoints"
        for i, task in enumerate(self.cfg.tasks):
            self.train_task(i)
            folder = save_checkpoint(self.engine.engine, ckpt_root, task_tag(i),
                                     self.trainer_state(i))
            self.log.info(f"task {i + 1} {task.name} done; checkpoint {folder}")
        self.log.info(f"run complete: {self.out} (TensorBoard: {self.out / 'tensorboard'})")
