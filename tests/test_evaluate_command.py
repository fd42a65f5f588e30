"""`gere-ds evaluate --run`: each task-end export is deleted once scored unless --keep-exports."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from gere_ds.commands import evaluate as ev


class FakeSuite:
    def __init__(self, *args, **kwargs) -> None:
        self.seen: list[str] = []

    def evaluate(self, scorer, tokenizer, device=None):
        assert Path(scorer).is_dir()  # scored while the folder still exists
        return SimpleNamespace(row=lambda: [50.0, 40.0], general={}, accuracy={"a": 50.0})


@pytest.fixture
def fake_scoring(monkeypatch):
    import gere_ds.model.engine as engine
    import gere_ds.evaluation.scoring as scoring

    monkeypatch.setattr(scoring, "EvalSuite", FakeSuite)
    monkeypatch.setattr(engine, "build_eval_engine", lambda cfg, log: SimpleNamespace(
        scorer=lambda: cfg.model, tokenizer=None))


def _cfg():
    tasks = [SimpleNamespace(name="a"), SimpleNamespace(name="b")]
    train = SimpleNamespace(seed=0, max_source_len=8, max_target_len=2, truncate_source="tail")
    return SimpleNamespace(tasks=tasks, eval=None, train=train, model="")


@pytest.mark.parametrize("keep", [False, True])
def test_exports_are_deleted_after_scoring_unless_kept(tmp_path, fake_scoring, keep):
    base, exports = tmp_path / "base", [tmp_path / "hf" / f"task00{i}-end" for i in (1, 2)]
    for folder in (base, *exports):
        folder.mkdir(parents=True)
    models = [("base", str(base))] + [(f"after task {i}", str(f)) for i, f in enumerate(exports)]
    args = ev.parse_args(["--config", "c.yaml", "--run", "r", "--out", str(tmp_path)] +
                         (["--keep-exports"] if keep else []))
    assert args.keep_exports is keep
    delete = frozenset() if keep else frozenset(str(f) for f in exports)
    ev.evaluate_models(_cfg(), models, tmp_path / "out", delete)
    assert base.is_dir()  # the base model is never an export
    assert all(f.is_dir() == keep for f in exports)
    assert (tmp_path / "out" / "metrics.json").is_file()
