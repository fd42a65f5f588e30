"""The general replay set: the first N documents of a row file with a 'text' field, checked
against the run's layout (training and the pre-flight check use the same function)."""
from __future__ import annotations

from gere_ds.config.sections import RunConfig
from gere_ds.data.files import read_rows
from gere_ds.errors import InputError
from gere_ds.training.batch_split import rows_per_rank


def load_replay_texts(path: str, num_samples: int) -> list[str]:
    """The first ``num_samples`` texts, fixed for the whole task sequence (the file is read no
    further than that: every rank reads it)."""
    texts: list[str] = []
    for row in read_rows(path, what="replay", limit=num_samples):
        text = row.data.get("text")
        if not isinstance(text, str) or not text.strip():
            raise row.error(path, "text", "missing or empty text")
        texts.append(text)
    return texts


def check_replay_inputs(cfg: RunConfig, world_size: int) -> list[str]:
    """The replay texts a run that mixes in replay rows will use, checked against the layout.

    The file must hold ``num_samples`` documents, every rank needs at least one document of its
    own, and a fixed number of replay rows per global batch must leave room for task rows.
    """
    texts = load_replay_texts(cfg.replay.data, cfg.replay.num_samples)
    if len(texts) < cfg.replay.num_samples:
        raise InputError(f"{cfg.replay.num_samples} documents asked for, the file has only "
                         f"{len(texts)}; lower replay.num_samples or use a larger replay set",
                         file=cfg.replay.data, field="replay.num_samples")
    if len(texts) < world_size:
        raise InputError(f"{len(texts)} replay documents for {world_size} ranks",
                         file=cfg.replay.data, field="replay.num_samples")
    global_batch = rows_per_rank(cfg) * world_size
    if cfg.replay.per_batch >= global_batch:
        raise InputError(f"per_batch={cfg.replay.per_batch} must be smaller than the global "
                         f"batch ({global_batch})", field="replay.per_batch")
    return texts
