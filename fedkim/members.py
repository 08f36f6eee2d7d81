"""The members of the federation and the server's splits: who they are, where their data lives, and which work
pool runs their part of a federated round.

A directory is `generated` (written by `fedkim data generate` to <data.root>/<id>; FEDKIM_DATA_ROOT moves them all)
or `provided` (a hospital's real site directory, or a server split of real data, at `path`; fedkim only reads it
and never writes into it). site_dir and split_dir are the one place that turns a member or split into its folder.
On one machine a provided member's folder can be pointed elsewhere with FEDKIM_SITE_DIR_<ID> (site_dir_env).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator, model_validator

from fedkim.params_base import ConfigError, Modality, Strict

if TYPE_CHECKING:
    from fedkim.config import Params

SERVER_SPLITS = ("public", "test", "validation")  # the server's own directories; no member may take these ids


def site_pool(site_id: str) -> str:
    """The default work pool of a site in federated mode: `site-<id>`, or the id itself when it starts with
    `site-`."""
    return site_id if site_id.startswith("site-") else f"site-{site_id}"


class DataSource(Strict):
    """Where a directory's data comes from: generated under data.root, or provided at `path`."""

    data: Literal["generated", "provided"] = "generated"
    path: Path | None = Field(None, description="provided: the directory (relative to the params file's folder); "
                                                "generated: not set (always <data.root>/<id>)")

    @model_validator(mode="after")
    def _path_matches_source(self) -> "DataSource":
        if self.data == "provided" and self.path is None:
            raise ValueError("a provided directory needs `path` (relative to the params file's folder)")
        if self.data == "generated" and self.path is not None:
            raise ValueError("a generated directory is always <data.root>/<id>: remove `path`, or set "
                             "`data: provided`")
        return self


class MemberSpec(DataSource):
    """One hospital of the federation (an entry of federation.members)."""

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{1,30}$")
    description: str = ""
    modalities: list[Modality] = Field(min_length=1)
    work_pool: str | None = Field(None, description="federated mode: the Prefect work pool its worker polls "
                                                    "(default: site-<id>, or the id when it starts with site-)")
    public_key: str | None = Field(None, description="base64 Ed25519 public key of the site (`fedkim site keygen`): "
                                                     "its packages' signatures verify with it")
    epsilon_max: float | None = Field(None, gt=0, description="this site's privacy budget (cumulative ε) when it "
                                                             "differs from site.privacy.epsilon_max")

    @field_validator("public_key")
    @classmethod
    def _ed25519(cls, v: str | None) -> str | None:
        from fedkim.identity import parse_public_key

        if v is not None:
            parse_public_key(v)  # ValueError: pydantic names the member's entry and the key
        return v

    @field_validator("modalities")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate modality in {v}")
        return v

    @property
    def pool(self) -> str:
        return self.work_pool or site_pool(self.id)


class ServerSplits(Strict):
    """The server's own splits: `public` (injection, calibration), `test` (the reported figures) and `validation`
    (the figures promotion decides on; null: generated when a member is generated, else none, and promotion then
    decides on `test` and says so)."""

    public: DataSource = DataSource()
    test: DataSource = DataSource()
    validation: DataSource | None = None


def split_source(params: Params, split: str) -> DataSource | None:
    """A server split's source; None for a validation split the federation does not have (see ServerSplits)."""
    source = getattr(params.federation.splits, split)
    if source is None and any(m.data == "generated" for m in params.federation.members):
        return DataSource()
    return source


def server_splits(params: Params) -> tuple[str, ...]:
    """The server splits this federation has (public and test always; validation where it has one)."""
    return tuple(n for n in SERVER_SPLITS if split_source(params, n) is not None)


def decision_split(params: Params) -> str:
    """The split promotion decides on: validation, else (a federation without one) test."""
    return "validation" if "validation" in server_splits(params) else "test"


def check_member_ids(members: list[MemberSpec]) -> list[MemberSpec]:
    if not members:
        raise ValueError("the federation needs at least one member")
    ids = [m.id for m in members]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise ValueError(f"duplicate member id(s) {sorted(dup)}")
    reserved = set(SERVER_SPLITS) & set(ids)
    if reserved:
        raise ValueError(f"member id(s) {sorted(reserved)} are reserved for the server's splits")
    return members


def check_profiles(params: Params) -> Params:
    """data.sites holds profiles of generated members only; generated server splits need a generated member."""
    generated = {m.id for m in params.federation.members if m.data == "generated"}
    for site_id in params.data.sites:
        if site_id not in generated:
            what = "a provided member" if site_id in params.member_ids() else "not a member"
            raise ValueError(f"data.sites.{site_id}: a generator profile, but {site_id!r} is {what}; profiles "
                             f"are for the generated members of federation.members ({sorted(generated)})")
    splits = [n for n in server_splits(params) if split_source(params, n).data == "generated"]
    if splits and not generated:
        raise ValueError(f"federation.splits.{splits[0]}: generated, but no member is generated (the server's "
                         "generated splits draw from the generated members' acquisition): provide it")
    return params


def find_member(params: Params, site_id: str) -> MemberSpec:
    for member in params.federation.members:
        if member.id == site_id:
            return member
    raise ConfigError(f"site {site_id!r} is not in federation.members; members: {params.member_ids()}")


# ------------------------------------------------------------------------------------- where the data lives
def site_dir(params: Params, site_id: str) -> Path:
    """A member's site directory: <data.root>/<id> when generated, its `path` when provided."""
    member = params.member(site_id)
    return params.data.root / site_id if member.data == "generated" else Path(member.path)


def split_dir(params: Params, split: str) -> Path:
    """A server split's directory (`public`, `test`, `validation`): <data.root>/<split> when generated, else its
    `path`."""
    if split not in SERVER_SPLITS:
        raise ConfigError(f"{split!r} is not a server split; splits: {list(SERVER_SPLITS)}")
    source = split_source(params, split)
    if source is None:
        raise ConfigError(f"federation.splits.{split}: this federation has none (no generated member): provide it")
    return params.data.root / split if source.data == "generated" else Path(source.path)


def provided_dirs(params: Params) -> dict[str, Path]:
    """Every provided directory by the key that declares it (federation.members.<id>, federation.splits.<name>)."""
    found = {f"federation.members.{m.id}": Path(m.path) for m in params.federation.members if m.data == "provided"}
    for name in SERVER_SPLITS:
        source = getattr(params.federation.splits, name)
        if source is not None and source.data == "provided":
            found[f"federation.splits.{name}"] = Path(source.path)
    return found


def site_dir_env(site_id: str) -> str:
    """The env var that points a provided member's directory elsewhere on one machine: FEDKIM_SITE_DIR_SITE_A."""
    return "FEDKIM_SITE_DIR_" + site_id.upper().replace("-", "_")


def apply_site_dir_env(raw: dict) -> None:
    """FEDKIM_SITE_DIR_<ID> replaces a provided member's path in the raw params (a hospital's worker keeps its data
    where it likes); generated members move with FEDKIM_DATA_ROOT instead."""
    members = (raw.get("federation") or {}).get("members")
    for member in members if isinstance(members, list) else []:
        if not isinstance(member, dict) or not isinstance(member.get("id"), str):
            continue  # validation names the bad entry
        value = os.environ.get(site_dir_env(member["id"]))
        if not value:
            continue
        if member.get("data", "generated") != "provided":
            raise ConfigError(f"{site_dir_env(member['id'])}: member {member['id']!r} is generated (its directory "
                              "is <data.root>/<id>: set FEDKIM_DATA_ROOT instead)")
        member["path"] = value
