"""What a checkpoint records of a run beside the engine (``trainer_state.json``), the checks a
checkpoint passes before anything of it is loaded, and its loading on every rank."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from gere_ds.checkpointing.checkpoint import load_rng, load_trainer_state
from gere_ds.checkpointing.resume import check_state, task_data_digests
from gere_ds.config.sections import RunConfig
from gere_ds.model.engine import Engine, resolve_ds_config, zero_stage
from gere_ds.errors import InputError
from gere_ds.model.lora import LoraRun, check_lora_state
from gere_ds.training.progress import Progress


class RunState:
    """One run's record in its checkpoints: progress, world, ZeRO stage, seed, tasks, the
    digests of the task files it depends on, the teacher data's fingerprint, LoRA's merges."""

    def __init__(self, cfg: RunConfig, world: int, lora: LoraRun | None) -> None:
        self.cfg, self.world, self.lora = cfg, world, lora
        self.task_data: dict[str, dict[str, str]] = {}  # sha256 per file, by read_task_data
        self._planned_stage: int | None = None  # the stage before the engine exists

    def read_task_data(self) -> None:
        """Hash the task files (the resume checks and every later checkpoint compare them)."""
        self.task_data = task_data_digests(self.cfg)

    def zero_stage(self, engine: Engine | None) -> int:
        """This launch's ZeRO stage: the engine's, or before it exists the one its DeepSpeed
        JSON resolves to (``deepspeed: auto`` counts the model's parameters: done once)."""
        if engine is not None:
            return zero_stage(engine.ds_config)
        if self._planned_stage is None:
            self._planned_stage = zero_stage(resolve_ds_config(self.cfg, self.world))
        return self._planned_stage

    def state(self, progress: Progress, engine: Engine, teacher_fingerprint: str | None
              ) -> dict[str, Any]:
        return {"progress": asdict(progress), "world_size": self.world,
                "zero_stage": zero_stage(engine.ds_config),
                "seed": self.cfg.train.seed,
                "task_names": [task.name for task in self.cfg.tasks],
                "task_data": self._seen_task_data(progress),
                "teacher_fingerprint": teacher_fingerprint,
                **(self.lora.state() if self.lora is not None else {})}

    def _seen_task_data(self, progress: Progress) -> dict[str, dict[str, str]]:
        """Digests of the files this point of the run depends on: every test file (each matrix
        row scores every task), the train files of the tasks trained so far."""
        return {name: {split: digest for split, digest in files.items()
                       if split == "test" or i <= progress.task_index}
                for i, (name, files) in enumerate(self.task_data.items())}

    def check(self, folder: Path, teacher_fingerprint: str | None, engine: Engine | None
              ) -> None:
        """Refuse (one line) a checkpoint of another job: world, tasks, data, teacher, stage."""
        state = load_trainer_state(folder)
        check_state(state, folder, self.cfg, self.world, teacher_fingerprint,
                    self.zero_stage(engine), self.task_data)
        check_lora_state(state, folder, self.cfg.train.lora)

    def load(self, folder: Path, engine: Engine, teacher_fingerprint: str | None) -> Progress:
        """Engine, RNG and progress from a checkpoint that passes its checks (every rank)."""
        state = load_trainer_state(folder)
        self.check(folder, teacher_fingerprint, engine)
        if self.lora is not None:  # the merged base first; the checkpoint holds the adapters
            self.lora.restore(engine.module, state, folder)
        try:
            engine.load_checkpoint(folder, strict=self.lora is None)
        except Exception as err:
            if self.lora is not None and state.get("lora_merged"):
                # the base already holds this checkpoint's merges: an older one cannot follow
                raise InputError(f"checkpoint {folder} failed to load after its LoRA merges were "
                                 f"replayed ({type(err).__name__}); no fallback is possible: "
                                 f"use resume=<an older checkpoint> in a new job",
                                 field="resume") from None
            raise
        load_rng(folder)
        return Progress(**state["progress"])
