"""Measurement-only wrapper around gere-ds' launch/train.py, run under the deepspeed launcher by
bench/bench_peer.py: on every rank it times the teacher pass (ContinualTrainer.prepare_teacher)
and each optimizer step (ContinualTrainer.optimizer_step, with the step's global token count),
and records the peak RSS (VmHWM) at each phase. Training itself is unchanged.

Writes ``$PROBE_OUT/probe_rank<r>.json``.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
T0 = time.time()
OUT = Path(os.environ["PROBE_OUT"])
RANK = int(os.environ.get("RANK", "0"))
RECORD: dict = {"rank": RANK, "phases": {}, "steps": []}


def _hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _mark(name: str) -> None:
    RECORD["phases"][name] = {"t": round(time.time() - T0, 3), "hwm": _hwm()}


def _install() -> None:
    import gere_ds.training.trainer as trainer

    cls = trainer.ContinualTrainer
    setup, teacher, step = cls.setup, cls.prepare_teacher, cls.optimizer_step

    def timed_setup(self, *a, **k):
        _mark("setup_start")
        out = setup(self, *a, **k)
        _mark("setup_end")
        return out

    def timed_teacher(self, *a, **k):
        _mark("teacher_start")
        t = time.perf_counter()
        out = teacher(self, *a, **k)
        RECORD["teacher_s"] = round(time.perf_counter() - t, 3)
        _mark("teacher_end")
        return out

    def timed_step(self, *a, **k):
        t = time.perf_counter()
        values, lr = step(self, *a, **k)
        RECORD["steps"].append({"step": self.progress.global_step,
                                "dt": round(time.perf_counter() - t, 4),
                                "tokens": float(values["tokens"]), "hwm": _hwm()})
        return values, lr

    cls.setup, cls.prepare_teacher, cls.optimizer_step = timed_setup, timed_teacher, timed_step


def main() -> None:
    _install()
    from gere_ds.commands.train import main as train_main

    sys.argv = [str(REPO / "launch" / "train.py")] + sys.argv[1:]
    rc = 1
    try:
        rc = train_main()
    finally:
        _mark("end")
        RECORD["rc"] = rc
        RECORD["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / f"probe_rank{RANK}.json").write_text(json.dumps(RECORD, indent=1))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)  # as launch/train.py: skip the process group's at-exit teardown


if __name__ == "__main__":
    main()
