"""A run's teacher data on this rank: the settings it depends on, its identity (fingerprint) and
the pass that computes it or reads it from the cache, from the BASE model before any checkpoint
is loaded."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from gere_ds.runtime import dist, stop
from gere_ds.config.sections import RunConfig
from gere_ds.teaching.fingerprint import fingerprint
from gere_ds.monitoring.run_log import RunLogger
from gere_ds.storage.digest_cache import DIGESTS_FILE, DigestCache
from gere_ds.strategies import ReplayTerm
from gere_ds.teaching.teacher import TeacherJob, prepare_teacher_data, teacher_settings
from gere_ds.training.assembly import RunParts


class TeacherSource:
    """The teacher data of one run on this rank. ``fingerprint`` is set by ``identify`` (the
    resume checks compare it) and ``data`` by ``prepare`` (what the term's teacher spec reads
    back); both stay None for a term without teacher data."""

    def __init__(self, cfg: RunConfig, world: int, rank: int) -> None:
        self.cfg, self.world, self.rank = cfg, world, rank
        self.fingerprint: str | None = None
        self.data: Any = None
        self.digests: DigestCache | None = None
        self._fingerprinted: tuple[dict[str, Any], Path] | None = None  # what it covers

    @property
    def root(self) -> Path:  # teacher data and a kept base evaluation; shared by a study
        return Path(self.cfg.replay.teacher_cache or Path(self.cfg.output_dir) / "teacher")

    def settings(self, term: ReplayTerm, n_replay: int) -> dict[str, Any]:
        r = self.cfg.replay
        return teacher_settings(term.name, term.teacher_spec(), num_samples=r.num_samples,
                                max_len=r.max_len, world_size=self.world,
                                seed=self.cfg.train.seed, bf16=self.cfg.train.bf16,
                                n_replay=n_replay)

    def identify(self, term: ReplayTerm, n_replay: int) -> str:
        """The teacher data's fingerprint (weights hashed whole; digests kept next to the cache
        so an unchanged file is not re-read at every launch); kept in ``fingerprint``."""
        self.digests = DigestCache(self.root / DIGESTS_FILE)  # saved after the checks
        settings = self.settings(term, n_replay)
        self._fingerprinted = (settings, self.root)
        # the weights are read once per node (its local rank 0; the node's ranks share its
        # files), not once per rank: 8 ranks reading 16 GB each would cost minutes at launch
        mine = (fingerprint(self.cfg.model, self.cfg.tokenizer or self.cfg.model,
                            self.cfg.replay.data, settings, self.digests)
                if dist.local_rank() == 0 else None)
        every = dist.all_gather_object(mine)
        self.fingerprint = every[self.rank - dist.local_rank()]
        return self.fingerprint

    def prepare(self, term: ReplayTerm, parts: RunParts, n_replay: int, log: RunLogger) -> None:
        """The teacher data of this rank's replay shard (what the term's teacher spec keeps),
        from the cache when every rank's cache is intact, else from one pass of the base model;
        attached to ``term``."""
        r, shard, engine = self.cfg.replay, parts.batches.shard, parts.engine
        if not term.needs_teacher:
            return
        settings = self.settings(term, n_replay)
        fp = self.fingerprint
        if self._fingerprinted != (settings, self.root):  # another term or cache folder
            fp = self.identify(term, n_replay)
        self.digests.save()
        spec = term.teacher_spec()
        # the LM head runs only for a spec that reads the logits (kl's top-k)
        forward = engine.forward if spec.reads_logits else engine.features_forward
        job = TeacherJob(spec, forward, parts.capture, parts.batches.replay_ids, shard,
                         int(engine.module.config.hidden_size), r.teacher_batch_size,
                         parts.tokenizer.pad_token_id, parts.device, self.root, fp,
                         settings=settings)
        engine.eval()
        log.progress(math.ceil(len(shard) / r.teacher_batch_size), "teacher pass")
        try:
            with stop.doing("the teacher pass"):
                self.data = prepare_teacher_data(job, log.info, lambda i, n: log.advance(1))
        finally:
            log.close_progress()
            engine.train()
        self.fingerprint = fp
        term.attach(self.data, parts.device, log.info)
