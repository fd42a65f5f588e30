"""What a replay strategy is: a ``ReplayTerm`` subclass, in one module, plus one registry line.

A term says whether replay rows are mixed in (``uses_replay``), whether it adds a regulariser to
them (``has_term``), whether it reads the logits at every replay token (``needs_full_logits``),
which teacher data it needs (``spec_type``: a gere_ds.teaching.teacher.TeacherSpec, None = no
teacher pass), how its own ``replay.*`` settings are checked (``check_settings``), its per-row
values as named statistics (``local_sums`` -> ``RowStats``), its weight and its TensorBoard
scalars. The trainer, the step, the teacher pass and the cache ask the term; they name no strategy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator

import torch

from gere_ds.errors import InputError
from gere_ds.teaching.teacher import TeacherSpec

# ``replay`` below is the run's replay section (gere_ds.config.sections.ReplayConfig): read by attribute
# only, so that this layer does not import the config loader (the loader asks the registry)
ReplaySection = Any


@dataclass
class ReplayRows:
    """The replay rows of one micro-batch, as a term reads them."""

    rows: torch.Tensor  # [R] row indices in the micro-batch
    sample_ids: list[int]  # their replay sample ids
    mask: torch.Tensor  # [R, T] attention mask of those rows
    width: int  # T, the micro-batch's padded length


@dataclass
class RowStats:
    """A term's values per replay row [R]: REG_r = sum / (count + 1e-8).

    ``sum`` carries autograd; the rest is detached. ``elements``: what the term looked at (the
    denominator of the logged count fraction; default ``count``: every element counts); ``held``:
    counted elements that pass no gradient (default none); ``logged``: any further per-row
    statistics of the term, under the names its ``stat_names`` declares; each step logs their
    mean over replay rows (losses.step_means), which ``log_values`` reads. Unpacks as (sum,
    count, elements, held), the reduction's record.
    """

    sum: torch.Tensor
    count: torch.Tensor
    elements: torch.Tensor | None = None
    held: torch.Tensor | None = None
    logged: dict[str, torch.Tensor] = field(default_factory=dict)

    def __iter__(self) -> Iterator[torch.Tensor]:
        yield self.sum
        yield self.count
        yield self.count if self.elements is None else self.elements
        yield self.count.new_zeros(self.count.shape) if self.held is None else self.held


def field_error(key: str, message: str) -> InputError:
    """A bad ``replay.<key>`` value (the loader adds the file and line); ``options.<key>`` for
    a key of ``replay.options``."""
    return InputError(message, field=f"replay.{key}")


class ReplayTerm:
    """The strategy ``none``'s behaviour; subclasses override what differs."""

    name: ClassVar[str] = "none"
    uses_replay: ClassVar[bool] = False  # replay rows are mixed into the batches
    has_term: ClassVar[bool] = False  # a regulariser on replay rows (local_sums, log_values)
    needs_full_logits: ClassVar[bool] = False  # the term reads logits at every replay token
    spec_type: ClassVar[type[TeacherSpec] | None] = None  # its teacher data; None: no pass
    teacher_kind: ClassVar[str | None] = None  # spec_type.kind, set for every subclass
    stat_names: ClassVar[tuple[str, ...]] = ()  # the keys of its RowStats.logged, always all
    option_keys: ClassVar[tuple[str, ...]] = ()  # its keys of replay.options (its own settings)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.teacher_kind = cls.spec_type.kind if cls.spec_type is not None else None

    def __init__(self, replay: ReplaySection, bf16: bool = True) -> None:
        """``replay``: the run's replay section; ``bf16``: the compute dtype of training."""
        self.replay = replay
        self.compute_dtype = torch.bfloat16 if bf16 else torch.float32
        self.teacher: Any = None  # set by attach(): this rank's teacher data

    @classmethod
    def check_settings(cls, replay: ReplaySection, bf16: bool) -> None:
        """Checks of the ``replay.*`` settings this strategy reads (its ``option_keys`` of
        ``replay.options`` included), at config load: raise ``field_error``. Every registered
        strategy checks its own keys whatever the run's strategy, so a bad value never waits for
        the run that reads it."""

    @property
    def needs_teacher(self) -> bool:
        return self.spec_type is not None

    @property
    def weight(self) -> float | str:
        """The weight rule of the term: a number, or 'dy' (CE_r / REG_r per row)."""
        return self.replay.weight

    def teacher_spec(self) -> TeacherSpec | None:
        """What this run's teacher pass computes and keeps (None: no pass)."""
        return self.spec_type(self.replay) if self.spec_type is not None else None

    def teacher_settings(self) -> dict[str, Any]:
        """Settings, beyond the common ones, that this term's teacher data depends on."""
        spec = self.teacher_spec()
        return spec.settings() if spec is not None else {}

    def check_model(self, vocab_size: int, model_dir: str) -> None:
        """Checks against the model's config.json, before any work (one clear line)."""

    def attach(self, teacher: Any, device: torch.device | str = "cpu",
               log: Callable[[str], None] | None = None) -> None:
        """Use ``teacher`` (this rank's teacher data) from now on."""
        self.teacher = teacher

    def local_sums(self, replay: ReplayRows, logits: torch.Tensor, hidden: torch.Tensor
                   ) -> RowStats | None:
        """The term's values per replay row. ``logits`` are [B, T, V] when ``needs_full_logits``
        (else only the supervised positions'), ``hidden`` [B, T, D]. None: no term."""
        return None

    def log_values(self, means: dict[str, float]) -> dict[str, float]:
        """The term's own TensorBoard scalars from one step's log values (losses.step_means)."""
        if not self.has_term:
            return {}
        values = {f"train/{self.name}": means["reg"]}
        if "reg_weight" in means:  # dy: absent where no replay row had a non-zero term
            values[f"train/{self.name}_weight"] = means["reg_weight"]
        return values
