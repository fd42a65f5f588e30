"""The knobs of asset preparation, with the defaults used for the CPU demo."""
from __future__ import annotations

from dataclasses import dataclass

from gere_assets.tasks import DEFAULT_TASKS, check_task_names
from gere_ds.errors import InputError


@dataclass(frozen=True)
class Settings:
    seed: int = 1234
    tasks: tuple[str, ...] = DEFAULT_TASKS
    train_size: int = 500            # per task
    test_size: int = 200             # per task
    max_words: int = 200             # task inputs longer than this are not sampled (CPU demo)
    replay_size: int = 1000
    heldout_size: int = 200
    min_paragraph_words: int = 40
    heldout_per_article: int = 25    # spreads held-out text over several articles
    mmlu_dev_size: int = 20
    model_dtype: str = "bfloat16"
    bigbench: str | None = None      # BIG-bench 1.0.0 sdist (or its folder): the optional step

    def validate(self) -> None:
        """Reject impossible values up front, before anything is written."""
        check_task_names(self.tasks)
        if len(self.tasks) < 1:
            raise InputError("at least one task is needed", field="tasks")
        for name in ("train_size", "test_size", "replay_size", "heldout_size", "mmlu_dev_size",
                     "max_words", "min_paragraph_words", "heldout_per_article"):
            if getattr(self, name) < 1:
                raise InputError(f"must be at least 1, got {getattr(self, name)}", field=name)
        if self.model_dtype not in ("bfloat16", "float16", "float32"):
            raise InputError(f"unsupported {self.model_dtype!r}; use bfloat16, float16 or float32",
                             field="model_dtype")
