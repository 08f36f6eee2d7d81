"""Where the next round starts: `rounds/LATEST.json`, which only moves forward.

The ordering rule: completed rounds form a chain, each starting from the one before. A round moves LATEST only
when it is new to the chain and started from the round LATEST names now (start_round records that starting
point in `rounds/<r>/global/base.json`). It then takes the next sequence number by creating the history entry
`rounds/_history/<sequence>.json` (created only when absent, so of two rounds finishing from the same LATEST only
one moves it) and LATEST.json is rewritten to match. Re-running or finishing an old round again, or a round that
started from an older LATEST, leaves LATEST where it is. Comparing round ids would not do: they are names (7,
2026-05-01, a scheduled time), not numbers.

LATEST.json is read strictly: malformed, written outside the store, or disagreeing with the history (pointing
backwards), it is reported with LatestError naming the key, and a round does not start from it or replace it.
Given the params (federation.signatures: required), LATEST.json, every history entry read and the base.json
behind a completion must carry the coordinator's signature (fedkim.federation.signing), else SignatureError names
the key; a history entry must sit at the sequence it was signed for.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedkim.config import ROUND_ID_PATTERN, Params
from fedkim.federation import signing

LATEST_KEY = "rounds/LATEST.json"  # also fedkim.rounds.LATEST_KEY, where callers take it from
HISTORY_PREFIX = "rounds/_history"  # '_' cannot start a round id (ROUND_ID_PATTERN): no round's keys collide
log = logging.getLogger(__name__)


class LatestError(ValueError):
    """rounds/LATEST.json (or the history behind it) cannot be trusted: the message names the key and why."""


@dataclass(frozen=True)
class Latest:
    round_id: str
    sequence: int  # 0: a LATEST.json written before sequence numbers (no history yet)
    completed: tuple[str, ...]
    repaired: bool = field(default=False, compare=False)  # read from the history, LATEST.json lagging behind

    def payload(self) -> dict:
        return {"round_id": self.round_id, "sequence": self.sequence, "completed": list(self.completed),
                "finished": time.time()}


def history_key(sequence: int) -> str:
    return f"{HISTORY_PREFIX}/{sequence:08d}.json"


def base_key(round_id: str) -> str:
    return f"rounds/{round_id}/global/base.json"


def _round_id(value, where: str, name: str) -> str:
    if not isinstance(value, str) or not re.match(ROUND_ID_PATTERN, value):
        raise LatestError(f"{where}: {name!r} must be a round id (text matching {ROUND_ID_PATTERN}), got {value!r}")
    return value


def parse_latest(raw: bytes, where: str) -> Latest:
    """LATEST.json's content, checked key by key."""
    try:
        payload = json.loads(raw)
    except ValueError as exc:
        raise LatestError(f"{where}: not JSON ({exc})") from None
    if not isinstance(payload, dict):
        raise LatestError(f"{where}: expected a JSON object with 'round_id', got {type(payload).__name__}")
    round_id = _round_id(payload.get("round_id"), where, "round_id")
    sequence = payload.get("sequence", 0)
    if not isinstance(sequence, int) or isinstance(sequence, bool) or sequence < 0:
        raise LatestError(f"{where}: 'sequence' must be a whole number >= 0, got {sequence!r}")
    completed = payload.get("completed", [round_id])
    if not isinstance(completed, list) or not completed or completed[-1] != round_id:
        raise LatestError(f"{where}: 'completed' must be the list of completed round ids ending with "
                          f"{round_id!r}, got {completed!r}")
    return Latest(round_id, sequence, tuple(_round_id(r, where, "completed") for r in completed))


def _read(store, key: str) -> bytes | None:
    """A JSON object of the store, integrity-checked; a file there that the store did not write is an error."""
    if not store.exists(key):
        if store.read_marker(key) is not None:
            raise LatestError(f"{store.uri(key)}: present but not written through the artifact store (no sha256 "
                              f"recorded); not trusted and not replaced: remove it or restore the original")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return store.get_file(key, Path(tmp) / "payload.json").read_bytes()
        except ValueError as exc:  # IntegrityError: altered after upload
            raise LatestError(f"{store.uri(key)}: {exc}") from None


def _history(store, sequence: int, params: Params | None) -> dict | None:
    raw = store.read_marker(history_key(sequence))
    if raw is None:
        return None
    where = store.uri(history_key(sequence))
    try:
        entry = json.loads(raw)
        _round_id(entry["round_id"], where, "round_id")
    except (ValueError, TypeError, KeyError) as exc:
        raise LatestError(f"{where}: not a round history entry ({exc!r})") from None
    if params is not None and signing.required(params):
        signing.verify_record(params, entry, signing.HISTORY, where)
        if entry.get("sequence") != sequence:  # a signed entry copied to another sequence number
            raise LatestError(f"{where}: signed as completion #{entry.get('sequence')}, not #{sequence}: not trusted")
    return entry


def read_latest(store, *, finishing: str | None = None, params: Params | None = None) -> Latest | None:
    """The last completed round (None before the first). LatestError when LATEST.json is malformed or disagrees
    with the history. `finishing`: the round finish_round is completing; when the history already lists it
    right after LATEST (a crash between the two writes), that is the answer, marked `repaired`. `params`: check
    the coordinator's signatures as federation.signatures says (SignatureError)."""
    raw = _read(store, LATEST_KEY)
    latest = parse_latest(raw, store.uri(LATEST_KEY)) if raw is not None else None
    if latest is not None and params is not None:
        signing.verify_record(params, json.loads(raw), signing.LATEST, store.uri(LATEST_KEY))
    after = _history(store, (latest.sequence if latest else 0) + 1, params)
    if latest is None:
        if after is None:
            return None
        where = f"{store.uri(LATEST_KEY)} is missing but"
    else:
        entry = _history(store, latest.sequence, params) if latest.sequence else {"round_id": latest.round_id}
        if entry is None or entry["round_id"] != latest.round_id:
            raise LatestError(f"{store.uri(LATEST_KEY)}: names round {latest.round_id!r} as completion "
                              f"#{latest.sequence}, but {store.uri(history_key(latest.sequence))} names "
                              f"{entry['round_id'] if entry else 'nothing'}: not trusted")
        if after is None:
            return latest
        where = f"{store.uri(LATEST_KEY)} names round {latest.round_id!r} but"
    if after["round_id"] == finishing:
        done = latest.completed if latest else ()
        return Latest(finishing, after["sequence"], (*done, finishing), repaired=True)
    later = store.uri(history_key((latest.sequence if latest else 0) + 1))
    raise LatestError(f"{where} round {after['round_id']!r} completed after it ({later}): "
                      f"LATEST points backwards and is not trusted; re-run round {after['round_id']} to finish it, "
                      f"or restore LATEST.json")


def advance(store, round_id: str, params: Params | None = None) -> Latest | None:
    """The LATEST that finishing `round_id` leads to, or None when LATEST stays (the reason is logged). `params`:
    verify what decides (LATEST, the history, base.json under the global model's signature) and sign the new
    history entry, as federation.signatures says."""
    round_id = str(round_id)
    current = read_latest(store, finishing=round_id, params=params)
    if current is not None and current.round_id == round_id:
        return current if current.repaired else None
    if current is not None and round_id in current.completed:
        log.warning("round %s completed before (LATEST is round %s): LATEST stays", round_id, current.round_id)
        return None
    raw = _read(store, base_key(round_id))
    if raw is not None and params is not None:
        signing.verified(params, store, base_key(round_id), signing.GLOBAL_MODEL, round_id,
                         signed_with=f"rounds/{round_id}/global/encoders.safetensors")
    base = json.loads(raw).get("previous", "?") if raw is not None else "?"
    expected = current.round_id if current else None
    if base != expected:
        started = "an unrecorded state" if base == "?" else f"round {base}" if base else "the initial model"
        log.warning("round %s started from %s, but LATEST is %s now: LATEST stays", round_id, started,
                    f"round {expected}" if expected else "unset")
        return None
    sequence = (current.sequence if current else 0) + 1
    entry = {"round_id": round_id, "previous": expected, "sequence": sequence, "finished": time.time()}
    if params is not None:
        entry = signing.sign_record(params, entry, signing.HISTORY)
    if not store.create_marker(history_key(sequence), json.dumps(entry, sort_keys=True).encode()):
        log.warning("round %s: another round took completion #%d meanwhile: LATEST stays", round_id, sequence)
        return None
    return Latest(round_id, sequence, (*(current.completed if current else ()), round_id))
