"""A hostile or careless site cannot take over a round: capped weights, the adaptive norm bound, coordinate-wise
median and trimmed mean, and FedAdam's moments carried from round to round. Real packages in a real LocalStore."""

import pytest
import torch

from fedkim.config import ConfigError
from fedkim.federation import aggregate, fedadam
from fedkim.federation.aggregate import ServerOptimizerState
from fedkim.federation.package import PackageManifest, read_package
from fedkim.federation.store import LocalStore, package_prefix
from fedkim.federation.weights import capped_shares
from fedkim.round_chain import base_key
from fedkim.rounds import (OPTIMIZER_FILE, aggregate_step, finish_round, get_json, get_state, latest_round, put_json,
                           put_state, round_key, validation_key)
from tests.helpers import small_params_dict, write_params
from tests.helpers.packages import gate_summary, global_state, package_fields, site_state, upload_package

IMAGE_KEY = "encoders.image.proj.weight"


@pytest.fixture
def configure(tmp_path_factory):
    """configure(**federation settings): params over the repository's params.yaml (no data is read)."""
    def make(**federation):
        folder = tmp_path_factory.mktemp("params")
        overrides = {f"federation.{k}": v for k, v in federation.items()}
        return write_params(folder, small_params_dict(folder / "federation", **overrides))
    return make


@pytest.fixture
def glob():
    return global_state()


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "store")


def publish(store, round_id, glob):
    """The round's global model, and where it started (as start_round records it: finish_round moves LATEST)."""
    put_state(store, round_key(round_id, "global", "encoders.safetensors"), glob)
    put_json(store, base_key(round_id), {"previous": latest_round(store)})


def send(store, round_id, glob, tmp_path, site, seed, scale=0.1, **counts):
    """Site `site` uploads an image-only (or `counts`) package moved by noise of `scale`; returns its state."""
    state = site_state(glob, set(counts), seed, scale=scale)
    upload_package(store, state, tmp_path, **package_fields(site, round_id, **counts))
    return state


def stored(store, round_id, site, tmp_path):
    return read_package(store.get_dir(package_prefix(round_id, site), tmp_path / f"read-{round_id}-{site}"))[1]


# ------------------------------------------------------------------------------------------------ weights
def test_shares_below_the_cap_are_exactly_fedavgs_and_a_capped_share_goes_to_the_others():
    # The shipped federation's image counts (site-a, site-c, site-d): 0.4 / 0.4 / 0.2, below the default 0.5.
    counts = {"site-a": 36, "site-c": 36, "site-d": 18}
    assert capped_shares(counts, 0.5) == {s: n / 90 for s, n in counts.items()}
    spread = capped_shares({"a": 1, "b": 1, "c": 2, "d": 96}, 0.4)
    assert spread["d"] == 0.4 and spread["c"] == pytest.approx(0.3) and spread["a"] == pytest.approx(0.15)
    assert sum(spread.values()) == pytest.approx(1.0)
    assert capped_shares({"a": 1, "b": 99}, 0.5) == {"a": 0.5, "b": 0.5}  # two sites under a 0.5 cap: equal
    assert capped_shares({"a": 1, "b": 99}, 1.0) == {"a": 0.01, "b": 0.99}


def test_an_inflated_sample_count_is_capped_by_its_gate_and_the_share_cap_with_its_reason(configure, store, glob,
                                                                                         tmp_path):
    publish(store, "1", glob)
    a = send(store, "1", glob, tmp_path, "site-a", 1, image=20)
    b = send(store, "1", glob, tmp_path, "site-b", 2, image=20)
    c = send(store, "1", glob, tmp_path, "site-c", 3, image=10**9)  # claims a billion samples
    # Orchestrated rounds store each site's gate summary beside the packages; site-c's gate counted 40.
    for site, samples in {"site-a": 30, "site-b": 30, "site-c": 44}.items():
        put_json(store, validation_key("1", site), gate_summary(site, samples, quarantined=4 if site == "site-c" else 0))

    outcome = aggregate_step(configure(), store, "1", ["site-a", "site-b", "site-c"])

    assert outcome.accepted == ["site-a", "site-b", "site-c"] and not outcome.rejected
    (reason,) = outcome.findings["site-c"]
    assert "'site-c'" in reason and "1000000000" in reason and "40 samples its data gate verified" in reason
    saved = get_json(store, round_key("1", "aggregate", "aggregate.json"))
    # Counts 20 / 20 / 40 would give site-c 0.5: exactly the default cap, so it holds that share and no more.
    assert saved["weights"]["image"] == {"site-a": 0.25, "site-b": 0.25, "site-c": 0.5}
    assert saved["weight_findings"] == {"site-c": [reason]} and saved["unverified_counts"] == []
    new = get_state(store, round_key("1", "aggregate", "encoders.safetensors"))
    torch.testing.assert_close(new[IMAGE_KEY], 0.25 * a[IMAGE_KEY] + 0.25 * b[IMAGE_KEY] + 0.5 * c[IMAGE_KEY])
    # Re-running the step reads the stored outcome back, findings included.
    assert aggregate_step(configure(), store, "1", ["site-a", "site-b", "site-c"]).findings == outcome.findings


def test_the_gate_s_per_modality_count_caps_that_modality(configure, store, glob, tmp_path):
    publish(store, "1", glob)
    send(store, "1", glob, tmp_path, "site-a", 1, image=20)
    send(store, "1", glob, tmp_path, "site-b", 2, image=20)
    send(store, "1", glob, tmp_path, "site-c", 3, image=30)  # its gate saw 12 image rows among 60 samples
    seen = {"site-a": {"image": 20}, "site-b": {"image": 20}, "site-c": {"image": 12, "ecg": 48}}
    for site, modalities in seen.items():
        put_json(store, validation_key("1", site), gate_summary(site, sum(modalities.values()), modalities=modalities))

    outcome = aggregate_step(configure(), store, "1", ["site-a", "site-b", "site-c"])

    (reason,) = outcome.findings["site-c"]
    assert "sample_counts['image'] = 30" in reason and "12 samples its data gate verified" in reason
    saved = get_json(store, round_key("1", "aggregate", "aggregate.json"))
    assert saved["weights"]["image"] == pytest.approx({"site-a": 20 / 52, "site-b": 20 / 52, "site-c": 12 / 52})


def test_without_a_gate_summary_the_share_cap_alone_keeps_a_site_from_taking_over(configure, store, glob, tmp_path):
    publish(store, "1", glob)
    states = [send(store, "1", glob, tmp_path, s, i, image=n)
              for i, (s, n) in enumerate([("site-a", 20), ("site-b", 20), ("site-c", 20), ("site-d", 10**9)])]
    summaries = {"site-a": gate_summary("site-a", 20), "site-b": None, "site-c": None, "site-d": None}
    outcome = aggregate_step(configure(max_weight_share=0.4), store, "1", ["site-a", "site-b", "site-c", "site-d"],
                             gate_summaries=summaries)
    saved = get_json(store, round_key("1", "aggregate", "aggregate.json"))
    assert saved["weights"]["image"]["site-d"] == 0.4 and not outcome.findings
    assert saved["unverified_counts"] == ["site-b", "site-c", "site-d"]
    new = get_state(store, round_key("1", "aggregate", "encoders.safetensors"))
    expected = sum(w * s[IMAGE_KEY] for w, s in zip([0.2, 0.2, 0.2, 0.4], states))
    torch.testing.assert_close(new[IMAGE_KEY], expected)


def test_counts_beyond_the_sites_own_task_counts_are_a_finding(configure, store, glob, tmp_path):
    publish(store, "1", glob)
    send(store, "1", glob, tmp_path, "site-a", 1, image=20)
    state = site_state(glob, {"image"}, 2)
    fields = package_fields("site-b", "1", image=500) | {"task_counts": {"lung_opacity": 20}}
    upload_package(store, state, tmp_path, **fields)
    outcome = aggregate_step(configure(), store, "1", ["site-a", "site-b"])
    assert outcome.findings["site-b"] == ["site 'site-b': sample_counts['image'] = 500 exceeds the 20 its task_counts "
                                          "list for image; weighed as 20"]


def test_default_settings_leave_the_shipped_federations_average_bit_identical(configure, store, glob, tmp_path):
    publish(store, "1", glob)
    shipped = {"site-a": dict(image=36, ecg=18, clinical=18), "site-b": dict(ecg=18, clinical=18),
               "site-c": dict(image=36, clinical=18), "site-d": dict(image=18, ecg=9)}
    for i, (site, counts) in enumerate(shipped.items()):
        send(store, "1", glob, tmp_path, site, i, **counts)
        put_json(store, validation_key("1", site), gate_summary(site, 2 * sum(counts.values())))
    aggregate_step(configure(), store, "1", list(shipped))
    packages = [read_package(store.get_dir(package_prefix("1", s), tmp_path / f"plain-{s}")) for s in shipped]
    plain = aggregate("fedavg", glob, packages)  # uncapped, as before the caps existed
    new = get_state(store, round_key("1", "aggregate", "encoders.safetensors"))
    assert all(torch.equal(new[k], plain.state_dict[k]) for k in glob)


# ------------------------------------------------------------------------------------------------ norm bound
def test_an_oversized_update_is_rejected_by_the_adaptive_bound_while_genuine_ones_pass(configure, store, glob,
                                                                                      tmp_path):
    publish(store, "1", glob)
    genuine = [send(store, "1", glob, tmp_path, f"site-{s}", i, image=20, ecg=20) for i, s in enumerate("abc")]
    send(store, "1", glob, tmp_path, "site-d", 9, scale=5.0, image=20, ecg=20)  # 50x the others' noise

    outcome = aggregate_step(configure(), store, "1", ["site-a", "site-b", "site-c", "site-d"])

    assert outcome.accepted == ["site-a", "site-b", "site-c"]
    reasons = outcome.rejected["site-d"]
    assert {r.split(" of its ")[1].split()[0] for r in reasons} == {"image", "ecg"}
    assert all("'site-d'" in r and "5 x the round's median" in r and "bound" in r for r in reasons)
    assert not any("exceeds max_update_norm" in r for r in reasons)  # the hard limit (1000) let it through
    new = get_state(store, round_key("1", "aggregate", "encoders.safetensors"))
    torch.testing.assert_close(new[IMAGE_KEY], sum(s[IMAGE_KEY] for s in genuine) / 3)


def test_the_adaptive_bound_follows_norm_multiple(configure, store, glob, tmp_path):
    publish(store, "1", glob)
    for i, s in enumerate("abc"):
        send(store, "1", glob, tmp_path, f"site-{s}", i, image=20)
    send(store, "1", glob, tmp_path, "site-d", 9, scale=0.3, image=20)  # 3x: within 5x, beyond 2x
    assert aggregate_step(configure(), store, "1", ["site-a", "site-b", "site-c", "site-d"]).rejected == {}
    publish(store, "2", glob)
    for i, s in enumerate("abc"):
        send(store, "2", glob, tmp_path, f"site-{s}", i, image=20)
    send(store, "2", glob, tmp_path, "site-d", 9, scale=0.3, image=20)
    strict = aggregate_step(configure(norm_multiple=2), store, "2", ["site-a", "site-b", "site-c", "site-d"])
    assert list(strict.rejected) == ["site-d"] and "2 x the round's median" in strict.rejected["site-d"][0]


# ------------------------------------------------------------------------------------------------ robust strategies
def poisoned_round(store, glob, tmp_path, round_id="1"):
    """Four genuine sites and one that sends its image encoder shifted by +50."""
    publish(store, round_id, glob)
    genuine = [send(store, round_id, glob, tmp_path, f"site-{s}", i, image=20) for i, s in enumerate("abcd")]
    poisoned = site_state(glob, {"image"}, 9)
    poisoned[IMAGE_KEY] = poisoned[IMAGE_KEY] + 50
    upload_package(store, poisoned, tmp_path, **package_fields("site-e", round_id, image=20))
    return torch.stack([s[IMAGE_KEY] for s in genuine]).sort(dim=0).values


@pytest.mark.parametrize("strategy", ["median", "trimmed_mean"])
def test_median_and_trimmed_mean_ignore_a_single_poisoned_site(configure, store, glob, tmp_path, strategy):
    genuine = poisoned_round(store, glob, tmp_path)
    # The adaptive bound would reject site-e outright; raise it so the strategy alone has to cope.
    params = configure(strategy=strategy, norm_multiple=10**6)
    outcome = aggregate_step(params, store, "1", [f"site-{s}" for s in "abcde"])
    assert "site-e" in outcome.accepted and outcome.strategy == strategy
    new = get_state(store, round_key("1", "aggregate", "encoders.safetensors"))[IMAGE_KEY]
    # Five values per coordinate, the poisoned one always the largest: the median is the genuine third smallest,
    # the 0.2-trimmed mean the mean of the genuine second to fourth.
    expected = genuine[2] if strategy == "median" else genuine[1:4].mean(dim=0)
    torch.testing.assert_close(new, expected)
    assert bool(((new >= genuine[0]) & (new <= genuine[-1])).all())


def test_fedavg_is_taken_over_by_the_same_poisoned_site(configure, store, glob, tmp_path):
    genuine = poisoned_round(store, glob, tmp_path)
    aggregate_step(configure(norm_multiple=10**6), store, "1", [f"site-{s}" for s in "abcde"])
    new = get_state(store, round_key("1", "aggregate", "encoders.safetensors"))[IMAGE_KEY]
    assert bool((new > genuine[-1] + 5).all())  # what the robust strategies prevent


def test_trim_fraction_sets_how_many_values_are_dropped(glob):
    packages = []
    for i, s in enumerate("abcd"):
        fields = package_fields(f"site-{s}", image=20)
        manifest = PackageManifest(schema_version=1, tensors_sha256="0" * 64, code_version="test",
                                   created_at="2025-01-01T00:00:00Z", **fields)
        packages.append((manifest, site_state(glob, {"image"}, i)))
    values = torch.stack([p[1][IMAGE_KEY] for p in packages]).sort(dim=0).values
    none = aggregate("trimmed_mean", glob, packages, trim_fraction=0.0).state_dict[IMAGE_KEY]
    one = aggregate("trimmed_mean", glob, packages, trim_fraction=0.25).state_dict[IMAGE_KEY]
    torch.testing.assert_close(none, values.mean(dim=0))
    torch.testing.assert_close(one, values[1:3].mean(dim=0))
    torch.testing.assert_close(aggregate("median", glob, packages).state_dict[IMAGE_KEY], values[1:3].mean(dim=0))
    with pytest.raises(ValueError, match="trim_fraction must be in"):
        aggregate("trimmed_mean", glob, packages, trim_fraction=0.5)


def test_bad_aggregation_settings_name_their_key(configure):
    with pytest.raises(ConfigError, match="max_weight_share"):
        configure(max_weight_share=0)
    with pytest.raises(ConfigError, match="trim_fraction"):
        configure(trim_fraction=0.5)
    with pytest.raises(ConfigError, match="strategy"):
        configure(strategy="krum")


# ------------------------------------------------------------------------------------------------ FedAdam
def test_fedadam_moments_carry_over_to_the_next_round(configure, store, glob, tmp_path):
    params = configure(strategy="fedadam")
    sites = ["site-a", "site-b"]
    publish(store, "1", glob)
    for i, site in enumerate(sites):
        send(store, "1", glob, tmp_path, site, i, image=20)
    aggregate_step(params, store, "1", sites)
    first = ServerOptimizerState.load(store.get_file(round_key("1", "aggregate", OPTIMIZER_FILE),
                                                     tmp_path / "one.safetensors"))
    assert first.step == 1 and IMAGE_KEY in first.m
    finish_round(store, "1")

    glob2 = get_state(store, round_key("1", "aggregate", "encoders.safetensors"))
    publish(store, "2", glob2)
    for i, site in enumerate(sites):
        send(store, "2", glob2, tmp_path, site, 10 + i, image=20)
    aggregate_step(params, store, "2", sites)

    second = ServerOptimizerState.load(store.get_file(round_key("2", "aggregate", OPTIMIZER_FILE),
                                                      tmp_path / "two.safetensors"))
    assert second.step == 2
    packages = [read_package(store.get_dir(package_prefix("2", s), tmp_path / f"two-{s}")) for s in sites]
    continued = fedadam(glob2, packages, state=first)
    fresh = fedadam(glob2, packages)
    new = get_state(store, round_key("2", "aggregate", "encoders.safetensors"))
    assert torch.equal(new[IMAGE_KEY], continued.state_dict[IMAGE_KEY])
    assert not torch.equal(new[IMAGE_KEY], fresh.state_dict[IMAGE_KEY])
    torch.testing.assert_close(second.m[IMAGE_KEY], continued.optimizer_state.m[IMAGE_KEY])
