"""The progress helper: throttled log lines off a terminal, a bar and one closing line on it."""

import logging

import pytest

from fedkim import progress as progress_module
from fedkim.progress import Progress


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def messages(caplog, name: str = "fedkim.test") -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == name]


def test_log_lines_every_tenth_with_counts_and_a_closing_line(caplog):
    caplog.set_level(logging.INFO, logger="fedkim")
    clock = Clock()
    with Progress("work", 20, logger="fedkim.test", bar=True, clock=clock) as bar:  # stderr is no terminal here
        for i in range(20):
            clock.now += 1.0
            bar.advance(description=f"loss {1 / (i + 1):.2f}")
    lines = messages(caplog)
    assert len(lines) == 10  # at 2, 4, ..., 18 of 20, then the closing line
    assert lines[0] == "work: 2/20 (10%) loss 0.50, 0:00:02 elapsed, ETA 0:00:18"
    assert lines[8].startswith("work: 18/20 (90%) loss 0.06")
    assert lines[-1] == "work: 20/20 (100%) done in 0:00:20, loss 0.05"


def test_a_slow_loop_logs_every_so_many_seconds(caplog):
    caplog.set_level(logging.INFO, logger="fedkim")
    clock = Clock()
    with Progress("slow", 1000, logger="fedkim.test", seconds=30, clock=clock) as bar:
        for _ in range(5):
            clock.now += 31.0
            bar.advance()
    lines = messages(caplog)
    assert [line.split(",")[0] for line in lines[:5]] == [f"slow: {i}/1000 (0%)" for i in range(1, 6)]
    assert "ETA 8:36:09" in lines[0] and lines[-1] == "slow: 5/1000 (0%) done in 0:02:35"


def test_every_item_and_an_unknown_total(caplog):
    caplog.set_level(logging.INFO, logger="fedkim")
    clock = Clock()
    with Progress("tasks", 3, logger="fedkim.test", every=0, clock=clock) as bar:
        for task in ("a", "b", "c"):
            bar.update(task)
            bar.advance()
    with Progress("files", None, logger="fedkim.test", seconds=0, clock=clock) as bar:
        bar.advance()
    assert messages(caplog) == ["tasks: 1/3 (33%) a, 0:00:00 elapsed, ETA 0:00:00",
                                "tasks: 2/3 (66%) b, 0:00:00 elapsed, ETA 0:00:00",
                                "tasks: 3/3 (100%) done in 0:00:00, c",
                                "files: 1, 0:00:00 elapsed", "files: 1 done in 0:00:00"]


def test_an_interrupted_loop_says_where_it_stopped(caplog):
    caplog.set_level(logging.INFO, logger="fedkim")
    with pytest.raises(RuntimeError):
        with Progress("work", 10, logger="fedkim.test") as bar:
            bar.advance(3)
            raise RuntimeError("boom")
    assert messages(caplog)[-1] == "work: stopped at 3/10 (30%) after 0:00:00"


def test_on_a_terminal_a_bar_instead_of_lines_and_the_log_handlers_restored(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="fedkim")
    monkeypatch.setattr(progress_module, "_is_terminal", lambda: True)
    root = logging.getLogger()
    handlers = list(root.handlers)
    with Progress("a", 30, logger="fedkim.test", bar=True) as a, Progress("b", 30, logger="fedkim.test", bar=True) as b:
        assert len(root.handlers) == len(handlers) + 2  # the guards that clear and redraw the bars around a record
        for _ in range(30):
            a.advance(description="x")
            b.advance()
            logging.getLogger("fedkim.other").info("a line between the bars")
    assert root.handlers == handlers and progress_module._DISPLAY.bars is None
    assert messages(caplog) == ["b: 30/30 (100%) done in 0:00:00", "a: 30/30 (100%) done in 0:00:00, x"]


def test_a_command_line_process_prints_progress_lines_once_on_stderr():
    import subprocess
    import sys

    script = ("import logging\n"
              "from fedkim.progress import Progress, log_to_console\n"
              "log_to_console(); log_to_console()\n"
              "with Progress('stage', 4, logger='fedkim.stage', every=0) as bar:\n"
              "    for i in range(4): bar.advance(description=f'item {i}')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "stage:" in line]
    assert len(lines) == 4 and "item 0" in lines[0] and "done in" in lines[-1]  # one handler, not two
    assert done.stdout == ""
