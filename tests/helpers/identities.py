"""Identities for test federations: a key pair per member and one for the coordinator, written as
`fedkim site keygen` writes them, and the params settings that require and trust them.

    make_identities(folder, ids)        <folder>/<id>.key and .pub for each id and the coordinator -> {id: public}
    signed_federation(raw, folder)      a params dict with signatures required and every key trusted
"""

from __future__ import annotations

from pathlib import Path

from fedkim.identity import COORDINATOR, write_key_pair


def make_identities(folder: Path, ids) -> dict[str, str]:
    return {party: write_key_pair(folder, party)[2] for party in [*ids, COORDINATOR]}


def signed_federation(raw: dict, folder: Path) -> dict:
    """`raw` (a params dict) with federation.signatures required, its members' and the coordinator's public keys
    set, their private keys in `folder` (point FEDKIM_SIGNING_KEY at it)."""
    members = raw["federation"]["members"]
    public = make_identities(folder, [m["id"] for m in members])
    for member in members:
        member["public_key"] = public[member["id"]]
    raw["federation"] |= {"signatures": "required", "coordinator_public_key": public[COORDINATOR]}
    return raw
