"""`gere-ds preflight`: check a (multi-node) job with the same launcher and arguments as training.

Three uses::

    # launcher side, before anything starts: hostfile syntax, host names resolve (bounded time),
    # node_rank inside the node count, master address resolves, optionally passwordless ssh
    gere-ds preflight --hostfile H [--num_nodes N --node_rank R --master_addr A] [--ssh]

    # every rank, same launcher as training: process group, collectives, versions, files
    deepspeed --hostfile H launch/preflight.py --config X.yaml [key=value ...] [--timeout 60]

    # one process (e.g. on a login node): the files only
    gere-ds preflight --config X.yaml [key=value ...]

Rank 0 prints one table (a row per rank: host, node, rank, local rank, one cell per check).
Exit codes: 0 all checks passed; 1 a check failed (one line per failure, naming the host, node,
rank and check); 2 bad launch arguments or environment (one line); 3 a peer never joined or a
collective stalled: one line after ``--timeout`` seconds instead of a hang. The checks
themselves: :mod:`gere_ds.runtime.preflight` and :mod:`gere_ds.runtime.launch_checks`.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import sys
import time

from gere_ds.errors import one_line
from gere_ds.runtime.launch_checks import check_launch, resolve_hosts
from gere_ds.runtime.preflight import (
    CHECKS,
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_STALLED,
    Row,
    Watchdog,
    check_collectives,
    cross_checks,
    local_checks,
    prebuild_comm_op,
    shared_filesystem,
    versions,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gere-ds preflight", description=__doc__,
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


def run_single(args: argparse.Namespace) -> int:
    """No launcher: the file checks of one process."""
    row = _identity()
    row.info["versions"] = versions()
    for check in ("ranks", "all_reduce", "all_gather"):
        row.set(check, None, "one process")
    row.set("versions", True)
    local_checks(row, args.config, args.overrides, 1)
    print(report([row], {}, "preflight: 1 process (no launcher): files only", _notes([row])),
          flush=True)
    return EXIT_FAILED if row.failures() else EXIT_OK


def run_distributed(args: argparse.Namespace) -> int:
    """Under a launcher: every check on every rank, rank 0 prints the table."""
    row = _identity()
    who = f"host {row.host} (node {row.node}, rank {row.rank})"
    code = _check_environment(row, who, args.timeout)
    if code is not None:
        return code
    import torch.distributed as tdist  # lazy: launcher-side checks run without torch

    from gere_ds.runtime import dist

    env = os.environ
    world, addr, port = int(env["WORLD_SIZE"]), env["MASTER_ADDR"], env["MASTER_PORT"]
    dog = Watchdog(who)
    dog.enter("building DeepSpeed's communication op", args.build_timeout,
              "point TORCH_EXTENSIONS_DIR at a node-local folder that already holds the build")
    prebuild_comm_op()
    join_hint = (f"not all {world} ranks joined at {addr}:{port}: check that every node's "
                 "launcher started with the same --num_nodes/hostfile and --master_addr/"
                 "--master_port, and that the port is open between nodes")
    dog.enter("joining the process group", args.timeout + 20, join_hint)
    t0 = time.monotonic()
    try:
        dist.init(timeout_s=args.timeout)
    except Exception as err:  # noqa: BLE001 (one line, whatever the backend raised)
        print(f"preflight: FAIL {who}: process group: {join_hint} "
              f"(after {time.monotonic() - t0:.0f} s: {one_line(err)[:300]})",
              file=sys.stderr, flush=True)
        os._exit(EXIT_STALLED)
    init_s = time.monotonic() - t0
    stall_hint = "a peer is stuck or gone (see its node's log)"
    limit = args.timeout + 20
    try:
        check_collectives(row, world, args.bench_mb, dog, limit)
        row.info["versions"] = versions()
        row.set("versions", True)
        dog.leave()
        local_checks(row, args.config, args.overrides, world)
        dog.enter("gathering the results", limit, stall_hint)
        rows = [Row(**d) for d in dist.all_gather_object(dataclasses.asdict(row))]
        cross_checks(rows)
        shared = shared_filesystem(rows, row)
        dog.enter("final barrier", limit, stall_hint)
        tdist.barrier()
        dog.leave()
    except Exception as err:  # noqa: BLE001 (one line, whatever the backend raised)
        print(f"preflight: FAIL {who}: collectives: {stall_hint} ({one_line(err)[:300]})",
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
    return EXIT_FAILED if any(r.failures() for r in rows) else EXIT_OK


def _check_environment(row: Row, who: str, timeout: float) -> int | None:
    """The launcher's variables are set and sane and the master address resolves; else the exit
    code, after one line per node (every rank of a node sees the same problem)."""
    env = os.environ
    say = row.local_rank == 0
    missing = [v for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
               if v not in env]
    if missing:
        if say:
            print(f"preflight: FAIL {who}: environment: {', '.join(missing)} not set "
                  "(start it with the deepspeed launcher or torchrun)", file=sys.stderr,
                  flush=True)
        return EXIT_BAD_INPUT
    world, addr = int(env["WORLD_SIZE"]), env["MASTER_ADDR"]
    if not 0 <= row.rank < world:
        print(f"preflight: FAIL {who}: environment: RANK {row.rank} is outside 0..{world - 1}",
              file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    why = resolve_hosts([addr], timeout)[addr]
    if why:
        if say:
            print(f"preflight: FAIL {who}: master_addr: {addr!r} {why}", file=sys.stderr,
                  flush=True)
        return EXIT_BAD_INPUT
    return None


def _identity() -> Row:
    env = os.environ
    node = int(env.get("CROSS_RANK", env.get("GROUP_RANK", env.get("SLURM_NODEID", 0))))
    return Row(host=socket.gethostname(), node=node, rank=int(env.get("RANK", 0)),
               local_rank=int(env.get("LOCAL_RANK", 0)),
               world_size=int(env.get("WORLD_SIZE", 1)))


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


if __name__ == "__main__":  # `python -m gere_ds.commands.preflight`: the same as `gere-ds preflight`
    from gere_ds.runtime import dist

    dist.exit_process(main())  # abandoned name-lookup threads are not joined either
