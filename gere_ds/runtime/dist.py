"""Rank/world helpers and collective wrappers that also work in a single plain process."""
from __future__ import annotations

import datetime
import logging
import os
import sys
from typing import Any, NoReturn

import torch
import torch.distributed as tdist


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return tdist.get_world_size() if is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")


def launched() -> bool:
    """Whether a launcher (deepspeed, torchrun, Slurm's srun through them) set up this process."""
    return any(name in os.environ for name in LAUNCHER_VARIABLES)


def single_rank_environment() -> None:
    """A world of one on this host, for a process started without a launcher: DeepSpeed would
    otherwise look for MPI. The port is one the system has just handed out."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def exit_process(code: int = 0) -> NoReturn:
    """End this process once its work is done and every rank passed its last barrier, without
    interpreter teardown: the process group's at-exit hooks occasionally abort with -6
    ("terminate called without an active exception") after all work is done, which a scheduler
    would count as a failed job. Logs and standard streams are flushed first."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code or 0))


def init(timeout_s: float = 1800.0) -> None:
    """Start the process group through DeepSpeed (gloo on CPU, NCCL on GPU).

    The timeout bounds every collective, so a dead rank makes the others fail instead of
    hanging forever.
    """
    if is_initialized():
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    import deepspeed

    deepspeed.init_distributed(timeout=datetime.timedelta(seconds=timeout_s))
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cuda":
        torch.cuda.set_device(local_rank())
    global _host_group
    if tdist.get_backend() != "gloo":  # every rank creates it here, in the same order
        _host_group = tdist.new_group(backend="gloo",
                                      timeout=datetime.timedelta(seconds=timeout_s))


# a gloo group over the same ranks when the main backend is a device one (NCCL): host flags
# agree over it without a device copy, so the GPU's launch queue is never drained for them
_host_group: Any = None


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    return torch.device(name, local_rank()) if name == "cuda" else torch.device(name)


def barrier() -> None:
    if is_initialized():
        tdist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (identity in one process); returns the tensor."""
    if is_initialized() and world_size() > 1:
        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if is_initialized() and world_size() > 1:
        tdist.all_reduce(tensor, op=tdist.ReduceOp.MAX)
    return tensor


def all_gather_object(obj: Any) -> list[Any]:
    if not is_initialized() or world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_initialized() or world_size() == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def any_rank_host(flag: bool) -> bool:
    """``any_rank`` over host memory (the gloo group; the default group when it is gloo)."""
    if not is_initialized() or world_size() == 1:
        return flag
    if _host_group is None and tdist.get_backend() != "gloo":
        return any_rank(flag)  # the process group was started elsewhere: no host group
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX, group=_host_group)
    return bool(t.item())


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on at least one rank."""
    t = torch.tensor([1.0 if flag else 0.0], device=device() if is_initialized() else "cpu")
    return bool(all_reduce_max(t).item() > 0)
