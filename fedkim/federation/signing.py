"""Signed uploads (federation.signatures: required): who wrote an object of a round, and for which round.

Every signature object is JSON beside what it signs, `<key>.sig`: {"statement": {...}, "signature": base64}, the
Ed25519 signature of the statement's canonical JSON (fedkim.identity).

    rounds/<r>/global/encoders.safetensors.sig      the coordinator's: kind global-model, the round id, the store
                                                    sha256 of the global model, and the round's nonce (fresh
                                                    random text: a package signed for another publication of
                                                    this round id carries a stale one)
    rounds/<r>/aggregate/encoders.safetensors.sig   the coordinator's: kind aggregate, the sha256 of the encoders,
                                                    aggregate.json (and FedAdam's moments)
    rounds/<r>/sites/<site>/manifest.json.sig       the site's: kind knowledge-package, its id, the round id, the
                                                    nonce, the sha256 of the canonical manifest (which holds the
                                                    tensors' sha256) and of its stored gate summary; uploaded last
    rounds/<r>/central/inject.json.sig              the coordinator's: kind central-model, the injected model's
                                                    trainable.safetensors and encoders.safetensors and inject.json
    rounds/<r>/evaluation/metrics.json.sig          the coordinator's: kind evaluation (validation_metrics.json too)
    rounds/<r>/global/encoders.safetensors.sig      also covers base.json (where the round started: it decides
                                                    whether finishing the round moves LATEST)

LATEST.json (rewritten at every completion) and the history entries rounds/_history/<n>.json (created atomically)
carry the coordinator's signature inside them, `coordinator_signature` over {kind, record}: a separate .sig could
be left behind, not matching, by a crash between two writes.

The server accepts a package only when the signature verifies with the public key of the site named in the
manifest, that site is the one whose folder holds it, and round id and nonce are the round's. A coordinator
object is verified before a step reuses it; an unsigned or forged one raises SignatureError naming the key.
With signatures off (the default) nothing is signed or checked.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedkim.config import Params
from fedkim.federation.package import MANIFEST_FILE
from fedkim.federation.store import ArtifactStore
from fedkim.identity import (COORDINATOR, KeyFileError, canonical_json, load_private_key, parse_public_key,
                             public_key_text, sign, signing_key_path, verify)

SIG_SUFFIX = ".sig"
PACKAGE_SIGNATURE = MANIFEST_FILE + SIG_SUFFIX
GLOBAL_MODEL, AGGREGATE, PACKAGE = "global-model", "aggregate", "knowledge-package"
CENTRAL, EVALUATION, LATEST, HISTORY = "central-model", "evaluation", "latest", "round-history"
RECORD_SIGNATURE = "coordinator_signature"  # inside a signed record (LATEST.json, a history entry)
COORDINATOR_KEY_SETTING = "federation.coordinator_public_key"


class SignatureError(RuntimeError):
    """A stored coordinator object that is unsigned, forged or edited: it is refused, never reused or replaced."""


def required(params: Params) -> bool:
    return params.federation.signatures == "required"


def digest(payload: object) -> str:
    """The sha256 of a JSON payload's canonical form (a manifest, a gate summary)."""
    return hashlib.sha256(canonical_json(payload)).hexdigest()


def new_round_nonce() -> str:
    return secrets.token_hex(16)


# ------------------------------------------------------------------------------------------------ keys
def public_key_setting(params: Params, party_id: str) -> tuple[str | None, str]:
    """(the configured public key of a party, the params key that holds it)."""
    if party_id == COORDINATOR:
        return params.federation.coordinator_public_key, "federation.coordinator_public_key"
    member = next((m for m in params.federation.members if m.id == party_id), None)
    return (member.public_key if member else None), f"federation.members[{party_id}].public_key"


def private_key(params: Params, party_id: str) -> Ed25519PrivateKey:
    """This process's key for `party_id` (FEDKIM_SIGNING_KEY), checked against the configured public key, so that
    a wrong key fails here, naming both, rather than as forged uploads at the server."""
    path = signing_key_path(party_id)
    key = load_private_key(path)
    expected, setting = public_key_setting(params, party_id)
    if public_key_text(key) != expected:
        raise KeyFileError(f"{path}: its public key {public_key_text(key)} is not {setting} ({expected}): "
                           f"not {party_id}'s key")
    return key


def _envelope(key: Ed25519PrivateKey, statement: dict) -> bytes:
    return json.dumps({"statement": statement, "signature": sign(key, statement)}, indent=2, sort_keys=True).encode()


def _read_envelope(path: Path) -> tuple[dict, str]:
    """(statement, signature) of a signature file; ValueError when it is not one."""
    try:
        envelope = json.loads(path.read_text())
        statement, signature = envelope["statement"], envelope["signature"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise ValueError("not a signature object ({\"statement\": ..., \"signature\": ...})") from None
    if not isinstance(statement, dict) or not isinstance(signature, str):
        raise ValueError("not a signature object ({\"statement\": ..., \"signature\": ...})")
    return statement, signature


# ------------------------------------------------------------------------------------------ coordinator side
def sign_objects(params: Params, store: ArtifactStore, key: str, kind: str, round_id: str, *,
                 round_nonce: str | None = None, also: tuple[str, ...] = (), replace: bool = False) -> None:
    """The coordinator signs `key` and those of the files `also` that its folder holds (the aggregate's
    aggregate.json and FedAdam moments), by their recorded sha256, as one statement in `<key>.sig`. An existing
    signature object is never replaced (KeyExistsError) unless `replace` (objects the step itself rewrites: the
    injected model)."""
    if not required(params):
        return
    folder = key.rsplit("/", 1)[0]
    keys = [key, *(k for k in (f"{folder}/{name}" for name in also) if store.exists(k))]
    statement = {"kind": kind, "round_id": str(round_id), "objects": {k: store.sha256(k) for k in keys}}
    if round_nonce is not None:
        statement["round_nonce"] = round_nonce
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "signature.json"
        path.write_bytes(_envelope(private_key(params, COORDINATOR), statement))
        store.put_file(key + SIG_SUFFIX, path, overwrite=replace)


def verified_key(params: Params, store: ArtifactStore, key: str, kind: str, round_id: str, *,
                 signed_with: str | None = None) -> str:
    """`key`, once `verified` (for reading it inline)."""
    verified(params, store, key, kind, round_id, signed_with=signed_with)
    return key


def verified(params: Params, store: ArtifactStore, key: str, kind: str, round_id: str, *,
             signed_with: str | None = None) -> dict | None:
    """The coordinator's statement about a stored object, verified before a step reuses it (None: signatures
    off). `signed_with`: the object whose `.sig` covers `key` as well (the aggregate's for aggregate.json and
    FedAdam's moments, inject.json's for the injected model's tensors); default `key` itself. SignatureError
    names the key when the object is unsigned, forged, signed for something else, not covered by the signature
    (added after signing), or was edited after signing."""
    if not required(params):
        return None
    signed = signed_with or key
    sig_key, setting = signed + SIG_SUFFIX, COORDINATOR_KEY_SETTING
    refused = f"{store.uri(key)}: refusing to reuse this {kind} of round {round_id}"
    if not store.exists(sig_key):
        raise SignatureError(f"{refused}: unsigned (no {sig_key}; signatures are required). It is left as it is: "
                             "remove it to have the round write and sign a new one")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            statement, signature = _read_envelope(store.get_file(sig_key, Path(tmp) / "signature.json"))
        except ValueError as exc:
            raise SignatureError(f"{refused}: {sig_key} is {exc}") from None
    if not verify(parse_public_key(params.federation.coordinator_public_key), statement, signature):
        raise SignatureError(f"{refused}: forged: {sig_key} does not verify with {setting}")
    objects = statement.get("objects") or {}
    if statement.get("kind") != kind or statement.get("round_id") != str(round_id) or signed not in objects:
        raise SignatureError(f"{refused}: {sig_key} signs a {statement.get('kind')} of round "
                             f"{statement.get('round_id')!r} ({sorted(objects)}), not this object (moved or replayed)")
    if key not in objects:
        raise SignatureError(f"{refused}: {sig_key} does not cover it (signed {sorted(objects)}): written after "
                             "signing")
    for signed_key, sha in objects.items():
        if not store.exists(signed_key) or store.sha256(signed_key) != sha:
            raise SignatureError(f"{refused}: {store.uri(signed_key)} differs from what {setting}'s key signed "
                                 "(edited after signing)")
    return statement


def sign_record(params: Params, record: dict, kind: str) -> dict:
    """`record` with the coordinator's signature of {kind, record} inside it, as `coordinator_signature`
    (signatures off: `record` as it is)."""
    if not required(params):
        return record
    return record | {RECORD_SIGNATURE: sign(private_key(params, COORDINATOR), {"kind": kind, "record": record})}


def verify_record(params: Params, record: dict, kind: str, where: str) -> None:
    """Refuse (SignatureError naming `where`) a record read to decide where the chain stands that the coordinator
    did not sign as a `kind`, or that was edited after signing (signatures off: nothing is checked)."""
    if not required(params):
        return
    refused = f"{where}: refusing to use this {kind}"
    signature = record.get(RECORD_SIGNATURE)
    if signature is None:
        raise SignatureError(f"{refused}: unsigned (no {RECORD_SIGNATURE}; signatures are required). It is left as "
                             "it is: restore the signed one")
    body = {k: v for k, v in record.items() if k != RECORD_SIGNATURE}
    if not isinstance(signature, str) or not verify(parse_public_key(params.federation.coordinator_public_key),
                                                    {"kind": kind, "record": body}, signature):
        raise SignatureError(f"{refused}: forged or edited after signing: its {RECORD_SIGNATURE} does not verify "
                             f"with {COORDINATOR_KEY_SETTING} as a {kind}")


def round_nonce(params: Params, store: ArtifactStore, global_key: str, round_id: str) -> str | None:
    """The nonce the coordinator signed with the round's global model (None: signatures off)."""
    statement = verified(params, store, global_key, GLOBAL_MODEL, round_id)
    return None if statement is None else statement.get("round_nonce")


# ------------------------------------------------------------------------------------------------ site side
def sign_package(params: Params, folder: Path, *, site_id: str, round_id: str, round_nonce: str | None,
                 gate_summary: dict | None) -> None:
    """Write `<folder>/manifest.json.sig`: the site's signature of its canonical manifest and of the gate summary
    it stored for the round (None: it stored none)."""
    if not required(params):
        return
    statement = {"kind": PACKAGE, "site_id": site_id, "round_id": str(round_id), "round_nonce": round_nonce,
                 "manifest_sha256": digest(json.loads((folder / MANIFEST_FILE).read_text())),
                 "gate_summary_sha256": None if gate_summary is None else digest(gate_summary)}
    (folder / PACKAGE_SIGNATURE).write_bytes(_envelope(private_key(params, site_id), statement))


def upload_package(params: Params, store: ArtifactStore, prefix: str, folder: Path, round_nonce: str | None,
                   gate_summary: Callable[[str], dict | None]) -> None:
    """Upload a site's package folder (named by its site id) to `prefix` (rounds/<r>/sites/<site>): the tensors,
    then the manifest, whose presence marks the package as complete, then (signatures required) the site's
    signature, last. `gate_summary(site)`: the summary the site stored for the round, or None (asked only when
    signatures are required)."""
    if required(params):
        sign_package(params, folder, site_id=folder.name, round_id=prefix.split("/")[1], round_nonce=round_nonce,
                     gate_summary=gate_summary(folder.name))
    for path in sorted(folder.iterdir(), key=lambda f: (f.name == PACKAGE_SIGNATURE, f.name == MANIFEST_FILE)):
        store.put_file(f"{prefix}/{path.name}", path)


# ---------------------------------------------------------------------------------------------- server side
def package_problem(params: Params, folder: Path, site: str, round_id: str, nonce: str | None,
                    gate_summary: dict | None) -> str | None:
    """Why the package in `folder` (downloaded from site `site`'s prefix) is refused, or None. `gate_summary`:
    the summary the site stored for the round, which its signature must cover."""
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        claimed = manifest["site_id"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        return f"site {site!r}: {MANIFEST_FILE} is missing or unreadable: nothing to verify a signature of"
    if claimed != site:
        return f"site {site!r}: its package claims site id {claimed!r} (another site's package in its folder)"
    if not (folder / PACKAGE_SIGNATURE).is_file():
        return f"site {site!r}: unsigned package (no {PACKAGE_SIGNATURE}; federation.signatures is required)"
    public, setting = public_key_setting(params, site)
    try:
        statement, signature = _read_envelope(folder / PACKAGE_SIGNATURE)
    except ValueError as exc:
        return f"site {site!r}: forged package: {PACKAGE_SIGNATURE} is {exc}"
    if public is None or not verify(parse_public_key(public), statement, signature):
        return f"site {site!r}: forged package: {PACKAGE_SIGNATURE} does not verify with {setting}"
    if statement.get("kind") != PACKAGE or statement.get("site_id") != site:
        return (f"site {site!r}: its signature is for a {statement.get('kind')} of site "
                f"{statement.get('site_id')!r}, not its own package (claims another site's id)")
    if statement.get("round_id") != str(round_id):
        return (f"site {site!r}: replayed package: signed for round {statement.get('round_id')!r}, this is round "
                f"{str(round_id)!r}")
    if statement.get("round_nonce") != nonce:
        return (f"site {site!r}: replayed package: signed with the stale round nonce "
                f"{statement.get('round_nonce')!r}, the coordinator published {nonce!r} for round {str(round_id)!r}")
    if digest(manifest) != statement.get("manifest_sha256") or manifest.get("round_nonce") != nonce:
        return f"site {site!r}: {MANIFEST_FILE} was edited after signing (its digest is not the signed one)"
    if gate_summary is not None and digest(gate_summary) != statement.get("gate_summary_sha256"):
        return f"site {site!r}: its stored gate summary was edited after signing (not the one the site signed)"
    return None


def screen_signatures(params: Params, store: ArtifactStore, global_key: str, folders: Iterable[Path],
                      round_id: str, gate_summary: Callable[[str], dict | None]
                      ) -> tuple[list[Path], dict[str, list[str]]]:
    """Split downloaded package folders (each named by its site) into (signed as required, rejected site ->
    reasons), against the nonce signed with the round's global model at `global_key`. `gate_summary(site)`: the
    summary the site stored for the round, or None."""
    folders = list(folders)
    if not required(params):
        return folders, {}
    nonce = round_nonce(params, store, global_key, round_id)
    kept, rejected = [], {}
    for folder in folders:
        problem = package_problem(params, folder, folder.name, round_id, nonce, gate_summary(folder.name))
        if problem:
            rejected[folder.name] = [problem]
        else:
            kept.append(folder)
    return kept, rejected
