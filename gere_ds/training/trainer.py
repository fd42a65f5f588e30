"""The continual loop: validate inputs -> teacher pass -> for each task: train, checkpoint.

One optimizer step, as data (docs/architecture.md): sampler rows (task example ids + replay
sample ids) -> TrainStep.compute_loss on every rank per micro-step (batch, forward, the
ReplayTerm's per-row terms, losses.reduce_rows) -> TrainStep.apply (engine.backward / step);
after the step one small all-reduce of the log values -> the listeners' scalars.

The loop owns the order of events; what a launch builds is gere_ds.training.assembly, what a
checkpoint records gere_ds.training.run_state, the teacher data gere_ds.teaching.source, and
what happens at log steps and task ends the listeners of gere_ds.training.listeners.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from gere_ds.runtime import dist, stop
from gere_ds.checkpointing.checkpoint import Checkpointer, run_identity, step_tag, task_tag
from gere_ds.checkpointing.resume import ResumePlan, load_resume, plan_resume
from gere_ds.config.sections import RunConfig
from gere_ds.data.sampler import ContinualSampler
from gere_ds.training.inputs import Inputs
from gere_ds.model.lora import lora_run
from gere_ds.training.progress import Progress, TokenWindow, count_bad_step
from gere_ds.monitoring.run_log import RunLogger
from gere_ds.training.schedule import lr_at
from gere_ds.training.step import Phases, StepStats, TrainStep
from gere_ds.strategies import ReplayTerm, make_term
from gere_ds.teaching.source import TeacherSource
from gere_ds.training.assembly import RunParts, build_parts, describe_run
from gere_ds.training.listeners import RunListener, default_listeners
from gere_ds.training.run_state import RunState


class ContinualTrainer:
    """One run's continual loop on this rank (every rank builds one; the engine is shared).

    Before ``setup`` it holds what needs no model (config, log, term, checkpoints, the teacher
    data's identity), so every check runs before anything is written; ``setup`` builds the
    :class:`RunParts`, which the properties below read."""

    def __init__(self, cfg: RunConfig, log: RunLogger | None = None,
                 listeners: list[RunListener] | None = None) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.log = log or RunLogger(self.out, report_to=cfg.report_to, config=cfg.to_dict())
        self.world, self.rank = dist.world_size(), dist.rank()
        self.progress = Progress()
        self.term = make_term(cfg)
        self.lora = lora_run(cfg)  # None: full fine-tuning
        self.ckpt = Checkpointer(self.out / "checkpoints", cfg.checkpoint.keep_last,
                                 cfg.checkpoint.keep_task_ends, run=run_identity(cfg),
                                 exclude_frozen=self.lora is not None)
        self.state = RunState(cfg, self.world, self.lora)
        self.teacher_source = TeacherSource(cfg, self.world, self.rank)
        self.listeners = default_listeners() if listeners is None else listeners
        self.inputs: Inputs | None = None  # by check_resume() or setup()
        self._parts: RunParts | None = None  # by setup()

    # ------------------------------------------------------------------ the parts
    @property
    def parts(self) -> RunParts:
        if self._parts is None:
            raise RuntimeError("ContinualTrainer.setup() has not run")
        return self._parts

    engine = property(lambda self: self.parts.engine)
    device = property(lambda self: self.parts.device)
    tokenizer = property(lambda self: self.parts.tokenizer)
    capture = property(lambda self: self.parts.capture)
    batches = property(lambda self: self.parts.batches)
    teacher = property(lambda self: self.teacher_source.data)
    teacher_fingerprint = property(lambda self: self.teacher_source.fingerprint)
    teacher_root = property(lambda self: self.teacher_source.root)

    def setup(self, inputs: Inputs) -> None:
        self.inputs = inputs
        self._parts = build_parts(self.cfg, inputs, self.term.uses_replay, self.world, self.rank,
                                  self.log.info)
        self.use_term(self.term)
        describe_run(self.cfg, inputs, self._parts, self.term, self.world, self.steps_for,
                     self.log.info)

    def use_term(self, term: ReplayTerm, phases: Phases | None = None) -> None:
        """Train with ``term`` from now on (benchmarks compare strategies on one engine)."""
        self.term = term
        self.step = TrainStep(self.cfg, self.engine, self.capture, self.batches, term, self.world,
                              phases)

    def prepare_teacher(self) -> None:
        """The term's teacher data (gere_ds.teaching.source), from the BASE model."""
        self.teacher_source.prepare(self.term, self.parts, len(self.inputs.replay_texts),
                                    self.log)

    def sampler(self, task_index: int) -> ContinualSampler:
        c, t = self.cfg, self.cfg.train
        return ContinualSampler(
            n_task=len(self.inputs.train_sets[task_index]),
            n_replay=len(self.inputs.replay_texts), world_size=self.world, rank=self.rank,
            micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum,
            per_batch=c.replay.per_batch, seed=t.seed, task_index=task_index,
            use_replay=self.term.uses_replay)

    def run_steps(self) -> int:
        """Optimizer steps of the whole sequence (the run's progress beside the task's)."""
        if not hasattr(self, "_run_steps"):
            self._run_steps = sum(self.steps_for(i) for i in range(len(self.cfg.tasks)))
        return self._run_steps

    def steps_for(self, task_index: int) -> int:
        total = self.cfg.train.epochs * self.sampler(task_index).steps_per_epoch()
        cap = self.cfg.train.max_steps_per_task
        return min(total, cap) if cap else total

    # ------------------------------------------------------------------ one task
    def optimizer_step(self, task_index: int, sampler: ContinualSampler, epoch: int, step: int,
                       total: int) -> tuple[dict[str, float], float]:
        """One optimizer step: the lr, every micro-step, the bad-step rule; (log values, lr)."""
        t, p = self.cfg.train, self.progress
        lr = lr_at(p.step_in_task, total, t.lr, t.warmup_steps, t.min_lr_ratio)
        self.engine.set_lr(lr)
        stats = StepStats()
        for rows in sampler.step_micro_batches(epoch, step):
            sl = self.step.compute_loss(task_index, rows)
            self.step.apply(sl)
            stats.add(sl)
            stop.crash_point("a micro-step")
        values = stats.reduce()
        p.epoch, p.step = epoch, step + 1
        p.step_in_task += 1
        p.global_step += 1
        count_bad_step(p, int(values["nonfinite"]), self.engine.was_step_applied(),
                       t.grad_accum * self.world, t.max_bad_steps, self.log.info)
        return values, lr

    def train_task(self, task_index: int) -> None:
        """Train one task from where self.progress stands (its start, or a resumed step)."""
        cfg, t, p = self.cfg, self.cfg.train, self.progress
        sampler, total = self.sampler(task_index), self.steps_for(task_index)
        if p.step_in_task == 0 and self.lora is not None:
            self.lora.before_task(self.engine.module, task_index, self.log.info)
        if p.step_in_task == 0 and t.reset_optimizer_per_task:
            self.engine.reset_optimizer_state()
        self.log.progress(total, f"task {task_index + 1}/{len(cfg.tasks)} "
                                 f"{cfg.tasks[task_index].name}", initial=p.step_in_task)
        window = TokenWindow(time.perf_counter())
        for epoch in range(p.epoch, t.epochs):
            for step in range(p.step if epoch == p.epoch else 0, sampler.steps_per_epoch()):
                if p.step_in_task >= total:
                    break
                values, lr = self.optimizer_step(task_index, sampler, epoch, step, total)
                window.add(values["tokens"])
                if p.step_in_task % t.log_every == 0 or p.step_in_task == total:
                    rate = window.rate(time.perf_counter())
                    for listener in self.listeners:
                        listener.on_log_step(self, task_index, epoch, values, lr, rate)
                self.log.advance(1)
                self._maybe_checkpoint(task_index, total)
        self.log.close_progress()

    def _maybe_checkpoint(self, task_index: int, total: int) -> None:
        """Periodic checkpoints, and the pre-emption checkpoint (decided on all ranks)."""
        every, p = self.cfg.checkpoint.every_steps, self.progress
        periodic = bool(every) and p.step_in_task % every == 0 and p.step_in_task < total
        stopping = stop.requested()
        if p.bad_steps_in_a_row:  # inside a non-finite streak: the last good checkpoint stays
            periodic = False
        if periodic or stopping:
            tag = step_tag(task_index, p.step_in_task)
            tick = time.perf_counter()
            self.ckpt.save(self.engine, tag, self.trainer_state())
            self.log.info(f"checkpoint {tag} ({time.perf_counter() - tick:.1f} s)")
        if stopping:
            raise stop.Preempted(f"pre-empted (signal) at task {task_index + 1} step "
                                 f"{p.step_in_task}: checkpoint saved; re-run the same command "
                                 f"to resume")

    def finish_task(self, i: int) -> None:
        """The end of task i: its checkpoint."""
        self.progress.task_done = True
        folder = self.ckpt.save(self.engine, task_tag(i), self.trainer_state())
        self.log.info(f"task {i + 1} {self.cfg.tasks[i].name} done; checkpoint {folder}")

    def trainer_state(self) -> dict[str, Any]:
        return self.state.state(self.progress, self.engine, self.teacher_fingerprint)

    # ------------------------------------------------------------------ resume
    def check_resume(self, inputs: Inputs) -> ResumePlan | None:
        """Which checkpoints to resume from (auto: the trusted ones, newest first), the newest
        checked against this job (world size, tasks, teacher data); None: a fresh start. Runs
        before anything is written, so a refused relaunch leaves the run folder as it was."""
        self.inputs = inputs
        self.state.read_task_data()
        if self.term.needs_teacher:
            self.teacher_source.identify(self.term, len(inputs.replay_texts))
        return plan_resume(self.cfg, self.ckpt, lambda folder: self.state.check(
            folder, self.teacher_fingerprint, self._parts.engine if self._parts else None))

    def resume(self, plan: ResumePlan | None) -> None:
        """Load the first candidate of the plan that loads (``check_resume``); cut the step log
        back to it, or start the log afresh."""
        folder = load_resume(plan, self.ckpt, self.log.info, self._load_checkpoint)
        if folder is None:
            self.log.start_fresh()  # steps of an attempt that saved no checkpoint go
            return
        p = self.progress
        self.log.truncate_steps_after(p.global_step)
        self.log.info(f"resumed from {folder}: task {p.task_index + 1}, step {p.step_in_task}"
                      f"{' (done)' if p.task_done else ''}, global step {p.global_step}")

    def _load_checkpoint(self, folder: Path) -> None:
        self.progress = self.state.load(folder, self.engine, self.teacher_fingerprint)

    # ------------------------------------------------------------------ the sequence
    def run(self, inputs: Inputs) -> None:
        target = self.check_resume(inputs)  # every check first, then write
        self.setup(inputs)
        self.prepare_teacher()  # from the BASE model, before any checkpoint is loaded
        self.resume(target)
        for listener in self.listeners:
            listener.on_run_start(self)
        for i in range(self.progress.task_index, len(self.cfg.tasks)):
            resumed = self.progress.task_done  # at this task's end already
            if not resumed:
                self.train_task(i)
                self.finish_task(i)
            for listener in self.listeners:
                listener.on_task_end(self, i, resumed)
            if i + 1 < len(self.cfg.tasks):
                self.progress = self.progress.next_task()
        for listener in self.listeners:
            listener.on_run_end(self)
