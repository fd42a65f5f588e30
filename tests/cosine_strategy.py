"""Two strategies defined outside gere_ds, as a user would add one: each is a class here plus
one ``register`` call by whoever uses it (tests/dist_scripts/extension_train.py, the tests'
fixture), with no edit under gere_ds/.

- ``cosine``: replay row: CE + w * mean over its real tokens of 1 - cos(h, t), against the
  teacher's final-norm output t kept at unit length in float16: its own kind of teacher data
  (its own file, reader and fingerprint field), a setting of its own (``replay.options.aligned``,
  checked by the strategy) and a statistic of its own (``aligned``: tokens whose cosine is at
  least that).
- ``decay``: replay row: CE + w * mean h^2 over its real elements: no teacher at all.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gere_ds.strategies import ReplayRows, ReplayTerm, RowStats
from gere_ds.strategies.base import field_error
from gere_ds.teaching.teacher import StreamSpec
from gere_ds.teaching.teacher_cache import DataFile, memmap_file

ALIGNED = 0.999  # replay.options.aligned's default: a token this close to its teacher
UNIT_FILES = (DataFile("unit.bin", "float16 (unit-length final-norm output)", np.float16),)


class UnitFeatures:
    """This rank's unit-length teacher features, memory-mapped: sample id -> [tokens, D]."""

    def __init__(self, hidden_size: int, index: dict[int, tuple[int, int]],
                 data: np.ndarray) -> None:
        self.hidden_size, self._index, self._data = hidden_size, index, data

    @property
    def sample_ids(self) -> list[int]:
        return sorted(self._index)

    def get(self, sample_id: int) -> torch.Tensor:
        tokens, offset = self._index[sample_id]
        raw = np.array(self._data[offset:offset + 2 * tokens * self.hidden_size])
        return torch.from_numpy(raw.view(np.float16)).reshape(tokens, self.hidden_size)

    def batch(self, sample_ids: list[int], width: int) -> torch.Tensor:
        """float32 [B, width, D], zero-padded."""
        out = torch.zeros(len(sample_ids), width, self.hidden_size)
        for b, sid in enumerate(sample_ids):
            got = self.get(sid)[:width]
            out[b, :got.shape[0]] = got.float()
        return out


class UnitFeaturesSpec(StreamSpec):
    """The teacher's final-norm output per replay token, normalised to unit length."""

    kind = "unit_features"
    files = UNIT_FILES

    def __init__(self, replay: Any) -> None:
        self.replay = replay

    def settings(self) -> dict[str, Any]:
        return {"unit_dtype": "float16"}

    def arrays(self, logits: torch.Tensor | None, hidden: torch.Tensor
               ) -> dict[str, np.ndarray]:
        return {"unit": F.normalize(hidden.float(), dim=-1).to(torch.float16).cpu().numpy()}

    def open(self, folder: Path, manifest: dict[str, Any], index: Any) -> UnitFeatures:
        return UnitFeatures(int(manifest["row_width"]),
                            {int(s): (int(n), int(o)) for s, n, o in index},
                            memmap_file(Path(folder) / "unit.bin"))


class FeatureCosine(ReplayTerm):
    """Mean over a replay row's real tokens of 1 - cos(student, teacher) final-norm output."""

    name = "cosine"
    uses_replay = True
    has_term = True
    spec_type = UnitFeaturesSpec
    stat_names = ("aligned",)
    option_keys = ("aligned",)

    @classmethod
    def check_settings(cls, replay: Any, bf16: bool) -> None:
        aligned = replay.options.get("aligned", ALIGNED)
        if isinstance(aligned, bool) or not isinstance(aligned, (int, float)) \
                or not 0 < aligned <= 1:
            raise field_error("options.aligned", f"a cosine in (0, 1], got {aligned!r}")

    @property
    def aligned(self) -> float:
        return float(self.replay.options.get("aligned", ALIGNED))

    def local_sums(self, replay: ReplayRows, logits: torch.Tensor, hidden: torch.Tensor
                   ) -> RowStats:
        teacher = self.teacher.batch(replay.sample_ids, replay.width).to(hidden.device)
        h = hidden.index_select(0, replay.rows).float()
        cos = (F.normalize(h, dim=-1) * teacher).sum(-1)  # the teacher is unit length already
        valid = replay.mask.bool()
        gap = torch.where(valid, 1.0 - cos, cos.new_zeros(()))
        aligned = (valid & (cos.detach() >= self.aligned)).sum(1).to(torch.float32)
        return RowStats(gap.sum(1), valid.sum(1).to(torch.float32), logged={"aligned": aligned})

    def log_values(self, means: dict[str, float]) -> dict[str, float]:
        return {**super().log_values(means), "train/cosine_aligned": means["aligned"]}


class ActivationDecay(ReplayTerm):
    """Mean of h^2 over a replay row's real elements: a term that needs no teacher."""

    name = "decay"
    uses_replay = True
    has_term = True

    def local_sums(self, replay: ReplayRows, logits: torch.Tensor, hidden: torch.Tensor
                   ) -> RowStats:
        h = hidden.index_select(0, replay.rows).float()
        valid = replay.mask.bool()[..., None]
        sq = torch.where(valid, h * h, h.new_zeros(()))
        return RowStats(sq.sum((1, 2)), replay.mask.sum(1).to(torch.float32) * h.shape[-1])
