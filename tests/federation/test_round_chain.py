"""rounds/LATEST.json only moves forward: re-running an old round, or finishing a round that started from an older
LATEST, leaves it; a malformed or backwards LATEST is reported naming the key and is neither trusted nor
replaced. Rounds here are published and completed in a real LocalStore with real tensors (no training)."""

from __future__ import annotations

import json
import logging

import pytest

from fedkim.federation.store import LocalStore
from fedkim import round_chain
from fedkim.round_chain import LatestError, history_key
from fedkim.rounds import (LATEST_KEY, finish_round, get_json, get_state, latest_round, put_json, put_state,
                           round_key, start_round)


def publish(params, store, round_id: str) -> None:
    """What a round leaves in the store before finish_round: its global model, aggregate and injected encoders
    (here the global model itself, so the chain is checked without training)."""
    start_round(params, store, round_id)
    state = get_state(store, round_key(round_id, "global", "encoders.safetensors"))
    put_state(store, round_key(round_id, "aggregate", "encoders.safetensors"), state)
    put_state(store, round_key(round_id, "central", "encoders.safetensors"), state)


def complete(params, store, round_id: str) -> bool:
    publish(params, store, round_id)
    return finish_round(store, round_id)


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "store")


def test_rerunning_round_1_after_round_2_leaves_latest_at_2(params, store, caplog):
    assert complete(params, store, "1") and complete(params, store, "2")
    latest = get_json(store, LATEST_KEY)
    assert (latest["round_id"], latest["sequence"], latest["completed"]) == ("2", 2, ["1", "2"])
    with caplog.at_level(logging.WARNING, logger="fedkim.round_chain"):
        assert complete(params, store, "1") is False  # the re-run reuses round 1 and finishes it again
        assert finish_round(store, "1") is False
    assert "round 1 completed before (LATEST is round 2): LATEST stays" in caplog.text
    assert get_json(store, LATEST_KEY) == latest and latest_round(store) == "2"
    assert finish_round(store, "2") is False and get_json(store, LATEST_KEY) == latest  # finishing again: no-op


def test_a_round_that_started_from_an_older_latest_does_not_move_it(params, store, caplog):
    assert complete(params, store, "1")
    publish(params, store, "2")
    publish(params, store, "3")  # both start from round 1
    assert get_json(store, round_key("3", "global", "base.json")) == {"previous": "1"}
    assert finish_round(store, "2")
    with caplog.at_level(logging.WARNING, logger="fedkim.round_chain"):
        assert finish_round(store, "3") is False
    assert "round 3 started from round 1, but LATEST is round 2 now: LATEST stays" in caplog.text
    assert latest_round(store) == "2"
    assert complete(params, store, "4") and get_json(store, LATEST_KEY)["completed"] == ["1", "2", "4"]


def test_a_planted_latest_pointing_backwards_is_reported_and_not_trusted(params, store):
    assert complete(params, store, "1") and complete(params, store, "2")
    put_json(store, LATEST_KEY, {"round_id": "1", "sequence": 1, "completed": ["1"]}, overwrite=True)
    planted = store.sha256(LATEST_KEY)
    with pytest.raises(LatestError, match=r"LATEST.json names round '1' but round '2' completed after it "
                                          r"\(.*_history/00000002.json\): LATEST points backwards"):
        latest_round(store)
    with pytest.raises(LatestError, match="points backwards"):
        start_round(params, store, "3")  # no round starts from it
    assert not store.exists(round_key("3", "global", "encoders.safetensors"))
    with pytest.raises(LatestError, match="points backwards"):
        finish_round(store, "1")
    assert store.sha256(LATEST_KEY) == planted  # reported, not replaced


@pytest.mark.parametrize("payload, key", [
    (b"{not json", "not JSON"),
    (b'["1"]', "expected a JSON object with 'round_id'"),
    (b'{"finished": 1}', "'round_id' must be a round id"),
    (b'{"round_id": 2}', "'round_id' must be a round id"),
    (b'{"round_id": "../x"}', "'round_id' must be a round id"),
    (b'{"round_id": "2", "sequence": "two"}', "'sequence' must be a whole number"),
    (b'{"round_id": "2", "completed": ["1"]}', "'completed' must be the list of completed round ids ending with"),
])
def test_a_malformed_latest_is_reported_naming_the_key(params, store, tmp_path, payload, key):
    source = tmp_path / "LATEST.json"
    source.write_bytes(payload)
    store.put_file(LATEST_KEY, source)
    with pytest.raises(LatestError, match=f"LATEST.json: {key}"):
        latest_round(store)
    with pytest.raises(LatestError, match="LATEST.json"):
        finish_round(store, "3")
    assert (store.root / LATEST_KEY).read_bytes() == payload


def test_a_latest_written_behind_the_stores_back_is_not_trusted_or_replaced(params, store):
    assert complete(params, store, "1")
    path = store.root / LATEST_KEY
    path.write_text(json.dumps({"round_id": "1", "sequence": 1, "completed": ["1"], "finished": 0}))
    with pytest.raises(LatestError, match="does not match"):  # its recorded sha256 no longer fits
        latest_round(store)
    (store.root / (LATEST_KEY + ".sha256")).unlink()
    with pytest.raises(LatestError, match="present but not written through the artifact store"):
        start_round(params, store, "2")
    assert json.loads(path.read_text())["finished"] == 0


def test_a_latest_of_an_older_version_is_read_and_extended(params, store):
    assert complete(params, store, "1")
    (store.root / history_key(1)).unlink()  # as before sequence numbers: no history
    put_json(store, LATEST_KEY, {"round_id": "1", "finished": 0.0}, overwrite=True)
    assert latest_round(store) == "1"
    assert complete(params, store, "2")
    latest = get_json(store, LATEST_KEY)
    assert (latest["round_id"], latest["sequence"], latest["completed"]) == ("2", 1, ["1", "2"])


def test_a_crash_between_history_and_latest_is_repaired_by_finishing_the_round_again(params, store):
    assert complete(params, store, "1")
    publish(params, store, "2")
    before = store.sha256(LATEST_KEY)
    entry = {"round_id": "2", "previous": "1", "sequence": 2, "finished": 0.0}
    assert store.create_marker(history_key(2), json.dumps(entry).encode())  # the history moved, LATEST did not
    with pytest.raises(LatestError, match="re-run round 2 to finish it"):
        latest_round(store)
    assert store.sha256(LATEST_KEY) == before
    assert finish_round(store, "2") and latest_round(store) == "2"
    assert get_json(store, LATEST_KEY)["completed"] == ["1", "2"]


def test_the_chain_and_the_round_steps_name_the_same_latest_key():
    assert round_chain.LATEST_KEY == LATEST_KEY == "rounds/LATEST.json"
