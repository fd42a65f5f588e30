"""The teacher pass: base-model data on the replay set, once, before task 1.

Each rank runs the base model over ITS replay shard (the samples it will train on) and keeps
exactly what its strategy needs (its ReplayTerm's ``teacher_kind``):
- tm  ("states"):   the final-norm output is captured and per-dimension sums S1, S2 and the
  token count are accumulated in float64; one all-reduce gives the global mean and population
  std, hence lo/hi = mu -+ k*sigma; then each rank codes its own samples as 2-bit tri-states;
- kl  ("topk"):     the top-k token ids and log-probabilities (T=1) of the logits that the same
  engine forward returns, per replay token (int32 + float16);
- l1/l2 ("features"): the final-norm output itself, in bfloat16.
Every rank runs the same number of forwards (the shorter shards run discarded dummy forwards),
because under ZeRO-3 each forward gathers parameters collectively.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from gere_ds import dist, stop
from gere_ds.capture import FinalNormCapture
from gere_ds.losses import tri_states
from gere_ds.data.collate import collate
from gere_ds.data.encode import Encoded
from gere_ds import owners
from gere_ds.errors import InputError
from gere_ds.fingerprint import fingerprint  # noqa: F401 - the trainer still imports it from here
from gere_ds.losses import teacher_topk
from gere_ds.owners import owner_tag, stale_entries
from gere_ds.strategies import ReplayTerm
from gere_ds.teacher_cache import (CacheWriter, TeacherData,
                                   check_rank_cache, load_rank_cache, rank_dir, to_bf16_bits,
                                   write_rank_cache)


def teacher_settings(term: ReplayTerm, *, num_samples: int, max_len: int, world_size: int,
                     seed: int, bf16: bool, n_replay: int) -> dict[str, Any]:
    """The settings part of the fingerprint: everything the stored teacher data depends on.

    The strategy (hence the kind of data) and the world size (hence the shard of each rank) are
    always in, and what the term adds (tm: threshold_k, kl: kl_topk). kl_temperature is not: the
    cache keeps T=1 log-probs and the loss applies T (losses.topk_kl_per_token).
    """
    return {"strategy": term.name, "kind": term.teacher_kind, "num_samples": num_samples,
            "max_len": max_len, "world_size": world_size, "seed": seed, "bf16": bf16,
            "n_replay": n_replay, **term.teacher_settings()}


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


def thresholds_from_sums(s1: torch.Tensor, s2: torch.Tensor, n: torch.Tensor | float,
                         threshold_k: float) -> torch.Tensor:
    """[4, D] float32: lo, hi, mu, sigma per dimension from float64 sums of h and h^2 over n
    tokens (population sigma; lo/hi = mu -+ k*sigma)."""
    mu = s1 / n
    sigma = (s2 / n - mu * mu).clamp(min=0).sqrt()
    lo, hi = (mu - threshold_k * sigma).float(), (mu + threshold_k * sigma).float()
    return torch.stack([lo, hi, mu.float(), sigma.float()])


@torch.no_grad()
def teacher_pass(forward: Callable[[torch.Tensor, torch.Tensor], object],
                 capture: FinalNormCapture, replay_ids: dict[int, list[int]], shard: list[int],
                 hidden_size: int, threshold_k: float, batch_size: int, pad_id: int,
                 device: torch.device, scratch: Path, progress: Callable[[int, int], None]
                 ) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """Run the pass; returns global thresholds [4, D] and this rank's (sample id, states)."""
    local_batches = math.ceil(len(shard) / batch_size)
    n_forwards = int(dist.all_reduce_max(torch.tensor([local_batches], device=device)).item())
    s1 = torch.zeros(hidden_size, dtype=torch.float64, device=device)
    s2 = torch.zeros(hidden_size, dtype=torch.float64, device=device)
    count = torch.zeros(1, dtype=torch.float64, device=device)
    # fp32 features spill to a local scratch file, so memory stays flat for big replay sets
    tokens = sum(len(replay_ids[s]) for s in shard)
    feats = np.lib.format.open_memmap(scratch / "features.npy", mode="w+", dtype=np.float32,
                                      shape=(max(tokens, 1), hidden_size))
    spans: list[tuple[int, int, int]] = []  # sample id, start row, tokens
    row = 0
    for i, ids in enumerate(_batches(shard, batch_size, n_forwards, replay_ids)):
        stop.check()  # same batch count on every rank: a safe point to stop
        real = ids is not None
        ids = ids if real else shard[:1]
        mb = collate([Encoded(replay_ids[s], replay_ids[s]) for s in ids], ids, pad_id).to(device)
        forward(mb.input_ids, mb.attention_mask)
        h = capture.pop().float()
        progress(i + 1, n_forwards)
        if not real:
            continue
        mask = mb.attention_mask.bool()
        flat = h[mask].double()
        s1 += flat.sum(0)
        s2 += (flat * flat).sum(0)
        count += flat.shape[0]
        for b, sid in enumerate(ids):
            n = len(replay_ids[sid])
            feats[row:row + n] = h[b, :n].cpu().numpy()
            spans.append((sid, row, n))
            row += n
    stats = dist.all_reduce_sum(torch.cat([s1, s2, count]))
    thresholds = thresholds_from_sums(stats[:hidden_size], stats[hidden_size:2 * hidden_size],
                                      stats[-1], threshold_k).cpu().numpy()
    lo_t, hi_t = torch.from_numpy(thresholds[0]), torch.from_numpy(thresholds[1])
    samples = []
    for sid, start, n in spans:
        h = feats[start:start + n]
        states = tri_states(torch.from_numpy(h), lo_t, hi_t).numpy()
        samples.append((sid, states))
    del feats
    return thresholds, samples


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


@torch.no_grad()
def stream_pass(forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                capture: FinalNormCapture, replay_ids: dict[int, list[int]], shard: list[int],
                writer: CacheWriter, kind: str, batch_size: int, pad_id: int,
                device: torch.device, progress: Callable[[int, int], None],
                kl_topk: int = 64) -> None:
    """The kl / l1 / l2 pass: no global statistics, so each sample goes to the writer as soon
    as its forward is done (memory stays flat whatever the shard size)."""
    local_batches = math.ceil(len(shard) / batch_size)
    n_forwards = int(dist.all_reduce_max(torch.tensor([local_batches], device=device)).item())
    for i, ids in enumerate(_batches(shard, batch_size, n_forwards, replay_ids)):
        stop.check()  # same batch count on every rank: a safe point to stop
        real = ids is not None
        ids = ids if real else shard[:1]
        mb = collate([Encoded(replay_ids[s], replay_ids[s]) for s in ids], ids, pad_id).to(device)
        logits = forward(mb.input_ids, mb.attention_mask)
        h = capture.pop()
        progress(i + 1, n_forwards)
        if not real:
            continue
        for b, sid in enumerate(ids):
            n = len(replay_ids[sid])
            if kind == "topk":
                top_ids, top_logp = teacher_topk(logits[b, :n], kl_topk)
                logp = top_logp.clamp(min=-60000.0).to(torch.float16)  # finite in float16
                writer.add(sid, n, topk_ids=top_ids.cpu().numpy(),
                           topk_logp=logp.cpu().numpy())
            else:
                writer.add(sid, n, features=to_bf16_bits(h[b, :n]))


@dataclass
class TeacherJob:
    """One rank's teacher pass: the model side, its replay shard and where the cache lives."""

    kind: str  # "states" (tm), "topk" (kl) or "features" (l1/l2): ReplayTerm.teacher_kind
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
    threshold_k: float = 1.0
    kl_topk: int = 64
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


def _scratch_folder(job: TeacherJob) -> Path:
    """A fresh local scratch folder for the tm pass's fp32 features, after removing what passes
    killed on this host left there and checking (all ranks, per node) that the features fit."""
    root = Path(os.environ.get("TMPDIR") or tempfile.gettempdir())
    for left in stale_entries(root, SCRATCH_PREFIX):
        shutil.rmtree(left, ignore_errors=True)
    need = max(sum(len(job.replay_ids[s]) for s in job.shard), 1) * job.hidden_size * 4
    free = shutil.disk_usage(root).free
    problems = scratch_problems(dist.all_gather_object((owners.host(), str(root), need, free)))
    if problems:
        raise InputError(problems[0])
    return Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{owner_tag()}+", dir=root))


def _compute(job: TeacherJob, folder: Path, progress: Callable[[int, int], None]) -> None:
    """Run the pass of ``job.kind`` and write this rank's cache folder."""
    meta = {"rank": dist.rank(), "world_size": dist.world_size(), "hidden_size": job.hidden_size,
            "settings": job.settings or {}}
    if job.kind == "states":
        scratch = _scratch_folder(job)
        try:
            thresholds, samples = teacher_pass(job.forward, job.capture, job.replay_ids,
                                               job.shard, job.hidden_size, job.threshold_k,
                                               job.batch_size, job.pad_id, job.device, scratch,
                                               progress)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        write_rank_cache(folder, job.fingerprint, thresholds, samples,
                         {**meta, "threshold_k": job.threshold_k})
        return
    topk = job.kind == "topk"
    writer = CacheWriter(folder, job.fingerprint, job.kind,
                         job.kl_topk if topk else job.hidden_size,
                         {**meta, **({"kl_topk": job.kl_topk} if topk else {})})
    try:
        stream_pass(job.forward, job.capture, job.replay_ids, job.shard, writer, job.kind,
                    job.batch_size, job.pad_id, job.device, progress, job.kl_topk)
        writer.finish()
    except BaseException:
        writer.abort()
        raise


def prepare_teacher_data(job: TeacherJob, log: Callable[[str], None],
                         progress: Callable[[int, int], None]) -> TeacherData:
    """Load this rank's cache if every rank's is intact, else recompute on all ranks.

    A missing, mismatched (other fingerprint: model, tokenizer, replay data, settings, world
    size) or damaged (size or sha256) cache on ANY rank makes every rank recompute, with one log
    line saying why; the manifest keeps ``job.settings``, so a later miss can say what changed.
    """
    folder = rank_dir(job.cache_root, job.fingerprint, dist.rank(), dist.world_size())
    reason = check_rank_cache(folder, job.fingerprint, job.kind)
    if reason is not None and not (folder / "manifest.json").is_file():
        reason = explain_miss(Path(job.cache_root), job.fingerprint, job.settings) or reason
    if not dist.any_rank(reason is not None):
        log(f"teacher cache reused: {folder.parent}")
        return load_rank_cache(folder)
    reasons = [r for r in dist.all_gather_object(reason) if r]
    log(f"teacher pass: computing {job.kind} in {folder.parent} ({reasons[0]})")
    _compute(job, folder, progress)
    dist.barrier()
    return load_rank_cache(folder)
