"""bench/gpu_check.sh: what can be checked without a GPU (its steps, the throughput script)."""
from __future__ import annotations

import json
import subprocess

import pytest

from conftest import REPO, run_python


def test_dry_run_lists_install_every_config_resume_evaluation_and_export():
    """The dry run prints every step and makes no CUDA call (it passes here, without one)."""
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    # a fresh box: the build tools from the folder first, then nothing fetched or isolated
    assert "--no-index --find-links wheels setuptools wheel" in out
    assert "--no-index --find-links wheels --no-build-isolation gere-ds[test]" in out
    assert "GERE_TEST_ACCELERATOR" not in out and "(NCCL)" in out
    for name, ds in (("auto", "auto"), ("zero2", "ds_configs/zero2_gpu.json"),
                     ("zero3", "ds_configs/zero3_gpu.json")):
        assert f"== {name}: {ds} on <GPUs> cuda rank(s)" in out
        assert f"GERE_DS_KILL_AT='a micro-step:5:0'" in out
        for mode in ("rank", "generate"):
            assert f"gpu_check/{name}/eval_{mode} eval.mode={mode}" in out
        assert f"launch/export.py {REPO}/.cache/gpu_check/{name}/run --task 2" in out
    assert "tests/test_train_dist.py::test_two_rank_evaluation_equals_one_process" in out
    assert "bench/gpu_throughput.py --steps 20" in out


def test_build_folder_carries_the_build_tools():
    script = (REPO / "bench" / "gpu_check.sh").read_text()
    assert "pip wheel -q --no-deps --no-build-isolation -r" in script  # sdists arrive built
    assert "pip download -q --no-deps setuptools wheel" in script


@pytest.mark.slow
def test_cpu_mode_runs_the_whole_path_and_writes_its_json(tmp_path):
    """`--cpu` on `deepspeed: auto`: bf16 on 2 CPU ranks, killed and resumed, both evaluation
    modes on 2 ranks, export; every field of the JSON filled (GPU memory aside)."""
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--cpu", "--configs", "auto",
                           "--work", str(tmp_path / "work"), "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    report = json.loads(out.read_text())
    assert report["ok"] and report["environment"]["accelerator"] == "cpu"
    auto = report["configs"]["auto"]
    assert auto["stage"] == 2 and "ZeRO-2 model states" in auto["why"]  # the tiny model fits
    assert auto["killed_rc"] == -9 and auto["resumed"] and auto["resume_equal"]
    assert auto["step1_tm"] == 0.0 and auto["step1_violating_frac"] is not None
    assert len(auto["tm_by_step"]) == 6  # 2 tasks x 3 steps, the resumed run's log
    assert auto["tokens_per_s_mean"] > 0 and len(auto["peak_host_gib_per_rank"]) == 2
    assert auto["checkpoint_save_s"] and all(b > 0 for b in auto["checkpoint_bytes"].values())
    for mode in ("rank", "generate"):
        assert auto[f"evaluate_{mode}"]["rc"] == 0 and len(auto[f"evaluate_{mode}"]["matrix"]) == 3
    assert auto["export"]["rc"] == 0 and auto["export"]["bytes"] > 0


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
