"""One round id runs once at a time: a lock object in the artifact store, taken before a round opens its MLflow
parent run and released when the round ends, fails or raises (the CLI, `run_round` and the Prefect flow alike).

The lock is `locks/rounds/<round id>.json`, created only when absent (`ArtifactStore.create_marker`: O_EXCL-style
on a LocalStore, a conditional PUT on S3). It records who holds it (owner, pid, host) and since when. A second
trigger of the same round id is refused with the holder's name (`federation.round_lock.mode: refuse`, the
default) or waits for it (`wait`). A lock older than `stale_after_s`, or one whose holder was a process on this
host that no longer exists (a crash), is broken with a warning; breaking goes through a marker created the same
way, so that two processes breaking one stale lock do not both take it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

from pydantic import Field, model_validator

from fedkim.params_base import Strict

LOCK_PREFIX = "locks/rounds"
BREAK_TIMEOUT_S = 60.0  # breaking a lock takes a few store requests; a break marker older than this was abandoned
log = logging.getLogger(__name__)


class RoundLockParams(Strict):
    """`federation.round_lock`: what a second trigger of a round id that is running does. A plain `refuse` or
    `wait` sets the mode only."""

    mode: Literal["refuse", "wait"] = Field("refuse", description="refuse: stop with the holder's name; wait: "
                                                                   "wait for the holder to finish (up to wait_s)")
    stale_after_s: float = Field(86400.0, gt=0, description="a lock older than this is taken as left by a crash "
                                                            "and broken (longer than the longest round)")
    wait_s: float = Field(6 * 3600.0, ge=0, description="wait mode: give up after this long")
    poll_s: float = Field(5.0, gt=0, description="wait mode: look again after this long")

    @model_validator(mode="before")
    @classmethod
    def _mode_only(cls, value: Any) -> Any:
        return {"mode": value} if isinstance(value, str) else value


class RoundLockedError(RuntimeError):
    """Another run holds the round id's lock (or its lock object cannot be read)."""


@dataclass(frozen=True)
class Holder:
    round_id: str
    token: str
    owner: str
    pid: int
    host: str
    since: float

    def describe(self) -> str:
        who = f"{self.owner}, " if self.owner else ""
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since))
        return f"{who}pid {self.pid} on {self.host}, since {started}"

    def crashed(self) -> bool:
        """Held by a process of this host that is gone. (Another host's holder can only go stale by age.)"""
        if self.host != socket.gethostname() or self.pid == os.getpid():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except OSError:  # exists, but not ours to signal
            return False
        return False


def lock_key(round_id: str) -> str:
    return f"{LOCK_PREFIX}/{round_id}.json"


def read_holder(store, round_id: str) -> Holder | None:
    """Who holds the round's lock; None when nobody does. An unreadable lock object is never taken as free."""
    raw = store.read_marker(lock_key(round_id))
    if raw is None:
        return None
    try:
        fields = json.loads(raw)
        holder = Holder(**{k: fields[k] for k in Holder.__dataclass_fields__})
        if not (isinstance(holder.since, (int, float)) and isinstance(holder.pid, int)):
            raise TypeError("since / pid are not numbers")
        return holder
    except (ValueError, TypeError, KeyError) as exc:
        raise RoundLockedError(
            f"round {round_id}: the lock object {store.uri(lock_key(round_id))} is not a fedkim round lock ({exc}); "
            f"if no run of this round is going on, delete it and start the round again") from None


def _break_stale(store, holder: Holder, why: str) -> None:
    """Remove a stale lock. Only the process that creates the break marker for this very holder removes it, and
    only while the lock still names that holder: a lock taken meanwhile by someone else stays."""
    marker = f"{LOCK_PREFIX}/{holder.round_id}.broken-{holder.token}"
    if not store.create_marker(marker, json.dumps({"pid": os.getpid(), "at": time.time()}).encode()):
        with contextlib.suppress(ValueError, TypeError, KeyError):  # a breaker that crashed midway: clear it
            if time.time() - json.loads(store.read_marker(marker) or b"{}")["at"] > BREAK_TIMEOUT_S:
                store.delete_marker(marker)
        return
    try:
        current = read_holder(store, holder.round_id)
        if current is not None and current.token == holder.token:
            store.delete_marker(lock_key(holder.round_id))
            log.warning("round %s: broke the stale lock of %s (%s)", holder.round_id, holder.describe(), why)
    finally:
        store.delete_marker(marker)


def try_lock(store, round_id: str, owner: str, stale_after_s: float) -> tuple[Holder | None, Holder | None]:
    """One attempt: (ours, None) when taken, (None, holder) when someone else holds it. A stale lock is broken
    and the attempt made again."""
    for _ in range(3):
        mine = Holder(str(round_id), uuid.uuid4().hex, owner, os.getpid(), socket.gethostname(), time.time())
        if store.create_marker(lock_key(round_id), json.dumps(asdict(mine), sort_keys=True).encode()):
            return mine, None
        holder = read_holder(store, round_id)
        if holder is None:  # released between our attempt and the read: try again
            continue
        age = time.time() - holder.since
        if age > stale_after_s:
            _break_stale(store, holder, f"{age:.0f} s old, above federation.round_lock.stale_after_s "
                                        f"{stale_after_s:.0f} s")
        elif holder.crashed():
            _break_stale(store, holder, "its process no longer exists")
        else:
            return None, holder
    return None, read_holder(store, round_id)


def release(store, mine: Holder) -> None:
    """Remove our lock, unless it is no longer ours (broken as stale and taken by someone else)."""
    try:
        current = read_holder(store, mine.round_id)
    except RoundLockedError as exc:  # replaced by something unreadable: leave it, and the round's own outcome
        log.warning("%s", exc)
        return
    if current is not None and current.token == mine.token:
        store.delete_marker(lock_key(mine.round_id))
    else:
        log.warning("round %s: our lock was broken while the round ran (now held by %s)", mine.round_id,
                    current.describe() if current else "nobody")


@contextlib.contextmanager
def round_lock(store, round_id: str, settings: RoundLockParams | None = None, *,
               owner: str = "") -> Iterator[Holder]:
    """Hold the round id's lock while the block runs (released however the block ends). `owner` names the run,
    e.g. the Prefect flow run; pid and host are added. Raises RoundLockedError naming the round and the holder."""
    settings = settings or RoundLockParams()
    deadline = time.monotonic() + (settings.wait_s if settings.mode == "wait" else 0.0)
    while True:
        mine, holder = try_lock(store, round_id, owner, settings.stale_after_s)
        if mine is not None:
            break
        if time.monotonic() >= deadline:
            waited = f" after waiting {settings.wait_s:.0f} s" if settings.mode == "wait" else ""
            who = holder.describe() if holder else "another run"
            hint = "federation.round_lock.wait_s" if settings.mode == "wait" else "federation.round_lock: wait"
            raise RoundLockedError(f"round {round_id} is already running{waited}: held by {who} "
                                   f"(lock {store.uri(lock_key(round_id))}); wait for it to end, or set {hint}")
        log.info("round %s is held by %s; waiting", round_id, holder.describe() if holder else "another run")
        time.sleep(max(0.01, min(settings.poll_s, deadline - time.monotonic())))
    try:
        yield mine
    finally:
        release(store, mine)
