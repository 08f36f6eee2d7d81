"""The store roles against a real S3 server that enforces them: moto's server with IAM on 127.0.0.1, the policies of
fedkim.federation.policies and key pairs that server issued (as `fedkim stack up --s3 moto` provisions them), used
through fedkim's own S3Store. A site's key that oversteps is refused BY THE SERVER, and nothing stored changes."""

from __future__ import annotations

import json

import pytest

from fedkim.federation.policies import for_moto, owner_of, role_name, role_policies, site_policy
from fedkim.federation.s3 import S3Store
from fedkim.federation.store import StoreError
from fedkim.ops.store_roles import bootstrap_admin, provision_roles
from fedkim.rounds import (LATEST_KEY, aggregate_step, get_json, gated_site, package_validation, put_json,
                           round_key, start_round, train_site_step, validation_key)
from tests.helpers.servers import moto_iam_server

BUCKET, REGION, SITES = "fedkim", "us-east-1", ["site-a", "site-b"]


@pytest.fixture
def server(tmp_path):
    """(endpoint, role -> key pair) of a fresh moto server with the bucket and one IAM user per role."""
    with moto_iam_server(tmp_path) as endpoint:
        admin = bootstrap_admin(endpoint, REGION)
        yield endpoint, provision_roles(endpoint, REGION, admin, BUCKET, "", SITES)


@pytest.fixture
def store_as(server, monkeypatch):
    """store_as(site id or None): fedkim's S3Store with that role's key pair (None: the coordinator)."""
    endpoint, pairs = server

    def make(site_id: str | None) -> S3Store:
        role = role_name(site_id)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", pairs[role]["access_key_id"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", pairs[role]["secret_access_key"])
        return S3Store(BUCKET, endpoint_url=endpoint, region=REGION, max_attempts=1, role=role)
    return make


def write(tmp_path, name: str, content: bytes):
    path = tmp_path / name
    path.write_bytes(content)
    return path


def snapshot(store: S3Store) -> dict[str, str]:
    return {key: store.sha256(key) for key in store.list("")}


# --------------------------------------------------------------------------------------------------- policies
def test_the_policies_name_each_roles_prefixes_and_close_lookalike_keys():
    policies = role_policies("bkt", "team/fedkim", SITES)
    assert set(policies) == {"coordinator", "site.site-a", "site.site-b"}
    site = {s["Sid"]: s for s in policies["site.site-a"]["Statement"]}
    assert site["ReadWriteOwnPrefix"]["Resource"] == ["arn:aws:s3:::bkt/team/fedkim/rounds/*/sites/site-a/*"]
    assert site["ReadGlobalModels"]["Resource"] == ["arn:aws:s3:::bkt/team/fedkim/rounds/*/global/*"]
    assert site["DenyLookalikeKeys"]["Effect"] == "Deny"
    assert "s3:DeleteObject" not in site["ReadWriteOwnPrefix"]["Action"]
    coordinator = {s["Sid"]: s for s in policies["coordinator"]["Statement"]}
    assert coordinator["DenySitePrefixes"]["Resource"] == ["arn:aws:s3:::bkt/team/fedkim/rounds/*/sites/*"]
    assert json.loads(json.dumps(policies)) == policies  # plain JSON, as IAM and `mc admin policy create` take it
    assert "s3:HeadBucket" in for_moto(policies["coordinator"])["Statement"][0]["Action"]
    assert "s3:HeadBucket" not in json.dumps(policies)
    with pytest.raises(ValueError, match="site id 'site-\\*'"):
        site_policy("bkt", "", "site-*")
    assert "site 'site-b'" in owner_of("rounds/1/sites/site-b/manifest.json.sha256")
    assert role_name("coordinator") != role_name(None)  # a member id never takes the coordinator's role


# ------------------------------------------------------------------------------------------- the server refuses
def test_a_site_key_is_refused_by_the_server_outside_its_own_prefix_and_nothing_stored_changes(store_as, tmp_path):
    coordinator, site_b = store_as(None), store_as("site-b")
    model, other = write(tmp_path, "model", b"global model"), write(tmp_path, "forged", b"forged")
    for key in ("rounds/1/global/encoders.safetensors", "rounds/1/aggregate/encoders.safetensors", LATEST_KEY,
                "rounds/1/evaluation/metrics.json", "rounds/1/central/encoders.safetensors"):
        coordinator.put_file(key, model)
    site_b.put_file("rounds/1/sites/site-b/manifest.json", write(tmp_path, "manifest", b"{}"))
    site_a = store_as("site-a")
    before = snapshot(coordinator)

    # its own work succeeds: the global model (with its sidecar) in, its package and gate summary out
    assert site_a.get_file("rounds/1/global/encoders.safetensors", tmp_path / "got").read_bytes() == b"global model"
    assert not site_a.exists("rounds/1/sites/site-a/manifest.json")
    site_a.put_file("rounds/1/sites/site-a/encoders.safetensors", other)
    put_json(site_a, validation_key("1", "site-a"), {"success": True}, overwrite=True)
    assert get_json(site_a, validation_key("1", "site-a")) == {"success": True}

    refused = {
        "another site's prefix": lambda: site_a.put_file("rounds/1/sites/site-b/encoders.safetensors", other),
        "another site's package": lambda: site_a.get_file("rounds/1/sites/site-b/manifest.json", tmp_path / "x"),
        "a lookalike key in another site's folder": lambda: site_a.put_file(
            "rounds/1/sites/site-b/sites/site-a/encoders.safetensors", other),
        "the global model": lambda: site_a.put_file("rounds/1/global/encoders.safetensors", other, overwrite=True),
        "the aggregate": lambda: site_a.put_file("rounds/1/aggregate/encoders.safetensors", other, overwrite=True),
        "LATEST": lambda: site_a.put_file(LATEST_KEY, other, overwrite=True),
        "the evaluation": lambda: site_a.put_file("rounds/1/evaluation/metrics.json", other, overwrite=True),
        "a round lock": lambda: site_a.create_marker("locks/rounds/1.json", b"{}"),
        "the aggregate's content": lambda: site_a.get_file("rounds/1/aggregate/encoders.safetensors", tmp_path),
    }
    for what, attempt in refused.items():
        with pytest.raises(StoreError) as caught:
            attempt()
        message = str(caught.value)
        assert "refused by the server" in message and ("AccessDenied" in message or "403" in message), what
        assert site_a_key(store_as) in message and "role site.site-a" in message, what
        assert caught.value.__suppress_context__ and caught.value.__cause__ is None  # no botocore traceback
    assert "site 'site-b'" in str(pytest.raises(StoreError, refused["another site's prefix"]).value)
    assert snapshot(coordinator) == {**before, **{k: v for k, v in snapshot(coordinator).items() if k not in before}}
    assert {k for k in snapshot(coordinator) if k not in before} == {"rounds/1/sites/site-a/encoders.safetensors",
                                                                       validation_key("1", "site-a")}


def site_a_key(store_as) -> str:
    return store_as("site-a")._session.get_credentials().access_key


def test_the_coordinator_reads_everything_writes_the_rest_and_never_a_sites_prefix(store_as, tmp_path):
    site_a = store_as("site-a")
    site_a.put_file("rounds/1/sites/site-a/manifest.json", write(tmp_path, "manifest", b"{}"))
    coordinator = store_as(None)
    assert coordinator.get_file("rounds/1/sites/site-a/manifest.json", tmp_path / "m").read_bytes() == b"{}"
    assert coordinator.create_marker("locks/rounds/1.json", b"{}") and not coordinator.create_marker(
        "locks/rounds/1.json", b"{}")
    coordinator.delete_marker("locks/rounds/1.json")
    coordinator.put_file(LATEST_KEY, write(tmp_path, "latest", b"{}"))
    with pytest.raises(StoreError, match="role coordinator.*site 'site-a'"):
        coordinator.put_file("rounds/1/sites/site-a/manifest.json", write(tmp_path, "forged", b"[]"),
                             overwrite=True)
    assert site_a.get_file("rounds/1/sites/site-a/manifest.json", tmp_path / "again").read_bytes() == b"{}"


@pytest.mark.slow
def test_a_signed_round_runs_with_each_party_on_its_own_key(store_as, small_federation, tmp_path, monkeypatch):
    """start_round as the coordinator, each site's gate summary and train_site_step with its own key, then the
    aggregation as the coordinator, with signatures required (the sites read the global model's signature and
    sign their packages): the round's steps need no more than their roles allow."""
    from tests.helpers import TINY, keep_members, small_params_dict, write_params
    from tests.helpers.identities import signed_federation

    monkeypatch.setenv("FEDKIM_SIGNING_KEY", str(tmp_path / "keys"))
    raw = keep_members(small_params_dict(small_federation.root, **TINY, **{"federation.quorum": 2}), SITES)
    params = write_params(tmp_path / "params", signed_federation(raw, tmp_path / "keys"))
    coordinator = store_as(None)
    start_round(params, coordinator, "1")
    for site in SITES:
        summary, excluded = gated_site(params, site)
        assert excluded is None
        store = store_as(site)
        put_json(store, validation_key("1", site), summary, overwrite=True)
        assert train_site_step(params, store, "1", site, validation=package_validation(summary)).status == "trained"
        assert store.exists(f"rounds/1/sites/{site}/manifest.json.sig")
    outcome = aggregate_step(params, store_as(None), "1", SITES)
    assert sorted(outcome.accepted) == SITES and not outcome.rejected
    assert coordinator.exists(round_key("1", "aggregate", "encoders.safetensors.sig"))
