"""Launcher-side checks of a multi-node job, before any process starts: the hostfile's syntax,
host names that resolve (within a time limit), node_rank inside the node count, a valid master
port, and optionally passwordless ssh. One line per problem."""
from __future__ import annotations

import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from gere_ds.errors import InputError, one_line

HOST_LINE = re.compile(r"^(\S+)\s+slots=(\d+)\s*(#.*)?$")


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


def check_launch(args: Any) -> list[str]:
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
            why = one_line(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else
                            f"exit {r.returncode}")
            problems.append(f"host {host!r}: passwordless ssh failed ({why})")
    return problems
