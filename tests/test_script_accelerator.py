"""launch/demo.sh and scripts/test.sh choose CPU ranks only where no CUDA device is visible."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _accelerator_lines(script: str) -> str:
    """The script's lines from its DS_ACCELERATOR choice (the export line before it included)."""
    lines = (REPO / script).read_text().splitlines()
    first = next(i for i, ln in enumerate(lines) if "OMP_NUM_THREADS" in ln)
    last = max(i for i, ln in enumerate(lines) if "DS_ACCELERATOR" in ln)
    return "\n".join(lines[first:last + 1])


@pytest.mark.parametrize("script", ["launch/demo.sh", "scripts/test.sh"])
@pytest.mark.parametrize("cuda", [True, False])
def test_cpu_accelerator_only_without_a_cuda_device(tmp_path, script, cuda):
    venv = tmp_path / ".venv" / "bin"
    venv.mkdir(parents=True)
    python = venv / "python"  # answers torch.cuda.is_available() as this machine would
    python.write_text(f"#!/bin/sh\nexit {0 if cuda else 1}\n")
    python.chmod(0o755)
    body = f"set -euo pipefail\nunset DS_ACCELERATOR\n{_accelerator_lines(script)}\n" \
           'echo "accelerator=${DS_ACCELERATOR:-auto}"\n'
    out = subprocess.run(["bash", "-c", body], cwd=tmp_path, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip().splitlines()[-1] == ("accelerator=auto" if cuda else "accelerator=cpu")
