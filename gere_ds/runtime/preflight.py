"""The pre-flight checks of a (multi-node) job; `gere-ds preflight` (gere_ds.commands.preflight)
runs them with the same launcher and arguments as training and prints the report.

Launcher side (no process group): hostfile syntax, host names resolve within a time limit,
node_rank inside the node count, optional passwordless ssh. Every rank: the process group,
collectives, versions, and the run's config, model, data, replay set and output folder, then
cross-rank comparisons of what each rank saw. Nothing here waits without a deadline.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gere_ds.errors import InputError, one_line
from gere_ds.storage.hashing import file_fingerprint, is_weight_file

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_STALLED = 0, 1, 2, 3  # the command's exit codes
CHECKS = ("ranks", "all_reduce", "all_gather", "versions", "config", "model", "data", "replay",
          "output")
# config keys that may legitimately differ between nodes (node-local paths)
NODE_LOCAL_KEYS = ("output_dir", "replay.teacher_cache")
SMALL_FILE = 64 << 20  # files up to this size are fingerprinted by content, larger by size


# ----------------------------------------------------------------------------- bounded helpers


class Watchdog:
    """Ends the process with one line if a phase runs past its deadline.

    A backstop under the process group's own timeout: whatever a library does, the check never
    hangs for longer than the limit of the phase it is in.
    """

    def __init__(self, who: str) -> None:
        self.who = who
        self._phase: tuple[str, float, str] | None = None
        self._lock = threading.Lock()
        threading.Thread(target=self._watch, daemon=True).start()

    def enter(self, phase: str, limit: float, hint: str = "") -> None:
        with self._lock:
            self._phase = (phase, time.monotonic() + limit, hint)
            self._limit = limit

    def leave(self) -> None:
        with self._lock:
            self._phase = None

    def _watch(self) -> None:
        while True:
            time.sleep(0.25)
            with self._lock:
                phase = self._phase
                if phase is None or time.monotonic() < phase[1]:
                    continue
                name, _, hint = phase
                print(f"preflight: FAIL {self.who}: {name}: no progress after {self._limit:g} s"
                      f"{'; ' + hint if hint else ''}", file=sys.stderr, flush=True)
                os._exit(EXIT_STALLED)


# ----------------------------------------------------------------------------- local checks


@dataclass
class Row:
    """One rank's identity and check results (gathered to every rank)."""

    host: str
    node: int
    rank: int
    local_rank: int
    world_size: int
    results: dict[str, tuple[str, str]] = field(default_factory=dict)  # check -> (cell, detail)
    info: dict[str, Any] = field(default_factory=dict)

    def set(self, check: str, ok: bool | None, detail: str = "", cell: str = "") -> None:
        cell = cell or {True: "ok", False: "FAIL", None: "-"}[ok]
        self.results[check] = (cell, one_line(detail))

    def failures(self) -> list[tuple[str, str]]:
        return [(c, d) for c, (cell, d) in self.results.items() if cell == "FAIL"]


def _run_check(row: Row, check: str, fn: Callable[[], str | None]) -> None:
    """Run one check; an InputError/OSError becomes a FAIL with its one-line message."""
    try:
        detail = fn()
        row.set(check, True, detail or "")
    except InputError as err:
        row.set(check, False, str(err))
    except OSError as err:
        where = f"{err.filename}: " if getattr(err, "filename", None) else ""
        row.set(check, False, f"{where}{err.strerror or err}")


def versions() -> dict[str, str]:
    from importlib import metadata

    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("deepspeed", "transformers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "missing"
    if torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
        try:
            out["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:  # noqa: BLE001, S110 (informational only)
            pass
    h = hashlib.sha1()
    root = Path(__file__).resolve().parents[1]  # gere_ds/
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    out["gere_ds"] = h.hexdigest()[:10]
    return out


def check_model(cfg: Any, info: dict[str, Any]) -> str:
    # lazy: launcher-side checks run without torch
    from gere_ds.model.engine import check_model_folder

    check_model_folder(cfg)
    folder = Path(cfg.model)
    weights = sorted(p for p in folder.iterdir()
                     if p.is_file() and is_weight_file(p))
    if not weights:
        raise InputError("no weight files (*.safetensors / *.bin) in the model folder",
                         file=cfg.model, field="model")
    for index in folder.glob("*.index.json"):
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise InputError(f"shard {missing[0]} listed in {index.name} is missing "
                             f"({len(missing)} missing)", file=cfg.model, field="model")
    (folder / "config.json").read_bytes()
    for w in weights:  # readable: the first MiB of every weight file
        with open(w, "rb") as fh:
            fh.read(1 << 20)
    tok = Path(cfg.tokenizer or cfg.model)
    names = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
    if not any((tok / n).is_file() for n in names):
        raise InputError("no tokenizer files (tokenizer.json / tokenizer.model / vocab.json)",
                         file=str(tok), field="tokenizer" if cfg.tokenizer else "model")
    info["model_files"] = {p.name: p.stat().st_size for p in weights}
    total = sum(info["model_files"].values())
    return f"{len(weights)} weight file(s), {total / 1e9:.2f} GB"


def check_data(cfg: Any, info: dict[str, Any]) -> str:
    from gere_ds.data.tasks import load_examples  # lazy: launcher-side checks run without torch

    prints, n = {}, 0
    for task in cfg.tasks:
        splits = ["train"] + (["test"] if cfg.eval.enabled and task.test else [])
        for split in splits:
            rows = load_examples(task, split)
            n += len(rows)
            path = Path(task.train if split == "train" else task.test)
            prints[str(path)] = file_fingerprint(path, SMALL_FILE)
    general = cfg.eval.general if cfg.eval.enabled else []
    for i, g in enumerate(general):
        path = Path(g.path)
        if not path.is_file():
            raise InputError(f"general evaluation {g.name!r} file not found", file=g.path,
                             field=f"eval.general.{i}.path")
        prints[str(path)] = file_fingerprint(path, SMALL_FILE)
    info["data_files"] = prints
    extra = f", {len(general)} general set(s)" if general else ""
    return f"{len(cfg.tasks)} task(s), {n} examples{extra}"


def check_replay(cfg: Any, world: int, info: dict[str, Any]) -> str | None:
    """The replay set as training checks it (gere_ds.data.replay.check_replay_inputs)."""
    # lazy: launcher-side checks run without torch
    from gere_ds.data.replay import check_replay_inputs
    from gere_ds.strategies import make_term

    if not make_term(cfg).uses_replay:
        return None
    texts = check_replay_inputs(cfg, world)
    info["replay_files"] = {cfg.replay.data: file_fingerprint(cfg.replay.data, SMALL_FILE)}
    return f"{len(texts)} documents"


def check_writable(folder: Path) -> str:
    """The folder (or, if absent, its nearest existing parent) takes a new file; nothing is left."""
    folder = Path(folder).absolute()
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        what = "exists and is not a directory" if probe == folder else \
            f"cannot be created: {probe} is not a directory"
        raise InputError(what, file=str(folder))
    if probe == folder:
        fd, tmp = tempfile.mkstemp(prefix=".preflight-", dir=folder)
        try:
            os.write(fd, b"ok\n")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.remove(tmp)
        state = "writable"
    else:  # training creates it: prove that it can
        tmp = tempfile.mkdtemp(prefix=".preflight-", dir=probe)
        os.rmdir(tmp)
        state = f"will be created (in {probe})"
    free = shutil.disk_usage(probe).free
    return f"{state}, {free / 1e9:.1f} GB free"


def check_output(cfg: Any, info: dict[str, Any]) -> str:
    from gere_ds.strategies import STRATEGIES  # lazy: launcher-side checks run without torch

    folders = [("output_dir", Path(cfg.output_dir))]
    if cfg.replay.teacher_cache and STRATEGIES[cfg.replay.strategy].spec_type is not None:
        folders.append(("replay.teacher_cache", Path(cfg.replay.teacher_cache)))
    details = []
    for key, folder in folders:
        try:
            details.append(f"{key} {check_writable(folder)}")
        except OSError as err:
            raise InputError(f"not writable ({err.strerror or err})", file=str(folder),
                             field=key) from None
        except InputError as err:
            raise InputError(err.detail, file=err.file, field=key) from None
    return "; ".join(details)


def local_checks(row: Row, config: str, overrides: list[str], world: int) -> Any:
    """Config, model, data, replay set and output folder as seen by this rank."""
    # lazy: launcher-side checks run without torch
    from gere_ds.config.loading import load_config
    from gere_ds.model.engine import resolve_ds_config

    cfg = None

    def load() -> str:
        nonlocal cfg
        cfg = load_config(config, overrides)
        resolve_ds_config(cfg, world)
        return config

    _run_check(row, "config", load)
    if cfg is None:
        for check in ("model", "data", "replay", "output"):
            row.set(check, None, "config did not load")
        return None
    row.info["config"] = _flatten(cfg.to_dict())
    _run_check(row, "model", lambda: check_model(cfg, row.info))
    _run_check(row, "data", lambda: check_data(cfg, row.info))
    _run_check(row, "replay", lambda: check_replay(cfg, world, row.info))
    if row.results["replay"][0] == "ok" and "replay_files" not in row.info:
        row.set("replay", None, f"strategy {cfg.replay.strategy}")  # it replays nothing
    _run_check(row, "output", lambda: check_output(cfg, row.info))
    return cfg


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(obj, list):
        out = {}
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}.{i}"))
        return out or {prefix: []}
    return {prefix: obj}


# ----------------------------------------------------------------------------- cross-rank checks


def _first_difference(mine: dict[str, Any], ref: dict[str, Any]) -> str | None:
    keys = sorted(set(mine) | set(ref))
    diff = [k for k in keys if mine.get(k) != ref.get(k)]
    if not diff:
        return None
    k = diff[0]
    more = f" (+{len(diff) - 1} more)" if len(diff) > 1 else ""
    return f"{k}: {mine.get(k, 'absent')} vs {ref.get(k, 'absent')} on rank 0{more}"


def cross_checks(rows: list[Row]) -> None:
    """Checks that compare ranks; identical on every rank (they all hold every row)."""
    world = len(rows)
    ranks = sorted(r.rank for r in rows)
    seats: dict[tuple[str, int, int], int] = {}
    for r in rows:
        key = (r.host, r.node, r.local_rank)
        if key in seats and r.results.get("ranks", ("ok",))[0] == "ok":
            r.set("ranks", False, f"local rank {r.local_rank} on node {r.node} is also taken by "
                                  f"rank {seats[key]}")
        seats.setdefault(key, r.rank)
    if ranks != list(range(world)):
        for r in rows:
            if r.results.get("ranks", ("ok",))[0] == "ok":
                r.set("ranks", False, f"ranks are {ranks}, expected 0..{world - 1}")
    ref = rows[0]
    for r in rows[1:]:
        diff = _first_difference(r.info.get("versions", {}), ref.info.get("versions", {}))
        if diff:
            r.set("versions", False, f"differs from rank 0 at {diff}")
        if "config" in r.info and "config" in ref.info:
            mine = {k: v for k, v in r.info["config"].items() if k not in NODE_LOCAL_KEYS}
            theirs = {k: v for k, v in ref.info["config"].items() if k not in NODE_LOCAL_KEYS}
            diff = _first_difference(mine, theirs)
            if diff and r.results["config"][0] == "ok":
                r.set("config", False, f"config differs from rank 0 at {diff}")
        for check, key in (("model", "model_files"), ("data", "data_files"),
                           ("replay", "replay_files")):
            if key in r.info and key in ref.info and r.results[check][0] == "ok":
                diff = _first_difference(r.info[key], ref.info[key])
                if diff:
                    r.set(check, False, f"files differ from rank 0's copy: {diff}")

# ----------------------------------------------------------------------------- collectives


def check_collectives(row: Row, world: int, bench_mb: float, dog: Watchdog, limit: float) -> None:
    """ranks, all_reduce (a sum, then a timed ``bench_mb`` MiB one) and all_gather; every rank
    must call it (each step is a collective) under a joined process group."""
    import torch  # lazy: launcher-side checks run without torch
    import torch.distributed as tdist

    from gere_ds.runtime import dist

    stall_hint = "a peer is stuck or gone (see its node's log)"
    _check_ranks(row, world)
    dev = dist.device()
    dog.enter("all_reduce", limit, stall_hint)
    t = torch.tensor([float(row.rank + 1)], device=dev)
    tdist.all_reduce(t)
    want = world * (world + 1) / 2
    n = max(int(bench_mb * 2**20 // 4), 1)
    big = torch.full((n,), float(row.rank + 1), device=dev)
    tdist.barrier()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    tdist.all_reduce(big)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    row.info["all_reduce_ms"] = (time.perf_counter() - t1) * 1e3
    row.info["bench_bytes"] = n * 4
    bad = int((big != want).sum())
    if float(t.item()) != want:
        row.set("all_reduce", False, f"sum of rank+1 gave {t.item():g}, expected {want:g}")
    elif bad:
        row.set("all_reduce", False, f"{bad} of {n} elements of the {bench_mb:g} MiB "
                                     f"all_reduce are wrong (expected {want:g})")
    else:
        row.set("all_reduce", True)
    del big
    dog.enter("all_gather", limit, stall_hint)
    mine = torch.tensor([row.rank], dtype=torch.int64, device=dev)
    got = [torch.zeros_like(mine) for _ in range(world)]
    tdist.all_gather(got, mine)
    values = [int(g.item()) for g in got]
    row.set("all_gather", values == list(range(world)),
            "" if values == list(range(world)) else f"gathered {values}, expected "
                                                    f"0..{world - 1}")


def _check_ranks(row: Row, world: int) -> None:
    """What the launcher said vs what the process group says (and a GPU per local rank)."""
    import torch
    import torch.distributed as tdist

    pg_rank, pg_world = tdist.get_rank(), tdist.get_world_size()
    if (pg_rank, pg_world) != (row.rank, world):
        row.set("ranks", False, f"environment says rank {row.rank} of {world}, process group "
                                f"says {pg_rank} of {pg_world}")
    elif torch.cuda.is_available() and row.local_rank >= torch.cuda.device_count():
        row.set("ranks", False, f"local rank {row.local_rank} but {torch.cuda.device_count()} "
                                "GPU(s) visible on this node")
    else:
        row.set("ranks", True)


def prebuild_comm_op() -> None:
    """Build (or load from TORCH_EXTENSIONS_DIR) the op init_distributed builds, outside the
    rendezvous timeout: a first build takes ~20 s and must not count as a missing peer."""
    try:
        from deepspeed.accelerator import get_accelerator
        from deepspeed.ops import __compatible_ops__

        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is not None and __compatible_ops__.get(builder.NAME, False):
            builder.load(verbose=False)
    except Exception:  # noqa: BLE001, S110 (init_distributed builds it again and reports)
        pass


def shared_filesystem(rows: list[Row], row: Row) -> dict[int, str]:
    """Does every rank see a file that rank 0 just wrote next to its output_dir? (informational)

    Decided from the gathered rows, so every rank takes the same branch into the collectives.
    """
    from gere_ds.runtime import dist  # lazy: launcher-side checks run without torch

    ref = rows[0]
    if ref.results.get("output", ("-",))[0] != "ok" or "config" not in ref.info:
        return {}
    probe = Path(ref.info["config"]["output_dir"]).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    marker = probe / f".preflight-shared-{ref.host}-{os.getpid() if row.rank == 0 else 0}"
    marker = Path(dist.broadcast_object(str(marker)))
    made = False
    if row.rank == 0:
        try:
            marker.write_text("preflight\n")
            made = True
        except OSError:
            pass
    if not dist.broadcast_object(made):
        return {}
    sees = dist.all_gather_object(marker.is_file())
    dist.barrier()
    if row.rank == 0:
        marker.unlink(missing_ok=True)
    return {r.rank: "yes" if s else "no" for r, s in zip(rows, sees)}
