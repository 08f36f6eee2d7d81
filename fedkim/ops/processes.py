"""Processes and loopback services of the served stack: start detached, wait until ready, stop a whole tree.

A process is known by its pid and its start time (clock ticks from /proc), so that a pid reused by another
process is never taken for it. Standard library only.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path

HOST = "127.0.0.1"


class StackError(RuntimeError):
    """The stack cannot start or stop; the message names the service, its port and its log file."""


def write_private(path: Path, payload: dict) -> None:
    """JSON readable by its owner only (it holds the S3 secret): created 0600, replaced atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(payload, out, indent=2)
    os.chmod(tmp, 0o600)  # an older tmp file may have had other modes
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- processes
def _proc_stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, session id, start time in clock ticks) from /proc; None when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return fields[0], int(fields[1]), int(fields[3]), int(fields[19])


def start_ticks(pid: int) -> int | None:
    stat = _proc_stat(pid)
    return stat[3] if stat else None


def alive(pid: int, ticks: int | None = None) -> bool:
    """Is this very process still running: same pid and, when known, same start time (pids get reused)?"""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)  # reap it when it is our own child, or it lingers as a zombie
    if Path("/proc").is_dir():
        stat = _proc_stat(pid)
        return stat is not None and stat[0] not in ("Z", "X") and (ticks is None or stat[3] == ticks)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def descendants(pid: int, ticks: int | None = None) -> list[tuple[int, int]]:
    """(pid, start ticks) of every process below `pid` (children, theirs, ...) and of every process still in
    its session (helpers orphaned when it died), found through /proc; [] where there is no /proc."""
    if not Path("/proc").is_dir():
        return []
    children: dict[int, list[int]] = {}
    stats: dict[int, tuple[str, int, int, int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        stat = _proc_stat(int(entry.name))
        if stat is not None:
            stats[int(entry.name)] = stat
            children.setdefault(stat[1], []).append(int(entry.name))
    if pid in stats and ticks is not None and stats[pid][3] != ticks:
        return []  # the pid now belongs to another process: neither its children nor its session are ours
    found = {p for p, s in stats.items()  # same session, started after the leader: not a reused session id
             if s[2] == pid and p != pid and (ticks is None or s[3] >= ticks)}
    todo = list(children.get(pid, [])) if alive(pid, ticks) else []
    todo += list(found)
    while todo:
        child = todo.pop()
        found.add(child)
        todo.extend(c for c in children.get(child, []) if c not in found)
    return sorted((p, stats[p][3]) for p in found if p in stats)


def stop_processes(entries: Iterable[dict], grace_s: float) -> list[int]:
    """SIGTERM each recorded process and everything below it (flow-run processes sit in sessions of their
    own), SIGKILL what is left after grace_s. Returns the pids that survived even that."""
    targets: list[tuple[int, int | None]] = []
    for entry in entries:
        root = [(entry["pid"], entry.get("ticks"))] if alive(entry["pid"], entry.get("ticks")) else []
        targets += root + descendants(entry["pid"], entry.get("ticks"))
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        for pid, ticks in targets:
            if alive(pid, ticks):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while any(alive(p, t) for p, t in targets) and time.monotonic() < deadline:
            time.sleep(0.1)
    return [p for p, t in targets if alive(p, t)]


def find_executable(name: str, package: str) -> str:
    # The venv's own bin first: the stack runs the versions the project pins, whatever PATH says.
    local = Path(sys.executable).parent / name
    found = str(local) if local.is_file() else shutil.which(name)
    if not found:
        raise StackError(f"`{name}` not found next to {sys.executable} or on PATH; install {package} "
                         f"(scripts/setup.sh does)")
    return found


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "    (no log written)"
    return "\n".join("    " + line for line in text[-lines:]) or "    (log empty)"


_PROCS: dict[int, subprocess.Popen] = {}  # started by this process: the exit codes of the short-lived ones


def launch(name: str, cmd: list[str], env: dict[str, str], logs: Path, cwd: Path, **extra) -> dict:
    """Start a detached process: a session of its own, so that a terminal's Ctrl-C or hang-up leaves it alone
    and its helpers can be found. Output goes to logs/<name>.log; the previous one is kept as <name>.log.1."""
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    if log.exists():
        os.replace(log, log.with_name(log.name + ".1"))
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=cwd, start_new_session=True)
    _PROCS[proc.pid] = proc
    return {"pid": proc.pid, "ticks": start_ticks(proc.pid), "cmd": [Path(cmd[0]).name, *cmd[1:]],
            "log": str(log), **extra}


def run_to_end(what: str, entry: dict, timeout_s: float) -> None:
    """Wait for a short-lived command started by launch; fail with its log when it fails or hangs."""
    try:
        code = _PROCS[entry["pid"]].wait(timeout_s)
    except subprocess.TimeoutExpired:
        stop_processes([entry], grace_s=2)
        raise StackError(f"{what} did not finish in {timeout_s:.0f} s; see its log {entry['log']}") from None
    if code != 0:
        raise StackError(f"{what} failed with exit code {code}; its log {entry['log']} ends with:\n"
                         f"{log_tail(Path(entry['log']))}")


# ------------------------------------------------------------------------------------------------- network
def port_in_use(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR: a port left in TIME_WAIT by an earlier run is free for a server; a listener is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback never goes via a proxy


def http_request(url: str, *, data: dict | None = None, timeout: float = 5.0) -> tuple[int, str]:
    request = urllib.request.Request(url, method="GET" if data is None else "POST",
                                     data=None if data is None else json.dumps(data).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with _DIRECT.open(request, timeout=timeout) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def tcp_open(port: int) -> bool:
    with socket.create_connection((HOST, port), timeout=2):
        return True


def wait_ready(what: str, check: Callable[[], bool], entry: dict, timeout_s: float) -> None:
    """Poll `check` until it holds; fail as soon as the process died, with the tail of its log."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(OSError, ValueError):
            if check():
                return
        if not alive(entry["pid"], entry.get("ticks")):
            raise StackError(f"{what} exited before it was ready; its log {entry['log']} ends with:\n"
                             f"{log_tail(Path(entry['log']))}")
        if time.monotonic() > deadline:
            raise StackError(f"{what} not ready after {timeout_s:.0f} s (raise --timeout on a slow machine); "
                             f"its log {entry['log']} ends with:\n{log_tail(Path(entry['log']))}")
        time.sleep(0.5)
