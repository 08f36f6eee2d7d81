"""What the coordinator writes besides the global model and the aggregate is signed too, and verified before a step
reuses it: the injected model (central/), the evaluation, LATEST.json and the round history, base.json, FedAdam's
moments. A planted, unsigned, forged or edited object is refused naming its key, and nothing stored changes. Real
key files, the tiny FM's real central model, a real LocalStore (and S3 on a moto server on 127.0.0.1)."""

import json

import pytest

from fedkim.federation import signing
from fedkim.federation.store import LocalStore, package_prefix
from fedkim.federation.package import write_package
from fedkim.round_chain import LatestError, base_key, history_key
from fedkim.rounds import (LATEST_KEY, OPTIMIZER_FILE, aggregate_step, evaluate_step, finish_round, get_json,
                           get_state, inject_step, latest_round, load_central, put_json, put_state, round_key,
                           start_round)
from pipelines import start_round as start_round_stage
from tests.helpers import TINY, keep_members, small_params_dict, write_params
from tests.helpers.identities import signed_federation
from tests.helpers.packages import global_state, package_fields, site_state

SITES = ["site-a", "site-b", "site-c"]
CENTRAL_FILES = ("trainable.safetensors", "encoders.safetensors")


def central(round_id, name="trainable.safetensors"):
    return round_key(round_id, "central", name)


@pytest.fixture
def keys(tmp_path, monkeypatch):
    folder = tmp_path / "keys"
    monkeypatch.setenv("FEDKIM_SIGNING_KEY", str(folder))  # one process signs for every party
    return folder


def signed_params(folder, keys, **overrides):
    raw = small_params_dict(folder / "federation", **{**TINY, "federation.quorum": 1, **overrides})
    return write_params(folder, signed_federation(keep_members(raw, SITES), keys))


@pytest.fixture
def params(tmp_path, keys):
    """The tiny FM, signatures required (no data is read)."""
    return signed_params(tmp_path / "params", keys)


@pytest.fixture
def attacker(tmp_path, monkeypatch):
    """sign(write): run `write` with params and keys of an attacker (the federation trusts other keys)."""
    params = signed_params(tmp_path / "attacker-params", tmp_path / "attacker-keys")

    def sign(write):
        with monkeypatch.context() as patch:
            patch.setenv("FEDKIM_SIGNING_KEY", str(tmp_path / "attacker-keys"))
            write(params)
    return sign


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "store")


def snapshot(store):
    return {key: store.sha256(key) for key in store.list("rounds/")}


def aggregated(params, store, round_id):
    """The coordinator's aggregate of a round, here its global model as it is (no site trained), signed."""
    key = round_key(round_id, "aggregate", "encoders.safetensors")
    put_json(store, round_key(round_id, "aggregate", "aggregate.json"),
             {"accepted": SITES, "rejected": {}, "strategy": "fedavg"})
    put_state(store, key, get_state(store, round_key(round_id, "global", "encoders.safetensors")))
    signing.sign_objects(params, store, key, signing.AGGREGATE, round_id, also=("aggregate.json",))


def injected(params, store, round_id, *, sign=True, covers=CENTRAL_FILES):
    """The central model as inject_step stores it (no injection steps): its tensors, then inject.json, then the
    coordinator's signature over inject.json and the tensors it `covers`."""
    model = load_central(params, store, round_id, injected=False)
    put_state(store, central(round_id), model.trainable_state(), overwrite=True)
    put_state(store, central(round_id, "encoders.safetensors"), model.encoder_state(), overwrite=True)
    put_json(store, central(round_id, "inject.json"), {"round_id": round_id, "steps": 0}, overwrite=True)
    if sign:
        signing.sign_objects(params, store, central(round_id, "inject.json"), signing.CENTRAL, round_id,
                             also=covers, replace=True)


def completed(params, store, round_id):
    start_round(params, store, round_id)
    aggregated(params, store, round_id)
    injected(params, store, round_id)
    assert finish_round(store, round_id, params)


def refused(key, kind, round_id, reason):
    return rf"{key}: refusing to reuse this {kind} of round {round_id}: {reason}"


# ---------------------------------------------------------------------------------------- the signed chain
def test_a_completed_round_is_signed_throughout_and_its_objects_are_reused(params, store, tmp_path):
    completed(params, store, "1")

    statement = signing.verified(params, store, central("1", "inject.json"), signing.CENTRAL, "1")
    assert set(statement["objects"]) == {central("1", n) for n in (*CENTRAL_FILES, "inject.json")}
    assert set(signing.verified(params, store, round_key("1", "global", "encoders.safetensors"),
                                signing.GLOBAL_MODEL, "1")["objects"]) >= {base_key("1")}
    assert signing.RECORD_SIGNATURE in get_json(store, LATEST_KEY)
    assert signing.RECORD_SIGNATURE in json.loads(store.read_marker(history_key(1)))
    assert latest_round(store, params) == "1"
    model, summary = inject_step(params, store, "1", tmp_path / "work")  # reused, verified
    assert summary == {"round_id": "1", "steps": 0} and model is not None
    before = snapshot(store)
    assert finish_round(store, "1", params) is False and snapshot(store) == before  # finishing again: no-op

    start_round(params, store, "2")  # from round 1's verified aggregate and injected encoders
    aggregated(params, store, "2")
    injected(params, store, "2")
    assert finish_round(store, "2", params) and latest_round(store, params) == "2"


def test_with_signatures_off_nothing_is_signed_or_checked(tmp_path, store):
    folder = tmp_path / "params"
    params = write_params(folder, keep_members(small_params_dict(folder / "federation", **TINY), SITES))
    completed(params, store, "1")
    assert not [key for key in store.list("rounds/") if key.endswith(signing.SIG_SUFFIX)]
    assert signing.RECORD_SIGNATURE not in get_json(store, LATEST_KEY)
    assert signing.RECORD_SIGNATURE not in json.loads(store.read_marker(history_key(1)))
    assert latest_round(store, params) == "1"


# ---------------------------------------------------------------------------------------- the injected model
@pytest.mark.parametrize("case, reason", [
    ("unsigned", r"unsigned \(no rounds/1/central/inject.json.sig; signatures are required\)"),
    ("forged", "forged: rounds/1/central/inject.json.sig does not verify with federation.coordinator_public_key"),
    ("edited", r"[^ ]*rounds/1/central/trainable.safetensors differs from what federation.coordinator_public_key's "
               r"key signed \(edited after signing\)"),
    ("not covered", r"rounds/1/central/inject.json.sig does not cover it .*written after signing"),
])
def test_a_planted_or_edited_injected_model_is_refused_and_kept(case, reason, params, attacker, store, tmp_path):
    start_round(params, store, "1")
    aggregated(params, store, "1")
    if case == "unsigned":
        injected(params, store, "1", sign=False)
    elif case == "forged":
        injected(params, store, "1", sign=False)
        attacker(lambda hostile: signing.sign_objects(hostile, store, central("1", "inject.json"), signing.CENTRAL,
                                                      "1", also=CENTRAL_FILES))
    elif case == "edited":
        injected(params, store, "1")
        put_state(store, central("1"), global_state(), overwrite=True)  # someone with write access to the store
    elif case == "not covered":
        injected(params, store, "1", covers=("encoders.safetensors",))
    before = snapshot(store)

    for step in (lambda: inject_step(params, store, "1", tmp_path / "work"),
                 lambda: load_central(params, store, "1", injected=True)):
        with pytest.raises(signing.SignatureError, match=refused(central("1"), "central-model", "1", reason)):
            step()
    assert snapshot(store) == before  # nothing overwritten, nothing injected again


def test_the_next_round_refuses_an_edited_injected_model_of_the_last_one(params, store):
    completed(params, store, "1")
    put_state(store, central("1", "encoders.safetensors"),
              get_state(store, round_key("1", "global", "encoders.safetensors")), overwrite=True)
    before = snapshot(store)
    with pytest.raises(signing.SignatureError, match=rf"{central('1', 'encoders.safetensors')}: refusing to reuse "
                                                     r"this central-model of round 1: .* \(edited after signing\)"):
        start_round(params, store, "2")
    assert snapshot(store) == before and not store.list("rounds/2/")


def test_injection_verifies_the_aggregate_it_starts_from(params, store, tmp_path):
    start_round(params, store, "1")
    aggregate = round_key("1", "aggregate", "encoders.safetensors")
    put_state(store, aggregate, get_state(store, round_key("1", "global", "encoders.safetensors")))  # planted
    before = snapshot(store)
    for step in (lambda: inject_step(params, store, "1", tmp_path / "work"),
                 lambda: load_central(params, store, "1", injected=False)):
        with pytest.raises(signing.SignatureError, match=refused(aggregate, "aggregate", "1", "unsigned")):
            step()
    assert snapshot(store) == before and not store.list("rounds/1/central/")


# ---------------------------------------------------------------------------------------- the evaluation
@pytest.mark.parametrize("case, reason", [
    ("unsigned", r"unsigned \(no rounds/1/evaluation/metrics.json.sig"),
    ("forged", "forged: rounds/1/evaluation/metrics.json.sig does not verify"),
    ("edited", r"[^ ]*rounds/1/evaluation/metrics.json differs from what .* \(edited after signing\)"),
])
def test_a_planted_or_edited_evaluation_is_refused_and_kept(case, reason, params, attacker, store):
    key = round_key("1", "evaluation", "metrics.json")
    put_json(store, key, {"tasks": {"covid": {"primary": 0.99}}})
    if case == "forged":
        attacker(lambda hostile: signing.sign_objects(hostile, store, key, signing.EVALUATION, "1"))
    elif case == "edited":
        signing.sign_objects(params, store, key, signing.EVALUATION, "1")
        put_json(store, key, {"tasks": {"covid": {"primary": 1.0}}}, overwrite=True)
    before = snapshot(store)
    with pytest.raises(signing.SignatureError, match=refused(key, "evaluation", "1", reason)):
        evaluate_step(params, store, "1", model=None)  # refused before any model is needed
    assert snapshot(store) == before


def test_a_signed_evaluation_is_reused(params, store):
    key = round_key("1", "evaluation", "metrics.json")
    put_json(store, key, {"tasks": {"covid": {"primary": 0.5}}})
    signing.sign_objects(params, store, key, signing.EVALUATION, "1")
    assert evaluate_step(params, store, "1", model=None) == {"tasks": {"covid": {"primary": 0.5}}}


# ---------------------------------------------------------------------------------------- LATEST and history
def unsigned(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != signing.RECORD_SIGNATURE}


def plant_marker(store, key, record: dict):
    """Someone with write access to the store writes a marker (they are not hashed: created atomically)."""
    path = store.root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, sort_keys=True))


@pytest.mark.parametrize("case, error, message", [
    ("unsigned", signing.SignatureError, rf"{LATEST_KEY}: refusing to use this latest: unsigned \(no "
                                         "coordinator_signature"),
    ("forged", signing.SignatureError, rf"{LATEST_KEY}: refusing to use this latest: forged or edited after "
                                       "signing: its coordinator_signature does not verify with "
                                       "federation.coordinator_public_key"),
    ("edited", signing.SignatureError, rf"{LATEST_KEY}: refusing to use this latest: forged or edited"),
    ("history unsigned", signing.SignatureError, rf"{history_key(2)}: refusing to use this round-history: "
                                                 "unsigned"),
    ("history moved", LatestError, rf"{history_key(2)}: signed as completion #1, not #2: not trusted"),
])
def test_an_untrusted_latest_or_history_is_refused_naming_the_key(case, error, message, params, attacker, store,
                                                                  tmp_path, capsys, monkeypatch):
    completed(params, store, "1")
    latest = get_json(store, LATEST_KEY)
    if case == "unsigned":
        put_json(store, LATEST_KEY, unsigned(latest), overwrite=True)
    elif case == "forged":
        attacker(lambda hostile: put_json(store, LATEST_KEY, signing.sign_record(hostile, unsigned(latest),
                                                                                 signing.LATEST), overwrite=True))
    elif case == "edited":
        put_json(store, LATEST_KEY, latest | {"completed": ["0", "1"]}, overwrite=True)
    elif case == "history unsigned":
        plant_marker(store, history_key(2), {"round_id": "9", "previous": "1", "sequence": 2, "finished": 0.0})
    elif case == "history moved":
        plant_marker(store, history_key(2), json.loads(store.read_marker(history_key(1))))
    before = snapshot(store)

    for step in (lambda: latest_round(store, params), lambda: start_round(params, store, "2"),
                 lambda: finish_round(store, "1", params)):
        with pytest.raises(error, match=message):
            step()
    monkeypatch.setenv("FEDKIM_PARAMS", str(tmp_path / "params" / "params.yaml"))
    assert start_round_stage.main(["--store", str(store.root)]) == 1  # the DVC stage reads LATEST as the flow does
    assert error.__name__ != "SignatureError" or "refusing to use this" in capsys.readouterr().err
    assert snapshot(store) == before and not store.list("rounds/2/")


def test_the_dvc_stage_still_refuses_a_store_whose_signed_latest_names_a_round(params, store, tmp_path, capsys,
                                                                               monkeypatch):
    completed(params, store, "1")
    monkeypatch.setenv("FEDKIM_PARAMS", str(tmp_path / "params" / "params.yaml"))
    assert start_round_stage.main(["--store", str(store.root)]) == 1
    assert "LATEST.json exists and names completed round 1" in capsys.readouterr().err


def test_an_edited_base_record_does_not_move_latest(params, store):
    """base.json (where a round started) decides whether finishing it moves LATEST: the global model's signature
    covers it."""
    completed(params, store, "1")
    start_round(params, store, "2")
    aggregated(params, store, "2")
    injected(params, store, "2")
    put_json(store, base_key("2"), {"previous": "0"}, overwrite=True)
    before = snapshot(store)
    with pytest.raises(signing.SignatureError, match=rf"{base_key('2')}: refusing to reuse this global-model of "
                                                     r"round 2: .*differs from what"):
        finish_round(store, "2", params)
    assert snapshot(store) == before and latest_round(store, params) == "1"


# ---------------------------------------------------------------------------------------- FedAdam's moments
def publish(params, store, round_id, state):
    """A round's global model as start_round signs it (with base.json), from helper tensors."""
    put_json(store, base_key(round_id), {"previous": latest_round(store, params)}, overwrite=True)
    put_state(store, round_key(round_id, "global", "encoders.safetensors"), state)
    signing.sign_objects(params, store, round_key(round_id, "global", "encoders.safetensors"), signing.GLOBAL_MODEL,
                         round_id, round_nonce="n" * 32, also=("base.json",))


def send_all(params, store, tmp_path, round_id, state):
    for i, site in enumerate(SITES):
        folder = tmp_path / f"package-{round_id}" / site
        write_package(folder, site_state(state, {"image"}, seed=10 * int(round_id) + i),
                      **package_fields(site, round_id, image=10), round_nonce="n" * 32)
        signing.upload_package(params, store, package_prefix(round_id, site), folder, "n" * 32, lambda _: None)


@pytest.mark.parametrize("case, reason", [
    ("replaced", r".*differs from what federation.coordinator_public_key's key signed"),
    ("planted", r"rounds/1/aggregate/encoders.safetensors.sig does not cover it"),
    ("forged", r"forged: rounds/1/aggregate/encoders.safetensors.sig does not verify"),
])
def test_fedadam_moments_are_verified_before_the_next_round_continues_from_them(case, reason, tmp_path, keys,
                                                                                attacker, store):
    params = signed_params(tmp_path / "params", keys, **{"federation.strategy": "fedadam"})
    first = params if case != "planted" else params.model_copy(update={"federation": params.federation.model_copy(
        update={"strategy": "fedavg"})})  # planted: round 1 aggregated with FedAvg, no moments signed
    publish(params, store, "1", global_state())
    send_all(params, store, tmp_path, "1", global_state())
    aggregate_step(first, store, "1", SITES)
    assert finish_round(store, "1", params)
    moments, aggregate = (round_key("1", "aggregate", name) for name in (OPTIMIZER_FILE, "encoders.safetensors"))
    state = get_state(store, aggregate)
    publish(params, store, "2", state)
    send_all(params, store, tmp_path, "2", state)
    original = store.get_file(moments, tmp_path / "moments.safetensors") if case != "planted" else None
    if case == "replaced":
        store.put_file(moments, store.get_file(aggregate, tmp_path / "other.safetensors"), overwrite=True)
    elif case == "planted":  # moments from elsewhere, beside a FedAvg aggregate whose signature knows none
        store.put_file(moments, store.get_file(aggregate, tmp_path / "other.safetensors"))
    elif case == "forged":  # the aggregate's signature replaced by one made with another key
        for suffix in (signing.SIG_SUFFIX, signing.SIG_SUFFIX + ".sha256"):  # the object and its recorded sha256
            (store.root / (aggregate + suffix)).unlink()
        attacker(lambda hostile: signing.sign_objects(hostile, store, aggregate, signing.AGGREGATE, "1",
                                                      also=("aggregate.json", OPTIMIZER_FILE)))
    before = snapshot(store)

    with pytest.raises(signing.SignatureError, match=refused(moments, "aggregate", "1", reason)):
        aggregate_step(params, store, "2", SITES)
    assert snapshot(store) == before and not store.list("rounds/2/aggregate/")

    if case == "replaced":  # the signed moments back: round 2 continues from them
        store.put_file(moments, original, overwrite=True)
        assert aggregate_step(params, store, "2", SITES).accepted == SITES
        assert store.exists(round_key("2", "aggregate", OPTIMIZER_FILE))


# ---------------------------------------------------------------------------------------- through S3
@pytest.mark.integration
def test_the_coordinator_objects_are_verified_through_an_s3_store(params, tmp_path, tmp_path_factory):
    import uuid

    from fedkim.federation.s3 import S3Store
    from tests.helpers.servers import fake_s3

    with fake_s3(tmp_path_factory.mktemp("aws")) as endpoint:
        s3 = S3Store(f"t-{uuid.uuid4().hex[:12]}", prefix="fed", endpoint_url=endpoint, create_bucket=True)
        completed(params, s3, "1")
        assert latest_round(s3, params) == "1"
        load_central(params, s3, "1", injected=True)
        put_state(s3, central("1"), global_state(), overwrite=True)  # someone with write access to the bucket
        with pytest.raises(signing.SignatureError, match=r"central/trainable.safetensors: refusing to reuse this "
                                                         r"central-model of round 1: .*edited after signing"):
            inject_step(params, s3, "1", tmp_path / "work")
        with pytest.raises(signing.SignatureError, match="refusing to reuse this central-model"):
            start_round(params, s3, "2")
