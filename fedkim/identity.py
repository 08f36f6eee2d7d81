"""Identities of the parties of a federation: an Ed25519 key pair per site and one for the coordinator.

    <dir>/<id>.key   the private key, PKCS8 PEM, mode 0600 (never leaves its party)
    <dir>/<id>.pub   the public key: one base64 line (the 32 raw bytes), pasted into params.yaml

What a party signs is a statement: a JSON object made canonical (sorted keys, no whitespace, UTF-8) so that the
signer and the verifier hash the same bytes. At run time a process finds its private key through
FEDKIM_SIGNING_KEY: the path of one key file (a site's worker, the coordinator), or of a folder holding
`<id>.key` files (a simulated federation, where one process signs for every party).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedkim.params_base import ConfigError

SIGNING_KEY_ENV = "FEDKIM_SIGNING_KEY"
COORDINATOR = "coordinator"  # the coordinator's party id (its key files: coordinator.key / coordinator.pub)


class KeyFileError(ConfigError):
    """A key file that cannot be written or read; the message names the file."""


def canonical_json(payload: object) -> bytes:
    """The bytes a statement is signed as: sorted keys, no whitespace, UTF-8; NaN and inf are refused."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode()


def public_key_text(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The public key as params.yaml carries it: base64 of its 32 raw bytes."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def parse_public_key(text: str) -> Ed25519PublicKey:
    """A base64 Ed25519 public key (32 bytes); ValueError saying what is wrong with it."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64 (expected the one line of a .pub file from `fedkim site keygen`)") from None
    if len(raw) != 32:
        raise ValueError(f"{len(raw)} bytes, an Ed25519 public key has 32 (the line of a .pub file)")
    return Ed25519PublicKey.from_public_bytes(raw)


def write_key_pair(folder: str | Path, party_id: str) -> tuple[Path, Path, str]:
    """Generate a key pair into folder/<id>.key (0600) and folder/<id>.pub; refuses to replace either file.
    Returns (key path, pub path, public key text)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = folder / f"{party_id}.key", folder / f"{party_id}.pub"
    for path in (key_path, pub_path):
        if path.exists():
            raise KeyFileError(f"{path}: already exists; an identity is never overwritten (move it away first)")
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    # O_EXCL: a file that appeared meanwhile is not replaced; 0600 from the start, never readable by others.
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    text = public_key_text(private)
    pub_path.write_text(text + "\n")
    return key_path, pub_path, text


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    path = Path(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise KeyFileError(f"{path}: private key not found") from None
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not an unencrypted PKCS8 PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: a {type(key).__name__}, not an Ed25519 private key")
    return key


def signing_key_path(party_id: str) -> Path:
    """Where this process's key for `party_id` is: FEDKIM_SIGNING_KEY (a key file, or a folder of <id>.key)."""
    value = os.environ.get(SIGNING_KEY_ENV)
    if not value:
        raise KeyFileError(f"{party_id}: signatures are required but {SIGNING_KEY_ENV} is not set (the path of "
                           f"{party_id}.key, or of the folder holding it)")
    path = Path(value)
    return path / f"{party_id}.key" if path.is_dir() else path


def sign(key: Ed25519PrivateKey, statement: dict) -> str:
    """The base64 signature of a statement's canonical JSON."""
    return base64.b64encode(key.sign(canonical_json(statement))).decode()


def verify(public: Ed25519PublicKey, statement: dict, signature: str) -> bool:
    try:
        public.verify(base64.b64decode(signature, validate=True), canonical_json(statement))
    except (InvalidSignature, binascii.Error, ValueError, TypeError):
        return False
    return True
