"""Progress on stderr for runs that take a while: a rich bar that appears after about a second, only on a
terminal and never with --quiet, and is erased when the run ends (stdout stays the report alone)."""

from __future__ import annotations

import sys
import threading

DELAY = 1.0  # seconds before the bar appears: quick runs never show it


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
