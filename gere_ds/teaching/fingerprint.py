"""The identity of what a computation read: a model folder, its tokenizer, one data file and the
settings. Teacher data and kept evaluations are reused only under the same identity."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from gere_ds.storage.digest_cache import DigestCache
from gere_ds.storage.hashing import is_weight_file, update_with_file


def fingerprint(model_dir: str, tokenizer_dir: str, replay_file: str, settings: dict,
                digests: DigestCache | None = None) -> str:
    """Identity of model, tokenizer, data file (the replay set) and every setting a result uses.

    Every file is hashed whole (a model changed in place changes the fingerprint); ``digests``
    keeps the weight files' digests between launches so unchanged weights are not re-read."""
    h = hashlib.sha256()
    h.update(json.dumps(settings, sort_keys=True).encode())
    for folder, weights in ((model_dir, True), (tokenizer_dir, False)):
        for path in sorted(Path(folder).iterdir()):
            if path.is_file() and not path.name.startswith("."):
                big = is_weight_file(path)
                if big and weights:
                    digest = (digests or DigestCache(None)).digest(path)
                    h.update(f"{path.name}:{path.stat().st_size}:{digest}".encode())
                elif not big:
                    update_with_file(h, path)
    update_with_file(h, Path(replay_file))
    return h.hexdigest()
