"""Knowledge package round trip, the never-samples guard, and every admission check's rejection reason."""

import json

import pytest
import torch

from fedkim.federation import (
    PackageError,
    PackageManifest,
    check_package,
    read_package,
    screen_packages,
    write_package,
)
from fedkim.federation.package import MANIFEST_FILE, TENSORS_FILE
from tests.helpers.packages import global_state, package_fields, site_state

NORM = 100.0


@pytest.fixture
def glob():
    return global_state()


def make(tmp_path, glob, name="site-a", modalities=("image", "ecg"), state=None, **fields):
    state = site_state(glob, modalities, seed=1) if state is None else state
    counts = {m: 10 for m in modalities}
    kwargs = package_fields(name, **counts) | fields
    write_package(tmp_path / name, state, **kwargs)
    return tmp_path / name


def check(folder, glob, **kw):
    return check_package(folder, glob, max_update_norm=kw.pop("max_update_norm", NORM), **kw)


def only_reason(result, *needles):
    assert not result.accepted
    assert len(result.reasons) == 1, result.reasons
    assert all(n in result.reasons[0] for n in needles), result.reasons[0]


# ------------------------------------------------------------------------------------------------ round trip
def test_round_trip(tmp_path, glob):
    state = site_state(glob, ("image", "ecg"), seed=1)
    manifest = write_package(tmp_path / "pkg", state, **package_fields(image=10, ecg=30),
                             local_metrics={"lung_opacity": {"auroc": 0.8, "f1": float("nan")}})
    assert sorted(p.name for p in (tmp_path / "pkg").iterdir()) == [TENSORS_FILE, MANIFEST_FILE]
    loaded, tensors = read_package(tmp_path / "pkg")
    assert loaded.model_dump(exclude={"local_metrics"}) == manifest.model_dump(exclude={"local_metrics"})
    assert loaded.local_metrics["lung_opacity"]["auroc"] == 0.8
    assert loaded.sample_counts == {"image": 10, "ecg": 30} and loaded.round_id == "r1"
    assert loaded.code_version.startswith("0.") and len(loaded.tensors_sha256) == 64
    assert loaded.validation_summary.success and loaded.validation_summary.findings == 0
    assert torch.isnan(torch.tensor(loaded.local_metrics["lung_opacity"]["f1"]))  # NaN survives JSON
    assert tensors.keys() == state.keys()
    for key in state:
        assert torch.equal(tensors[key], state[key]) and tensors[key].dtype == state[key].dtype
    assert check(tmp_path / "pkg", glob, expected_round="r1").accepted


def test_integer_round_id_is_stored_as_text(tmp_path, glob):
    manifest = write_package(tmp_path / "p", site_state(glob, ("image",), 1), **package_fields(round_id=3))
    assert manifest.round_id == "3"
    assert check(tmp_path / "p", glob, expected_round=3).accepted


def test_tied_and_non_contiguous_tensors_are_written(tmp_path, glob):
    weight = glob["encoders.image.proj.weight"].t().contiguous().t()  # non-contiguous view
    state = {"encoders.image.proj.weight": weight,
             "heads.lung_opacity.weight": glob["heads.lung_opacity.weight"]}
    state["heads.covid.weight"] = state["heads.lung_opacity.weight"]  # shared storage
    write_package(tmp_path / "p", state, **package_fields())
    assert torch.equal(read_package(tmp_path / "p").state_dict["encoders.image.proj.weight"], weight)


@pytest.mark.parametrize("key", ["samples.images", "outputs.logits", "batch", "encodersimage.w"])
def test_never_samples_guard(tmp_path, glob, key):
    state = site_state(glob, ("image",), 1) | {key: torch.zeros(8, 3)}
    with pytest.raises(PackageError, match="never samples"):
        write_package(tmp_path / "p", state, **package_fields())
    assert not (tmp_path / "p" / MANIFEST_FILE).exists()


def test_invalid_manifest_fields_raise_before_anything_is_written(tmp_path, glob):
    with pytest.raises(PackageError, match="data_fingerprint"):
        write_package(tmp_path / "p", site_state(glob, ("image",), 1),
                      **(package_fields() | {"data_fingerprint": "not-hex"}))
    assert not any((tmp_path / "p").iterdir())


def test_read_package_verifies_the_tensor_hash(tmp_path, glob):
    folder = make(tmp_path, glob)
    data = bytearray((folder / TENSORS_FILE).read_bytes())
    data[-1] ^= 0xFF
    (folder / TENSORS_FILE).write_bytes(bytes(data))
    with pytest.raises(PackageError, match="sha256"):
        read_package(folder)


# ------------------------------------------------------------------------------------------------ rejections
def test_nan_and_inf_values_are_rejected(tmp_path, glob):
    state = site_state(glob, ("image",), 1)
    state["encoders.image.proj.weight"][0, 0] = float("nan")
    state["heads.lung_opacity.weight"][0, 1] = float("inf")
    result = check(make(tmp_path, glob, modalities=("image",), state=state), glob)
    assert not result.accepted and len(result.reasons) == 2
    assert any("'encoders.image.proj.weight'" in r and "non-finite" in r for r in result.reasons)
    assert any("'heads.lung_opacity.weight'" in r and "non-finite" in r for r in result.reasons)


def test_wrong_shape_is_rejected(tmp_path, glob):
    state = site_state(glob, ("image",), 1) | {"encoders.image.proj.weight": torch.zeros(5, 3)}
    only_reason(check(make(tmp_path, glob, modalities=("image",), state=state), glob),
                "'encoders.image.proj.weight'", "shape (5, 3)", "(4, 3)")


def test_wrong_dtype_is_rejected(tmp_path, glob):
    state = site_state(glob, ("image",), 1)
    state["encoders.image.proj.bias"] = state["encoders.image.proj.bias"].double()
    only_reason(check(make(tmp_path, glob, modalities=("image",), state=state), glob),
                "'encoders.image.proj.bias'", "torch.float64", "torch.float32")


def test_unknown_key_is_rejected(tmp_path, glob):
    state = site_state(glob, ("image",), 1) | {"encoders.image.extra.weight": torch.zeros(2)}
    only_reason(check(make(tmp_path, glob, modalities=("image",), state=state), glob),
                "'encoders.image.extra.weight'", "unknown key")


def test_tampered_tensor_file_is_rejected(tmp_path, glob):
    folder = make(tmp_path, glob)
    tensors = read_package(folder).state_dict
    tensors["encoders.ecg.conv.weight"] += 1e-3  # a valid file, but not the one the manifest describes
    from safetensors.torch import save_file

    save_file(tensors, str(folder / TENSORS_FILE))
    only_reason(check(folder, glob), TENSORS_FILE, "sha256", "does not match")


def test_unreadable_tensor_file_is_rejected(tmp_path, glob):
    folder = make(tmp_path, glob)
    (folder / TENSORS_FILE).write_bytes(b"garbage")
    result = check(folder, glob)
    assert not result.accepted and any("sha256" in r for r in result.reasons)
    assert any("not a readable safetensors file" in r for r in result.reasons)


def test_oversized_update_is_rejected(tmp_path, glob):
    state = site_state(glob, ("image",), 1, scale=0.0)
    state["encoders.image.proj.bias"] = state["encoders.image.proj.bias"] + torch.tensor([3.0, 4.0, 0, 0])
    folder = make(tmp_path, glob, modalities=("image",), state=state)
    result = check(folder, glob, max_update_norm=5.5)
    assert result.accepted and result.update_norm == pytest.approx(5.0)
    only_reason(check(folder, glob, max_update_norm=4.0), "update norm 5", "max_update_norm 4")


def test_wrong_round_is_rejected(tmp_path, glob):
    only_reason(check(make(tmp_path, glob), glob, expected_round="r2"), "round_id 'r1'", "'r2'")


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m.pop("tensors_sha256"), "tensors_sha256"),
    (lambda m: m.update(schema_version=99), "unsupported schema_version 99"),
    (lambda m: m.update(sample_counts={"audio": 3}), "sample_counts"),
    (lambda m: m.update(surprise=1), "surprise"),
])
def test_bad_manifest_schema_is_rejected(tmp_path, glob, edit, needle):
    folder = make(tmp_path, glob)
    raw = json.loads((folder / MANIFEST_FILE).read_text())
    edit(raw)
    (folder / MANIFEST_FILE).write_text(json.dumps(raw))
    only_reason(check(folder, glob), "bad manifest schema", needle)


def test_not_json_manifest_is_rejected(tmp_path, glob):
    folder = make(tmp_path, glob)
    (folder / MANIFEST_FILE).write_text("{not json")
    result = check(folder, glob)
    only_reason(result, "bad manifest schema", "not valid JSON")
    assert result.site_id == "site-a"  # falls back to the folder name


def test_missing_sample_count_is_rejected(tmp_path, glob):
    folder = make(tmp_path, glob, modalities=("image", "ecg"), sample_counts={"image": 10, "ecg": 0})
    only_reason(check(folder, glob), "sample_counts['ecg']", "positive")


def test_loaded_package_is_checked_too(tmp_path, glob):
    manifest, state = read_package(make(tmp_path, glob))
    state["heads.ecg_abnormal.weight"][0, 0] = float("nan")
    result = check_package((manifest, state), glob, max_update_norm=NORM)
    only_reason(result, "heads.ecg_abnormal", "non-finite")


def test_screen_excludes_rejected_packages_with_reasons(tmp_path, glob):
    good = make(tmp_path, glob, "site-a")
    bad_state = site_state(glob, ("ecg",), 2)
    bad_state["encoders.ecg.conv.weight"][0, 0, 0] = float("inf")
    bad = make(tmp_path, glob, "site-b", modalities=("ecg",), state=bad_state)
    late = make(tmp_path, glob, "site-c", modalities=("image",), round_id="r0")
    accepted, rejected = screen_packages([good, bad, late], glob, max_update_norm=NORM, expected_round="r1")
    assert [p.manifest.site_id for p in accepted] == ["site-a"]
    assert set(rejected) == {"site-b", "site-c"}
    assert "non-finite" in rejected["site-b"][0] and "round_id 'r0'" in rejected["site-c"][0]


def test_screen_rejects_both_packages_of_a_site_that_sent_two(tmp_path, glob):
    first = make(tmp_path, glob, "site-a")
    second = tmp_path / "again"
    write_package(second, site_state(glob, ("image",), 5), **package_fields("site-a"))
    accepted, rejected = screen_packages([first, second], glob, max_update_norm=NORM)
    assert accepted == [] and "duplicate" in rejected["site-a"][0]


def test_manifest_json_schema_names_the_fields():
    fields = PackageManifest.model_json_schema()["properties"]
    for name in ("schema_version", "site_id", "round_id", "sample_counts", "task_counts", "data_fingerprint",
                 "tensors_sha256", "code_version", "local_metrics", "validation_summary", "created_at"):
        assert name in fields
