"""bench/gpu_check.sh: what can be checked without a GPU (its steps, the throughput script)."""
from __future__ import annotations

import json
import subprocess

from conftest import REPO, run_python


def test_dry_run_lists_install_nccl_subset_and_throughput():
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "--no-index --find-links wheels gere-ds[test]" in out
    assert "GERE_TEST_ACCELERATOR" not in out and "(NCCL," in out
    assert "tests/test_train_dist.py::test_two_rank_evaluation_equals_one_process" in out
    assert "bench/gpu_throughput.py --steps 20" in out


def test_throughput_script_runs_on_the_cpu_and_prints_its_fields():
    proc = run_python(["bench/gpu_throughput.py", "--cpu"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tokens_per_s"] > 0 and result["steps"] == 3 and result["device"] == "cpu"
    assert set(result) >= {"mfu", "peak_memory_gib", "parameters"}


def test_peak_table_gives_mfu_for_known_gpus(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_throughput",
                                                  REPO / "bench" / "gpu_throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.delenv("GPU_PEAK_TFLOPS", raising=False)
    assert mod.peak_tflops("NVIDIA H200") == 989.0 and mod.peak_tflops("Mystery") is None
    monkeypatch.setenv("GPU_PEAK_TFLOPS", "100")
    assert mod.peak_tflops("Mystery") == 100.0
