"""The teacher pass: base-model data on the replay set, once, before task 1.

Each rank runs the base model over ITS replay shard (the samples it will train on) and keeps
exactly what its strategy's ``TeacherSpec`` asks for: the spec names the cache's kind, whether
the pass needs the logits or only the final-norm output, the data files kept per sample, the
settings its data depends on (part of the fingerprint) and how the cache is read back. A
``StreamSpec`` turns each sample's forward into its arrays as soon as it is done (kl's top-k,
l1/l2's features); a spec needing global statistics first overrides ``compute`` (tm's states).
Every rank runs the same number of forwards (the shorter shards run discarded dummy forwards),
because under ZeRO-3 each forward gathers parameters collectively.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch

from gere_ds.runtime import dist, stop
from gere_ds.model.capture import FinalNormCapture
from gere_ds.data.collate import MicroBatch, collate
from gere_ds.data.encode import Encoded
from gere_ds.storage import owners
from gere_ds.errors import InputError
from gere_ds.storage.owners import owner_tag, stale_entries
from gere_ds.teaching.teacher_cache import (CacheWriter, DataFile, check_rank_cache, rank_dir,
                                            read_manifest)


class TeacherSpec:
    """What one strategy's teacher pass computes, how its cache stores and reads it back, and
    which settings its data depends on. One instance per run (built from the replay config)."""

    kind: ClassVar[str]  # the cache's kind, kept in its manifest (a cache of another is not read)
    reads_logits: ClassVar[bool] = False  # the pass runs the LM head (else final-norm only)

    def settings(self) -> dict[str, Any]:
        """The settings, beyond the common ones, that the stored data depends on (fingerprint)."""
        return {}

    def compute(self, job: "TeacherJob", folder: Path, progress: Callable[[int, int], None]
                ) -> None:
        """Run the pass over this rank's shard and write its cache folder (atomically)."""
        raise NotImplementedError

    def open(self, folder: Path, manifest: dict[str, Any], index: Any) -> Any:
        """This rank's teacher data from a checked cache folder (what the term's ``attach``
        receives; its ``batch`` reads the samples of a micro-batch)."""
        raise NotImplementedError


class StreamSpec(TeacherSpec):
    """A spec without global statistics: each sample's arrays go to the cache as soon as its
    forward is done, so memory stays flat whatever the shard size."""

    files: ClassVar[tuple[DataFile, ...]]  # the per-sample data files, in index-column order

    def row_width(self, hidden_size: int) -> int:
        """Elements stored per token (checked for every ``dtype`` file)."""
        return hidden_size

    def manifest_extras(self) -> dict[str, Any]:
        """Entries of the manifest beyond the common ones (e.g. kl_topk)."""
        return self.settings()

    def arrays(self, logits: torch.Tensor | None, hidden: torch.Tensor) -> dict[str, np.ndarray]:
        """One sample's arrays, keyed by file stem, from its [n, V] logits (None unless
        ``reads_logits``) and [n, D] final-norm output."""
        raise NotImplementedError

    def compute(self, job: "TeacherJob", folder: Path, progress: Callable[[int, int], None]
                ) -> None:
        writer = CacheWriter(folder, job.fingerprint, self.kind, self.files,
                             self.row_width(job.hidden_size),
                             {**job_meta(job), **self.manifest_extras()})
        try:
            for ids, _, logits, hidden in forward_shard(job, progress):
                for b, sid in enumerate(ids):
                    n = len(job.replay_ids[sid])
                    writer.add(sid, n, **self.arrays(
                        logits[b, :n] if self.reads_logits else None, hidden[b, :n]))
            writer.finish()
        except BaseException:
            writer.abort()
            raise


def teacher_settings(strategy: str, spec: TeacherSpec, *, num_samples: int, max_len: int,
                     world_size: int, seed: int, bf16: bool, n_replay: int) -> dict[str, Any]:
    """The settings part of the fingerprint: everything the stored teacher data depends on.

    The strategy, the kind of data and the world size (hence the shard of each rank) are always
    in, and what the spec adds (tm: threshold_k, kl: kl_topk). kl_temperature is not: the cache
    keeps T=1 log-probs and the loss applies T (losses.topk_kl_per_token).
    """
    return {"strategy": strategy, "kind": spec.kind, "num_samples": num_samples,
            "max_len": max_len, "world_size": world_size, "seed": seed, "bf16": bf16,
            "n_replay": n_replay, **spec.settings()}


def _batches(shard: list[int], batch_size: int, n_forwards: int,
             lengths: dict[int, list[int]] | None = None) -> list[list[int] | None]:
    """This rank's sample-id batches, padded with None (dummy forwards) to n_forwards.

    With ``lengths`` (the token ids of each sample) the samples are grouped by length, longest
    first, so a batch pads to nearly its own length: random lengths at batch 4 waste about a
    third of a forward on padding. The cache is keyed by sample id, so the order is free.
    """
    if lengths is not None:
        shard = sorted(shard, key=lambda s: (-len(lengths[s]), s))
    out: list[list[int] | None] = [shard[i:i + batch_size]
                                   for i in range(0, len(shard), batch_size)]
    return out + [None] * (n_forwards - len(out))


def explain_miss(cache_root: Path, fp: str, settings: dict | None) -> str | None:
    """Why no cache exists under this fingerprint when caches of other fingerprints do (the
    folder name holds the fingerprint, so a changed input shows up as a missing folder)."""
    others = [m for m in cache_root.glob("*/rank*-of-*/manifest.json")
              if m.parent.parent.name != fp[:16]]
    if not others:
        return None
    latest = max(others, key=lambda m: m.stat().st_mtime)
    try:
        old = json.loads(latest.read_text()).get("settings") or {}
    except (OSError, json.JSONDecodeError):
        old = {}
    where = latest.parent.parent.name
    if old and settings:
        changed = [f"{k} {old.get(k)!r} -> {settings.get(k)!r}"
                   for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
        if changed:
            return f"fingerprint mismatch with cache {where}: {', '.join(changed)}"
        return (f"fingerprint mismatch with cache {where}: the model, tokenizer or replay file "
                f"changed")
    return f"fingerprint mismatch with cache {where} (model, tokenizer, replay data or settings)"


def _micro_batch(job: "TeacherJob", ids: list[int]) -> MicroBatch:
    return collate([Encoded(job.replay_ids[s], job.replay_ids[s]) for s in ids], ids,
                   job.pad_id).to(job.device)


@torch.no_grad()
def forward_shard(job: "TeacherJob", progress: Callable[[int, int], None]
                  ) -> Iterator[tuple[list[int], MicroBatch, torch.Tensor, torch.Tensor]]:
    """The base model over this rank's shard: (sample ids, micro-batch, logits, final-norm output
    [B, T, D]) per real batch, each sample's tokens first in its row. Every rank runs the same
    number of forwards (dummy ones are discarded)."""
    local_batches = math.ceil(len(job.shard) / job.batch_size)
    n_forwards = int(dist.all_reduce_max(torch.tensor([local_batches], device=job.device)).item())
    for i, ids in enumerate(_batches(job.shard, job.batch_size, n_forwards, job.replay_ids)):
        stop.check()  # same batch count on every rank: a safe point to stop
        mb = _micro_batch(job, ids if ids is not None else job.shard[:1])
        logits = job.forward(mb.input_ids, mb.attention_mask)
        hidden = job.capture.pop()
        progress(i + 1, n_forwards)
        if ids is not None:
            yield ids, mb, logits, hidden


def job_meta(job: "TeacherJob") -> dict[str, Any]:
    """The manifest entries every kind has."""
    return {"rank": dist.rank(), "world_size": dist.world_size(), "hidden_size": job.hidden_size,
            "settings": job.settings or {}}


@dataclass
class TeacherJob:
    """One rank's teacher pass: the model side, its replay shard and where the cache lives."""

    spec: TeacherSpec  # what to compute and keep: the strategy's (ReplayTerm.teacher_spec)
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    capture: FinalNormCapture
    replay_ids: dict[int, list[int]]  # token ids of every sample of the shard
    shard: list[int]
    hidden_size: int
    batch_size: int
    pad_id: int
    device: torch.device
    cache_root: Path
    fingerprint: str
    settings: dict | None = None  # the fingerprint's settings, kept in the manifest


SCRATCH_PREFIX = "gere-teacher-"  # + <pid>@<host>+<random>: a dead owner's leftover can go


def scratch_problems(entries: list[tuple[str, str, int, int]]) -> list[str]:
    """One line per node whose scratch folder cannot hold the features of all its ranks;
    ``entries`` has one (host, folder, bytes needed, bytes free) per rank. The ranks of a node
    share its disk, so their needs add up against that disk's free space."""
    needs: dict[tuple[str, str], list[int]] = {}
    for host, root, need, free in entries:
        total = needs.setdefault((host, root), [0, free, 0])
        total[0] += need
        total[1] = min(total[1], free)
        total[2] += 1
    return [f"teacher pass: its scratch files need {need / 2**30:.2f} GiB in {root} ({ranks} "
            f"rank(s)) but only {free / 2**30:.2f} GiB are free on {host}; set TMPDIR to a "
            f"local disk with room"
            for (host, root), (need, free, ranks) in needs.items() if free < need]


def scratch_folder(job: TeacherJob, bytes_per_token: int) -> Path:
    """A fresh local scratch folder for a pass that spills ``bytes_per_token`` per replay token
    (tm's fp32 features), after removing what passes killed on this host left there and
    checking (all ranks, per node) that the spill fits."""
    root = Path(os.environ.get("TMPDIR") or tempfile.gettempdir())
    for left in stale_entries(root, SCRATCH_PREFIX):
        shutil.rmtree(left, ignore_errors=True)
    need = max(sum(len(job.replay_ids[s]) for s in job.shard), 1) * bytes_per_token
    free = shutil.disk_usage(root).free
    problems = scratch_problems(dist.all_gather_object((owners.host(), str(root), need, free)))
    if problems:
        raise InputError(problems[0])
    return Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{owner_tag()}+", dir=root))


def prepare_teacher_data(job: TeacherJob, log: Callable[[str], None],
                         progress: Callable[[int, int], None]) -> Any:
    """Load this rank's cache if every rank's is intact, else recompute on all ranks.

    A missing, mismatched (other fingerprint: model, tokenizer, replay data, settings, world
    size) or damaged (size or sha256) cache on ANY rank makes every rank recompute, with one log
    line saying why; the manifest keeps ``job.settings``, so a later miss can say what changed.
    """
    folder = rank_dir(job.cache_root, job.fingerprint, dist.rank(), dist.world_size())
    reason = check_rank_cache(folder, job.fingerprint, job.spec.kind)
    if reason is not None and not (folder / "manifest.json").is_file():
        reason = explain_miss(Path(job.cache_root), job.fingerprint, job.settings) or reason
    if not dist.any_rank(reason is not None):
        log(f"teacher cache reused: {folder.parent}")
        return job.spec.open(folder, *read_manifest(folder))
    reasons = [r for r in dist.all_gather_object(reason) if r]
    log(f"teacher pass: computing {job.spec.kind} in {folder.parent} ({reasons[0]})")
    job.spec.compute(job, folder, progress)
    dist.barrier()
    return job.spec.open(folder, *read_manifest(folder))
