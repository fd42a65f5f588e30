"""TensorBoard and W&B reporting: evaluation at the global step, hparams with the final metrics,
the forgetting curve (run and compare), W&B offline."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from gere_ds.evaluation.report import log_hparams, log_to_tensorboard, write_report

NAMES = ["a", "b"]
MATRIX = [[50.0, 40.0], [80.0, 45.0], [60.0, 90.0]]
GENERAL = {"mmlu": [30.0, 29.0, 28.0]}


def _events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"images": 10, "scalars": 100})
    acc.Reload()
    return acc


def test_eval_scalars_at_the_global_step_figures_and_hparams(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    for rows, step in ((MATRIX[:2], 7), (MATRIX, 19)):
        log_to_tensorboard(writer, NAMES, rows, {"mmlu": GENERAL["mmlu"][:len(rows)]},
                           rows="last", global_step=step)
    results = log_to_tensorboard(writer, NAMES, MATRIX, GENERAL, rows="last")
    log_hparams(writer, {"strategy": "tm", "lr": 1e-5, "betas": [0.9, 0.99]}, results)
    writer.close()
    acc = _events(tmp_path)
    by_step = {e.step: e.value for e in acc.Scalars("eval_step/b/acc")}
    assert by_step == {7: 45.0, 19: 90.0}
    assert {e.step for e in acc.Scalars("eval/b/acc")} == {1, 2}  # the row index, as before
    assert [e.value for e in acc.Scalars("general_step/mmlu")] == [29.0, 28.0]
    assert "eval/forgetting_curve" in acc.Tags()["images"]
    hp = _events(tmp_path)  # add_hparams writes into the same folder (run_name=".")
    plugins = hp.PluginTagToContent("hparams")
    assert plugins, "no hparams summary"
    assert any(t == "final/AP" for t in hp.Tags()["scalars"])


def test_forgetting_curve_written_by_the_report_and_by_compare(tmp_path, capsys):
    from gere_ds.commands.compare import main as compare

    for name in ("r1", "r2"):
        (tmp_path / name).mkdir()
        write_report(str(tmp_path / name), NAMES, MATRIX, GENERAL)
        png = tmp_path / name / "forgetting_curve.png"
        assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5000
    assert compare([str(tmp_path / "r1"), str(tmp_path / "r2"), "--out",
                    str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "compare_forgetting.png").stat().st_size > 5000


def test_forgetting_figure_has_one_line_per_task():
    from gere_ds.evaluation.report import forgetting_figure

    fig = forgetting_figure(NAMES, MATRIX)
    ax = fig.axes[0]
    labelled = [ln.get_label() for ln in ax.get_lines() if not ln.get_label().startswith("_")]
    assert labelled == NAMES
    solid_b = [ln for ln in ax.get_lines() if ln.get_label() == "b"][0]
    assert list(solid_b.get_ydata()) == [90.0]  # b is trained by the last row


def test_report_to_names_are_checked(tmp_path):
    from gere_ds.config.loading import load_config
    from gere_ds.errors import InputError

    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: m\noutput_dir: o\ntasks: [{name: a, train: a.jsonl, labels: [x, y]}]\n"
                   "replay: {data: r.jsonl}\nreport_to: [tensorboard, wandbb]\n")
    with pytest.raises(InputError, match=r"c.yaml:5: report_to.1: unknown reporter 'wandbb'"):
        load_config(cfg)


def test_wandb_offline_run_gets_the_scalars(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from gere_ds.monitoring.run_log import RunLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = RunLogger(tmp_path, enabled=True, report_to=["tensorboard", "wandb"],
                    config={"replay": {"strategy": "tm"}})
    log.scalars({"train/loss": 1.5}, 1)
    log.external({"eval/a/acc": 60.0}, 2)
    log.wandb.summary({"final/AP": 61.0})
    log.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    (record,) = runs[0].glob("run-*.wandb")  # the offline record a later `wandb sync` uploads
    assert (tmp_path / "wandb_run_id").read_text().strip() in record.name
    keys = (b"train/loss", b"eval/a/acc", b"final/AP", b"strategy")
    deadline = time.time() + 60  # wandb's service process may still be flushing after finish()
    while True:
        data = record.read_bytes()  # protobuf keeps the keys as plain strings
        if all(k in data for k in keys) or time.time() > deadline:
            break
        time.sleep(0.5)
    for key in keys:
        assert key in data, key
