"""Progress when stdout is not a terminal: plain periodic lines with an ETA, no redraws."""
from __future__ import annotations

import io

from gere_ds.monitoring.progress_bar import PlainProgress, progress_bar


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_not_a_terminal_gives_plain_lines_every_ten_percent_with_eta():
    out, clock = io.StringIO(), Clock()
    bar = PlainProgress(50, "task 1/2 boolq", file=out, clock=clock)
    for _ in range(50):
        clock.t += 2.0
        bar.update(1)
    bar.set_postfix({"loss": "0.5"})
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) == 10  # every 5 of 50 steps (10 %), no more
    assert lines[0] == "task 1/2 boolq: 5/50 (10 %), 00:10 elapsed, ETA 01:30"
    assert lines[-1] == "task 1/2 boolq: 50/50 (100 %), 01:40 elapsed, ETA 00:00"


def test_slow_work_reports_every_thirty_seconds_and_resumed_work_counts_from_its_start():
    out, clock = io.StringIO(), Clock()
    bar = PlainProgress(1000, "teacher pass", initial=400, file=out, clock=clock)
    bar.set_postfix({"run": "400/1000"})
    clock.t = 31.0
    bar.update(1)
    clock.t = 40.0
    bar.update(1)  # neither 30 s nor 10 % since the last line
    lines = out.getvalue().splitlines()
    assert lines == ["teacher pass: 401/1000 (40 %), 00:31 elapsed, ETA 5:09:29, run=400/1000"]


def test_a_pipe_gets_plain_progress_and_a_terminal_gets_tqdm():
    assert isinstance(progress_bar(3, "x", file=io.StringIO()), PlainProgress)

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    bar = progress_bar(3, "x", file=Tty())
    assert type(bar).__name__ == "tqdm"
    bar.close()


def test_run_logger_progress_is_plain_when_stdout_is_captured(tmp_path, capsys):
    from gere_ds.monitoring.run_log import RunLogger

    log = RunLogger(tmp_path, enabled=True)
    log.progress(4, "task 1/1 a")
    for _ in range(4):
        log.advance(1)
    log.info("done")
    log.close()
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("task 1/1 a: 1/4 (25 %)") and out[3].startswith("task 1/1 a: 4/4")
    assert out[-1].endswith("] done")
