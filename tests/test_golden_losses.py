"""Pinned per-step losses of short real runs (tiny model, fp32, real `deepspeed` launches, one
per rank count running tm, kl, l1 and l2 one after another): any change to the maths of a loss
term, a reduction, the teacher data, the data order or the optimizer shows up here.

The tolerance allows fp32 summation order (other kernels, other thread counts), nothing more.
After an intended change of the maths, re-pin the values from the failure message."""
from __future__ import annotations

import json

import pytest

from conftest import REPO, run_deepspeed

pytestmark = pytest.mark.slow

REL, ABS = 1e-4, 1e-6
# 2 tasks x 3 optimizer steps, one replay row in every global batch
STEPS = ["train.max_steps_per_task=3", "replay.per_batch=1", "eval.enabled=false"]

# per rank count: strategy -> logged train/loss and train/<strategy> of each optimizer step
GOLDEN: dict[int, dict[str, dict[str, list[float]]]] = {
    1: {
        "tm": {
            "loss": [10.77606, 10.49697, 10.12585, 10.59667, 10.27428, 9.941607],
            "term": [0, 0.3795282, 0.4441655, 0.4384046, 0.6434075, 0.6814688],
        },
        "kl": {
            "loss": [10.77606, 10.40239, 9.997829, 10.33407, 10.03982, 9.717422],
            "term": [5.560136e-07, 0.00118545, 0.002854083, 0.002909831, 0.002787983, 0.00341357],
        },
        "l1": {
            "loss": [10.77634, 10.53882, 10.15795, 10.55902, 10.34212, 10.00962],
            "term": [0.001135789, 0.5456987, 0.628933, 0.4997716, 0.9761749, 1.003361],
        },
        "l2": {
            "loss": [10.77606, 10.50656, 10.11305, 10.63137, 10.41142, 10.08103],
            "term": [2.841491e-06, 0.4179195, 0.3933034, 0.5573744, 1.200537, 1.171899],
        },
    },
    2: {
        "tm": {
            "loss": [10.84549, 10.29583, 9.914076, 10.45979, 10.01363, 9.667325],
            "term": [0, 0.4161793, 0.3931657, 0.4284081, 0.6009914, 0.7025268],
        },
        "kl": {
            "loss": [10.84549, 10.24397, 9.851255, 10.3355, 9.922585, 9.552079],
            "term": [6.581484e-07, 0.001251323, 0.002410901, 0.002741634, 0.002660444, 0.003438416],
        },
        "l1": {
            "loss": [10.84563, 10.31317, 9.93358, 10.44759, 10.05593, 9.698959],
            "term": [0.001106599, 0.5313559, 0.5797387, 0.4524184, 0.9136698, 0.976122],
        },
        "l2": {
            "loss": [10.84549, 10.30169, 9.907335, 10.46248, 10.0631, 9.747705],
            "term": [2.630106e-06, 0.4633464, 0.3384997, 0.4330757, 1.004893, 1.358941],
        },
    },
}


@pytest.mark.parametrize("ranks", [1, 2])
def test_per_step_losses_are_pinned(tiny_config, tmp_path, ranks):
    results = tmp_path / "golden"
    cfg = tiny_config("tm", name=f"golden{ranks}")
    proc = run_deepspeed(REPO / "tests/dist_scripts/golden_losses.py",
                         ["--config", str(cfg), "--results", str(results), *STEPS],
                         nproc=ranks, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads((results / "golden.json").read_text())
    want = GOLDEN[ranks]
    assert set(got) == set(want) == {"tm", "kl", "l1", "l2"}
    for strategy, values in want.items():
        for key, pinned in values.items():
            assert got[strategy][key] == pytest.approx(pinned, rel=REL, abs=ABS), \
                (ranks, strategy, key, got[strategy][key])
    for strategy in want:  # the runs are not trivial: the term bites after the first step
        assert any(v > 0 for v in got[strategy]["term"][1:]), (strategy, got[strategy])
