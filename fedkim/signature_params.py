"""The signature settings of `federation` in params.yaml: whether packages and the coordinator's objects must be
signed, and the coordinator's public key (each site's is `federation.members[].public_key`). FederationParams
(fedkim.config) inherits them, so the keys stay `federation.<key>`; the default `off` signs and checks nothing.
(A top-level module: fedkim.federation imports fedkim.config.)"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator

from fedkim.identity import parse_public_key


class SignatureSettings(BaseModel):
    """Who must sign what (fedkim.federation.signing); the private keys come from FEDKIM_SIGNING_KEY."""

    signatures: Literal["off", "required"] = Field(
        "off", description="required: every package is signed by its site and every global model and aggregate by "
                           "the coordinator; an unsigned or forged one is refused")
    coordinator_public_key: str | None = Field(
        None, description="base64 Ed25519 public key of the coordinator (`fedkim site keygen --id coordinator`)")

    @field_validator("coordinator_public_key")
    @classmethod
    def _ed25519(cls, v: str | None) -> str | None:
        if v is not None:
            parse_public_key(v)  # ValueError: pydantic names the key
        return v


def check_signature_keys(params):
    """With signatures required, the coordinator and every member need a public key (a rule across
    federation.signatures and federation.members: Params validates it, so the message names both keys)."""
    fed = params.federation
    if fed.signatures != "required":
        return params
    if fed.coordinator_public_key is None:
        raise ValueError("federation.signatures is required but federation.coordinator_public_key is not set "
                         "(`fedkim site keygen --id coordinator` prints the line)")
    unkeyed = [m.id for m in fed.members if m.public_key is None]
    if unkeyed:
        raise ValueError(f"federation.signatures is required but federation.members {unkeyed} have no "
                         "public_key (`fedkim site keygen --id <id>` prints the line)")
    return params
