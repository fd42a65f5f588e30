"""The ``l1`` and ``l2`` strategies: element mean of |h - t|^p between the student's and the
teacher's final-norm output; their teacher data is that output per replay token, in bfloat16."""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from gere_ds.strategies.base import ReplayRows, ReplaySection, ReplayTerm, RowStats
from gere_ds.teaching.teacher import StreamSpec
from gere_ds.teaching.teacher_cache import (FEATURES_FILES, TeacherFeatures, open_features,
                                            to_bf16_bits)
from gere_ds.training.losses import feature_diff_rows


class FeaturesSpec(StreamSpec):
    """The teacher's final-norm output per replay token, as bfloat16 bits."""

    kind = "features"
    files = FEATURES_FILES

    def __init__(self, replay: ReplaySection) -> None:
        pass

    def arrays(self, logits: torch.Tensor | None, hidden: torch.Tensor
               ) -> dict[str, np.ndarray]:
        return {"features": to_bf16_bits(hidden)}

    def open(self, folder: Path, manifest: dict[str, Any], index: Any) -> TeacherFeatures:
        return open_features(folder, manifest, index)


class FeatureImitation(ReplayTerm):
    """Element mean of |h - t|^p between the student's and the teacher's final-norm output."""

    has_term = True
    spec_type = FeaturesSpec
    power: ClassVar[int] = 1

    def local_sums(self, replay: ReplayRows, logits: torch.Tensor, hidden: torch.Tensor
                   ) -> RowStats:
        feats = self.teacher.batch(replay.sample_ids, width=replay.width).to(hidden.device)
        total, count = feature_diff_rows(hidden.index_select(0, replay.rows), feats,
                                         replay.mask, self.power)
        return RowStats(total, count)


class L1Features(FeatureImitation):
    name = "l1"
    uses_replay = True
    power = 1


class L2Features(FeatureImitation):
    name = "l2"
    uses_replay = True
    power = 2
