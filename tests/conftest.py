"""Shared fixtures: the tiny real setup (GPT-2 tokenizer, 2-layer Llama, 2 tasks, replay set)
and a helper that runs scripts under the real `deepspeed` launcher with CPU ranks over gloo."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dist_scripts.launchers import ds_env, free_port  # noqa: E402,F401  (one copy of each)

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def run_deepspeed(script: str | Path, args: list[str], nproc: int = 2, timeout: int = 600,
                  extra: list[str] | None = None, env: dict[str, str] | None = None
                  ) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus nproc script args...` with a free port; output captured; ``env``
    adds variables. The job runs in its own process group (session), so a test hook that kills
    the whole job (``GERE_DS_KILL_AT``) kills nothing else."""
    port = free_port()
    # bench/gpu_check.sh on a 1-GPU machine: NCCL needs one device per rank
    nproc = min(nproc, int(os.environ.get("GERE_TEST_RANKS", nproc)))
    cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(port),
           *(extra or []), str(script), *args]
    try:
        return subprocess.run(cmd, cwd=REPO, env={**ds_env(), **(env or {})},
                              capture_output=True, text=True, timeout=timeout,
                              start_new_session=True)
    finally:
        # only this job's shm buffers (named after its master port): other DeepSpeed jobs on
        # the machine keep theirs
        for f in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"):
            try:
                os.remove(f)
            except OSError:
                pass


LOSS_KEYS = ("global_step", "task", "epoch", "step_in_task", "train/loss", "train/task_ce",
             "train/replay_ce", "train/tm", "train/lr", "train/grad_norm")


def step_losses(run_dir: Path) -> list[dict]:
    """The step log's progress and loss columns (no timings): equal across interrupted and
    uninterrupted runs of the same config."""
    rows = [json.loads(x) for x in (run_dir / "train_steps.jsonl").read_text().splitlines()]
    return [{k: r.get(k) for k in LOSS_KEYS} for r in rows]


def run_python(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=ds_env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir(tmp_path_factory) -> Path:
    from gere_assets.tiny import gpt2_tokenizer_files

    return gpt2_tokenizer_files(tmp_path_factory.mktemp("gpt2_tokenizer"))


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory) -> dict[str, str]:
    from gere_assets.tiny import make_tiny_assets

    return make_tiny_assets(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def tiny_config(tiny_paths, tmp_path):
    """Factory: write a tiny run config (with dict updates) and return its path."""
    from gere_assets.tiny import tiny_config_dict

    def make(strategy: str = "tm", name: str = "cfg", **sections) -> Path:
        cfg = tiny_config_dict(tiny_paths, str(tmp_path / f"run_{name}"), strategy)
        for key, value in sections.items():
            if isinstance(value, dict):
                cfg.setdefault(key, {}).update(value)
            else:
                cfg[key] = value
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    return make
