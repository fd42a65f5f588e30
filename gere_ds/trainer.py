"""The continual loop: validate inputs -> teacher pass -> for each task: train, checkpoint.

One optimizer step, as data (docs/architecture.md): sampler rows (task example ids + replay
sample ids) -> TrainStep.compute_loss on every rank per micro-step (batch, forward, the
ReplayTerm's per-row terms, losses.reduce_rows) -> TrainStep.apply (engine.backward / step);
after the step one small all-reduce of the log values -> scalars to TensorBoard.
"""
from __future__ import annotations

import math
import resource
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from gere_ds import dist
from gere_ds.batches import BatchMaker
from gere_ds.capture import FinalNormCapture
from gere_ds.checkpoint import (Checkpointer, load_rng, load_trainer_state, run_identity,
                                step_tag, task_tag)
from gere_ds.config.loading import save_resolved
from gere_ds.config.sections import RunConfig
from gere_ds.data.sampler import ContinualSampler
from gere_ds.digest_cache import DIGESTS_FILE, DigestCache
from gere_ds.engine import Engine, build_engine, resolve_ds_config, zero_stage
from gere_ds.evaluation.base_cache import evaluate_base, evaluate_task_end
from gere_ds.errors import InputError
from gere_ds.inputs import Inputs
from gere_ds.lora import check_lora_state, lora_run
from gere_ds import stop
from gere_ds.progress import Progress, TokenWindow, count_bad_step, step_scalars
from gere_ds.resume import (ResumePlan, check_state, load_resume, plan_resume,
                            task_data_digests)
from gere_ds.run_log import RunLogger
from gere_ds.schedule import lr_at
from gere_ds.step import Phases, StepStats, TrainStep
from gere_ds.strategies import ReplayTerm, make_term
from gere_ds.teacher import TeacherJob, fingerprint, prepare_teacher_data, teacher_settings


class ContinualTrainer:
    """One run's continual loop on this rank (every rank builds one; the engine is shared)."""

    def __init__(self, cfg: RunConfig, log: RunLogger | None = None) -> None:
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
        # set by check_resume() and setup(), in this order
        self.inputs: Inputs | None = None
        self.task_data: dict[str, dict[str, str]] = {}  # sha256 of each task's files
        self.engine: Engine | None = None
        self._planned_stage: int | None = None  # _zero_stage before the engine exists
        self.device: torch.device | None = None
        self.tokenizer: Any = None
        self.capture: FinalNormCapture | None = None
        self.batches: BatchMaker | None = None
        self.step: TrainStep | None = None
        # set by prepare_teacher()
        self.teacher: Any = None  # what the term's teacher spec reads back
        self.teacher_fingerprint: str | None = None
        self._digests: DigestCache | None = None
        self._fingerprinted: tuple[dict[str, Any], Path] | None = None  # what the fingerprint covers

    # ------------------------------------------------------------------ setup
    def setup(self, inputs: Inputs) -> None:
        cfg = self.cfg
        self.inputs = inputs
        if dist.is_main():
            self.out.mkdir(parents=True, exist_ok=True)
            save_resolved(cfg, self.out / "config.yaml")
        torch.manual_seed(cfg.train.seed)
        stop.install()  # SIGTERM / SIGUSR1 (Slurm pre-emption), acted on by stop.check
        self.engine = build_engine(cfg, self.world, self.log.info)
        self.device = dist.device()
        self.tokenizer = self.engine.tokenizer
        self.capture = FinalNormCapture(self.engine.module)
        self.batches = BatchMaker(cfg, self.tokenizer, self.device, inputs.train_sets,
                                  inputs.replay_texts, self.term.uses_replay, self.world, self.rank)
        self.use_term(self.term)
        self._print_summary()

    def use_term(self, term: ReplayTerm, phases: Phases | None = None) -> None:
        """Train with ``term`` from now on (benchmarks compare strategies on one engine)."""
        self.term = term
        self.step = TrainStep(self.cfg, self.engine, self.capture, self.batches, term, self.world,
                              phases)

    def _print_summary(self) -> None:
        c, t = self.cfg, self.cfg.train
        gb = t.micro_batch_size * t.grad_accum * self.world
        self.log.info(f"world size {self.world} | micro batch {t.micro_batch_size} x accum "
                      f"{t.grad_accum} x ranks {self.world} = global batch {gb} | "
                      f"strategy {self.term.name} (w={c.replay.weight}) | bf16 {t.bf16}")
        for i, (task, rows) in enumerate(zip(c.tasks, self.inputs.train_sets)):
            self.log.info(f"task {i + 1}/{len(c.tasks)} {task.name}: {len(rows)} train examples, "
                          f"{self.steps_for(i)} optimizer steps")
        if self.term.uses_replay:
            self.log.info(f"replay: {len(self.inputs.replay_texts)} documents, "
                          f"{len(self.batches.shard)} on this rank, per_batch={c.replay.per_batch}")

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

    # ------------------------------------------------------------------ teacher
    def prepare_teacher(self) -> None:
        """The teacher data of this rank's replay shard (what the term's teacher spec keeps),
        from the cache when every rank's cache is intact, else from one pass of the base model."""
        r, term, shard = self.cfg.replay, self.term, self.batches.shard
        if not term.needs_teacher:
            return
        settings = self._teacher_settings()
        if self._fingerprinted != (settings, self.teacher_root):  # another term or cache folder
            self.teacher_fingerprint = self._teacher_identity()
        fp = self.teacher_fingerprint
        self._digests.save()
        spec = term.teacher_spec()
        # the LM head runs only for a spec that reads the logits (kl's top-k)
        forward = self.engine.forward if spec.reads_logits else self.engine.features_forward
        job = TeacherJob(spec, forward, self.capture,
                         self.batches.replay_ids, shard, int(self.engine.module.config.hidden_size),
                         r.teacher_batch_size, self.tokenizer.pad_token_id, self.device,
                         self.teacher_root, fp, settings=settings)
        self.engine.engine.eval()
        self.log.progress(math.ceil(len(shard) / r.teacher_batch_size), "teacher pass")
        try:
            with stop.doing("the teacher pass"):
                self.teacher = prepare_teacher_data(job, self.log.info,
                                                    lambda i, n: self.log.advance(1))
        finally:
            self.log.close_progress()
            self.engine.engine.train()
        self.teacher_fingerprint = fp
        term.attach(self.teacher, self.device, self.log.info)

    def _teacher_settings(self) -> dict[str, Any]:
        r = self.cfg.replay
        return teacher_settings(self.term.name, self.term.teacher_spec(),
                                num_samples=r.num_samples, max_len=r.max_len,
                                world_size=self.world, seed=self.cfg.train.seed,
                                bf16=self.cfg.train.bf16, n_replay=len(self.inputs.replay_texts))

    def _teacher_identity(self) -> str:
        """The teacher data's fingerprint (weights hashed whole; digests kept next to the cache
        so an unchanged file is not re-read at every launch)."""
        self._digests = DigestCache(self.teacher_root / DIGESTS_FILE)  # saved after the checks
        settings = self._teacher_settings()
        self._fingerprinted = (settings, self.teacher_root)
        # the weights are read once per node (its local rank 0; the node's ranks share its
        # files), not once per rank: 8 ranks reading 16 GB each would cost minutes at launch
        mine = (fingerprint(self.cfg.model, self.cfg.tokenizer or self.cfg.model,
                            self.cfg.replay.data, settings, self._digests)
                if dist.local_rank() == 0 else None)
        every = dist.all_gather_object(mine)
        return every[self.rank - dist.local_rank()]

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
        count_bad_step(p, int(values["nonfinite"]), self.engine.engine.was_step_applied(),
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
                    scalars = step_scalars(values, lr, window.rate(time.perf_counter()),
                                           self.engine.engine.get_global_grad_norm(), self.term)
                    self.log.scalars(scalars, p.global_step, {"task": task_index, "epoch": epoch,
                                                              "step_in_task": p.step_in_task})
                    self.log.advance(0, loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}",
                                     run=f"{p.global_step}/{self.run_steps()}")
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
            self.ckpt.save(self.engine.engine, tag, self.trainer_state())
            self.log.info(f"checkpoint {tag} ({time.perf_counter() - tick:.1f} s)")
        if stopping:
            raise stop.Preempted(f"pre-empted (signal) at task {task_index + 1} step "
                                 f"{p.step_in_task}: checkpoint saved; re-run the same command "
                                 f"to resume")

    # ------------------------------------------------------------------ the sequence
    def trainer_state(self) -> dict[str, Any]:
        return {"progress": asdict(self.progress), "world_size": self.world,
                "zero_stage": zero_stage(self.engine.ds_config),
                "seed": self.cfg.train.seed,
                "task_names": [task.name for task in self.cfg.tasks],
                "task_data": self._seen_task_data(),
                "teacher_fingerprint": self.teacher_fingerprint,
                **(self.lora.state() if self.lora is not None else {})}

    def _seen_task_data(self) -> dict[str, dict[str, str]]:
        """Digests of the files this point of the run depends on: every test file (each matrix
        row scores every task), the train files of the tasks trained so far."""
        return {name: {split: digest for split, digest in files.items()
                       if split == "test" or i <= self.progress.task_index}
                for i, (name, files) in enumerate(self.task_data.items())}

    def check_resume(self, inputs: Inputs) -> ResumePlan | None:
        """Which checkpoints to resume from (auto: the trusted ones, newest first), the newest
        checked against this job (world size, tasks, teacher data); None: a fresh start. Runs
        before anything is written, so a refused relaunch leaves the run folder as it was."""
        self.inputs = inputs
        self.task_data = task_data_digests(self.cfg)
        if self.term.needs_teacher:
            self.teacher_fingerprint = self._teacher_identity()
        return plan_resume(self.cfg, self.ckpt, self._check_checkpoint)

    def _zero_stage(self) -> int:
        """This launch's ZeRO stage: the engine's, or before it exists the one its DeepSpeed
        JSON resolves to (``deepspeed: auto`` counts the model's parameters: done once)."""
        if self.engine is not None:
            return zero_stage(self.engine.ds_config)
        if self._planned_stage is None:
            self._planned_stage = zero_stage(resolve_ds_config(self.cfg, self.world))
        return self._planned_stage

    def _check_checkpoint(self, folder: Path) -> None:
        state = load_trainer_state(folder)
        check_state(state, folder, self.cfg, self.world, self.teacher_fingerprint,
                    self._zero_stage(), self.task_data)
        check_lora_state(state, folder, self.cfg.train.lora)

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
        """Engine, RNG and progress from a checkpoint that passed its checks (every rank)."""
        state = load_trainer_state(folder)
        self._check_checkpoint(folder)
        if self.lora is not None:  # the merged base first; the checkpoint holds the adapters
            self.lora.restore(self.engine.module, state, folder)
        try:
            self.engine.engine.load_checkpoint(str(folder.parent), tag=folder.name,
                                               load_optimizer_states=True,
                                               load_lr_scheduler_states=False,
                                               load_module_strict=self.lora is None)
        except Exception as err:
            if self.lora is not None and state.get("lora_merged"):
                # the base already holds this checkpoint's merges: an older one cannot follow
                raise InputError(f"checkpoint {folder} failed to load after its LoRA merges were "
                                 f"replayed ({type(err).__name__}); no fallback is possible: "
                                 f"use resume=<an older checkpoint> in a new job",
                                 field="resume") from None
            raise
        load_rng(folder)
        self.progress = Progress(**state["progress"])

    @property
    def teacher_root(self) -> Path:  # teacher data and a kept base evaluation; shared by a study
        return Path(self.cfg.replay.teacher_cache or self.out / "teacher")

    def evaluate_row(self) -> None:
        """Evaluate the current model on every task and general set; one more matrix row."""
        suite, p = self.inputs.eval_suite, self.progress
        if suite is None:
            return
        label = "base model" if not p.matrix else f"after task {len(p.matrix)}"
        model = label if not p.matrix else f"model {label}"
        self.log.info(f"evaluating the {model} on {len(self.cfg.tasks)} task(s) "
                      f"and {len(suite.general)} general set(s)")
        self.engine.engine.eval()
        score = lambda: suite.evaluate(self.engine.scorer(), self.tokenizer, device=self.device,  # noqa: E731
                                       progress=self.log.advance)
        self.log.progress(sum(suite.sizes().values()), f"evaluating the {model} (examples)")
        try:
            with stop.doing("the base model's evaluation" if not p.matrix
                            else f"the evaluation {label}"):
                if p.matrix:  # a task end: the checkpoint just saved or resumed from holds it
                    row = evaluate_task_end(self.cfg, suite, self.world, self.out,
                                            self.ckpt.run or "", self.ckpt.parent or "", score,
                                            self.log.info)
                else:
                    row = evaluate_base(self.cfg, suite, self.world, self.teacher_root, score,
                                        self.log.info)
        finally:
            self.log.close_progress()
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
            log_to_tensorboard(self.log.tb, names, p.matrix, p.general, rows="last",
                               global_step=p.global_step)
            self.log.external({**{f"eval/{n}/acc": v for n, v in zip(names, p.matrix[-1])},
                               **{f"general/{g}": v for g, v in row.general.items()}},
                              p.global_step)
        scores = ", ".join(f"{k} {v:.1f}" for k, v in {**row.accuracy, **row.general}.items())
        self.log.info(f"{label}: {scores}")

    def finish_task(self, i: int) -> None:
        """The end of task i: its checkpoint, and the Hugging Face export if configured."""
        self.progress.task_done = True
        folder = self.ckpt.save(self.engine.engine, task_tag(i), self.trainer_state())
        self.log.info(f"task {i + 1} {self.cfg.tasks[i].name} done; checkpoint {folder}")
        self.export_task(i)

    def export_task(self, i: int, only_if_missing: bool = False) -> None:
        """The Hugging Face export of task i's end (the engine holds it), if configured;
        ``only_if_missing``: a resumed run redoes an export that failed after the checkpoint."""
        target = self.out / "hf" / task_tag(i)
        if only_if_missing and dist.broadcast_object(target.is_dir()):
            return
        if self.cfg.checkpoint.export_hf:
            from gere_ds.export import export_from_engine, gather_units

            self.log.progress(gather_units(self.engine.module), f"export of task {i + 1} (modules)")
            try:
                with stop.doing(f"the export of task {i + 1}"):
                    export_from_engine(self.engine.module, self.tokenizer, target,
                                       info=self.lora.state() if self.lora is not None else None,
                                       progress=self.log.advance)
            finally:
                self.log.close_progress()

    def run(self, inputs: Inputs) -> None:
        target = self.check_resume(inputs)  # every check first, then write
        self.setup(inputs)
        self.prepare_teacher()  # from the BASE model, before any checkpoint is loaded
        self.resume(target)
        if not self.progress.matrix:
            self.evaluate_row()
        for i in range(self.progress.task_index, len(self.cfg.tasks)):
            if not self.progress.task_done:
                self.train_task(i)
                self.finish_task(i)
            else:
                self.export_task(i, only_if_missing=True)  # resumed at this task's end
            if self.inputs.eval_suite is not None and len(self.progress.matrix) < i + 2:
                self.evaluate_row()
            if i + 1 < len(self.cfg.tasks):
                self.progress = self.progress.next_task()
        self._final_metrics()
        self._closing_lines()

    def _final_metrics(self) -> None:
        """The run's settings against its final metrics: TensorBoard's HPARAMS view, W&B's
        summary."""
        p = self.progress
        if self.inputs.eval_suite is None or not p.matrix or not dist.is_main():
            return
        from gere_ds.evaluation.report import build_results, final_metrics, log_hparams

        c, t = self.cfg, self.cfg.train
        results = build_results([task.name for task in c.tasks], p.matrix, p.general)
        hparams = {"strategy": c.replay.strategy, "weight": str(c.replay.weight),
                   "lr": t.lr, "epochs": t.epochs, "global_batch":
                   t.micro_batch_size * t.grad_accum * self.world, "seed": t.seed,
                   "model": c.model_id or c.model, "bf16": t.bf16}
        log_hparams(self.log.tb, hparams, results)
        if self.log.wandb is not None:
            self.log.wandb.summary(final_metrics(results))

    def _closing_lines(self) -> None:
        where = [f"TensorBoard: {self.out / 'tensorboard'}", f"log: {self.out / 'train.log'}"]
        if self.inputs.eval_suite is not None:
            where = [f"metrics: {self.out / 'metrics.md'}",
                     f"heatmap: {self.out / 'accuracy_matrix.png'}"] + where
        peak_gb = [kb / 2**20 for kb in dist.all_gather_object(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)]
        self.log.info("peak memory per rank (RSS): "
                      + ", ".join(f"rank {r} {gb:.2f} GiB" for r, gb in enumerate(peak_gb)))
        if self.device is not None and self.device.type == "cuda":
            gpu_gb = [b / 2**30 for b in dist.all_gather_object(
                torch.cuda.max_memory_allocated(self.device))]
            self.log.info("peak GPU memory per rank (allocated): "
                          + ", ".join(f"rank {r} {gb:.2f} GiB" for r, gb in enumerate(gpu_gb)))
        self.log.info("run complete; " + "; ".join(where))
