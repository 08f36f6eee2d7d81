"""Progress of fedkim's long loops (site training, injection, evaluation, data generation): one helper for all.

    with Progress("site-a training", total=120, logger=log, bar=progress) as bar:
        for ...:
            bar.advance(description=f"epoch {e}/{n} loss {loss:.3f}")

Where a bar is allowed (`bar=True`) and stderr is a terminal, a rich progress bar shows the count, the
description and the time left. Elsewhere (a pipe, a CI log, a Prefect worker's log) the same progress is written
as INFO log records on the caller's logger (a name under "fedkim"), throttled: a line when another `every` of the
total is done or `seconds` have passed since the last one. In both cases one line is logged when the loop ends.
The log records reach a console only where the application shows fedkim's INFO records (the flows do).

Concurrent loops (sites trained in threads) share one rich display. While it is live, a record that the root
logger's handlers print would be written across the bar: the display is cleared before such a record and
redrawn after it, so log lines and bars do not overwrite each other.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import threading
import time
from typing import Callable


class Progress:
    """A count of `total` steps (None: unknown) with a description, shown as a bar or logged; a context manager."""

    def __init__(self, label: str, total: int | None, *, logger: logging.Logger | str, bar: bool = False,
                 every: float = 0.1, seconds: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.label, self.total = label, total
        self.logger = logging.getLogger(logger) if isinstance(logger, str) else logger
        self.every, self.seconds, self.clock = every, seconds, clock
        self.done, self.description = 0, ""
        self.started = self.last_time = clock()
        self.last_done = 0
        self.closed = False
        self.task = _DISPLAY.add(label, total) if bar and _is_terminal() else None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind, error, trace) -> None:
        self.close(failed=error is not None)

    def update(self, description: str) -> None:
        """Change the description without counting a step (say, the item about to be worked on)."""
        self.description = description
        if self.task is not None:
            _DISPLAY.update(self.task, description=self._text())

    def advance(self, steps: int = 1, description: str | None = None) -> None:
        self.done += steps
        if description is not None:
            self.description = description
        if self.task is not None:
            _DISPLAY.update(self.task, advance=steps, description=self._text())
            return
        if self.total is not None and self.done >= self.total:
            return  # the closing line reports it
        step = max(1, math.ceil((self.total or 0) * self.every))
        now = self.clock()
        if (self.total is not None and self.done - self.last_done >= step) or now - self.last_time >= self.seconds:
            self.last_done, self.last_time = self.done, now
            self.logger.info("%s", self.line(now))

    def close(self, failed: bool = False) -> None:
        """Remove the bar and log the closing line (once)."""
        if self.closed:
            return
        self.closed = True
        if self.task is not None:
            _DISPLAY.remove(self.task)
        now = self.clock()
        if failed:
            self.logger.info("%s: stopped at %s after %s", self.label, self._count(), _clock(now - self.started))
        else:
            self.logger.info("%s: %s done in %s%s", self.label, self._count(), _clock(now - self.started),
                             f", {self.description}" if self.description else "")

    def line(self, now: float) -> str:
        """A log line: label, count and share, description, time elapsed and, with a known total, time left."""
        elapsed = now - self.started
        text = f"{self.label}: {self._count()}" + (f" {self.description}" if self.description else "")
        text += f", {_clock(elapsed)} elapsed"
        if self.total and self.done:
            text += f", ETA {_clock(elapsed / self.done * (self.total - self.done))}"
        return text

    def _count(self) -> str:
        if not self.total:
            return str(self.done)
        return f"{self.done}/{self.total} ({100 * self.done // self.total}%)"

    def _text(self) -> str:
        return f"{self.label} {self.description}".strip()


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


class _Display:
    """The process's one rich display of every bar: shown with the first bar, gone with the last."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.bars = None  # a rich Progress: the bars' state, drawn by `live`
        self.live = None
        self.guards: list[_Guard] = []
        self.printing = 0  # log records being printed now: the bars stay cleared until the last is out

    def add(self, label: str, total: int | None):
        with self.lock:
            if self.bars is None:
                from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                           TimeElapsedColumn, TimeRemainingColumn)

                self.bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
                self.guards, self.printing = [_Guard(self.pause), _Guard(self.resume)], 0
                # Clear the bars before the handlers that print, draw them again after. A new list, never the
                # one changed in place: another thread may be going through it with a record.
                root = logging.getLogger()
                root.handlers = [self.guards[0], *root.handlers, self.guards[1]]
                self.show()
            return self.bars.add_task(label, total=total)

    def update(self, task, **changes) -> None:
        with self.lock:
            self.bars.update(task, **changes)

    def remove(self, task) -> None:
        with self.lock:
            self.bars.remove_task(task)
            if self.bars.tasks:
                return
            self.hide()
            root = logging.getLogger()
            root.handlers = [h for h in root.handlers if h not in self.guards]
            self.bars, self.guards = None, []

    def show(self) -> None:
        from rich.console import Console
        from rich.live import Live

        # A fresh Live each time: one that was stopped would erase, when restarted, the lines printed meanwhile.
        self.live = Live(self.bars, console=Console(stderr=True), transient=True, refresh_per_second=4)
        self.live.start(refresh=True)

    def hide(self) -> None:
        if self.live is not None:
            self.live.stop()  # transient: the bars are erased
            self.live = None

    def pause(self) -> None:
        with self.lock:
            self.printing += 1
            self.hide()

    def resume(self) -> None:
        with self.lock:
            self.printing = max(0, self.printing - 1)
            if self.bars is not None and not self.printing and self.live is None:
                self.show()


class _Guard(logging.Handler):
    """A root-logger handler that only runs an action (clear or redraw the bars) around the printing handlers."""

    def __init__(self, action: Callable[[], None]):
        super().__init__()
        self.action = action

    def emit(self, record: logging.LogRecord) -> None:
        self.action()


_DISPLAY = _Display()


def log_to_console(level: int = logging.INFO) -> None:
    """Print fedkim's progress records on stderr: for command-line tools and pipeline stages, which configure no
    logging of their own. Where the application already handles log records (the flows through Prefect's
    handlers, a test's capture), only the level is set. Idempotent."""
    logger = logging.getLogger("fedkim")
    logger.setLevel(level)
    if logging.getLogger().handlers or any(getattr(h, "fedkim_console", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    handler.fedkim_console = True
    logger.addHandler(handler)


class PhaseTimer:
    """Wall seconds per named phase of a round (`with timer("inject"): ...`), for the round summary and the
    orchestration benchmark's breakdown. A phase entered twice adds up."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = round(self.seconds.get(phase, 0.0) + time.perf_counter() - started, 2)
