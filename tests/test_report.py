"""A 2-task matrix gives metrics.json / metrics.md / accuracy_matrix.png and TensorBoard events."""
from __future__ import annotations

import glob
import json
import os

import pytest

from gere_ds.evaluation.report import log_to_tensorboard, write_report

TASKS = ["yelp", "amazon"]
MATRIX = [[20.0, 30.0], [80.0, 45.0], [70.0, 90.0]]
GENERAL = {"mmlu": [60.0, 58.0, 55.0], "ppl": [12.0, 13.0, 14.5]}


def test_write_report(tmp_path):
    res = write_report(str(tmp_path / "run"), TASKS, MATRIX, GENERAL)
    files = sorted(os.listdir(tmp_path / "run"))
    assert files == ["accuracy_matrix.png", "forgetting_curve.png", "metrics.json",
                     "metrics.md"]  # no temp leftovers
    data = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert data == json.loads(json.dumps(res))
    assert data["tasks"] == TASKS and data["matrix"] == MATRIX
    assert data["row_labels"] == ["base", "after yelp", "after amazon"]
    assert data["AP"] == pytest.approx(80.0)
    assert data["BWT"] == pytest.approx(-10.0)
    assert data["FWT"] == pytest.approx(15.0)
    assert data["forgetting"] == pytest.approx(10.0)
    assert data["general"] == GENERAL
    assert data["general_final"] == {"mmlu": 55.0, "ppl": 14.5}
    assert data["F1_general"] == "mmlu"
    assert data["F1"] == pytest.approx(2 * 55 * 80 / 135)
    md = (tmp_path / "run" / "metrics.md").read_text()
    assert "| after yelp | 80.00 | 45.00 |" in md
    assert "| base | 20.00 | 30.00 |" in md
    assert "| BWT | -10.00 |" in md and "| F1 (mmlu, AP) | 65.19 |" in md
    assert "| after amazon | 55.00 | 14.50 |" in md
    png = (tmp_path / "run" / "accuracy_matrix.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_partial_report(tmp_path):
    data = write_report(str(tmp_path), TASKS, MATRIX[:2], {"mmlu": [60.0, 58.0]}, plot=False)
    assert data["completed_tasks"] == 1 and data["BWT"] is None
    md = (tmp_path / "metrics.md").read_text()
    assert "1 of 2 tasks" in md and "| BWT | - |" in md
    assert json.loads((tmp_path / "metrics.json").read_text())["forgetting"] is None


def test_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "tb"))
    log_to_tensorboard(writer, TASKS, MATRIX, GENERAL)
    writer.close()
    assert glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "images": 0,
                                                                "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    assert [e.step for e in acc.Scalars("eval/yelp/acc")] == [0, 1, 2]
    assert [e.value for e in acc.Scalars("eval/amazon/acc")] == [30.0, 45.0, 90.0]
    assert [e.value for e in acc.Scalars("general/mmlu")] == [60.0, 58.0, 55.0]
    ap = acc.Scalars("eval/AP")
    assert len(ap) == 1 and ap[0].step == 2 and ap[0].value == pytest.approx(80.0)
    for key in ("eval/BWT", "eval/FWT", "eval/forgetting", "eval/F1"):
        assert key in tags["scalars"]
    assert "eval/accuracy_matrix" in tags["images"]
    assert any(t.startswith("eval/metrics") for t in tags["tensors"])  # add_text


def test_tensorboard_last_row_only(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    log_to_tensorboard(writer, TASKS, MATRIX[:1], {"mmlu": [60.0]}, rows="last")
    log_to_tensorboard(writer, TASKS, MATRIX[:2], {"mmlu": [60.0, 58.0]}, rows="last")
    writer.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("eval/yelp/acc")] == [0, 1]
    assert "eval/BWT" not in acc.Tags()["scalars"]  # undefined with one task learned
