"""train/tokens_per_s covers every step of its logging window."""
from __future__ import annotations

from gere_ds.training.progress import TokenWindow


def test_tokens_per_s_counts_every_step_of_the_window():
    window = TokenWindow(start=100.0)
    for _ in range(10):  # log_every 10: ten steps of 500 tokens in 5 s
        window.add(500.0)
    assert window.rate(105.0) == 1000.0  # not 100 (one step's tokens over the window)
    window.add(300.0)  # the next window starts at the log line
    assert window.rate(106.0) == 300.0


def test_the_trainer_logs_the_window_rate():
    """The training loop feeds every step into the window (not the last step alone)."""
    import inspect

    from gere_ds.training.trainer import ContinualTrainer

    source = inspect.getsource(ContinualTrainer.train_task)
    assert "window.add(values[\"tokens\"])" in source and "window.rate(" in source
