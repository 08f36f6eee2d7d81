"""A round as idempotent steps around a real local store: tiny FM, the small federation."""

import pytest
import torch

from fedkim.digests import sha256_file
from fedkim.federation.store import LocalStore, package_key
from fedkim.rounds import (QuorumError, aggregate_step, get_state, latest_round, round_key, run_round,
                           start_round, train_site_step)

pytestmark = pytest.mark.slow


def snapshot(store: LocalStore) -> dict[str, str]:
    return {key: store.sha256(key) for key in store.list("rounds/")}


def test_a_round_reruns_without_duplicating_anything_and_the_next_starts_from_it(params, tmp_path):
    store = LocalStore(tmp_path / "store")
    first = run_round(params, store, "1", tmp_path / "work")
    assert {s["status"] for s in first["sites"]} == {"trained"}
    assert set(first["aggregate"]["accepted"]) == {s.id for s in params.data.sites}
    assert first["metrics"]["tasks"] and latest_round(store) == "1"
    assert set(first["timings"]) == {"start", *(f"site:{s.id}" for s in params.data.sites), "aggregate", "inject",
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
    sites = [s.id for s in params.data.sites[:2]]
    for site in sites:
        train_site_step(params, store, "7", site)
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
    for site in params.data.sites[:2]:
        train_site_step(params, store, "3", site.id)
    aggregate_step(params, store, "3", [s.id for s in params.data.sites[:2]])
    injected, _ = inject_step(params, store, "3", tmp_path / "work")
    torch.manual_seed(12345)  # a different global RNG state, as in another process
    torch.rand(1000)
    rebuilt = load_central(params, store, "3", injected=True)
    for task in ("lung_opacity", "ecg_abnormal", "mortality"):
        batch = batch_of(params, task)
        expected = injected.option_logprobs(batch, task, [["No", "Yes"]] * 4)
        assert torch.allclose(rebuilt.option_logprobs(batch, task, [["No", "Yes"]] * 4), expected, atol=1e-5)
