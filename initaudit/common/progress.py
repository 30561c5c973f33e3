"""Progress on stderr for runs that take a while, the one owner of both bars: over the models of a run
(`Progress`, appearing after about a second, never with --quiet) and over one model's bytes (`byte_bar`, for
large models). Only on a terminal, erased when done: stdout stays the report alone."""

from __future__ import annotations

import contextlib
import sys
import threading
from typing import Callable, Iterator

DELAY = 1.0  # seconds before the bar appears: quick runs never show it
PROGRESS_BYTES = 256 << 20  # a byte bar (on a terminal) for models at least this large


class Progress:
    """`with Progress(total, enabled) as progress: progress.step(label)` before each model."""

    def __init__(self, total: int, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self._bar = self._task = self._timer = None
        self._lock = threading.Lock()
        self._started = False
        self.total = total

    def __enter__(self) -> "Progress":
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._bar = Bar(SpinnerColumn(), TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=Console(stderr=True), transient=True)
            self._task = self._bar.add_task("auditing", total=self.total)
            self._timer = threading.Timer(DELAY, self._start)
            self._timer.daemon = True
            self._timer.start()
        return self

    def _start(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.start()
                self._started = True

    def step(self, label: str, done: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=label, completed=done)

    def __exit__(self, *exc) -> None:
        if self._timer is not None:
            self._timer.cancel()
        with self._lock:
            if self._started:
                self._bar.stop()
            self._bar = None


@contextlib.contextmanager
def byte_bar(total: int) -> Iterator[Callable[[int], None]]:
    """An `advance(nbytes)` callable for one model's `total` bytes: a rich bar on stderr when it is a terminal
    and the model is large, else a no-op."""
    if total < PROGRESS_BYTES or not sys.stderr.isatty():
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress as Bar, TransferSpeedColumn

    bar = Bar("auditing", BarColumn(), DownloadColumn(), TransferSpeedColumn(), console=Console(stderr=True),
              transient=True)
    task = bar.add_task("audit", total=total)
    bar.start()
    try:
        yield lambda n: bar.advance(task, n)
    finally:
        bar.stop()
