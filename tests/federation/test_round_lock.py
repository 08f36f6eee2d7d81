"""One round id runs once at a time: the store's create-if-absent markers (LocalStore; S3 on moto, which enforces
If-None-Match, and on `rclone serve s3`, which ignores it) and the round lock built on them."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
import uuid

import pytest

from fedkim.federation.store import LocalStore, S3Store
from fedkim.round_lock import RoundLockedError, RoundLockParams, lock_key, read_holder, round_lock
from tests.helpers import REPO
from tests.helpers.servers import moto_server, rclone_s3_server

FAKE_AWS = {"AWS_ACCESS_KEY_ID": "fedkimtestkey", "AWS_SECRET_ACCESS_KEY": "fedkimtestsecret",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "FEDKIM_S3_ENDPOINT_URL")


@pytest.fixture(scope="module")
def aws_env(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        for name in UNSET:
            mp.delenv(name, raising=False)
        for name, value in FAKE_AWS.items():
            mp.setenv(name, value)
        nowhere = tmp_path_factory.mktemp("aws") / "none"
        mp.setenv("AWS_CONFIG_FILE", str(nowhere))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(nowhere))
        yield


@pytest.fixture(scope="module")
def moto_endpoint(aws_env):
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def rclone_endpoint(aws_env, tmp_path_factory):
    folder = tmp_path_factory.mktemp("rclone")
    (folder / "bkt").mkdir()
    with rclone_s3_server(folder, FAKE_AWS["AWS_ACCESS_KEY_ID"], FAKE_AWS["AWS_SECRET_ACCESS_KEY"]) as endpoint:
        yield endpoint


@pytest.fixture(params=["local", "moto", "rclone"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    if request.param == "moto":
        return S3Store(f"t-{uuid.uuid4().hex[:12]}", prefix="proj", create_bucket=True,
                       endpoint_url=request.getfixturevalue("moto_endpoint"))
    return S3Store("bkt", prefix=f"p{uuid.uuid4().hex[:8]}", endpoint_url=request.getfixturevalue("rclone_endpoint"))


def race(n: int, action) -> list:
    """`action(i)` in n threads released at once; their results in thread order."""
    barrier, results = threading.Barrier(n), [None] * n

    def run(i):
        barrier.wait()
        results[i] = action(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


# ------------------------------------------------------------------------------------------ the primitive
def test_conditional_writes_are_enforced_by_moto_and_ignored_by_rclone(moto_endpoint, rclone_endpoint):
    moto = S3Store(f"t-{uuid.uuid4().hex[:12]}", endpoint_url=moto_endpoint, create_bucket=True)
    rclone = S3Store("bkt", prefix="probe", endpoint_url=rclone_endpoint)
    assert moto._enforces_conditional_writes() is True
    assert rclone._enforces_conditional_writes() is False  # so its markers go through claims
    assert moto.list() == [] and rclone.list() == []  # the probe leaves nothing behind


def test_create_marker_has_exactly_one_winner(store):
    results = race(8, lambda i: store.create_marker("locks/rounds/7.json", f"writer {i}".encode()))
    assert results.count(True) == 1
    winner = results.index(True)
    assert store.read_marker("locks/rounds/7.json") == f"writer {winner}".encode()
    assert store.create_marker("locks/rounds/7.json", b"late") is False  # an existing marker is never replaced
    assert store.read_marker("locks/rounds/7.json") == f"writer {winner}".encode()
    store.delete_marker("locks/rounds/7.json")
    assert store.read_marker("locks/rounds/7.json") is None and store.create_marker("locks/rounds/7.json", b"x")


def test_markers_are_not_keys_of_a_local_store(tmp_path):
    store = LocalStore(tmp_path / "store")
    assert store.create_marker("locks/rounds/1.json", b"{}")
    assert store.list() == [] and not store.exists("locks/rounds/1.json")
    assert sorted(p.name for p in (tmp_path / "store" / "locks" / "rounds").iterdir()) == ["1.json"]  # no temp


# ------------------------------------------------------------------------------------------ the round lock
def test_a_second_trigger_is_refused_naming_the_round_and_the_holder(store):
    with round_lock(store, "7", owner="prefect flow run abc") as mine:
        assert read_holder(store, "7") == mine
        with pytest.raises(RoundLockedError, match=r"round 7 is already running: held by prefect flow run abc, "
                                                   r"pid \d+ on .*set federation.round_lock: wait"):
            with round_lock(store, "7"):
                pytest.fail("entered a held round")
        with round_lock(store, "8"):  # another round id is not held up
            pass
    assert read_holder(store, "7") is None  # released


def test_the_lock_is_released_when_the_round_fails(tmp_path):
    store = LocalStore(tmp_path / "store")
    with pytest.raises(ZeroDivisionError):
        with round_lock(store, "1"):
            1 / 0
    assert store.read_marker(lock_key("1")) is None


def test_concurrent_triggers_run_once(store, request):
    inside, overlaps = [], []

    def trigger(i):
        try:
            with round_lock(store, "3", owner=f"trigger {i}"):
                inside.append(i)
                overlaps.append(len(inside))
                time.sleep(0.5)
                inside.remove(i)
            return "ran"
        except RoundLockedError as exc:
            return str(exc)

    results = race(4, trigger)
    assert max(overlaps) == 1  # never two holders at once
    refused = [r for r in results if r != "ran"]
    assert all(r.startswith("round 3 is already running") for r in refused), refused
    if "rclone" in request.node.name:  # claims retry with pauses: a late one may run after the first ended
        assert results.count("ran") >= 1
    else:
        assert results.count("ran") == 1


def test_wait_mode_waits_for_the_holder_then_gives_up_after_wait_s(tmp_path):
    store = LocalStore(tmp_path / "store")
    released = threading.Event()

    def hold():
        with round_lock(store, "1", owner="first"):
            time.sleep(0.6)
        released.set()

    holder = threading.Thread(target=hold)
    holder.start()
    time.sleep(0.2)
    with pytest.raises(RoundLockedError, match="already running after waiting 0 s: held by first"):
        with round_lock(store, "1", RoundLockParams(mode="wait", wait_s=0.1, poll_s=0.05)):
            pass
    with round_lock(store, "1", RoundLockParams(mode="wait", wait_s=30, poll_s=0.05), owner="second") as mine:
        assert released.is_set() and mine.owner == "second"
    holder.join()


def test_a_crashed_holders_lock_is_broken_with_a_warning(tmp_path, caplog):
    store = LocalStore(tmp_path / "store")
    crash = ("import os, sys\nfrom fedkim.federation.store import LocalStore\n"
             "from fedkim.round_lock import round_lock\n"
             "with round_lock(LocalStore(sys.argv[1]), '5', owner='crashing run'):\n    os._exit(3)")
    done = subprocess.run([sys.executable, "-c", crash, str(tmp_path / "store")], cwd=REPO, timeout=120)
    assert done.returncode == 3
    left = read_holder(store, "5")
    assert left is not None and left.owner == "crashing run"  # the crash left its lock behind
    with caplog.at_level(logging.WARNING, logger="fedkim.round_lock"):
        with round_lock(store, "5", owner="next run") as mine:
            assert mine.owner == "next run"
    assert f"broke the stale lock of crashing run, pid {left.pid}" in caplog.text
    assert "its process no longer exists" in caplog.text


def test_a_lock_older_than_the_stale_timeout_is_broken(store, caplog):
    old = {"round_id": "2", "token": "t0", "owner": "lost run", "pid": 1, "host": "other-host",
           "since": time.time() - 1000}
    assert store.create_marker(lock_key("2"), json.dumps(old).encode())
    with pytest.raises(RoundLockedError, match="held by lost run, pid 1 on other-host"):
        with round_lock(store, "2", RoundLockParams(stale_after_s=10_000)):
            pass
    with caplog.at_level(logging.WARNING, logger="fedkim.round_lock"):
        with round_lock(store, "2", RoundLockParams(stale_after_s=100)):
            assert read_holder(store, "2").owner == ""
    assert "broke the stale lock of lost run" in caplog.text and "above federation.round_lock.stale_after_s" \
        in caplog.text
    assert read_holder(store, "2") is None


def test_an_unreadable_lock_is_reported_and_left_alone(tmp_path):
    store = LocalStore(tmp_path / "store")
    store.create_marker(lock_key("4"), b"not json")
    with pytest.raises(RoundLockedError, match=r"round 4: the lock object .*locks/rounds/4.json is not a fedkim "
                                               r"round lock.*delete it"):
        with round_lock(store, "4"):
            pass
    assert store.read_marker(lock_key("4")) == b"not json"


def test_round_lock_settings_accept_a_plain_mode():
    from fedkim.config import ConfigError, FederationParams

    assert FederationParams().round_lock == RoundLockParams(mode="refuse")
    assert FederationParams(round_lock="wait").round_lock.mode == "wait"
    with pytest.raises((ValueError, ConfigError), match="round_lock"):
        FederationParams(round_lock="sometimes")


def test_a_break_abandoned_by_a_crashed_breaker_does_not_block_the_round(tmp_path):
    store = LocalStore(tmp_path / "store")
    old = {"round_id": "6", "token": "t6", "owner": "lost run", "pid": 1, "host": "other-host",
           "since": time.time() - 1000}
    assert store.create_marker(lock_key("6"), json.dumps(old).encode())
    assert store.create_marker("locks/rounds/6.broken-t6", json.dumps({"pid": 1, "at": time.time() - 600}).encode())
    with round_lock(store, "6", RoundLockParams(stale_after_s=100), owner="next run") as mine:
        assert read_holder(store, "6") == mine
    assert store.read_marker("locks/rounds/6.broken-t6") is None
