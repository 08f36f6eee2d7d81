from pathlib import Path

import pytest
import yaml

from fedkim.config import ConfigError, load_params, params_hash
from tests.helpers import REPO, small_params_dict


def write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_repo_params_load_with_paths_relative_to_the_file():
    params = load_params(REPO / "params.yaml")
    assert params.data.root == REPO / "data" / "federation"
    assert [s.id for s in params.data.sites] == ["site-a", "site-b", "site-c", "site-d"]
    assert params.store.root == REPO / "artifacts"


def test_unknown_key_names_the_key_and_the_allowed_ones(tmp_path):
    raw = small_params_dict(tmp_path / "fed")
    raw["data"]["difficulty"]["contrast"] = 0.3
    with pytest.raises(ConfigError) as err:
        load_params(write(tmp_path, raw))
    message = str(err.value)
    assert "data.difficulty.contrast: unknown key" in message
    assert "image_contrast" in message and "label_noise" in message


def test_unknown_key_inside_a_site_list_entry(tmp_path):
    raw = small_params_dict(tmp_path / "fed")
    raw["data"]["sites"][1]["colour"] = "red"
    with pytest.raises(ConfigError, match=r"data\.sites\.1\.colour: unknown key; allowed here: .*modalities"):
        load_params(write(tmp_path, raw))


def test_bad_choice_lists_allowed_values(tmp_path):
    raw = small_params_dict(tmp_path / "fed")
    raw["data"]["sites"][0]["image_format"] = "jpeg"
    with pytest.raises(ConfigError) as err:
        load_params(write(tmp_path, raw))
    assert "data.sites.0.image_format" in str(err.value) and "'png' or 'dicom'" in str(err.value)


def test_out_of_range_value_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.difficulty\.label_noise"):
        load_params(REPO / "params.yaml", {"data.difficulty.label_noise": 0.9})


@pytest.mark.parametrize(
    "sites, expected",
    [
        ([{"id": "site-a", "modalities": ["image", "ecg", "clinical"]}] * 2, "duplicate site id"),
        ([{"id": "public", "modalities": ["image", "ecg", "clinical"]}], "reserved"),
        ([{"id": "site-a", "modalities": ["image", "image", "ecg", "clinical"]}], "duplicate modality"),
    ],
)
def test_site_list_rules(sites, expected):
    with pytest.raises(ConfigError, match=expected):
        load_params(REPO / "params.yaml", {"data.sites": sites})


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_params(listy)


def test_environment_overrides(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDKIM_DATA_ROOT", str(tmp_path / "elsewhere"))
    assert load_params(REPO / "params.yaml").data.root == tmp_path / "elsewhere"
    monkeypatch.setenv("FEDKIM_PARAMS", str(write(tmp_path, small_params_dict(tmp_path / "f"))))
    monkeypatch.delenv("FEDKIM_DATA_ROOT")
    assert load_params().data.sizes.site_train == 24


def test_params_hash_ignores_paths_but_not_values():
    a = load_params(REPO / "params.yaml").data
    b = load_params(REPO / "params.yaml", {"data.root": "/tmp/other"}).data
    c = load_params(REPO / "params.yaml", {"data.seed": 7}).data
    assert params_hash(a) == params_hash(b) != params_hash(c)


def test_every_training_modality_needs_a_site(tmp_path):
    from fedkim.data.catalogue import load_catalogue
    from fedkim.data.synth.federation import generate_federation

    check_sites = load_catalogue().check_sites

    params = load_params(REPO / "params.yaml", {"data.sites": [{"id": "site-a", "modalities": ["image"]}],
                                                "data.root": str(tmp_path / "fed")})
    with pytest.raises(ConfigError, match=r"no site holds modality \['clinical', 'ecg'\].*ecg_abnormal"):
        check_sites(params.data.sites)
    with pytest.raises(ConfigError, match="no site holds modality"):  # before anything is written
        generate_federation(params.data)
    assert not (tmp_path / "fed").exists()
    check_sites(load_params(REPO / "params.yaml").data.sites)  # the default federation covers every task
