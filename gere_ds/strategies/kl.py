"""The ``kl`` strategy: token mean of KL(teacher || student) over the teacher's top-k tokens; its
teacher data is the top-k ids and log-probabilities of every replay token."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from gere_ds.errors import InputError
from gere_ds.strategies.base import ReplayRows, ReplaySection, ReplayTerm, RowStats, field_error
from gere_ds.teaching.teacher import StreamSpec
from gere_ds.teaching.teacher_cache import TOPK_FILES, TeacherTopK, open_topk
from gere_ds.training.losses import teacher_topk, topk_kl_rows


class TopKSpec(StreamSpec):
    """The teacher's top-k token ids (int32) and log-probabilities (T=1, float16) per token."""

    kind = "topk"
    reads_logits = True
    files = TOPK_FILES

    def __init__(self, replay: ReplaySection) -> None:
        self.k = int(replay.kl_topk)

    def settings(self) -> dict[str, Any]:
        return {"kl_topk": self.k}

    def row_width(self, hidden_size: int) -> int:
        return self.k

    def arrays(self, logits: torch.Tensor | None, hidden: torch.Tensor
               ) -> dict[str, np.ndarray]:
        top_ids, top_logp = teacher_topk(logits, self.k)
        logp = top_logp.clamp(min=-60000.0).to(torch.float16)  # finite in float16
        return {"topk_ids": top_ids.cpu().numpy(), "topk_logp": logp.cpu().numpy()}

    def open(self, folder: Path, manifest: dict[str, Any], index: Any) -> TeacherTopK:
        return open_topk(folder, manifest, index)


class TopKDistillation(ReplayTerm):
    """Token mean of KL(teacher || student) over the teacher's top-k tokens."""

    name = "kl"
    uses_replay = True
    has_term = True
    needs_full_logits = True
    spec_type = TopKSpec

    @classmethod
    def check_settings(cls, replay: ReplaySection, bf16: bool) -> None:
        if replay.kl_topk < 1:
            raise field_error("kl_topk", "must be >= 1")
        if replay.kl_temperature <= 0:
            raise field_error("kl_temperature", "must be > 0")

    def check_model(self, vocab_size: int, model_dir: str) -> None:
        """kl keeps the teacher's top-k tokens: k cannot exceed the vocabulary."""
        if self.replay.kl_topk > vocab_size:
            raise InputError(f"kl_topk={self.replay.kl_topk} is larger than the model's "
                             f"vocabulary ({vocab_size} tokens, vocab_size in "
                             f"{Path(model_dir) / 'config.json'})", field="replay.kl_topk")

    def local_sums(self, replay: ReplayRows, logits: torch.Tensor, hidden: torch.Tensor
                   ) -> RowStats:
        top_ids, top_logp = self.teacher.batch(replay.sample_ids, width=replay.width)
        total, count = topk_kl_rows(logits.index_select(0, replay.rows),
                                    top_ids.to(logits.device), top_logp.to(logits.device),
                                    replay.mask, self.replay.kl_temperature)
        return RowStats(total, count)
