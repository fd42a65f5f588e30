"""A non-finite micro-step under ZeRO-2 and ZeRO-3 in bf16 (real 2-rank DeepSpeed runs on
CPU): the ranks agree to skip the optimizer step, which leaves the fp32 master weights and the
Adam moments bit-identical, writes no checkpoint, and the next step trains on finite losses."""
from __future__ import annotations

import json
import math

import pytest

from conftest import REPO, run_deepspeed

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("ds_json", ["zero3.json", "zero2.json"])
def test_a_nan_micro_step_leaves_the_master_weights_bit_identical(tiny_config, tmp_path, ds_json):
    cfg = tiny_config("replay", name=f"nan_{ds_json[:5]}", replay={"per_batch": 2},
                      eval={"enabled": False}, deepspeed=str(REPO / "ds_configs" / ds_json),
                      train={"bf16": True, "warmup_steps": 0, "max_steps_per_task": 4},
                      checkpoint={"every_steps": 1, "keep_last": 5})
    out = tmp_path / "report.json"
    proc = run_deepspeed(REPO / "tests/dist_scripts/nonfinite_step.py",
                         ["--config", str(cfg), "--out", str(out)], nproc=2, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    good, bad, after = json.loads(out.read_text())
    assert math.isfinite(good["loss"]) and not good["unchanged"] and good["applied"]
    # NaN on rank 0's first micro-step only: both ranks skip
    assert math.isnan(bad["loss"])
    assert bad["unchanged"], "the non-finite step reached the fp32 master weights"
    assert bad["skipped"] and not bad["applied"]
    assert bad["bad_in_a_row"] == 1
    assert bad["checkpoints"] == good["checkpoints"] == ["task001-step000001"]
    assert math.isfinite(after["loss"]) and not after["unchanged"] and after["applied"]
    assert after["bad_in_a_row"] == 0 and "task001-step000003" in after["checkpoints"]
