"""Aggregation against hand computations: per-modality FedAvg, FedProx at the server, FedAdam steps."""

import math

import pytest
import torch

from fedkim.federation import ServerOptimizerState, aggregate, fedavg, write_package
from fedkim.federation.package import PackageManifest, read_package
from tests.helpers.packages import global_state, package_fields, site_state


def pkg(glob, site, seed, **counts):
    """An in-memory package: (manifest, state_dict) with the site's modalities' keys."""
    fields = package_fields(site, **counts)
    manifest = PackageManifest(schema_version=1, tensors_sha256="0" * 64, code_version="test",
                               created_at="2025-01-01T00:00:00Z", **fields)
    return manifest, site_state(glob, set(counts), seed)


@pytest.fixture
def glob():
    return global_state()


@pytest.fixture
def two_sites(glob):
    # Site A: image n=10, ECG n=30. Site B: image n=30, no ECG.
    return pkg(glob, "site-a", 1, image=10, ecg=30), pkg(glob, "site-b", 2, image=30)


def test_fedavg_weights_each_modality_by_its_own_counts(glob, two_sites):
    (_, a), (_, b) = two_sites
    result = aggregate("fedavg", glob, list(two_sites))
    new = result.state_dict
    for key in ("encoders.image.proj.weight", "encoders.image.proj.bias", "heads.lung_opacity.weight",
                "heads.covid.weight"):
        torch.testing.assert_close(new[key], (10 * a[key] + 30 * b[key]) / 40)
    for key in ("encoders.ecg.conv.weight", "heads.ecg_abnormal.weight"):
        torch.testing.assert_close(new[key], a[key])  # site B holds no ECG: it must not dilute it
    for key in ("encoders.clinical.lin.weight", "heads.mortality.weight"):
        assert torch.equal(new[key], glob[key])  # nobody trained clinical: the global value stays
    # Integer buffers come from the global state, never from sites (site A's counter is +3).
    counter = "encoders.image.bn.num_batches_tracked"
    assert torch.equal(new[counter], glob[counter])
    assert new.keys() == glob.keys() and all(new[k].dtype == glob[k].dtype for k in glob)
    assert result.contributors == {"image": ["site-a", "site-b"], "ecg": ["site-a"]}
    assert result.weights == {"image": {"site-a": 0.25, "site-b": 0.75}, "ecg": {"site-a": 1.0}}
    assert result.optimizer_state is None and result.strategy == "fedavg"


def test_fedavg_of_identical_models_is_the_identity(glob):
    same = {k: v for k, v in glob.items()}
    manifests = [pkg(glob, s, 0, image=n, ecg=n, clinical=n)[0] for s, n in [("a", 3), ("b", 50), ("c", 7)]]
    new = fedavg(glob, [(m, same) for m in manifests]).state_dict
    for key in glob:
        torch.testing.assert_close(new[key], glob[key], rtol=0, atol=1e-6)


def test_fedavg_keeps_half_precision_parameters(glob):
    glob = {k: v.half() if v.is_floating_point() else v for k, v in glob.items()}
    a = pkg(glob, "a", 1, image=1)
    b = pkg(glob, "b", 2, image=3)
    new = fedavg(glob, [a, b]).state_dict
    key = "encoders.image.proj.weight"
    assert new[key].dtype == torch.float16
    torch.testing.assert_close(new[key].float(), (a[1][key].float() + 3 * b[1][key].float()) / 4,
                               rtol=1e-3, atol=1e-3)


def test_fedprox_equals_fedavg_at_the_server(glob, two_sites):
    avg = aggregate("fedavg", glob, list(two_sites))
    prox = aggregate("fedprox", glob, list(two_sites), mu=0.01)
    assert prox.strategy == "fedprox" and prox.hparams == {"mu": 0.01}
    for key in glob:
        assert torch.equal(avg.state_dict[key], prox.state_dict[key])


def test_fedadam_one_step_matches_a_hand_computation(glob, two_sites):
    (_, a), (_, b) = two_sites
    lr, b1, b2, tau = 0.5, 0.8, 0.9, 0.01
    result = aggregate("fedadam", glob, list(two_sites), lr=lr, beta1=b1, beta2=b2, tau=tau)
    key = "encoders.image.proj.bias"
    for i in range(glob[key].numel()):
        x = glob[key][i].item()
        delta = (10 * a[key][i].item() + 30 * b[key][i].item()) / 40 - x
        m, v = (1 - b1) * delta, (1 - b2) * delta**2
        assert result.state_dict[key][i].item() == pytest.approx(x + lr * m / (math.sqrt(v) + tau), rel=1e-5)
        # float32 cancellation in (average - global): compare moments to an absolute tolerance.
        assert result.optimizer_state.m[key][i].item() == pytest.approx(m, abs=1e-7)
        assert result.optimizer_state.v[key][i].item() == pytest.approx(v, abs=1e-9)
    assert torch.equal(result.state_dict["heads.mortality.weight"], glob["heads.mortality.weight"])
    assert "heads.mortality.weight" not in result.optimizer_state.m
    assert result.optimizer_state.step == 1
    assert result.hparams == {"lr": lr, "beta1": b1, "beta2": b2, "tau": tau}


def test_fedadam_second_step_uses_saved_state(tmp_path, glob, two_sites):
    first = aggregate("fedadam", glob, list(two_sites))
    path = first.optimizer_state.save(tmp_path / "server_opt.safetensors")
    loaded = ServerOptimizerState.load(path)
    assert loaded.step == 1 and loaded.m.keys() == first.optimizer_state.m.keys()
    for key in loaded.m:
        assert torch.equal(loaded.m[key], first.optimizer_state.m[key])
        assert torch.equal(loaded.v[key], first.optimizer_state.v[key])

    g1 = first.state_dict
    second = aggregate("fedadam", g1, list(two_sites), state=loaded)
    key = "encoders.ecg.conv.weight"
    delta = two_sites[0][1][key] - g1[key]  # only site A holds ECG
    m = 0.9 * first.optimizer_state.m[key] + 0.1 * delta
    v = 0.99 * first.optimizer_state.v[key] + 0.01 * delta**2
    torch.testing.assert_close(second.state_dict[key], g1[key] + 1e-2 * m / (v.sqrt() + 1e-3))
    assert second.optimizer_state.step == 2


def test_aggregate_on_packages_read_from_disk(tmp_path, glob, two_sites):
    loaded = []
    for manifest, state in two_sites:
        fields = manifest.model_dump(include={"site_id", "round_id", "sample_counts", "task_counts",
                                              "data_fingerprint", "validation_summary"})
        write_package(tmp_path / manifest.site_id, state, **fields)
        loaded.append(read_package(tmp_path / manifest.site_id))
    from_disk = aggregate("fedavg", glob, loaded).state_dict
    in_memory = aggregate("fedavg", glob, list(two_sites)).state_dict
    assert all(torch.equal(from_disk[k], in_memory[k]) for k in glob)


def test_unknown_strategy_lists_the_allowed_names(glob, two_sites):
    with pytest.raises(ValueError, match=r"fedsgd.*fedadam.*fedavg.*fedprox"):
        aggregate("fedsgd", glob, list(two_sites))


def test_misplaced_hyperparameter_is_an_error(glob, two_sites):
    with pytest.raises(ValueError, match="fedavg takes no hyperparameter"):
        aggregate("fedavg", glob, list(two_sites), mu=0.1)


def test_empty_or_unscreened_input_is_refused(glob):
    with pytest.raises(ValueError, match="no accepted packages"):
        aggregate("fedavg", glob, [])
    manifest, state = pkg(glob, "a", 1, image=5)
    with pytest.raises(ValueError, match="screen packages"):
        aggregate("fedavg", glob, [(manifest, state | {"encoders.image.new": torch.zeros(1)})])
