"""Progress with an ETA: a tqdm bar on a terminal, plain periodic lines elsewhere (Slurm logs,
pipes), where tqdm's carriage-return redraws would fill the file with one giant line."""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, TextIO

EVERY_S = 30.0  # a plain line at least this often ...
EVERY_FRACTION = 0.10  # ... or every 10 % of the work, whichever comes first


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"


class PlainProgress:
    """tqdm's small interface (update, set_postfix, write, close) as periodic one-line reports:
    ``desc: n/total (p %), elapsed, ETA, postfix``."""

    def __init__(self, total: int, desc: str, initial: int = 0, file: TextIO | None = None,
                 every_s: float = EVERY_S, every_fraction: float = EVERY_FRACTION,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.desc, self.n = total, desc, initial
        self.file = file or sys.stdout
        self.every_s, self.every_fraction, self.clock = every_s, every_fraction, clock
        self.start = clock()
        self.start_n = initial
        self.last_t, self.last_n = self.start, initial
        self.postfix = ""

    def line(self) -> str:
        elapsed = self.clock() - self.start
        done = self.n - self.start_n
        pct = f" ({100 * self.n / self.total:.0f} %)" if self.total else ""
        eta = (f", ETA {_clock(elapsed / done * (self.total - self.n))}"
               if done > 0 and self.total else "")
        post = f", {self.postfix}" if self.postfix else ""
        return f"{self.desc}: {self.n}/{self.total}{pct}, {_clock(elapsed)} elapsed{eta}{post}"

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        step = max(1, int(self.total * self.every_fraction)) if self.total else 0
        due = (now - self.last_t >= self.every_s or (step and self.n - self.last_n >= step)
               or (self.total and self.n >= self.total and self.last_n < self.total))
        if n and due:
            self.last_t, self.last_n = now, self.n
            print(self.line(), file=self.file, flush=True)

    def set_postfix(self, values: dict[str, Any], refresh: bool = False) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def write(self, text: str, file: TextIO | None = None) -> None:
        print(text, file=file or self.file, flush=True)

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, initial: int = 0, file: TextIO | None = None) -> Any:
    """A tqdm bar when ``file`` (stdout) is a terminal, else :class:`PlainProgress`."""
    file = file or sys.stdout
    if getattr(file, "isatty", lambda: False)():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, initial=initial, dynamic_ncols=True, file=file,
                    mininterval=1.0)
    return PlainProgress(total, desc, initial, file)
