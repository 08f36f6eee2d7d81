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
    assert params.member_ids() == ["site-a", "site-b", "site-c", "site-d"]
    assert list(params.data.sites) == params.member_ids()  # each generated member has its generator profile
    assert params.store.root == REPO / "artifacts"


def test_unknown_key_names_the_key_and_the_allowed_ones(tmp_path):
    raw = small_params_dict(tmp_path / "fed")
    raw["data"]["difficulty"]["contrast"] = 0.3
    with pytest.raises(ConfigError) as err:
        load_params(write(tmp_path, raw))
    message = str(err.value)
    assert "data.difficulty.contrast: unknown key" in message
    assert "image_contrast" in message and "label_noise" in message


def test_unknown_key_inside_a_member_or_a_profile(tmp_path):
    raw = small_params_dict(tmp_path / "fed")
    raw["federation"]["members"][1]["colour"] = "red"
    with pytest.raises(ConfigError, match=r"federation\.members\.1\.colour: unknown key; allowed here: .*modalities"):
        load_params(write(tmp_path, raw))
    raw = small_params_dict(tmp_path / "fed")
    raw["data"]["sites"]["site-b"]["colour"] = "red"
    with pytest.raises(ConfigError, match=r"data\.sites\.site-b\.colour: unknown key; allowed here: .*prevalence"):
        load_params(write(tmp_path, raw))


def test_bad_choice_lists_allowed_values(tmp_path):
    raw = small_params_dict(tmp_path / "fed")
    raw["data"]["sites"]["site-a"]["image_format"] = "jpeg"
    with pytest.raises(ConfigError) as err:
        load_params(write(tmp_path, raw))
    assert "data.sites.site-a.image_format" in str(err.value) and "'png' or 'dicom'" in str(err.value)


def test_out_of_range_value_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.difficulty\.label_noise"):
        load_params(REPO / "params.yaml", {"data.difficulty.label_noise": 0.9})


ALL = ["image", "ecg", "clinical"]


@pytest.mark.parametrize(
    "members, expected",
    [
        ([{"id": "site-a", "modalities": ALL}] * 2, r"federation\.members.*duplicate member id\(s\) \['site-a'\]"),
        ([{"id": "public", "modalities": ALL}], r"federation\.members.*\['public'\] are reserved"),
        ([{"id": "test", "modalities": ALL}], r"\['test'\] are reserved"),
        ([{"id": "site-a", "modalities": ["image", "image", "ecg", "clinical"]}], "duplicate modality"),
        ([{"id": "site-a", "modalities": ALL, "data": "provided"}],
         r"federation\.members\.0: .*provided directory needs `path`"),
        ([{"id": "site-a", "modalities": ALL, "path": "x"}], r"federation\.members\.0: .*generated directory is "
                                                            r"always <data.root>/<id>"),
        ([], r"federation\.members: .*at least one member"),
    ],
)
def test_member_list_rules(members, expected):
    with pytest.raises(ConfigError, match=expected):
        load_params(REPO / "params.yaml", {"federation.members": members, "data.sites": {}})


def test_a_provided_member_needs_no_generator_fields(tmp_path):
    raw = small_params_dict(tmp_path / "fed")
    raw["federation"]["members"].append({"id": "charite", "modalities": ["image"], "data": "provided",
                                         "path": "hospitals/charite", "work_pool": "berlin"})
    params = load_params(write(tmp_path, raw))
    member = params.member("charite")
    assert member.pool == "berlin" and params.member("site-a").pool == "site-a"
    assert "charite" not in [s.id for s in params.generated_sites()]
    from fedkim.members import site_dir, split_dir

    assert site_dir(params, "charite") == tmp_path / "hospitals" / "charite"  # relative to the params file
    assert site_dir(params, "site-a") == tmp_path / "fed" / "site-a"
    assert split_dir(params, "test") == tmp_path / "fed" / "test"
    with pytest.raises(ConfigError, match="'nowhere' is not in federation.members"):
        site_dir(params, "nowhere")


def test_a_profile_for_a_non_generated_member_is_named(tmp_path):
    raw = small_params_dict(tmp_path / "fed")
    raw["data"]["sites"]["site-z"] = {"prevalence": 0.3}
    with pytest.raises(ConfigError, match=r"data\.sites\.site-z: a generator profile, but 'site-z' is not a member"):
        load_params(write(tmp_path, raw))
    raw = small_params_dict(tmp_path / "fed")
    raw["federation"]["members"][0] |= {"data": "provided", "path": "real/site-a"}
    with pytest.raises(ConfigError, match=r"data\.sites\.site-a: .* is a provided member"):
        load_params(write(tmp_path, raw))


def test_a_generated_member_without_a_profile_gets_the_defaults(tmp_path):
    raw = small_params_dict(tmp_path / "fed")
    del raw["data"]["sites"]["site-b"]
    site_b = {s.id: s for s in load_params(write(tmp_path, raw)).generated_sites()}["site-b"]
    assert site_b.prevalence == 0.4 and site_b.modalities == ["ecg", "clinical"]


def test_server_splits_can_be_provided(tmp_path):
    from fedkim.members import split_dir

    raw = small_params_dict(tmp_path / "fed", **{"federation.splits.test": {"data": "provided", "path": "eval"}})
    assert split_dir(load_params(write(tmp_path, raw)), "test") == tmp_path / "eval"
    raw = small_params_dict(tmp_path / "fed", **{"federation.splits.public": {"data": "provided"}})
    with pytest.raises(ConfigError, match=r"federation\.splits\.public: .*needs `path`"):
        load_params(write(tmp_path, raw))


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
    from fedkim.members import site_dir

    raw = small_params_dict(tmp_path / "fed")
    raw["federation"]["members"].append({"id": "charite", "modalities": ["image"], "data": "provided",
                                         "path": "hospitals/charite"})
    path = write(tmp_path, raw)
    monkeypatch.setenv("FEDKIM_SITE_DIR_CHARITE", str(tmp_path / "mounted"))
    assert site_dir(load_params(path), "charite") == tmp_path / "mounted"
    monkeypatch.setenv("FEDKIM_SITE_DIR_SITE_A", str(tmp_path / "mounted"))
    with pytest.raises(ConfigError, match="FEDKIM_SITE_DIR_SITE_A: member 'site-a' is generated"):
        load_params(path)
    monkeypatch.delenv("FEDKIM_SITE_DIR_SITE_A")
    monkeypatch.delenv("FEDKIM_SITE_DIR_CHARITE")
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

    params = load_params(REPO / "params.yaml", {"federation.members": [{"id": "site-a", "modalities": ["image"]}],
                                                "data.sites": {}, "data.root": str(tmp_path / "fed")})
    with pytest.raises(ConfigError, match=r"no member holds modality \['clinical', 'ecg'\].*ecg_abnormal"):
        check_sites(params.federation.members)
    with pytest.raises(ConfigError, match="no member holds modality"):  # before anything is written
        generate_federation(params)
    assert not (tmp_path / "fed").exists()
    check_sites(load_params(REPO / "params.yaml").federation.members)  # the default federation covers every task
