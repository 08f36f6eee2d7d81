"""Signed uploads: a package is taken only when its site signed it for this round and it lies in that site's
folder; the coordinator's global model and aggregate are verified before a step reuses them. Real key files, real
packages in a real LocalStore; the round end to end on the small federation with the tiny FM."""

import hashlib
import json
import os
import stat

import pytest
from typer.testing import CliRunner

from fedkim.cli import app
from fedkim.config import ConfigError
from fedkim.federation import signing
from fedkim.federation.package import write_package
from fedkim.federation.store import LocalStore, package_prefix
from fedkim.identity import KeyFileError, parse_public_key
from fedkim.rounds import (LATEST_KEY, aggregate_step, get_json, put_json, put_state, round_key, run_round, start_round,
                           validation_key)
from tests.helpers import TINY, keep_members, small_params_dict, write_params
from tests.helpers.identities import make_identities, signed_federation
from tests.helpers.packages import gate_summary, global_state, package_fields, site_state

SITES = ["site-a", "site-b", "site-c"]
GLOBAL = round_key("1", "global", "encoders.safetensors")
AGGREGATE = round_key("1", "aggregate", "encoders.safetensors")


@pytest.fixture
def keys(tmp_path, monkeypatch):
    """The federation's key folder; this process signs for every party (a simulated federation)."""
    folder = tmp_path / "keys"
    monkeypatch.setenv("FEDKIM_SIGNING_KEY", str(folder))
    return folder


@pytest.fixture
def params(tmp_path, keys):
    """Signatures required over the repository's params (no data is read), three members, a quorum of 1."""
    folder = tmp_path / "params"
    raw = keep_members(small_params_dict(folder / "federation", **{"federation.quorum": 1}), SITES)
    return write_params(folder, signed_federation(raw, keys))


@pytest.fixture
def attacker(tmp_path):
    """Params that trust an attacker's keys for every party, and the folder of those keys."""
    folder = tmp_path / "attacker-params"
    raw = keep_members(small_params_dict(folder / "federation", **{"federation.quorum": 1}), SITES)
    return write_params(folder, signed_federation(raw, tmp_path / "attacker-keys")), tmp_path / "attacker-keys"


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "store")


def publish(params, store, round_id="1", nonce="n" * 32):
    """The coordinator's global model of a round, signed with the round's nonce."""
    key = round_key(round_id, "global", "encoders.safetensors")
    put_state(store, key, global_state())
    signing.sign_objects(params, store, key, signing.GLOBAL_MODEL, round_id, round_nonce=nonce)
    return nonce


def send(params, store, tmp_path, site, round_id="1", nonce="n" * 32, *, prefix_site=None, gate=None):
    """Site `site` writes, signs (with `params`' view of the keys) and uploads an image package, into its own
    folder or `prefix_site`'s."""
    folder = tmp_path / f"package-{round_id}-{site}-{prefix_site}" / site
    state = site_state(global_state(), {"image"}, seed=len(site))
    write_package(folder, state, **package_fields(site, round_id, image=10), round_nonce=nonce)
    signing.upload_package(params, store, package_prefix(round_id, prefix_site or site), folder, nonce,
                           lambda _: gate)


def snapshot(store):
    return {key: store.sha256(key) for key in store.list("rounds/")}


def rejected_reason(outcome, site):
    (reason,) = outcome.rejected[site]
    return reason


def replace_object(store, key, content: bytes):
    """Someone with write access to the store replaces an object (content and recorded hash)."""
    path = store.root / key
    path.write_bytes(content)
    (store.root / (key + ".sha256")).write_text(hashlib.sha256(content).hexdigest())


# ------------------------------------------------------------------------------------------------ keys
def test_keygen_writes_a_private_key_only_its_owner_reads_and_prints_the_line_for_params(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["site", "keygen", "--id", "site-a", "--out", str(tmp_path / "keys")])
    assert result.exit_code == 0, result.output
    key, pub = tmp_path / "keys" / "site-a.key", tmp_path / "keys" / "site-a.pub"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert key.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    public = pub.read_text().strip()
    parse_public_key(public)
    assert f"public_key: {public}" in result.output

    before = key.read_bytes()
    again = runner.invoke(app, ["site", "keygen", "--id", "site-a", "--out", str(tmp_path / "keys")])
    assert again.exit_code == 2 and "already exists" in again.output and key.read_bytes() == before

    coordinator = runner.invoke(app, ["site", "keygen", "--id", "coordinator", "--out", str(tmp_path / "keys")])
    assert coordinator.exit_code == 0 and "federation.coordinator_public_key: " in coordinator.output
    bad = runner.invoke(app, ["site", "keygen", "--id", "Site A", "--out", str(tmp_path / "keys")])
    assert bad.exit_code == 2 and "not a member id" in bad.output


def test_signatures_are_off_by_default_and_required_ones_need_every_key(tmp_path):
    folder = tmp_path / "params"
    assert write_params(folder, small_params_dict(folder / "federation")).federation.signatures == "off"
    keys = make_identities(tmp_path / "keys", ["site-a"])

    raw = small_params_dict(folder / "federation", **{"federation.signatures": "required"})
    with pytest.raises(ConfigError, match="federation.coordinator_public_key is not set"):
        write_params(folder, raw)
    raw["federation"]["coordinator_public_key"] = keys["coordinator"]
    raw["federation"]["members"][0]["public_key"] = keys["site-a"]
    with pytest.raises(ConfigError, match=r"federation.members \['site-b', 'site-c', 'site-d'\] have no public_key"):
        write_params(folder, raw)
    raw["federation"]["members"][1]["public_key"] = "not a key"
    with pytest.raises(ConfigError, match=r"federation.members.1.public_key: .*not base64"):
        write_params(folder, raw)
    raw["federation"]["members"][1]["public_key"] = keys["site-a"][:20]
    with pytest.raises(ConfigError, match=r"federation.members.1.public_key: .*an Ed25519 public key has 32"):
        write_params(folder, raw)


def test_a_key_that_is_not_the_configured_one_fails_at_signing_naming_both(params, attacker, store, tmp_path,
                                                                           monkeypatch):
    monkeypatch.setenv("FEDKIM_SIGNING_KEY", str(attacker[1] / "site-a.key"))
    with pytest.raises(KeyFileError, match=r"site-a.key: its public key .* is not "
                                           r"federation.members\[site-a\].public_key"):
        send(params, store, tmp_path, "site-a")
    assert not store.exists(f"{package_prefix('1', 'site-a')}/manifest.json")
    monkeypatch.delenv("FEDKIM_SIGNING_KEY")
    with pytest.raises(KeyFileError, match="FEDKIM_SIGNING_KEY is not set"):
        send(params, store, tmp_path, "site-a")


# ------------------------------------------------------------------------------------------ server side
def test_signed_packages_are_taken_and_the_aggregate_is_signed(params, store, tmp_path):
    publish(params, store)
    for site in SITES:
        send(params, store, tmp_path, site)
    assert store.list(package_prefix("1", "site-a") + "/")[-1].endswith("manifest.json.sig")

    outcome = aggregate_step(params, store, "1", SITES)

    assert outcome.accepted == SITES and not outcome.rejected
    statement = signing.verified(params, store, AGGREGATE, signing.AGGREGATE, "1")
    assert set(statement["objects"]) == {AGGREGATE, round_key("1", "aggregate", "aggregate.json")}
    assert aggregate_step(params, store, "1", SITES).reused


@pytest.mark.parametrize("case, reason", [
    ("unsigned", "site 'site-c': unsigned package (no manifest.json.sig; federation.signatures is required)"),
    ("forged", "site 'site-c': forged package: manifest.json.sig does not verify with "
               "federation.members[site-c].public_key"),
    ("another site's id", "site 'site-c': its package claims site id 'site-b' (another site's package in its "
                          "folder)"),
    ("stale nonce", "site 'site-c': replayed package: signed with the stale round nonce 'old-nonce', the "
                    f"coordinator published {'n' * 32!r} for round '1'"),
    ("edited after signing", "site 'site-c': manifest.json was edited after signing (its digest is not the "
                             "signed one)"),
    ("gate summary edited", "site 'site-c': its stored gate summary was edited after signing (not the one the "
                            "site signed)"),
])
def test_a_hostile_package_is_rejected_with_its_reason_and_nothing_stored_changes(
        case, reason, params, keys, attacker, store, tmp_path, monkeypatch):
    publish(params, store)
    send(params, store, tmp_path, "site-a")
    send(params, store, tmp_path, "site-b")
    if case == "unsigned":
        unsigned = params.model_copy(update={"federation": params.federation.model_copy(
            update={"signatures": "off"})})
        send(unsigned, store, tmp_path, "site-c")
    elif case == "forged":
        monkeypatch.setenv("FEDKIM_SIGNING_KEY", str(attacker[1]))
        send(attacker[0], store, tmp_path, "site-c")  # signed with a key the federation does not trust for site-c
        monkeypatch.setenv("FEDKIM_SIGNING_KEY", str(keys))
    elif case == "another site's id":
        send(params, store, tmp_path, "site-b", prefix_site="site-c")  # site-b's signed package, in site-c's folder
    elif case == "stale nonce":
        send(params, store, tmp_path, "site-c", nonce="old-nonce")
    elif case == "edited after signing":
        send(params, store, tmp_path, "site-c")
        key = f"{package_prefix('1', 'site-c')}/manifest.json"
        manifest = json.loads((store.root / key).read_text())
        manifest["sample_counts"]["image"] = 10**6  # claims more samples, signature unchanged
        replace_object(store, key, json.dumps(manifest).encode())
    elif case == "gate summary edited":
        put_json(store, validation_key("1", "site-c"), gate_summary("site-c", 12))
        send(params, store, tmp_path, "site-c", gate=gate_summary("site-c", 12))
        put_json(store, validation_key("1", "site-c"), gate_summary("site-c", 10**6), overwrite=True)
    before = snapshot(store)

    outcome = aggregate_step(params, store, "1", ["site-a", "site-b", "site-c"])

    assert outcome.accepted == ["site-a", "site-b"]
    assert rejected_reason(outcome, "site-c") == reason
    assert {k: v for k, v in snapshot(store).items() if k in before} == before  # nothing stored was replaced


def test_a_package_replayed_from_another_round_is_rejected(params, store, tmp_path):
    publish(params, store, "1")
    send(params, store, tmp_path, "site-a", "1")
    publish(params, store, "2", nonce="m" * 32)
    send(params, store, tmp_path, "site-b", "2", nonce="m" * 32)
    for name in ("encoders.safetensors", "manifest.json", "manifest.json.sig"):  # round 1's package, copied
        source = store.root / package_prefix("1", "site-a") / name
        store.put_file(f"{package_prefix('2', 'site-a')}/{name}", source)

    outcome = aggregate_step(params, store, "2", ["site-a", "site-b"])

    assert outcome.accepted == ["site-b"]
    assert rejected_reason(outcome, "site-a") == ("site 'site-a': replayed package: signed for round '1', this is "
                                                  "round '2'")


@pytest.mark.integration
def test_signed_uploads_through_an_s3_store(params, tmp_path, tmp_path_factory):
    """The same signatures over S3 (a moto server on 127.0.0.1): the objects' recorded sha256 is their metadata."""
    import uuid

    from fedkim.federation.s3 import S3Store
    from tests.helpers.servers import fake_s3

    with fake_s3(tmp_path_factory.mktemp("aws")) as endpoint:
        s3 = S3Store(f"t-{uuid.uuid4().hex[:12]}", prefix="fed", endpoint_url=endpoint, create_bucket=True)
        publish(params, s3)
        for site in SITES:
            send(params, s3, tmp_path, site)
        key = f"{package_prefix('1', 'site-c')}/manifest.json"
        edited = tmp_path / "edited.json"
        manifest = json.loads(s3.get_file(key, tmp_path / "manifest.json").read_text())
        edited.write_text(json.dumps(manifest | {"sample_counts": {"image": 10**6}}))
        s3.put_file(key, edited, overwrite=True)  # someone with write access to the bucket

        outcome = aggregate_step(params, s3, "1", SITES)

        assert outcome.accepted == ["site-a", "site-b"]
        assert "site 'site-c': manifest.json was edited after signing" in rejected_reason(outcome, "site-c")
        assert signing.verified(params, s3, AGGREGATE, signing.AGGREGATE, "1") is not None
        assert aggregate_step(params, s3, "1", SITES).reused


# ------------------------------------------------------------------------------------------ coordinator side
def test_a_planted_unsigned_global_model_is_refused_naming_its_key_and_kept(params, store, tmp_path):
    put_state(store, GLOBAL, global_state())
    before = snapshot(store)
    for step in (lambda: start_round(params, store, "1"), lambda: aggregate_step(params, store, "1", SITES)):
        with pytest.raises(signing.SignatureError, match=rf"{GLOBAL}: refusing to reuse this global-model of round "
                                                         rf"1: unsigned \(no {GLOBAL}.sig"):
            step()
    assert snapshot(store) == before


def test_a_forged_or_moved_global_model_is_refused(params, keys, attacker, store, monkeypatch):
    monkeypatch.setenv("FEDKIM_SIGNING_KEY", str(attacker[1]))
    publish(attacker[0], store, "1")  # signed with a key the federation does not trust
    with pytest.raises(signing.SignatureError, match="forged: .* does not verify with "
                                                     "federation.coordinator_public_key"):
        start_round(params, store, "1")

    monkeypatch.setenv("FEDKIM_SIGNING_KEY", str(keys))
    publish(params, store, "2")
    for name in ("encoders.safetensors", "encoders.safetensors.sig"):  # round 2's global, copied to round 3
        store.put_file(round_key("3", "global", name), store.root / round_key("2", "global", name))
    with pytest.raises(signing.SignatureError, match="signs a global-model of round '2'.*not this object"):
        start_round(params, store, "3")


def test_a_planted_or_edited_aggregate_is_refused_and_never_replaced(params, store, tmp_path):
    publish(params, store)
    for site in SITES:
        send(params, store, tmp_path, site)
    put_state(store, AGGREGATE, global_state(seed=1))  # planted before the coordinator aggregates
    put_json(store, round_key("1", "aggregate", "aggregate.json"),
             {"accepted": ["site-a"], "rejected": {}, "strategy": "fedavg"})
    before = snapshot(store)
    with pytest.raises(signing.SignatureError, match=f"{AGGREGATE}: refusing to reuse this aggregate of round 1: "
                                                     "unsigned"):
        aggregate_step(params, store, "1", SITES)
    assert snapshot(store) == before

    signing.sign_objects(params, store, AGGREGATE, signing.AGGREGATE, "1", also=("aggregate.json",))  # now signed
    assert aggregate_step(params, store, "1", SITES).reused
    replace_object(store, round_key("1", "aggregate", "aggregate.json"),
                   json.dumps({"accepted": SITES, "rejected": {}, "strategy": "fedavg"}).encode())
    with pytest.raises(signing.SignatureError, match="aggregate.json differs from what "
                                                     "federation.coordinator_public_key's key signed"):
        aggregate_step(params, store, "1", SITES)


# ------------------------------------------------------------------------------------------------ a round
@pytest.mark.slow
def test_a_signed_round_runs_end_to_end_and_reruns_from_its_signed_objects(small_federation, tmp_path, monkeypatch):
    keys = tmp_path / "keys"
    monkeypatch.setenv("FEDKIM_SIGNING_KEY", str(keys))
    raw = keep_members(small_params_dict(small_federation.root, **TINY), SITES)
    params = write_params(tmp_path / "params", signed_federation(raw, keys))
    store = LocalStore(tmp_path / "store")

    first = run_round(params, store, "1", tmp_path / "work")

    assert first["aggregate"]["accepted"] == SITES and not first["aggregate"]["rejected"]
    for site in SITES:
        assert store.exists(f"{package_prefix('1', site)}/manifest.json.sig")
        manifest = get_json(store, f"{package_prefix('1', site)}/manifest.json")
        assert manifest["round_nonce"] == signing.round_nonce(params, store, GLOBAL, "1")
    # the coordinator signed the injected model, the evaluation and LATEST too; the re-run verifies them
    assert signing.verified(params, store, round_key("1", "central", "inject.json"), signing.CENTRAL, "1")
    assert signing.verified(params, store, round_key("1", "evaluation", "metrics.json"), signing.EVALUATION, "1")
    assert signing.RECORD_SIGNATURE in get_json(store, LATEST_KEY)
    before = snapshot(store)
    again = run_round(params, store, "1", tmp_path / "work")
    assert again["aggregate"]["reused"] and snapshot(store) == before
    start_round(params, store, "2")  # from round 1's verified aggregate, signed with a fresh nonce
    assert signing.round_nonce(params, store, round_key("2", "global", "encoders.safetensors"), "2") != \
        signing.round_nonce(params, store, GLOBAL, "1")
