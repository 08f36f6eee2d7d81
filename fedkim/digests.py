"""Digests: a file's sha256, and the short digest of the settings that decide a model.

The settings digest names a round's configuration in MLflow tags and registry lineage: two rounds with the same
digest trained the same way. Where files, runs and reports go, and how a round is orchestrated (timeouts,
retries, modes), are left out, so that moving the repository or re-running a round elsewhere keeps it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

# What decides the model and its figures: whole sections, the data minus where it lies and how many processes
# generate it, and the federation's aggregation rules.
WHOLE_SECTIONS = ("site", "inject", "eval")
DATA_IGNORED = ("root", "workers")  # data.catalogue counts by its content (settings_digest)
FEDERATION_KEYS = ("strategy", "quorum", "max_update_norm")


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def short_digest(payload: Any) -> str:
    """16 hex digits of the sha256 of a JSON-able payload, key order ignored."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=float).encode()).hexdigest()[:16]


def settings_digest(params) -> str:
    """The digest of the settings that decide a model (see the module docstring); `params`: fedkim.config.Params."""
    dumped = params.model_dump(mode="json")
    payload = {section: dumped[section] for section in WHOLE_SECTIONS}
    payload["inject"].pop("checkpoint_every", None)  # where a crash resumes from: the same model either way
    privacy = payload["site"].pop("privacy", {})  # off: its other settings decide nothing (digests as they were)
    if privacy.get("enabled"):
        payload["site"]["privacy"] = {k: v for k, v in privacy.items() if k != "ledger"}  # a site's local file
    payload["data"] = {k: v for k, v in dumped["data"].items() if k not in DATA_IGNORED}
    catalogue = payload["data"].pop("catalogue", None)  # its content decides, not where it lies
    if catalogue is not None:  # (None, the shipped catalogue, leaves the digest as it always was)
        payload["data"]["catalogue_sha256"] = sha256_file(catalogue)
    payload["federation"] = {k: dumped["federation"][k] for k in FEDERATION_KEYS}
    # The aggregation bounds count only when set away from their defaults, so default digests stay as they were.
    payload["federation"] |= params.federation.non_default()
    return short_digest(payload)
