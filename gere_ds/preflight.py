"""Pre-flight check of a (multi-node) job: run it with the same launcher and arguments as training.

Three uses::

    # launcher side, before anything starts: hostfile syntax, host names resolve (bounded time),
    # node_rank inside the node count, master address resolves, optionally passwordless ssh
    python -m gere_ds.preflight --hostfile H [--num_nodes N --node_rank R --master_addr A] [--ssh]

    # every rank, same launcher as training: process group, collectives, versions, files
    deepspeed --hostfile H launch/preflight.py --config X.yaml [key=value ...] [--timeout 60]

    # one process (e.g. on a login node): the files only
    python -m gere_ds.preflight --config X.yaml [key=value ...]

Rank 0 prints one table (a row per rank: host, node, rank, local rank, one cell per check).
Exit codes: 0 all checks passed; 1 a check failed (one line per failure, naming the host, node,
rank and check); 2 bad launch arguments or environment (one line); 3 a peer never joined or a
collective stalled: one line after ``--timeout`` seconds instead of a hang.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gere_ds.errors import InputError
from gere_ds.hashing import file_fingerprint, is_weight_file

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_STALLED = 0, 1, 2, 3
CHECKS = ("ranks", "all_reduce", "all_gather", "versions", "config", "model", "data", "replay",
          "output")
# config keys that may legitimately differ between nodes (node-local paths)
NODE_LOCAL_KEYS = ("output_dir", "replay.teacher_cache")
HOST_LINE = re.compile(r"^(\S+)\s+slots=(\d+)\s*(#.*)?$")
SMALL_FILE = 64 << 20  # files up to this size are fingerprinted by content, larger by size


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


# ----------------------------------------------------------------------------- bounded helpers


def resolve_hosts(hosts: list[str], timeout: float) -> dict[str, str | None]:
    """Resolve every name in parallel; returns host -> None (ok) or why not, within ``timeout``.

    getaddrinfo has no timeout of its own (a dead DNS server blocks for minutes), so each lookup
    runs in a daemon thread that is abandoned when the deadline passes.
    """
    answers: dict[str, str | None] = {}

    def lookup(host: str) -> None:
        try:
            socket.getaddrinfo(host, None)
            answers[host] = None
        except OSError as err:
            answers[host] = f"does not resolve ({err.strerror or err})"

    threads = {h: threading.Thread(target=lookup, args=(h,), daemon=True) for h in set(hosts)}
    for t in threads.values():
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads.values():
        t.join(max(deadline - time.monotonic(), 0))
    late = f"name lookup gave no answer within {timeout:g} s"
    return {h: answers.get(h, late) for h in hosts}


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


# ----------------------------------------------------------------------------- launcher side


def parse_hostfile(path: str) -> list[tuple[str, int]]:
    """(host, slots) per line of a DeepSpeed hostfile; InputError naming the line otherwise."""
    p = Path(path)
    if not p.is_file():
        raise InputError("hostfile not found", file=path)
    hosts: list[tuple[str, int]] = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(p.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = HOST_LINE.match(line)
        if not m:
            raise InputError(f"bad entry {line!r}: expected '<host> slots=<N>'", file=path,
                             line=lineno)
        host, slots = m.group(1), int(m.group(2))
        if slots < 1:
            raise InputError(f"host {host!r} has slots={slots}; need >= 1", file=path,
                             line=lineno)
        if host in seen:
            raise InputError(f"host {host!r} listed twice (first on line {seen[host]})",
                             file=path, line=lineno)
        seen[host] = lineno
        hosts.append((host, slots))
    if not hosts:
        raise InputError("no hosts listed (expected lines '<host> slots=<N>')", file=path)
    return hosts


def check_launch(args: argparse.Namespace) -> list[str]:
    """Launcher-argument checks that need no process group; one line per problem."""
    problems: list[str] = []
    hosts: list[tuple[str, int]] = []
    if args.hostfile:
        try:
            hosts = parse_hostfile(args.hostfile)
        except InputError as err:
            return [str(err)]
    n_nodes = args.num_nodes if args.num_nodes else len(hosts) or 1
    if args.num_nodes is not None and args.num_nodes < 1:
        problems.append(f"--num_nodes {args.num_nodes}: must be >= 1")
    elif hosts and n_nodes > len(hosts):
        problems.append(f"--num_nodes {n_nodes}: the hostfile {args.hostfile} lists only "
                        f"{len(hosts)} host(s)")
    elif not hosts and n_nodes > 1:
        problems.append(f"--num_nodes {n_nodes} needs a hostfile listing {n_nodes} hosts "
                        "(the deepspeed launcher takes the world layout from it)")
    if args.node_rank is not None and not 0 <= args.node_rank < n_nodes:
        problems.append(f"--node_rank {args.node_rank} is outside 0..{n_nodes - 1} "
                        f"({n_nodes} node(s))")
    if args.master_port is not None and not 1 <= args.master_port <= 65535:
        problems.append(f"--master_port {args.master_port}: must be in 1..65535")
    names = [h for h, _ in hosts[:n_nodes]]
    if args.master_addr:
        names.append(args.master_addr)
    if names:
        answers = resolve_hosts(names, args.timeout)
        for i, name in enumerate(names):
            why = answers[name]
            if why is None:
                continue
            if args.master_addr and i == len(names) - 1:
                problems.append(f"--master_addr {name!r} {why}")
            else:
                problems.append(f"{args.hostfile}: host {name!r} {why}")
    if args.ssh and hosts and not problems:
        problems += _check_ssh([h for h, _ in hosts[:n_nodes]], args.timeout)
    return problems


def _check_ssh(hosts: list[str], timeout: float) -> list[str]:
    """Passwordless ssh to every host (what `deepspeed --hostfile` without --no_ssh needs)."""
    if shutil.which("ssh") is None:
        return [("ssh is not installed here; `deepspeed --hostfile` needs passwordless ssh "
                 "(or use --no_ssh with one launcher per node)")]
    problems = []
    for host in hosts:
        cmd = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={max(int(timeout), 1)}",
               host, "true"]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 5,
                               check=False)
        except subprocess.TimeoutExpired:
            problems.append(f"host {host!r}: ssh gave no answer within {timeout:g} s")
            continue
        if r.returncode != 0:
            why = _one_line(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else
                            f"exit {r.returncode}")
            problems.append(f"host {host!r}: passwordless ssh failed ({why})")
    return problems


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
        self.results[check] = (cell, _one_line(detail))

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
    root = Path(__file__).resolve().parent
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    out["gere_ds"] = h.hexdigest()[:10]
    return out


def check_model(cfg: Any, info: dict[str, Any]) -> str:
    from gere_ds.engine import check_model_folder

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
    from gere_ds.data.tasks import load_examples

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
    if cfg.replay.strategy == "none":
        return None
    from gere_ds.data.replay import load_replay_texts

    texts = load_replay_texts(cfg.replay.data, cfg.replay.num_samples)
    if len(texts) < world:
        raise InputError(f"{len(texts)} replay documents for {world} ranks",
                         file=cfg.replay.data, field="replay.num_samples")
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
    folders = [("output_dir", Path(cfg.output_dir))]
    if cfg.replay.teacher_cache and cfg.strategy_needs_teacher():
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


def local_checks(row: Row, args: argparse.Namespace, world: int) -> Any:
    """Config, model, data, replay set and output folder as seen by this rank."""
    from gere_ds.config import load_config
    from gere_ds.engine import resolve_ds_config

    cfg = None

    def config() -> str:
        nonlocal cfg
        cfg = load_config(args.config, args.overrides)
        resolve_ds_config(cfg, world)
        return args.config

    _run_check(row, "config", config)
    if cfg is None:
        for check in ("model", "data", "replay", "output"):
            row.set(check, None, "config did not load")
        return None
    row.info["config"] = _flatten(cfg.to_dict())
    _run_check(row, "model", lambda: check_model(cfg, row.info))
    _run_check(row, "data", lambda: check_data(cfg, row.info))
    _run_check(row, "replay", lambda: check_replay(cfg, world, row.info))
    if cfg.replay.strategy == "none":
        row.set("replay", None, "strategy none")
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


# ----------------------------------------------------------------------------- report


def render_table(rows: list[Row], shared: dict[int, str]) -> str:
    head = ["host", "node", "rank", "local", *CHECKS, "shared_fs"]
    body = []
    for r in rows:
        cells = [r.host[:28], str(r.node), str(r.rank), str(r.local_rank)]
        cells += [r.results.get(c, ("-", ""))[0] for c in CHECKS]
        cells.append(shared.get(r.rank, "-"))
        body.append(cells)
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, body)])


def failure_lines(rows: list[Row]) -> list[str]:
    return [f"preflight: FAIL host {r.host} (node {r.node}, rank {r.rank}): {check}: {detail}"
            for r in rows for check, detail in r.failures()]


def report(rows: list[Row], shared: dict[int, str], header: str, notes: list[str]) -> str:
    lines = [header, render_table(rows, shared), *notes]
    fails = failure_lines(rows)
    if fails:
        bad_ranks = {r.rank for r in rows if r.failures()}
        lines += fails
        lines.append(f"preflight: FAILED: {len(fails)} check(s) on {len(bad_ranks)} of "
                     f"{len(rows)} rank(s)")
    else:
        lines.append(f"preflight: all checks passed on {len(rows)} rank(s)")
    return "\n".join(lines)


def _notes(rows: list[Row]) -> list[str]:
    ref = rows[0].info
    notes = []
    if "versions" in ref:
        notes.append("versions: " + " | ".join(f"{k} {v}" for k, v in ref["versions"].items()))
    if "all_reduce_ms" in ref:
        ms = max(r.info.get("all_reduce_ms", 0.0) for r in rows)
        world = len(rows)
        mb = ref["bench_bytes"] / 2**20
        bus = 2 * (world - 1) / world * ref["bench_bytes"] / max(ms / 1e3, 1e-9) / 1e9
        notes.append(f"all_reduce {mb:g} MiB fp32: slowest rank {ms:.1f} ms, bus bandwidth "
                     f"{bus:.2f} GB/s")
    for r in rows:
        if r.rank == 0 or r.node != rows[r.rank - 1].node:  # one line per node
            cell, d = r.results.get("output", ("-", ""))
            if cell == "ok" and d:
                notes.append(f"output on {r.host} (node {r.node}): {d}")
    return notes


# ----------------------------------------------------------------------------- modes


def _identity() -> Row:
    env = os.environ
    node = int(env.get("CROSS_RANK", env.get("GROUP_RANK", env.get("SLURM_NODEID", 0))))
    return Row(host=socket.gethostname(), node=node, rank=int(env.get("RANK", 0)),
               local_rank=int(env.get("LOCAL_RANK", 0)),
               world_size=int(env.get("WORLD_SIZE", 1)))


def run_single(args: argparse.Namespace) -> int:
    """No launcher: the file checks of one process."""
    row = _identity()
    row.info["versions"] = versions()
    for check in ("ranks", "all_reduce", "all_gather"):
        row.set(check, None, "one process")
    row.set("versions", True)
    local_checks(row, args, 1)
    print(report([row], {}, "preflight: 1 process (no launcher): files only", _notes([row])),
          flush=True)
    return EXIT_FAILED if row.failures() else EXIT_OK


def run_distributed(args: argparse.Namespace) -> int:
    env = os.environ
    row = _identity()
    who = f"host {row.host} (node {row.node}, rank {row.rank})"
    # launcher/environment problems are the same on every rank of a node: say them once per node
    say = row.local_rank == 0
    missing = [v for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
               if v not in env]
    if missing:
        if say:
            print(f"preflight: FAIL {who}: environment: {', '.join(missing)} not set "
                  "(start it with the deepspeed launcher or torchrun)", file=sys.stderr,
                  flush=True)
        return EXIT_BAD_INPUT
    world, addr, port = int(env["WORLD_SIZE"]), env["MASTER_ADDR"], env["MASTER_PORT"]
    if not 0 <= row.rank < world:
        print(f"preflight: FAIL {who}: environment: RANK {row.rank} is outside 0..{world - 1}",
              file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    why = resolve_hosts([addr], args.timeout)[addr]
    if why and say:
        print(f"preflight: FAIL {who}: master_addr: {addr!r} {why}", file=sys.stderr,
              flush=True)
    if why:
        return EXIT_BAD_INPUT

    import torch
    import torch.distributed as tdist

    from gere_ds import dist

    dog = Watchdog(who)
    dog.enter("building DeepSpeed's communication op", args.build_timeout,
              "point TORCH_EXTENSIONS_DIR at a node-local folder that already holds the build")
    _prebuild_comm_op()
    join_hint = (f"not all {world} ranks joined at {addr}:{port}: check that every node's "
                 "launcher started with the same --num_nodes/hostfile and --master_addr/"
                 "--master_port, and that the port is open between nodes")
    dog.enter("joining the process group", args.timeout + 20, join_hint)
    t0 = time.monotonic()
    try:
        dist.init(timeout_s=args.timeout)
    except Exception as err:  # noqa: BLE001 (one line, whatever the backend raised)
        print(f"preflight: FAIL {who}: process group: {join_hint} "
              f"(after {time.monotonic() - t0:.0f} s: {_one_line(err)[:300]})",
              file=sys.stderr, flush=True)
        os._exit(EXIT_STALLED)
    init_s = time.monotonic() - t0
    stall_hint = "a peer is stuck or gone (see its node's log)"
    try:
        # ranks: what the launcher said vs what the process group says
        pg_rank, pg_world = tdist.get_rank(), tdist.get_world_size()
        if (pg_rank, pg_world) != (row.rank, world):
            row.set("ranks", False, f"environment says rank {row.rank} of {world}, process group "
                                    f"says {pg_rank} of {pg_world}")
        elif torch.cuda.is_available() and row.local_rank >= torch.cuda.device_count():
            row.set("ranks", False, f"local rank {row.local_rank} but {torch.cuda.device_count()} "
                                    "GPU(s) visible on this node")
        else:
            row.set("ranks", True)
        dev = dist.device()
        dog.enter("all_reduce", args.timeout + 20, stall_hint)
        t = torch.tensor([float(row.rank + 1)], device=dev)
        tdist.all_reduce(t)
        want = world * (world + 1) / 2
        n = max(int(args.bench_mb * 2**20 // 4), 1)
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
            row.set("all_reduce", False, f"{bad} of {n} elements of the {args.bench_mb:g} MiB "
                                         f"all_reduce are wrong (expected {want:g})")
        else:
            row.set("all_reduce", True)
        del big
        dog.enter("all_gather", args.timeout + 20, stall_hint)
        mine = torch.tensor([row.rank], dtype=torch.int64, device=dev)
        got = [torch.zeros_like(mine) for _ in range(world)]
        tdist.all_gather(got, mine)
        values = [int(g.item()) for g in got]
        row.set("all_gather", values == list(range(world)),
                "" if values == list(range(world)) else f"gathered {values}, expected "
                                                        f"0..{world - 1}")
        row.info["versions"] = versions()
        row.set("versions", True)
        dog.leave()
        local_checks(row, args, world)
        dog.enter("gathering the results", args.timeout + 20, stall_hint)
        rows = [Row(**d) for d in dist.all_gather_object(dataclasses.asdict(row))]
        cross_checks(rows)
        shared = _shared_filesystem(rows, row)
        dog.enter("final barrier", args.timeout + 20, stall_hint)
        tdist.barrier()
        dog.leave()
    except Exception as err:  # noqa: BLE001 (one line, whatever the backend raised)
        print(f"preflight: FAIL {who}: collectives: {stall_hint} ({_one_line(err)[:300]})",
              file=sys.stderr, flush=True)
        os._exit(EXIT_STALLED)
    nodes = len({r.node for r in rows})
    header = (f"preflight: {world} rank(s) on {nodes} node(s), master {addr}:{port}, backend "
              f"{tdist.get_backend()}, process group joined in {init_s:.1f} s")
    if row.rank == 0:
        print(report(rows, shared, header, _notes(rows)), flush=True)
    elif row.node != rows[0].node and row.local_rank == 0:
        # this node's own log names its failures too (rank 0's table is on another node)
        for line in failure_lines([r for r in rows if r.node == row.node]):
            print(line, file=sys.stderr, flush=True)
    failed = any(r.failures() for r in rows)
    return EXIT_FAILED if failed else EXIT_OK


def _prebuild_comm_op() -> None:
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


def _shared_filesystem(rows: list[Row], row: Row) -> dict[int, str]:
    """Does every rank see a file that rank 0 just wrote next to its output_dir? (informational)

    Decided from the gathered rows, so every rank takes the same branch into the collectives.
    """
    from gere_ds import dist

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


# ----------------------------------------------------------------------------- entry


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gere_ds.preflight", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="run config YAML (the one training will use)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds allowed for name lookups, joining the process group and each "
                        "collective (default 60)")
    p.add_argument("--build_timeout", type=float, default=900.0,
                   help="seconds allowed to compile DeepSpeed's comm op on a first run")
    p.add_argument("--bench_mb", type=float, default=32.0,
                   help="size of the timed all_reduce in MiB (default 32)")
    p.add_argument("--hostfile", help="DeepSpeed hostfile to validate ('<host> slots=<N>' lines)")
    p.add_argument("--num_nodes", type=int, help="node count the launchers will be given")
    p.add_argument("--node_rank", type=int, help="this node's --node_rank")
    p.add_argument("--master_addr", help="the --master_addr the launchers will be given")
    p.add_argument("--master_port", type=int, help="the --master_port the launchers will use")
    p.add_argument("--ssh", action="store_true",
                   help="also check passwordless ssh to every host (deepspeed --hostfile "
                        "without --no_ssh needs it)")
    p.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, as for training")
    args = p.parse_args(argv)
    if not args.config and not (args.hostfile or args.master_addr or args.num_nodes is not None
                                or args.node_rank is not None):
        p.error("give --config (run checks) and/or --hostfile/--num_nodes/--node_rank/"
                "--master_addr (launch checks)")
    if args.timeout <= 0:
        p.error("--timeout must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if args.hostfile or args.master_addr or args.num_nodes is not None \
            or args.node_rank is not None:
        problems = check_launch(args)
        if problems and (not launched or int(os.environ["RANK"]) == 0):
            for line in problems:
                print(f"preflight: FAIL launch: {line}", file=sys.stderr, flush=True)
        if problems:
            return EXIT_BAD_INPUT
        if not args.config:
            hosts = f"{args.hostfile}: " if args.hostfile else ""
            print(f"preflight: launch arguments ok ({hosts}names resolve"
                  f"{', ssh ok' if args.ssh else ''})", flush=True)
            return EXIT_OK
    if launched:
        return run_distributed(args)
    return run_single(args)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # no destroy_process_group (see docs: a rare abort at exit); skip interpreter teardown of
    # abandoned lookup threads as well
    os._exit(code)
