"""The on-disk teacher cache: per-rank files, a manifest with checksums, written last.

Layout (one folder per rank, so no shared filesystem is needed; the world size is part of both
the fingerprint and the folder name, so a run with another world size never reads these)::

    <cache_root>/<fingerprint[:16]>/rank00000-of-00002/
        index.npy        int64 [n, 2 + F]: replay sample id, tokens, byte offset in each data file
        manifest.json    kind, fingerprint, shapes, dtypes, counts, sha256 per file; written LAST
        <data files>     what the strategy's teacher spec declares (``DataFile``), e.g.
      STATES_FILES (tm):
        states.bin       uint8: 2-bit tri-states, 4 per byte, one byte-aligned run per sample
        thresholds.npy   float32 [4, D]: lo, hi, mu, sigma (global, identical on every rank)
      TOPK_FILES (kl):
        topk_ids.bin     int32 [tokens, k]: the teacher's top-k token ids per replay token
        topk_logp.bin    float16 [tokens, k]: their log-probabilities (T=1, full-vocab softmax)
      FEATURES_FILES (l1, l2):
        features.bin     bfloat16 [tokens, D] (raw bits): the teacher's final-norm output

Data files are raw row-major bytes, memory-mapped for reading; one sample's rows are contiguous.
A folder without a manifest, with another fingerprint or kind, or whose files fail their size or
sha256 check is never read: the teacher pass recomputes it. This module knows no strategy: the
readers below are the storage formats the built-in strategies choose; a strategy with another
kind of data declares its own files and reader (gere_ds.teaching.teacher.TeacherSpec).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from gere_ds.storage.atomic import sha256_file, write_json_atomic
from gere_ds.storage.owners import owner_tag, stale_entries

FORMAT_VERSION = 2
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


def rank_dir(root: Path, fingerprint: str, rank: int, world: int) -> Path:
    return Path(root) / fingerprint[:16] / f"rank{rank:05d}-of-{world:05d}"


class _SampleCache:
    """What the three cache kinds share: an index ``sample id -> (tokens, byte offsets...)`` over
    memory-mapped data files, per-sample reads (``get``) and zero-padded batches."""

    def __init__(self, index: dict[int, tuple[int, ...]]) -> None:
        self._index = index

    def has(self, sample_id: int) -> bool:
        return sample_id in self._index

    @property
    def sample_ids(self) -> list[int]:
        return sorted(self._index)

    def _padded(self, sample_ids: list[int], width: int,
                parts: tuple[tuple[tuple[int, ...], torch.dtype], ...]) -> list[torch.Tensor]:
        """One zero tensor [B, width, *shape] per (shape, dtype) part, filled with what ``get``
        returns for each sample (cut at ``width``; the padding is masked out of the loss)."""
        outs = [torch.zeros((len(sample_ids), width, *shape), dtype=dtype)
                for shape, dtype in parts]
        for b, sid in enumerate(sample_ids):
            got = self.get(sid)  # type: ignore[attr-defined]
            for out, part in zip(outs, got if isinstance(got, tuple) else (got,)):
                out[b, :part.shape[0]] = part[:width]
        return outs


class TeacherStates(_SampleCache):
    """Thresholds and the tri-states of this rank's replay samples, memory-mapped."""

    def __init__(self, thresholds: torch.Tensor, index: dict[int, tuple[int, int]],
                 packed: np.ndarray) -> None:
        super().__init__(index)  # sample id -> (tokens, byte offset in states.bin)
        self.lo, self.hi, self.mu, self.sigma = thresholds
        self.hidden_size = int(thresholds.shape[1])
        self._packed = packed  # uint8 memmap

    def get(self, sample_id: int) -> torch.Tensor:
        """int8 [tokens, D] tri-states of one replay sample."""
        tokens, offset = self._index[sample_id]
        n = tokens * self.hidden_size
        states = unpack_states(np.asarray(self._packed[offset:offset + (n + 3) // 4]), n)
        return torch.from_numpy(states.reshape(tokens, self.hidden_size))

    def batch(self, sample_ids: list[int], width: int) -> torch.Tensor:
        """int8 [B, width, D], zero-padded."""
        return self._padded(sample_ids, width, (((self.hidden_size,), torch.int8),))[0]


class TeacherTopK(_SampleCache):
    """The teacher's top-k ids and log-probs of this rank's replay samples, memory-mapped."""

    def __init__(self, k: int, index: dict[int, tuple[int, int, int]], ids: np.ndarray,
                 logp: np.ndarray) -> None:
        super().__init__(index)  # sample id -> (tokens, byte offset in topk_ids, in topk_logp)
        self.k = k
        self._ids, self._logp = ids, logp  # uint8 memmaps

    def get(self, sample_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """int32 ids [tokens, k] and float16 log-probs [tokens, k] of one replay sample."""
        tokens, off_ids, off_logp = self._index[sample_id]
        n = tokens * self.k
        ids = np.array(self._ids[off_ids:off_ids + 4 * n]).view(np.int32)
        logp = np.array(self._logp[off_logp:off_logp + 2 * n]).view(np.float16)
        return (torch.from_numpy(ids.reshape(tokens, self.k)),
                torch.from_numpy(logp.reshape(tokens, self.k)))

    def batch(self, sample_ids: list[int], width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ids int64 [B, width, k] and log-probs float32 [B, width, k], zero-padded."""
        ids, logp = self._padded(sample_ids, width,
                                 (((self.k,), torch.long), ((self.k,), torch.float32)))
        return ids, logp


class TeacherFeatures(_SampleCache):
    """The teacher's bf16 final-norm features of this rank's replay samples, memory-mapped."""

    def __init__(self, hidden_size: int, index: dict[int, tuple[int, int]],
                 data: np.ndarray) -> None:
        super().__init__(index)  # sample id -> (tokens, byte offset in features.bin)
        self.hidden_size = hidden_size
        self._data = data  # uint8 memmap

    def get(self, sample_id: int) -> torch.Tensor:
        """bfloat16 [tokens, D] features of one replay sample."""
        tokens, offset = self._index[sample_id]
        n = tokens * self.hidden_size
        raw = np.array(self._data[offset:offset + 2 * n]).view(np.int16)
        return torch.from_numpy(raw).view(torch.bfloat16).reshape(tokens, self.hidden_size)

    def batch(self, sample_ids: list[int], width: int) -> torch.Tensor:
        """bfloat16 [B, width, D], zero-padded."""
        return self._padded(sample_ids, width, (((self.hidden_size,), torch.bfloat16),))[0]


@dataclass(frozen=True)
class DataFile:
    """One per-sample data file of a cache kind: ``CacheWriter.add`` takes its array under the
    file's stem; ``dtype`` rows [tokens, row_width] are checked and stored as they are, or
    ``encode`` turns a sample's array into the bytes to store (no shape kept)."""

    name: str
    about: str  # the manifest's description of the bytes
    dtype: Any = None  # numpy dtype of a stored row; None: ``encode`` decides
    encode: Callable[[np.ndarray], np.ndarray] | None = None

    def bytes_of(self, array: np.ndarray, tokens: int, row_width: int) -> np.ndarray:
        """What this file stores for one sample's ``array``."""
        if self.encode is not None:
            return self.encode(array)
        data = np.ascontiguousarray(array, dtype=self.dtype)
        if data.shape != (tokens, row_width):
            raise ValueError(f"{self.name}: shape {data.shape} != {(tokens, row_width)}")
        return data


STATES_FILES = (DataFile("states.bin", "uint8 (2-bit tri-states, 4 per byte)",
                         encode=pack_states),)
TOPK_FILES = (DataFile("topk_ids.bin", "int32", np.int32),
              DataFile("topk_logp.bin", "float16", np.float16))
FEATURES_FILES = (DataFile("features.bin", "bfloat16 (raw bits)", np.int16),)


def to_bf16_bits(features: torch.Tensor) -> np.ndarray:
    """A float tensor as the raw int16 bits of its bfloat16 rounding (numpy has no bfloat16)."""
    return features.detach().to(torch.bfloat16).cpu().contiguous().view(torch.int16).numpy()


class CacheWriter:
    """Streams one rank's cache into a temp folder; ``finish`` writes the index, the extra
    arrays, the manifest (last) and renames the folder into place (atomic)."""

    def __init__(self, folder: Path, fingerprint: str, kind: str, files: tuple[DataFile, ...],
                 row_width: int, meta: dict[str, Any] | None = None) -> None:
        self.folder, self.fingerprint, self.kind = Path(folder), fingerprint, kind
        self.files = files
        self.row_width = row_width  # elements per token: D (states, features) or k (topk)
        self.meta = dict(meta or {})
        self.tmp = self.folder.with_name(f"{self.folder.name}.tmp{owner_tag()}")
        # left by an interrupted pass; a live job's temp folder (another run sharing this cache)
        # is never touched
        for left in stale_entries(self.folder.parent, self.folder.name + ".tmp"):
            shutil.rmtree(left, ignore_errors=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.names = [f.name for f in files]
        self._fh = {name: open(self.tmp / name, "wb") for name in self.names}
        self._offsets = {name: 0 for name in self.names}
        self._index: list[list[int]] = []

    def add(self, sample_id: int, tokens: int, **arrays: np.ndarray) -> None:
        """Append one sample: one array per data file, keyed by the file stem
        (e.g. ``states`` int8 tri-states, ``topk_ids`` + ``topk_logp``, ``features`` bf16 bits)."""
        row = [int(sample_id), int(tokens)]
        for f in self.files:
            name = f.name
            data = f.bytes_of(arrays[name.split(".")[0]], tokens, self.row_width)
            row.append(self._offsets[name])
            self._fh[name].write(data.tobytes())
            self._offsets[name] += data.nbytes
        self._index.append(row)

    def finish(self, extras: dict[str, np.ndarray] | None = None) -> None:
        for fh in self._fh.values():
            fh.close()
        index = np.array(self._index, dtype=np.int64).reshape(-1, 2 + len(self.names))
        np.save(self.tmp / "index.npy", index)
        tokens = int(index[:, 1].sum())
        files: dict[str, dict[str, Any]] = {}
        for f in self.files:
            files[f.name] = {"dtype": f.about, "elements": tokens * self.row_width}
            if f.encode is None:
                files[f.name]["shape"] = [tokens, self.row_width]
        files["index.npy"] = {"dtype": "int64", "shape": list(index.shape)}
        for name, arr in (extras or {}).items():
            np.save(self.tmp / name, arr)
            files[name] = {"dtype": str(arr.dtype), "shape": list(arr.shape)}
        for name, info in files.items():
            info.update(bytes=(self.tmp / name).stat().st_size,
                        sha256=sha256_file(self.tmp / name))
        data_bytes = sum(files[n]["bytes"] for n in self.names)
        manifest = {"format_version": FORMAT_VERSION, "fingerprint": self.fingerprint,
                    "kind": self.kind, "row_width": self.row_width, "samples": len(index),
                    "tokens": tokens, "data_bytes": data_bytes,
                    "bytes_per_token": data_bytes / max(tokens, 1), "files": files, **self.meta}
        write_json_atomic(self.tmp / "manifest.json", manifest, indent=1)
        if self.folder.exists():
            shutil.rmtree(self.folder)
        os.replace(self.tmp, self.folder)

    def abort(self) -> None:
        for fh in self._fh.values():
            fh.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def write_rank_cache(folder: Path, fingerprint: str, thresholds: np.ndarray,
                     samples: list[tuple[int, np.ndarray]], meta: dict[str, Any]) -> None:
    """Write one rank's tm cache (thresholds + tri-states) atomically."""
    writer = CacheWriter(folder, fingerprint, "states", STATES_FILES, int(thresholds.shape[1]),
                         {"hidden_size": int(thresholds.shape[1]), **meta})
    try:
        for sid, states in samples:
            writer.add(sid, states.shape[0], states=states)
        writer.finish({"thresholds.npy": thresholds.astype(np.float32)})
    except BaseException:
        writer.abort()
        raise


def check_rank_cache(folder: Path, fingerprint: str, kind: str | None = None) -> str | None:
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
    if kind is not None and manifest.get("kind") != kind:
        return f"cache holds {manifest.get('kind')!r} data, {kind!r} needed"
    for name, info in manifest["files"].items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != info["bytes"]:
            return f"{name} truncated or missing"
        if sha256_file(path) != info["sha256"]:
            return f"{name} checksum mismatch"
    return None


def memmap_file(path: Path) -> np.ndarray:
    """A data file as read-only uint8 bytes (an empty file as an empty array)."""
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r")


def read_manifest(folder: Path) -> tuple[dict[str, Any], np.ndarray]:
    """The manifest and the index of a checked cache folder (see check_rank_cache)."""
    folder = Path(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    return manifest, np.load(folder / "index.npy", allow_pickle=False)


def open_states(folder: Path, manifest: dict[str, Any], index: np.ndarray) -> TeacherStates:
    """The reader of a STATES_FILES cache (and its thresholds.npy)."""
    thresholds = np.load(Path(folder) / "thresholds.npy", allow_pickle=False)
    return TeacherStates(torch.from_numpy(thresholds.copy()),
                         {int(s): (int(n), int(o)) for s, n, o in index},
                         memmap_file(Path(folder) / "states.bin"))


def open_topk(folder: Path, manifest: dict[str, Any], index: np.ndarray) -> TeacherTopK:
    """The reader of a TOPK_FILES cache."""
    return TeacherTopK(int(manifest["row_width"]),
                       {int(s): (int(n), int(a), int(b)) for s, n, a, b in index},
                       memmap_file(Path(folder) / "topk_ids.bin"),
                       memmap_file(Path(folder) / "topk_logp.bin"))


def open_features(folder: Path, manifest: dict[str, Any], index: np.ndarray
                  ) -> TeacherFeatures:
    """The reader of a FEATURES_FILES cache."""
    return TeacherFeatures(int(manifest["row_width"]),
                           {int(s): (int(n), int(o)) for s, n, o in index},
                           memmap_file(Path(folder) / "features.bin"))
