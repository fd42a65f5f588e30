"""The on-disk teacher cache: per-rank files, a manifest with checksums, written last.

Layout (one folder per rank, so no shared filesystem is needed)::

    <cache_root>/<fingerprint[:16]>/rank00000-of-00002/
        thresholds.npy   float32 [4, D]: lo, hi, mu, sigma (global, identical on every rank)
        states.bin       uint8: 2-bit tri-states, 4 per byte, one byte-aligned run per sample
        index.npy        int64 [n, 3]: replay sample id, tokens, byte offset
        manifest.json    fingerprint, shapes, dtypes, counts, sha256 per file; written LAST

A folder without a manifest, with another fingerprint, or whose files fail their checksum is
never read: the teacher pass recomputes it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT_VERSION = 1
# state s in {-1, 0, +1} is stored as code s + 1 in {0, 1, 2}
_DECODE = np.array([-1, 0, 1, 0], dtype=np.int8)


def pack_states(states: np.ndarray) -> np.ndarray:
    """int8 tri-states (any shape) -> uint8, 4 per byte (little-end first)."""
    codes = (states.reshape(-1).astype(np.int16) + 1).astype(np.uint8)
    pad = (-len(codes)) % 4
    if pad:
        codes = np.concatenate([codes, np.ones(pad, dtype=np.uint8)])
    c = codes.reshape(-1, 4)
    return (c[:, 0] | (c[:, 1] << 2) | (c[:, 2] << 4) | (c[:, 3] << 6)).astype(np.uint8)


def unpack_states(packed: np.ndarray, count: int) -> np.ndarray:
    """Inverse of pack_states: the first ``count`` tri-states as int8."""
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)
    codes = (packed[:, None] >> shifts) & 3
    return _DECODE[codes.reshape(-1)[:count]]


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def rank_dir(root: Path, fingerprint: str, rank: int, world: int) -> Path:
    return Path(root) / fingerprint[:16] / f"rank{rank:05d}-of-{world:05d}"


@dataclass
class TeacherStates:
    """Thresholds and the tri-states of this rank's replay samples, memory-mapped."""

    lo: torch.Tensor
    hi: torch.Tensor
    mu: torch.Tensor
    sigma: torch.Tensor
    hidden_size: int
    _index: dict[int, tuple[int, int]]  # sample id -> (tokens, byte offset)
    _packed: np.ndarray

    def has(self, sample_id: int) -> bool:
        return sample_id in self._index

    @property
    def sample_ids(self) -> list[int]:
        return sorted(self._index)

    def get(self, sample_id: int) -> torch.Tensor:
        """int8 [tokens, D] tri-states of one replay sample."""
        tokens, offset = self._index[sample_id]
        n = tokens * self.hidden_size
        nbytes = (n + 3) // 4
        states = unpack_states(np.asarray(self._packed[offset:offset + nbytes]), n)
        return torch.from_numpy(states.reshape(tokens, self.hidden_size))

    def batch(self, sample_ids: list[int], width: int) -> torch.Tensor:
        """int8 [B, width, D], zero-padded (padding is masked out of the loss)."""
        out = torch.zeros((len(sample_ids), width, self.hidden_size), dtype=torch.int8)
        for b, sid in enumerate(sample_ids):
            s = self.get(sid)
            out[b, :s.shape[0]] = s[:width]
        return out


def write_rank_cache(folder: Path, fingerprint: str, thresholds: np.ndarray,
                     samples: list[tuple[int, np.ndarray]], meta: dict[str, Any]) -> None:
    """Write one rank's cache into a temp folder, then rename it into place (atomic)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    hidden = thresholds.shape[1]
    index = np.zeros((len(samples), 3), dtype=np.int64)
    offset = 0
    with open(tmp / "states.bin", "wb") as fh:
        for i, (sid, states) in enumerate(samples):
            packed = pack_states(states)
            fh.write(packed.tobytes())
            index[i] = (sid, states.shape[0], offset)
            offset += len(packed)
    np.save(tmp / "thresholds.npy", thresholds.astype(np.float32))
    np.save(tmp / "index.npy", index)
    files = {}
    for name in ("states.bin", "thresholds.npy", "index.npy"):
        files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
    files["states.bin"].update(dtype="uint8 (2-bit tri-states, 4 per byte)",
                               elements=int(index[:, 1].sum()) * hidden)
    files["thresholds.npy"].update(dtype="float32", shape=list(thresholds.shape))
    files["index.npy"].update(dtype="int64", shape=list(index.shape))
    manifest = {"format_version": FORMAT_VERSION, "fingerprint": fingerprint, "kind": "states",
                "hidden_size": hidden, "samples": len(samples),
                "tokens": int(index[:, 1].sum()), "files": files, **meta}
    (tmp / "manifest.json.tmp").write_text(json.dumps(manifest, indent=1))
    os.replace(tmp / "manifest.json.tmp", tmp / "manifest.json")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def check_rank_cache(folder: Path, fingerprint: str) -> str | None:
    """None if the folder is a complete, intact cache for ``fingerprint``, else the reason."""
    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        return "no complete cache (manifest missing)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        return "manifest unreadable"
    if manifest.get("format_version") != FORMAT_VERSION:
        return "cache format changed"
    if manifest.get("fingerprint") != fingerprint:
        return "fingerprint mismatch (model, tokenizer, replay data or settings changed)"
    for name, info in manifest["files"].items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != info["bytes"]:
            return f"{name} truncated or missing"
        if sha256_file(path) != info["sha256"]:
            return f"{name} checksum mismatch"
    return None


def load_rank_cache(folder: Path) -> TeacherStates:
    folder = Path(folder)
    thresholds = np.load(folder / "thresholds.npy", allow_pickle=False)
    index = np.load(folder / "index.npy", allow_pickle=False)
    packed = np.memmap(folder / "states.bin", dtype=np.uint8, mode="r") \
        if (folder / "states.bin").stat().st_size else np.zeros(0, dtype=np.uint8)
    t = torch.from_numpy(thresholds.copy())
    return TeacherStates(lo=t[0], hi=t[1], mu=t[2], sigma=t[3], hidden_size=thresholds.shape[1],
                         _index={int(s): (int(n), int(o)) for s, n, o in index},
                         _packed=packed)
