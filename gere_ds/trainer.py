"""The continual loop: validate inputs -> teacher pass -> for each task: train, checkpoint.

One optimizer step, as data:
  sampler rows (task example ids + replay sample ids) -> collate -> one engine forward per
  micro-step on every rank (the hook keeps the final-norm output) -> per-row loss terms ->
  losses.reduce_rows (the configured weighing of rows) -> engine.backward / engine.step; after
  the step one small all-reduce of the log values -> scalars to TensorBoard at log steps.
"""
from __future__ import annotations

import math
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from gere_ds import dist
from gere_ds.capture import FinalNormCapture, lm_head_on_positions
from gere_ds.checkpoint import (find_resume_checkpoint, load_rng, load_trainer_state,
                                local_problem, prune_checkpoints, save_checkpoint, step_tag, task_tag)
from gere_ds.config import RunConfig, save_resolved
from gere_ds.data.collate import MicroBatch, collate
from gere_ds.data.encode import Encoded, encode_example, encode_replay
from gere_ds.data.replay import load_replay_texts
from gere_ds.data.sampler import ContinualSampler, Row, replay_shard
from gere_ds.data.tasks import Example, load_examples
from gere_ds.engine import Engine, build_engine, check_model_folder, resolve_ds_config
from gere_ds.errors import InputError
from gere_ds.evaluation.scoring import EvalSuite
from gere_ds.losses import (RowTerms, StepLoss, dead_band_units, feature_diff_rows, reduce_rows,
                            row_ce_sums, step_means, supervised_positions, tm_dead_band,
                            tm_row_terms, topk_kl_rows)
from gere_ds.run_log import RunLogger
from gere_ds.teacher import check_kl_topk, fingerprint
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
    eval_suite: EvalSuite | None = None


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
    if cfg.replay.strategy == "kl":  # before the model is loaded: one clear line
        import json

        vocab = json.loads((Path(cfg.model) / "config.json").read_text()).get("vocab_size")
        if vocab:
            check_kl_topk(cfg.replay.kl_topk, int(vocab), cfg.model)
    suite = None
    if cfg.eval.enabled:
        suite = EvalSuite(cfg.tasks, cfg.eval, seed=cfg.train.seed,
                          max_source_len=cfg.train.max_source_len,
                          max_target_len=cfg.train.max_target_len,
                          truncate_source=cfg.train.truncate_source)
    return Inputs(train_sets, replay, suite)


class Preempted(Exception):
    """SIGTERM/SIGUSR1 arrived: a checkpoint was saved at a step boundary on every rank."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stayed non-finite); the message says why."""


@dataclass
class Progress:
    """Where the run stands in the task sequence; saved in every checkpoint."""

    task_index: int = 0  # the task being trained, or the next one
    task_done: bool = False  # task_index finished training (its end checkpoint exists)
    epoch: int = 0
    step: int = 0  # optimizer steps done in this epoch
    step_in_task: int = 0
    global_step: int = 0
    bad_steps_in_a_row: int = 0
    skipped_steps: int = 0
    matrix: list[list[float]] = field(default_factory=list)  # row 0 = base model
    general: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class StepStats:
    """This rank's log values (losses.STAT_NAMES) summed over the micro-steps of one optimizer
    step; ``reduce`` sums them over ranks (the step's one collective for logging)."""

    total: torch.Tensor | None = None

    def add(self, sl: StepLoss) -> None:
        self.total = sl.stats if self.total is None else self.total + sl.stats

    def reduce(self) -> dict[str, float]:
        """Global values of the step, identical on every rank (one all-reduce, every rank)."""
        return step_means(dist.all_reduce_sum(self.total.clone()))


class ContinualTrainer:
    def __init__(self, cfg: RunConfig, log: RunLogger | None = None) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.log = log or RunLogger(self.out)
        self.world, self.rank = dist.world_size(), dist.rank()
        self.progress = Progress()
        self._stop_signal: int | None = None
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
        for sig in (signal.SIGTERM, signal.SIGUSR1):  # Slurm pre-emption
            signal.signal(sig, self._on_signal)
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
                                                self.cfg.train.max_target_len,
                                                truncate_source=self.cfg.train.truncate_source,
                                                option_line=task.option_line)
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
        """The teacher data of this rank's replay shard (states / top-k / features), from the
        cache when every rank's cache is intact, else from one pass of the base model."""
        from gere_ds.teacher import check_kl_topk, prepare_teacher_data, teacher_settings
        from gere_ds.teacher_cache import STRATEGY_KIND

        r = self.cfg.replay
        if r.strategy not in STRATEGY_KIND:
            return
        if r.strategy == "kl":  # before any teacher work: one clear line
            check_kl_topk(r.kl_topk, int(self.engine.module.config.vocab_size), self.cfg.model)
        cache_root = Path(r.teacher_cache) if r.teacher_cache else self.out / "teacher"
        settings = teacher_settings(r.strategy, num_samples=r.num_samples, max_len=r.max_len,
                                    world_size=self.world, seed=self.cfg.train.seed,
                                    bf16=self.cfg.train.bf16,
                                    n_replay=len(self.inputs.replay_texts),
                                    threshold_k=r.threshold_k, kl_topk=r.kl_topk)
        fp = fingerprint(self.cfg.model, self.cfg.tokenizer or self.cfg.model, r.data, settings)
        self.engine.engine.eval()
        n_fwd = math.ceil(len(self.shard) / r.teacher_batch_size)
        self.log.progress(n_fwd, "teacher pass")
        try:
            self.teacher = prepare_teacher_data(
                STRATEGY_KIND[r.strategy], self.engine.forward, self.capture, self._replay_ids,
                self.shard, self.hidden_size, r.teacher_batch_size, self.tokenizer.pad_token_id,
                self.device, cache_root, fp, self.log.info, lambda i, n: self.log.advance(1),
                threshold_k=r.threshold_k, kl_topk=r.kl_topk, settings=settings)
        finally:
            self.log.close_progress()
            self.engine.engine.train()
        self.teacher_fingerprint = fp
        if r.strategy == "tm":
            self._lo = self.teacher.lo.to(self.device)
            self._hi = self.teacher.hi.to(self.device)
            compute = torch.bfloat16 if self.cfg.train.bf16 else torch.float32
            units = dead_band_units(r.tm_dead_band, compute)
            self._band = tm_dead_band(self.teacher.lo, self.teacher.hi, self.teacher.sigma,
                                      units, compute).to(self.device)
            if units > 0:
                self.log.info(f"TM dead-band: {units:g} rounding units x sigma + one {compute} "
                              f"rounding step (median {float(self._band.median()):.3g}, max "
                              f"{float(self._band.max()):.3g}; median sigma "
                              f"{float(self.teacher.sigma.median()):.3g})")
            else:
                self.log.info("TM dead-band: off (the reference's exact test)")

    # ------------------------------------------------------------------ one micro-step
    def row_terms(self, logits: torch.Tensor, hidden: torch.Tensor, mb: MicroBatch,
                  replay_ids: list[int], picked: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> RowTerms:
        """This rank's per-row loss terms. ``logits`` are [B, T, V], or with ``picked`` =
        (positions, targets) the [N, V] logits of the supervised positions only."""
        n_rows, width = mb.input_ids.shape
        logits_at = logits
        if picked is None:  # full logits: take the supervised positions here
            picked = supervised_positions(mb.labels)
            logits_at = logits.reshape(-1, logits.shape[-1]).index_select(0, picked[0])
        pos, targets = picked
        ce_sum, ce_count = row_ce_sums(logits_at.reshape(-1, logits_at.shape[-1]), targets,
                                       pos // width, n_rows)
        zeros = ce_sum.new_zeros(n_rows)
        reg_sum, reg_count, reg_elems, reg_ignored = zeros, zeros, zeros, zeros
        replay_rows = [i for i, sid in enumerate(replay_ids) if sid >= 0]
        strategy = self.cfg.replay.strategy
        if strategy in ("tm", "kl", "l1", "l2") and replay_rows:
            ids = [replay_ids[i] for i in replay_rows]
            sel = torch.tensor(replay_rows, device=hidden.device)
            mask = mb.attention_mask.index_select(0, sel)
            if strategy == "tm":
                states = self.teacher.batch(ids, width=width).to(self.device)
                parts = tm_row_terms(hidden.index_select(0, sel), states, self._lo, self._hi,
                                     mask, self._band)
            elif strategy == "kl":  # token mean of KL(teacher || student) over the top-k
                top_ids, top_logp = self.teacher.batch(ids, width=width)
                s_, c_ = topk_kl_rows(logits.index_select(0, sel), top_ids.to(self.device),
                                      top_logp.to(self.device), mask,
                                      self.cfg.replay.kl_temperature)
                parts = (s_, c_, c_, c_.new_zeros(c_.shape))
            else:  # l1 / l2: element mean of |h - t| or (h - t)^2
                feats = self.teacher.batch(ids, width=width).to(self.device)
                s_, c_ = feature_diff_rows(hidden.index_select(0, sel), feats, mask,
                                           1 if strategy == "l1" else 2)
                parts = (s_, c_, c_, c_.new_zeros(c_.shape))
            reg_sum, reg_count, reg_elems, reg_ignored = (
                zeros.index_put((sel,), part.to(zeros.dtype)) for part in parts)
        return RowTerms(mb.is_replay, ce_sum, ce_count, reg_sum, reg_count, reg_elems,
                        reg_ignored, mb.attention_mask.sum().to(torch.float32))

    def forward_loss(self, task_index: int, rows: list[Row]) -> StepLoss:
        """One micro-batch: forward on the engine, per-row terms, the configured reduction.
        Every rank calls it once per micro-step (ZeRO-3 forwards are collective)."""
        mb, replay_ids = self.make_batch(task_index, rows)
        if self.cfg.replay.strategy == "kl":  # the KL term reads logits at every replay token
            logits = self.engine.forward(mb.input_ids, mb.attention_mask)
            picked = None
        else:  # the LM head only where a target is (same loss and gradients, less work)
            picked = supervised_positions(mb.labels)
            with lm_head_on_positions(self.engine.module, picked[0]):
                logits = self.engine.forward(mb.input_ids, mb.attention_mask)
        terms = self.row_terms(logits, self.capture.pop(), mb, replay_ids, picked)
        t = self.cfg.train
        global_rows = t.micro_batch_size * t.grad_accum * self.world
        return reduce_rows(terms, self.cfg.replay.reduction, self.cfg.replay.weight,
                           global_rows, t.grad_accum)

    def micro_step(self, task_index: int, rows: list[Row]) -> StepLoss:
        """forward_loss, backward, and DeepSpeed's step (which applies the optimizer at the
        accumulation boundary). A non-finite loss still goes through backward: DeepSpeed finds
        the non-finite gradient norm and skips that optimizer step (skipping backward instead
        would leave ZeRO-3 without gradients to step on)."""
        sl = self.forward_loss(task_index, rows)
        self.engine.engine.backward(sl.local_loss)
        self.engine.engine.step()
        return sl

    # ------------------------------------------------------------------ one task
    def _on_signal(self, signum: int, frame: Any) -> None:
        self._stop_signal = signum

    def train_task(self, task_index: int) -> None:
        """Train one task from where self.progress stands (its start, or a resumed step)."""
        cfg, t, p = self.cfg, self.cfg.train, self.progress
        task = cfg.tasks[task_index]
        sampler = self._sampler(task_index)
        total = self._steps_for(task_index)
        if p.step_in_task == 0 and t.reset_optimizer_per_task:
            self.engine.reset_optimizer_state()
        self.log.progress(total, f"task {task_index + 1}/{len(cfg.tasks)} {task.name}",
                          initial=p.step_in_task)
        tick = time.perf_counter()
        for epoch in range(p.epoch, t.epochs):
            for step in range(p.step if epoch == p.epoch else 0, sampler.steps_per_epoch()):
                if p.step_in_task >= total:
                    break
                lr = lr_at(p.step_in_task, total, t.lr, t.warmup_steps, t.min_lr_ratio)
                self.engine.set_lr(lr)
                stats = StepStats()
                for rows in sampler.step_micro_batches(epoch, step):
                    stats.add(self.micro_step(task_index, rows))
                values = stats.reduce()
                p.epoch, p.step = epoch, step + 1
                p.step_in_task += 1
                p.global_step += 1
                self._count_bad_step(task_index, int(values["nonfinite"]))
                if p.step_in_task % t.log_every == 0 or p.step_in_task == total:
                    now = time.perf_counter()
                    self._log_step(values, lr, now - tick, task_index, epoch, p.step_in_task)
                    tick = now
                self.log.advance(1)
                self._maybe_checkpoint(task_index, total)
        self.log.close_progress()

    def _count_bad_step(self, task_index: int, nonfinite: int) -> None:
        """``nonfinite``: micro-batches (over all ranks) whose loss was not finite."""
        p = self.progress
        skipped = not self.engine.engine.was_step_applied()  # DeepSpeed saw non-finite grads
        if not nonfinite and not skipped:
            p.bad_steps_in_a_row = 0
            return
        p.bad_steps_in_a_row += 1
        p.skipped_steps += 1
        self.log.info(f"non-finite loss or gradients at task {task_index + 1} step "
                      f"{p.step_in_task} ({nonfinite} of {self.cfg.train.grad_accum * self.world}"
                      f" rank micro-batches): optimizer step skipped "
                      f"({p.bad_steps_in_a_row} in a row, {p.skipped_steps} in all)")
        if p.bad_steps_in_a_row >= self.cfg.train.max_bad_steps:
            raise TrainingError(f"loss non-finite for {p.bad_steps_in_a_row} steps in a row "
                                f"(train.max_bad_steps={self.cfg.train.max_bad_steps}) at task "
                                f"{task_index + 1} step {p.step_in_task}; lower train.lr or "
                                f"check the data; last good checkpoint kept")

    def _maybe_checkpoint(self, task_index: int, total: int) -> None:
        """Periodic checkpoints, and the pre-emption checkpoint (decided on all ranks)."""
        every = self.cfg.checkpoint.every_steps
        p = self.progress
        periodic = bool(every) and p.step_in_task % every == 0 and p.step_in_task < total
        stop = dist.any_rank(self._stop_signal is not None)
        if periodic or stop:
            tag = step_tag(task_index, p.step_in_task)
            save_checkpoint(self.engine.engine, self.ckpt_root, tag, self.trainer_state())
            if dist.local_rank() == 0:  # after the new one is complete
                prune_checkpoints(self.ckpt_root, self.cfg.checkpoint.keep_last,
                                  self.cfg.checkpoint.keep_task_ends)
            dist.barrier()
            self.log.info(f"checkpoint {tag}")
        if stop:
            raise Preempted(f"pre-empted (signal) at task {task_index + 1} step "
                            f"{p.step_in_task}: checkpoint saved; re-run the same command to "
                            f"resume")

    def _log_step(self, m: dict[str, float], lr: float, seconds: float, task_index: int,
                  epoch: int, step_in_task: int) -> None:
        grad_norm = self.engine.engine.get_global_grad_norm()
        values = {"train/loss": m["loss"], "train/task_ce": m["task_ce"],
                  "train/replay_ce": m["replay_ce"], "train/lr": lr,
                  "train/grad_norm": float(grad_norm) if grad_norm is not None else 0.0,
                  "train/tokens_per_s": m["tokens"] / max(seconds, 1e-9)}
        strategy = self.cfg.replay.strategy
        if strategy in ("tm", "kl", "l1", "l2"):
            values[f"train/{strategy}"] = m["reg"]
            if "reg_weight" in m:  # dy: absent where no replay row had a non-zero term
                values[f"train/{strategy}_weight"] = m["reg_weight"]
        if strategy == "tm":
            values["train/tm_violation_frac"] = m["violation_frac"]
            values["train/tm_ignored_frac"] = m["ignored_frac"]
        self.log.scalars(values, self.progress.global_step,
                         {"task": task_index, "epoch": epoch, "step_in_task": step_in_task})
        self.log.advance(0, loss=f"{m['loss']:.4f}", lr=f"{lr:.2e}")

    # ------------------------------------------------------------------ the sequence
    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"

    def trainer_state(self) -> dict[str, Any]:
        return {"progress": asdict(self.progress), "world_size": self.world,
                "seed": self.cfg.train.seed,
                "task_names": [task.name for task in self.cfg.tasks],
                "teacher_fingerprint": getattr(self, "teacher_fingerprint", None)}

    def resume(self) -> None:
        """Load the checkpoint that `resume` names (auto: the newest complete one)."""
        mode = self.cfg.resume
        if mode == "never":
            if dist.any_rank(any(self.ckpt_root.glob("task*"))):
                raise InputError(f"{self.ckpt_root} already holds checkpoints and resume=never; "
                                 f"use a new output_dir or resume=auto", field="resume")
            return
        if mode == "auto":
            root, tag = self.ckpt_root, find_resume_checkpoint(self.ckpt_root, self.log.info)
            if tag is None:
                return
        else:
            root, tag = Path(mode).parent, Path(mode).name
            problems = [x for x in dist.all_gather_object(local_problem(Path(mode))) if x]
            if problems:
                raise InputError(f"not a complete checkpoint: {problems[0]}", file=mode,
                                 field="resume")
        folder = root / tag
        state = load_trainer_state(folder)
        if state["world_size"] != self.world:
            raise InputError(f"checkpoint {folder} was written by {state['world_size']} ranks and "
                             f"this job has {self.world}; relaunch with {state['world_size']} "
                             f"ranks (the replay shards and data order depend on the world "
                             f"size), or start a new output_dir", field="resume")
        names = [task.name for task in self.cfg.tasks]
        if state["task_names"] != names[:len(state["task_names"])]:
            raise InputError(f"checkpoint {folder} belongs to tasks {state['task_names']}, the "
                             f"config has {names}", field="tasks")
        fp = getattr(self, "teacher_fingerprint", None)
        if state.get("teacher_fingerprint") != fp:
            raise InputError(f"checkpoint {folder} was trained against other teacher data (model, "
                             f"replay set or settings changed); use a new output_dir",
                             field="replay")
        self.engine.engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                           load_lr_scheduler_states=False)
        load_rng(folder)
        self.progress = Progress(**state["progress"])
        self.log.truncate_steps_after(self.progress.global_step)
        p = self.progress
        self.log.info(f"resumed from {folder}: task {p.task_index + 1}, step {p.step_in_task}"
                      f"{' (done)' if p.task_done else ''}, global step {p.global_step}")

    def evaluate_row(self) -> None:
        """Evaluate the current model on every task and general set; one more matrix row."""
        suite = self.inputs.eval_suite
        if suite is None:
            return
        p = self.progress
        label = "base model" if not p.matrix else f"after task {len(p.matrix)}"
        self.log.info(f"evaluating the {label} on {len(self.cfg.tasks)} task(s) "
                      f"and {len(suite.general)} general set(s)")
        self.engine.engine.eval()
        try:
            row = suite.evaluate(self.engine.forward, self.tokenizer, device=self.device)
        finally:
            self.engine.engine.train()
        p.matrix.append(row.row())
        for name, value in row.general.items():
            p.general.setdefault(name, []).append(value)
        if dist.is_main():
            from gere_ds.evaluation.outcomes import record_outcomes
            from gere_ds.evaluation.report import log_to_tensorboard, write_report

            names = [task.name for task in self.cfg.tasks]
            write_report(str(self.out), names, p.matrix, p.general)
            record_outcomes(self.out, len(p.matrix) - 1, row, suite)
            log_to_tensorboard(self.log.tb, names, p.matrix, p.general, rows="last")
        scores = ", ".join(f"{k} {v:.1f}" for k, v in {**row.accuracy, **row.general}.items())
        self.log.info(f"{label}: {scores}")

    def run(self, inputs: Inputs) -> None:
        self.setup(inputs)
        self.prepare_teacher()  # from the BASE model, before any checkpoint is loaded
        self.resume()
        p = self.progress
        if not p.matrix:
            self.evaluate_row()
        for i in range(p.task_index, len(self.cfg.tasks)):
            task = self.cfg.tasks[i]
            if not p.task_done:
                self.train_task(i)
                p.task_done = True
                folder = save_checkpoint(self.engine.engine, self.ckpt_root, task_tag(i),
                                         self.trainer_state())
                if dist.local_rank() == 0:  # after the new one is complete
                    prune_checkpoints(self.ckpt_root, self.cfg.checkpoint.keep_last,
                                      self.cfg.checkpoint.keep_task_ends)
                self.log.info(f"task {i + 1} {task.name} done; checkpoint {folder}")
                if self.cfg.checkpoint.export_hf:
                    from gere_ds.export import export_from_engine

                    export_from_engine(self.engine.module, self.tokenizer,
                                       self.out / "hf" / task_tag(i))
            if self.inputs.eval_suite is not None and len(p.matrix) < i + 2:
                self.evaluate_row()
            if i + 1 < len(self.cfg.tasks):
                self.progress = p = Progress(task_index=i + 1, global_step=p.global_step,
                                             skipped_steps=p.skipped_steps, matrix=p.matrix,
                                             general=p.general)
        where = [f"TensorBoard: {self.out / 'tensorboard'}", f"log: {self.out / 'train.log'}"]
        if self.inputs.eval_suite is not None:
            where = [f"metrics: {self.out / 'metrics.md'}",
                     f"heatmap: {self.out / 'accuracy_matrix.png'}"] + where
        import resource

        peak_gb = [kb / 2**20 for kb in dist.all_gather_object(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)]
        self.log.info("peak memory per rank (RSS): "
                      + ", ".join(f"rank {r} {gb:.2f} GiB" for r, gb in enumerate(peak_gb)))
        self.log.info("run complete; " + "; ".join(where))
