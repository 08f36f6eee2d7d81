"""A round as idempotent steps around a real local store: tiny FM, the small federation."""

import shutil
import threading

import pytest
import torch

from fedkim.digests import sha256_file
from fedkim.federation.store import LocalStore, package_key, package_prefix
from fedkim.rounds import (
    QuorumError,
    SplitGateError,
    aggregate_step,
    evaluate_step,
    gated_site,
    get_state,
    latest_round,
    load_central,
    package_validation,
    put_json,
    read_manifest_from_store,
    round_key,
    run_round,
    start_round,
    train_site_step,
)
from fedkim.round_lock import RoundLockedError
from tests.helpers import TINY, keep_members, small_params_dict, write_params
from tests.helpers.sites import refinalize

pytestmark = pytest.mark.slow


def snapshot(store: LocalStore) -> dict[str, str]:
    return {key: store.sha256(key) for key in store.list("rounds/")}


def test_a_round_reruns_without_duplicating_anything_and_the_next_starts_from_it(params, tmp_path):
    store = LocalStore(tmp_path / "store")
    first = run_round(params, store, "1", tmp_path / "work")
    assert {s["status"] for s in first["sites"]} == {"trained"}
    assert set(first["aggregate"]["accepted"]) == set(params.member_ids())
    assert first["metrics"]["tasks"] and latest_round(store) == "1"
    assert set(first["timings"]) == {"start", *(f"site:{s}" for s in params.member_ids()), "aggregate", "inject",
                                     "evaluate", "finish"}
    before = snapshot(store)

    again = run_round(params, store, "1", tmp_path / "work")
    assert {s["status"] for s in again["sites"]} == {"reused"}
    assert again["aggregate"]["reused"] and snapshot(store) == before  # nothing re-uploaded or overwritten

    # Round 2 starts from round 1's encoders after injection (they go back to the sites), heads from the aggregate.
    start_round(params, store, "2")
    start = get_state(store, round_key("2", "global", "encoders.safetensors"))
    injected = get_state(store, round_key("1", "central", "encoders.safetensors"))
    aggregated = get_state(store, round_key("1", "aggregate", "encoders.safetensors"))
    some_encoder = next(k for k in injected if k.startswith("encoders.image"))
    some_head = next(k for k in aggregated if k.startswith("heads."))
    assert torch.equal(start[some_encoder], injected[some_encoder])
    assert torch.equal(start[some_head], aggregated[some_head])
    assert not torch.equal(injected[some_encoder], aggregated[some_encoder])  # injection did train the encoders


def test_a_tampered_package_is_rejected_with_its_reason_and_the_quorum_decides(params, tmp_path):
    store = LocalStore(tmp_path / "store")
    start_round(params, store, "7")
    sites = params.member_ids()[:2]
    for site in sites:
        train_site_step(params, store, "7", site, validation=package_validation(gated_site(params, site)[0]))
    # Corrupt one site's tensors after upload: the package's own sha256 no longer matches its manifest.
    tensors = store.root / package_key("7", sites[0], "encoders.safetensors")
    tensors.write_bytes(tensors.read_bytes()[:-8] + b"\0" * 8)
    (store.root / (package_key("7", sites[0], "encoders.safetensors") + ".sha256")).write_text(sha256_file(tensors))

    with pytest.raises(QuorumError, match="below the quorum of 2") as failure:
        aggregate_step(params, store, "7", sites + ["site-z"])
    assert sites[0] in str(failure.value) and "site-z" in str(failure.value)
    assert not store.exists(round_key("7", "aggregate", "encoders.safetensors"))

    relaxed = params.model_copy(update={"federation": params.federation.model_copy(update={"quorum": 1})})
    outcome = aggregate_step(relaxed, store, "7", sites + ["site-z"])
    assert outcome.accepted == [sites[1]]
    assert any("sha256" in r or "hash" in r for r in outcome.rejected[sites[0]])
    assert outcome.rejected["site-z"] == ["no package in the store at rounds/7/sites/site-z/"]


def test_a_model_rebuilt_from_the_store_answers_exactly_like_the_injected_one(params, tmp_path):
    """DVC stages and Prefect workers rebuild the central model in a new process: the FM's modality-tag rows
    must come out the same there, or the trained experts meet different inputs."""
    from fedkim.rounds import inject_step, load_central
    from tests.helpers.models import batch_of

    store = LocalStore(tmp_path / "store")
    start_round(params, store, "3")
    for site in params.member_ids()[:2]:
        train_site_step(params, store, "3", site, validation=package_validation(gated_site(params, site)[0]))
    aggregate_step(params, store, "3", params.member_ids()[:2])
    injected, _ = inject_step(params, store, "3", tmp_path / "work")
    torch.manual_seed(12345)  # a different global RNG state, as in another process
    torch.rand(1000)
    rebuilt = load_central(params, store, "3", injected=True)
    for task in ("lung_opacity", "ecg_abnormal", "mortality"):
        batch = batch_of(params, task)
        expected = injected.option_logprobs(batch, task, [["No", "Yes"]] * 4)
        assert torch.allclose(rebuilt.option_logprobs(batch, task, [["No", "Yes"]] * 4), expected, atol=1e-5)


def test_the_figures_promotion_decides_on_are_recomputed_not_read_from_the_store(params, tmp_path):
    """A planted validation_metrics.json with perfect figures: the reporting path reads it, the deciding path
    (recompute) evaluates the model itself, flags the disagreement and leaves the planted object as it is."""
    store = LocalStore(tmp_path / "store")
    run_round(params, store, "1", tmp_path / "work")
    key = round_key("1", "evaluation", "validation_metrics.json")
    perfect = {"tasks": {t: {"role": "train", "kind": "binary", "primary": 1.0, "f1": 1.0, "auroc": 1.0}
                         for t in ("lung_opacity", "covid", "ecg_abnormal", "mortality")}}
    put_json(store, key, perfect)
    planted = store.sha256(key)
    model = load_central(params, store, "1", injected=True)

    assert evaluate_step(params, store, "1", model, split="validation") == perfect  # as stored: reported only
    fresh = evaluate_step(params, store, "1", model, split="validation", recompute=True)
    assert fresh["stored_differs"] is True and fresh["tasks"] != perfect["tasks"]
    assert all(0.0 <= m["f1"] <= 1.0 for m in fresh["tasks"].values()) and set(fresh["tasks"]) == set(perfect["tasks"])
    assert store.sha256(key) == planted  # never overwritten
    again = evaluate_step(params, store.__class__(tmp_path / "clean"), "1", model, split="validation", recompute=True)
    assert again["tasks"] == fresh["tasks"]  # deterministic: the same model gives the same figures


def test_a_site_needs_its_gate_summary_to_train(params, tmp_path):
    with pytest.raises(TypeError):
        train_site_step(params, LocalStore(tmp_path / "store"), "1", "site-a")  # the gate's summary is required
    with pytest.raises(ValueError, match="site-a: train_site_step needs the data gate's summary"):
        train_site_step(params, LocalStore(tmp_path / "store"), "1", "site-a", validation=None)


def test_a_round_gates_provided_members_and_the_server_splits(small_federation, tmp_path):
    """site-a joins as a provided directory (a copy outside data.root), site-b's provided directory fails the gate
    and is left out with its reason, site-c is generated; the quorum of 2 is met. A public split that fails the
    gate stops the round naming `public`; pointed at a good one, the same round completes."""
    root = small_federation.root
    shutil.copytree(root / "site-a", tmp_path / "hospitals" / "site-a")
    shutil.copytree(root / "site-b", tmp_path / "hospitals" / "site-b")
    (tmp_path / "hospitals" / "site-b" / "index.parquet").unlink()
    shutil.copytree(root / "public", tmp_path / "server" / "public")
    next((tmp_path / "server" / "public" / "images").rglob("*.png")).write_bytes(b"not a PNG")  # after site.yaml
    hospitals = snapshot_files(tmp_path / "hospitals")

    raw = keep_members(small_params_dict(root, **TINY), ["site-a", "site-b", "site-c"])
    for member in raw["federation"]["members"][:2]:
        member |= {"data": "provided", "path": f"hospitals/{member['id']}"}
        del raw["data"]["sites"][member["id"]]
    raw["federation"]["splits"] = {"public": {"data": "provided", "path": "server/public"}}
    params = write_params(tmp_path, raw)
    store = LocalStore(tmp_path / "store")

    with pytest.raises(SplitGateError, match=r"server split 'public' .*data gate failed.*manifest\.fingerprint"):
        run_round(params, store, "1", tmp_path / "work")
    refinalize(tmp_path / "server" / "public")  # the export re-made: now one undecodable image, quarantined
    summary = run_round(params, store, "1", tmp_path / "work")  # injection and calibration leave it out

    sites = {s["site_id"]: s for s in summary["sites"]}
    assert sites["site-a"]["status"] == "reused" and sites["site-c"]["status"] == "reused"  # trained before
    assert sites["site-b"]["status"] == "excluded" and "index.readable" in sites["site-b"]["reason"]
    assert summary["aggregate"]["accepted"] == ["site-a", "site-c"]
    gate = summary["data_gate"]
    assert gate["site-a"]["success"] and gate["site-a"]["stats"]["expectations"] > 0
    assert gate["public"]["success"] and gate["test"]["success"] and not gate["site-b"]["success"]
    assert gate["public"]["quarantined"]["samples"] == 1 and gate["test"]["quarantined"]["samples"] == 0
    manifest = read_manifest_from_store(store, package_prefix("1", "site-a"))
    assert manifest.validation_summary.success and manifest.validation_summary.findings == 0
    assert snapshot_files(tmp_path / "hospitals") == hospitals  # the gate wrote nothing into provided directories


def snapshot_files(folder) -> dict:
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


def test_two_concurrent_runs_of_one_round_id_run_it_once(params, tmp_path):
    store = LocalStore(tmp_path / "store")
    barrier, outcomes = threading.Barrier(2), {}

    def trigger(name):
        barrier.wait()
        try:
            outcomes[name] = run_round(params, store, "1", tmp_path / name, owner=name)
        except RoundLockedError as exc:
            outcomes[name] = exc

    threads = [threading.Thread(target=trigger, args=(name,)) for name in ("first", "second")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(1800)
    refused = [o for o in outcomes.values() if isinstance(o, RoundLockedError)]
    ran = [o for o in outcomes.values() if isinstance(o, dict)]
    assert len(refused) == 1 and len(ran) == 1
    holder = "first" if isinstance(outcomes["first"], dict) else "second"
    assert f"round 1 is already running: held by {holder}, pid" in str(refused[0])
    assert {s["status"] for s in ran[0]["sites"]} == {"trained"} and latest_round(store) == "1"
    assert run_round(params, store, "1", tmp_path / "again")["aggregate"]["reused"]  # the lock was released
