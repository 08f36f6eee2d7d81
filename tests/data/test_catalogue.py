"""The task catalogue as data: the shipped file, validation errors that name file, task and field, the params key
that selects a catalogue, and a catalogue with a further training task."""

import hashlib
import json
import shutil

import pytest
import yaml

from fedkim.config import ConfigError, load_params
from fedkim.data.catalogue import SHIPPED, CatalogueError, load_catalogue
from tests.helpers import REPO, small_params_dict, write_params

# sha256 of the tasks' fields and the modality descriptions as the Python catalogue defined them before the file
# existed (json.dumps(..., sort_keys=True) of {name: [modality, role, kind, answers, task_description, question,
# original]} | {"__mod__": modality descriptions}).
FEDKIM_12 = "32ab7206c27ee682a1358d47c9ed88ad334bde897df8d12b44afb86903aa20cb"
ORDER = ["lung_opacity", "covid", "ecg_abnormal", "mortality", "enlarged_cardiomediastinum", "atelectasis",
         "pleural_effusion", "ectopic_beats", "sepsis", "ecg_noise_qa", "cxr_vqa", "medical_qa"]

PNEUMOTHORAX = {"name": "pneumothorax", "modality": "image", "role": "train", "kind": "binary",
                "answers": ["No", "Yes"], "question": "Does this chest radiograph show a pneumothorax?",
                "task_description": "The pneumothorax detection task: decide whether air has collected between "
                                    "the lung and the chest wall."}


def shipped_doc() -> dict:
    return yaml.safe_load(SHIPPED.read_text())


def write_catalogue(folder, doc: dict, name: str = "cat.yaml"):
    path = folder / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_the_shipped_file_holds_fedkim_12_tasks_with_the_same_texts():
    catalogue = load_catalogue()
    assert list(catalogue.tasks) == ORDER
    assert catalogue.train == ("lung_opacity", "covid", "ecg_abnormal", "mortality")
    snapshot = {n: [t.modality, t.role, t.kind, list(t.answers), t.task_description, t.question, t.original]
                for n, t in catalogue.tasks.items()} | {"__mod__": catalogue.modalities}
    assert hashlib.sha256(json.dumps(snapshot, sort_keys=True).encode()).hexdigest() == FEDKIM_12
    assert catalogue["cxr_vqa"].question == "(per sample)" and catalogue["cxr_vqa"].inputs == ("image", "text")
    assert [t.name for t in catalogue.for_modality("image")] == ["lung_opacity", "covid"]
    assert catalogue.modality_description("ecg+text") == catalogue["ecg_noise_qa"].modality_description
    assert load_catalogue() is catalogue and load_catalogue(SHIPPED) is catalogue  # cached by path and content


@pytest.mark.parametrize("change, message", [
    (lambda d: d["tasks"].append({**PNEUMOTHORAX, "answers": ["No", "Yes", "Maybe"]}),
     "cat.yaml: task 'pneumothorax': answers: a binary task has two answers"),
    (lambda d: d["tasks"].append({**PNEUMOTHORAX, "colour": "red"}),
     "cat.yaml: task 'pneumothorax': colour: unknown field"),
    (lambda d: d["tasks"].append({**PNEUMOTHORAX, "role": "later"}),
     "cat.yaml: task 'pneumothorax': role: Input should be 'train' or 'zero_shot'"),
    (lambda d: d["tasks"].append({**PNEUMOTHORAX, "modality": "image+text"}),
     "cat.yaml: task 'pneumothorax': modality: a training task has one site modality"),
    (lambda d: d["tasks"].append({**PNEUMOTHORAX, "kind": "choice", "answers": ["a", "b", "c"]}),
     "cat.yaml: task 'pneumothorax': kind: a training task is binary"),
    (lambda d: d["tasks"].append({**PNEUMOTHORAX, "modality": "image+smell"}),
     "cat.yaml: task 'pneumothorax': modality 'image+smell': unknown input"),
    (lambda d: d["tasks"].append({**PNEUMOTHORAX, "role": "zero_shot", "modality": "ecg+image"}),
     "cat.yaml: task 'pneumothorax': modality: 'ecg+image' has no description under `modalities`"),
    (lambda d: d["tasks"].append({k: v for k, v in PNEUMOTHORAX.items() if k != "question"}),
     "cat.yaml: task 'pneumothorax': `question` missing"),
    (lambda d: d["tasks"].append({k: v for k, v in PNEUMOTHORAX.items() if k != "name"}),
     "cat.yaml: task #13: name: Field required"),
    (lambda d: d["tasks"].append(dict(d["tasks"][0])), "cat.yaml: task 'lung_opacity': name: duplicate task name"),
    (lambda d: d.update(tasks=[t for t in d["tasks"] if t["role"] != "train"]),
     "cat.yaml: tasks: no training task"),
    (lambda d: d.update(extra=1), "cat.yaml: top level must be a mapping with `modalities` and `tasks`; unknown"),
])
def test_a_bad_entry_names_the_file_the_task_and_the_field(tmp_path, change, message):
    doc = shipped_doc()
    change(doc)
    with pytest.raises(CatalogueError) as caught:
        load_catalogue(write_catalogue(tmp_path, doc))
    assert str(caught.value).startswith(message), str(caught.value)
    assert isinstance(caught.value, ConfigError)


def test_unreadable_and_invalid_yaml_files_are_named(tmp_path):
    with pytest.raises(CatalogueError, match="missing.yaml: task catalogue not readable"):
        load_catalogue(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("tasks: [\n")
    with pytest.raises(CatalogueError, match="broken.yaml: not valid YAML"):
        load_catalogue(tmp_path / "broken.yaml")


def test_params_select_a_catalogue_relative_to_the_params_folder(tmp_path):
    from fedkim.data.catalogue import catalogue_of
    from fedkim.digests import settings_digest

    default = load_params(REPO / "params.yaml")
    assert default.data.catalogue is None and catalogue_of(default.data) is load_catalogue()
    doc = shipped_doc()
    doc["tasks"].append({**PNEUMOTHORAX, "role": "zero_shot"})
    (tmp_path / "a").mkdir()
    write_catalogue(tmp_path / "a", doc, "tasks.yaml")
    params = write_params(tmp_path / "a", small_params_dict(tmp_path / "fed", **{"data.catalogue": "tasks.yaml"}))
    assert params.data.catalogue == tmp_path / "a" / "tasks.yaml"
    assert "pneumothorax" in catalogue_of(params.data).zero_shot
    # the settings digest follows the catalogue's content, not where it lies
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    moved = load_params(tmp_path / "b" / "params.yaml")
    assert settings_digest(moved) == settings_digest(params) != settings_digest(
        load_params(tmp_path / "a" / "params.yaml", {"data.catalogue": str(SHIPPED)}))
    with pytest.raises(ConfigError, match="data.catalogue"):
        load_params(tmp_path / "a" / "params.yaml", {"data.catalogue": {"not": "a path"}})


def test_the_generator_cache_key_holds_the_catalogue_content_not_its_path(tmp_path):
    from fedkim.data.synth.federation import data_hash

    base = load_params(REPO / "params.yaml")

    def with_catalogue(path):
        return base.model_copy(update={"data": base.data.model_copy(update={"catalogue": path})})

    copy_a, copy_b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    shutil.copy(SHIPPED, copy_a)
    shutil.copy(SHIPPED, copy_b)
    assert data_hash(base) == data_hash(with_catalogue(copy_a)) == data_hash(with_catalogue(copy_b))
    doc = shipped_doc()
    doc["tasks"][0]["task_description"] += " Reworded."
    changed = write_catalogue(tmp_path, doc)
    assert data_hash(with_catalogue(changed)) != data_hash(base)


def test_an_extra_training_task_gets_a_head_and_asks_for_its_data(tmp_path):
    from fedkim.data.synth.federation import GenerationError, generate_federation
    from fedkim.site.model import global_model

    doc = shipped_doc()
    doc["tasks"].insert(4, PNEUMOTHORAX)  # after the four training tasks: their heads keep their draws
    raw = small_params_dict(tmp_path / "fed", **{"data.catalogue": str(write_catalogue(tmp_path, doc))})
    params = write_params(tmp_path / "params", raw)
    model, default = global_model(params.site, params.data), global_model(params.site, load_params(
        REPO / "params.yaml").data)
    assert list(model.heads) == ["lung_opacity", "covid", "ecg_abnormal", "mortality", "pneumothorax"]
    assert model.task_modality["pneumothorax"] == "image"
    shared = default.state_dict()
    assert all((model.state_dict()[k] == v).all() for k, v in shared.items())  # defaults do not move
    with pytest.raises(GenerationError, match=r"\['pneumothorax'\].*must be provided"):
        generate_federation(params)
    assert not (tmp_path / "fed").exists()


def test_the_package_manifest_and_aggregation_follow_the_catalogue(tmp_path):
    import torch

    from fedkim.federation.package import PackageError, key_modality, read_package, write_package

    doc = shipped_doc()
    doc["tasks"].append(PNEUMOTHORAX)
    catalogue = load_catalogue(write_catalogue(tmp_path, doc))
    assert key_modality("heads.pneumothorax.mlp.0.weight", catalogue) == "image"
    with pytest.raises(KeyError):
        key_modality("heads.pneumothorax.mlp.0.weight")  # the shipped catalogue has no such task

    common = dict(site_id="site-a", round_id="1", sample_counts={"image": 8}, task_counts={"pneumothorax": 8},
                  data_fingerprint="0" * 64, validation_summary={"success": True, "findings": 0})
    state = {"heads.pneumothorax.mlp.0.weight": torch.zeros(2, 2)}
    with pytest.raises(PackageError, match=r"unknown task\(s\) \['pneumothorax'\]"):
        write_package(tmp_path / "shipped", state, **common)
    write_package(tmp_path / "custom", state, **common, catalogue=catalogue)
    assert read_package(tmp_path / "custom", catalogue=catalogue).manifest.task_counts == {"pneumothorax": 8}
    with pytest.raises(PackageError, match="pneumothorax"):
        read_package(tmp_path / "custom")
