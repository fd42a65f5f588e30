"""N nodes train the same model as one, on one machine.

The tiny 2-task TM job (3 optimizer steps per task, 2 replay rows per global batch) runs as
  (a) one launcher with 2 ranks (the reference),
  (b) two launchers `--no_ssh --num_nodes 2 --num_gpus 1 --node_rank 0/1` started concurrently,
      rendezvousing over the loopback interface (gloo over TCP, as between machines),
  (c) launch/slurm_train.sh on 2 simulated nodes (fake srun/scontrol/scancel), pre-empted after
      its first step (SIGTERM to the batch shell), then run again as the re-queued job would.
Per-step losses (train_steps.jsonl, written by rank 0) and metrics.json must be identical.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from dist_scripts.launchers import (
    REPO,
    clean_shm,
    ds_env,
    free_port,
    run_nodes,
    run_one,
)

TRAIN = REPO / "launch" / "train.py"
FAKE_SLURM = Path(__file__).parent / "dist_scripts" / "fake_slurm"
# wall-clock rates differ between runs; everything else must match exactly
TIMING_KEYS = ("train/tokens_per_s",)


def _steps(run_dir: Path) -> list[dict]:
    rows = [json.loads(ln) for ln in (run_dir / "train_steps.jsonl").read_text().splitlines()
            if ln.strip()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def _metrics(run_dir: Path) -> dict | None:
    path = run_dir / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


@pytest.fixture(scope="module")
def job(tiny_paths, tmp_path_factory):
    """The job's config file and the reference run (one launcher, 2 ranks)."""
    from gere_assets.tiny import tiny_config_dict

    root = tmp_path_factory.mktemp("multinode")
    cfg = tiny_config_dict(tiny_paths, str(root / "unused"), "tm")
    cfg["train"]["max_steps_per_task"] = 3
    cfg["replay"]["per_batch"] = 2
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    ref = root / "one_launcher"
    t0 = time.monotonic()
    r = run_one(TRAIN, ["--config", str(path), f"output_dir={ref}"], nproc=2, timeout=900)
    assert r.returncode == 0, r.output[-4000:]
    steps = _steps(ref)
    assert len(steps) == 2 * 3  # 2 tasks x max_steps_per_task
    assert any(s["train/replay_ce"] > 0 for s in steps)  # replay rows were in the batches
    assert any(s["train/tm"] > 0 for s in steps)
    return {"config": path, "root": root, "ref": ref, "seconds": time.monotonic() - t0}


@pytest.mark.slow
def test_two_nodes_train_like_one(job, tmp_path):
    out = tmp_path / "two_launchers"
    t0 = time.monotonic()
    nodes = run_nodes(TRAIN, [["--config", str(job["config"]), f"output_dir={out}"]] * 2,
                      tmp_path, gpus_per_node=1, timeout=900)
    seconds = time.monotonic() - t0
    for node in nodes:
        assert node.returncode == 0, f"node {node.node_rank}:\n{node.output[-4000:]}"
    # the two launchers really formed one 2-rank world across 2 "nodes"
    assert "nnodes=2, num_local_procs=1, node_rank=1" in nodes[1].output

    assert _steps(out) == _steps(job["ref"])  # losses, TM terms, grad norms, lr: identical
    assert _metrics(out) == _metrics(job["ref"])  # None == None if the trainer writes none
    print(f"\none launcher x 2 ranks: {job['seconds']:.1f} s; two launchers x 1 rank: "
          f"{seconds:.1f} s; {len(_steps(out))} steps equal; metrics.json "
          f"{'equal' if _metrics(out) is not None else 'not written'}")


def _slurm_env(tmp_path: Path, port: int) -> dict[str, str]:
    env = ds_env()
    env.update(PATH=f"{FAKE_SLURM}:{env['PATH']}", FAKE_SLURM_DIR=str(tmp_path / "slurm"),
               SLURM_JOB_ID="4242", SLURM_JOB_NAME="gere-ds", SLURM_NNODES="2",
               SLURM_JOB_NODELIST="localhost,127.0.0.1", SLURM_SUBMIT_DIR=str(REPO),
               GERE_ACCELERATOR="cpu", RANKS_PER_NODE="1", OMP_NUM_THREADS="1",
               GERE_VENV=str(Path(sys.executable).parents[1]),
               LOG_DIR=str(tmp_path / "logs"), NODE_TMP=str(tmp_path / "node_tmp"),
               MASTER_PORT=str(port))
    (tmp_path / "node_tmp").mkdir(exist_ok=True)
    return env


def _kill_steps(tmp_path: Path) -> None:
    """Timeout clean-up: the node tasks the fake srun started (their process groups)."""
    steps = tmp_path / "slurm" / "steps"
    for f in steps.iterdir() if steps.is_dir() else []:
        try:
            os.killpg(int(f.name), signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_slurm_recipe_preempted_and_requeued_trains_like_one(job, tmp_path):
    out = tmp_path / "slurm_run"
    port = free_port()
    env = _slurm_env(tmp_path, port)
    cmd = ["bash", str(REPO / "launch" / "slurm_train.sh"), str(job["config"]),
           f"output_dir={out}"]
    steps_file = out / "train_steps.jsonl"
    batch = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 600
        while not (steps_file.is_file() and steps_file.stat().st_size) \
                and batch.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        batch.send_signal(signal.SIGTERM)  # what `#SBATCH --signal=B:TERM@120` sends
        first, _ = batch.communicate(timeout=600)
    finally:
        if batch.poll() is None:
            batch.kill()
        _kill_steps(tmp_path)
        clean_shm(port)
    logs = "\n".join(p.read_text() for p in sorted((tmp_path / "logs").glob("*.log")))
    assert batch.returncode == 0, first + logs[-4000:]
    assert "pre-emption notice" in first and "re-queueing 4242" in first, first
    assert (tmp_path / "slurm" / "requeued").read_text().split() == ["4242"]
    assert "preflight: all checks passed on 2 rank(s)" in logs  # ran before training
    assert sorted(p.name for p in (tmp_path / "logs").glob("*.log")) == [
        "gere-ds-4242-node0.log", "gere-ds-4242-node1.log"]  # one log per node
    stopped = [ln for ln in (out / "train.log").read_text().splitlines() if "pre-empted" in ln]
    assert stopped, "the ranks did not stop at a checkpoint"
    assert len(_steps(out)) < len(_steps(job["ref"]))

    # the re-queued job: same script, same arguments; resume: auto continues
    env.update(SLURM_RESTART_COUNT="1", PREFLIGHT="0")
    try:
        again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                               timeout=900, check=False)
    finally:
        _kill_steps(tmp_path)
        clean_shm(port)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "training finished (exit 0)" in again.stdout
    assert "resumed from" in (out / "train.log").read_text()
    assert _steps(out) == _steps(job["ref"])
    assert _metrics(out) == _metrics(job["ref"])
    print(f"\n{stopped[0].split('] ', 1)[-1]}; re-queued run resumed; "
          f"{len(_steps(out))} steps equal to the one-launcher run")
