"""Test helper: N `deepspeed --no_ssh` launchers on this machine, one per simulated node.

Each launcher gets ``--hostfile H --no_ssh --num_nodes N --num_gpus G --node_rank R
--master_addr 127.0.0.1 --master_port P``; they rendezvous over the loopback interface exactly as
launchers on separate machines do over the network (gloo/TCP; DeepSpeed's shared-memory
all-reduce is off because LOCAL_SIZE != WORLD_SIZE). Node r gets global ranks r*G .. r*G+G-1.
"""
from __future__ import annotations

import glob
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
# two names for this machine: the launcher only needs distinct keys, the preflight resolves them
LOOPBACK_HOSTS = ("localhost", "127.0.0.1")


def ds_env() -> dict[str, str]:
    env = dict(os.environ)
    # bench/gpu_check.sh runs a subset on GPUs (NCCL) with GERE_TEST_ACCELERATOR=cuda
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR=os.environ.get("GERE_TEST_ACCELERATOR", "cpu"),
               TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_hostfile(path: Path, n_nodes: int, slots: int = 1) -> Path:
    assert n_nodes <= len(LOOPBACK_HOSTS)
    path.write_text("".join(f"{h} slots={slots}\n" for h in LOOPBACK_HOSTS[:n_nodes]))
    return path


@dataclass
class NodeResult:
    node_rank: int
    returncode: int
    output: str
    seconds: float


def clean_shm(port: int) -> None:
    """Remove the shared-memory all-reduce buffers of the job on ``port`` (ours only)."""
    for f in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"):
        try:
            os.remove(f)
        except OSError:
            pass


def run_nodes(script: str | Path, node_args: list[list[str]], workdir: Path,
              gpus_per_node: int = 1, timeout: float = 600, port: int | None = None,
              master_addr: str = "127.0.0.1",
              launcher_extra: list[str] | None = None) -> list[NodeResult]:
    """Start one launcher per entry of ``node_args`` concurrently; wait for all of them."""
    n = len(node_args)
    port = port or free_port()
    hostfile = write_hostfile(workdir / f"hostfile_{port}", n, gpus_per_node)
    procs, logs, starts = [], [], []
    for r, args in enumerate(node_args):
        cmd = [DEEPSPEED, "--hostfile", str(hostfile), "--no_ssh", "--num_nodes", str(n),
               "--num_gpus", str(gpus_per_node), "--node_rank", str(r), "--master_addr",
               master_addr, "--master_port", str(port), *(launcher_extra or []), str(script),
               *args]
        log = open(workdir / f"node{r}_{port}.log", "w+")  # noqa: SIM115 - closed below
        logs.append(log)
        starts.append(time.monotonic())
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=ds_env(), stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True))
    results = []
    deadline = time.monotonic() + timeout
    try:
        for r, p in enumerate(procs):
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)  # the launcher we started and its ranks
                p.wait()
            logs[r].seek(0)
            results.append(NodeResult(r, p.returncode, logs[r].read(),
                                      time.monotonic() - starts[r]))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for log in logs:
            log.close()
        clean_shm(port)
    return results


def run_one(script: str | Path, args: list[str], nproc: int, timeout: float = 600,
            extra: list[str] | None = None) -> NodeResult:
    """`deepspeed --num_gpus nproc --master_port P [extra] script args` (one launcher)."""
    port = free_port()
    cmd = [DEEPSPEED, "--num_gpus", str(nproc), "--master_port", str(port), *(extra or []),
           str(script), *args]
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, cwd=REPO, env=ds_env(), capture_output=True, text=True,
                           timeout=timeout, check=False)
    finally:
        clean_shm(port)
    return NodeResult(0, p.returncode, p.stdout + p.stderr, time.monotonic() - t0)


def our_lines(output: str) -> list[str]:
    """The lines gere-ds printed (not DeepSpeed's own '[date] [INFO]' log lines)."""
    return [ln for ln in output.splitlines() if ln.startswith("preflight")]
