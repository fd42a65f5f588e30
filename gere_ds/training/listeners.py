"""Listeners of the continual loop: what happens around training at its log steps, task ends and
start and end, kept out of the loop itself. Every rank calls every hook at the same point, in
the order of ``default_listeners`` (a hook may run collectives: the export's gathers, the
evaluation's forwards, the closing memory lines)."""
from __future__ import annotations

import resource
from typing import Any

import torch

from gere_ds.training.batch_split import rows_per_rank
from gere_ds.checkpointing.checkpoint import task_tag
from gere_ds.evaluation.base_cache import evaluate_base, evaluate_task_end
from gere_ds.evaluation.outcomes import record_outcomes
from gere_ds.evaluation.report import (build_results, final_metrics, log_hparams,
                                       log_to_tensorboard, write_report)
from gere_ds.model.export import export_from_engine, gather_units
from gere_ds.training.progress import step_scalars
from gere_ds.runtime import dist, stop

# ``trainer`` below is the gere_ds.training.trainer.ContinualTrainer whose loop calls the hook (its
# parts set up, its progress current).


class RunListener:
    """Hooks of the loop; each does nothing unless overridden."""

    def on_run_start(self, trainer: Any) -> None:
        """After setup, the teacher pass and the resume; before the first task's training."""

    def on_log_step(self, trainer: Any, task_index: int, epoch: int, values: dict[str, float],
                    lr: float, tokens_per_s: float) -> None:
        """After an optimizer step that logs (every ``train.log_every`` and a task's last)."""

    def on_task_end(self, trainer: Any, task_index: int, resumed: bool) -> None:
        """After task ``task_index``'s end checkpoint (``resumed``: saved by an earlier launch)."""

    def on_run_end(self, trainer: Any) -> None:
        """After the last task."""


class StepLog(RunListener):
    """The step's scalars to train_steps.jsonl, TensorBoard (and W&B); the progress bar's line."""

    def on_log_step(self, trainer: Any, task_index: int, epoch: int, values: dict[str, float],
                    lr: float, tokens_per_s: float) -> None:
        p, log = trainer.progress, trainer.log
        scalars = step_scalars(values, lr, tokens_per_s, trainer.engine.grad_norm(), trainer.term)
        log.scalars(scalars, p.global_step, {"task": task_index, "epoch": epoch,
                                             "step_in_task": p.step_in_task})
        log.advance(0, loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}",
                    run=f"{p.global_step}/{trainer.run_steps()}")


class Export(RunListener):
    """The Hugging Face export of each task's end (``checkpoint.export_hf``); a resumed run
    redoes an export that failed after its checkpoint."""

    def on_task_end(self, trainer: Any, task_index: int, resumed: bool) -> None:
        i = task_index
        target = trainer.out / "hf" / task_tag(i)
        if resumed and dist.broadcast_object(target.is_dir()):
            return
        if not trainer.cfg.checkpoint.export_hf:
            return
        lora, log, module = trainer.lora, trainer.log, trainer.engine.module
        log.progress(gather_units(module), f"export of task {i + 1} (modules)")
        try:
            with stop.doing(f"the export of task {i + 1}"):
                export_from_engine(module, trainer.tokenizer, target,
                                   info=lora.state() if lora is not None else None,
                                   progress=log.advance)
        finally:
            log.close_progress()


class Evaluation(RunListener):
    """One accuracy-matrix row per evaluation point (the base model, each task's end): every
    task's test set and the general sets; the report and its metrics at the end."""

    def on_run_start(self, trainer: Any) -> None:
        if not trainer.progress.matrix:
            self.evaluate_row(trainer)

    def on_task_end(self, trainer: Any, task_index: int, resumed: bool) -> None:
        if trainer.inputs.eval_suite is not None and \
                len(trainer.progress.matrix) < task_index + 2:
            self.evaluate_row(trainer)

    def evaluate_row(self, trainer: Any) -> None:
        """Evaluate the current model on every task and general set; one more matrix row."""
        cfg, log, engine = trainer.cfg, trainer.log, trainer.engine
        suite, p = trainer.inputs.eval_suite, trainer.progress
        if suite is None:
            return
        label = "base model" if not p.matrix else f"after task {len(p.matrix)}"
        model = label if not p.matrix else f"model {label}"
        log.info(f"evaluating the {model} on {len(cfg.tasks)} task(s) "
                 f"and {len(suite.general)} general set(s)")
        engine.eval()
        score = lambda: suite.evaluate(engine.scorer(), trainer.tokenizer,  # noqa: E731
                                       device=trainer.device, progress=log.advance)
        log.progress(sum(suite.sizes().values()), f"evaluating the {model} (examples)")
        try:
            with stop.doing("the base model's evaluation" if not p.matrix
                            else f"the evaluation {label}"):
                if p.matrix:  # a task end: the checkpoint just saved or resumed from holds it
                    ckpt = trainer.ckpt
                    row = evaluate_task_end(cfg, suite, trainer.world, trainer.out,
                                            ckpt.run or "", ckpt.parent or "", score, log.info)
                else:
                    row = evaluate_base(cfg, suite, trainer.world, trainer.teacher_root, score,
                                        log.info)
        finally:
            log.close_progress()
            engine.train()
        p.matrix.append(row.row())
        for name, value in row.general.items():
            p.general.setdefault(name, []).append(value)
        if dist.is_main():
            names = [task.name for task in cfg.tasks]
            write_report(str(trainer.out), names, p.matrix, p.general)
            record_outcomes(trainer.out, len(p.matrix) - 1, row, suite)
            log_to_tensorboard(log.tb, names, p.matrix, p.general, rows="last",
                               global_step=p.global_step)
            log.external({**{f"eval/{n}/acc": v for n, v in zip(names, p.matrix[-1])},
                          **{f"general/{g}": v for g, v in row.general.items()}},
                         p.global_step)
        scores = ", ".join(f"{k} {v:.1f}" for k, v in {**row.accuracy, **row.general}.items())
        log.info(f"{label}: {scores}")

    def on_run_end(self, trainer: Any) -> None:
        """The run's settings against its final metrics: TensorBoard's HPARAMS view, W&B's
        summary."""
        p, log = trainer.progress, trainer.log
        if trainer.inputs.eval_suite is None or not p.matrix or not dist.is_main():
            return
        c, t = trainer.cfg, trainer.cfg.train
        results = build_results([task.name for task in c.tasks], p.matrix, p.general)
        hparams = {"strategy": c.replay.strategy, "weight": str(c.replay.weight),
                   "lr": t.lr, "epochs": t.epochs, "global_batch":
                   rows_per_rank(c) * trainer.world, "seed": t.seed,
                   "model": c.model_id or c.model, "bf16": t.bf16}
        log_hparams(log.tb, hparams, results)
        if log.wandb is not None:
            log.wandb.summary(final_metrics(results))


class ClosingLines(RunListener):
    """Peak memory per rank and where the run's files are."""

    def on_run_end(self, trainer: Any) -> None:
        out, log, device = trainer.out, trainer.log, trainer.device
        where = [f"TensorBoard: {out / 'tensorboard'}", f"log: {out / 'train.log'}"]
        if trainer.inputs.eval_suite is not None:
            where = [f"metrics: {out / 'metrics.md'}",
                     f"heatmap: {out / 'accuracy_matrix.png'}"] + where
        peak_gb = [kb / 2**20 for kb in dist.all_gather_object(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)]
        log.info("peak memory per rank (RSS): "
                 + ", ".join(f"rank {r} {gb:.2f} GiB" for r, gb in enumerate(peak_gb)))
        if device.type == "cuda":
            gpu_gb = [b / 2**30 for b in dist.all_gather_object(
                torch.cuda.max_memory_allocated(device))]
            log.info("peak GPU memory per rank (allocated): "
                     + ", ".join(f"rank {r} {gb:.2f} GiB" for r, gb in enumerate(gpu_gb)))
        log.info("run complete; " + "; ".join(where))


def default_listeners() -> list[RunListener]:
    """The run's listeners, in the order every rank calls them."""
    return [StepLog(), Export(), Evaluation(), ClosingLines()]
