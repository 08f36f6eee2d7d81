"""Model bundles: a saved central model loads back with identical outputs, and tampering is caught by name."""

import hashlib
import json
import shutil

import pytest
import torch
import yaml

from fedkim.central.bundle import BundleError, load_bundle, save_bundle
from fedkim.data.catalogue import load_catalogue
from tests.helpers.models import batch_of, trained_model

TASKS = load_catalogue().tasks  # the shipped catalogue

METRICS = {"tasks": {"lung_opacity": {"role": "train", "primary": 0.61, "f1": 0.61, "auroc": 0.7, "accuracy": 0.6}},
           "train_mean_f1": 0.61, "zeroshot_mean": float("nan"), "mean_auroc": 0.7}


@pytest.fixture(scope="module")
def saved(params, tmp_path_factory):
    model = trained_model(params)
    folder = save_bundle(model, params, tmp_path_factory.mktemp("saved") / "bundle", round_id="7",
                         sites={"site-a": "abc123", "site-b": "def456"}, metrics=METRICS, adapters="all")
    return model, folder


def test_round_trip_gives_the_same_outputs(params, saved):
    model, folder = saved
    loaded, loaded_params = load_bundle(folder)
    assert loaded_params == params
    for task in ("lung_opacity", "ecg_abnormal", "mortality", "cxr_vqa"):
        batch = batch_of(params, task, "test", "test")
        options = batch.get("options") or [list(TASKS[task].answers)] * len(batch["answer"])
        assert torch.equal(model.option_logprobs(batch, task, options), loaded.option_logprobs(batch, task, options))
    ids = torch.tensor([loaded.tokenizer.convert_tokens_to_ids("<ecg>")])
    assert torch.equal(loaded.fm.get_input_embeddings().weight[ids], model.fm.get_input_embeddings().weight[ids])


def test_layout_manifest_and_model_card(saved):
    _, folder = saved
    manifest = json.loads((folder / "bundle.json").read_text())
    assert manifest["round_id"] == "7" and manifest["variant"] == "fedkim" and manifest["schema_version"] == 1
    assert {"params.yaml", "trainable.safetensors", "encoders.safetensors", "MODEL_CARD.md"} <= set(manifest["files"])
    for task in TASKS:  # one merged peft adapter per (task, modality) pair of the catalogue
        assert f"adapters/{task}/adapter_model.safetensors" in manifest["files"]
        assert json.loads((folder / "adapters" / task / "adapter_config.json").read_text())["r"] == (4 + 1) * 4
    card = (folder / "MODEL_CARD.md").read_text()
    assert "`tiny`" in card and "experts: 4 routed + 1 shared, rank 4" in card and "site-a, site-b" in card and "round 7" in card
    assert "| lung_opacity | train | 0.610 |" in card and "Not for clinical use" in card and "synthetic" in card
    assert not any(p.name.endswith(".partial") for p in folder.parent.iterdir())


def test_tampered_or_missing_file_is_named(saved, tmp_path):
    _, folder = saved
    copy = shutil.copytree(folder, tmp_path / "copy")
    data = bytearray((copy / "encoders.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (copy / "encoders.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"encoders\.safetensors: sha256 mismatch"):
        load_bundle(copy)
    shutil.rmtree(copy / "adapters" / "sepsis")
    (copy / "encoders.safetensors").write_bytes((folder / "encoders.safetensors").read_bytes())
    with pytest.raises(BundleError, match=r"adapters/sepsis/.*listed in bundle.json but missing"):
        load_bundle(copy)
    with pytest.raises(BundleError, match="not a model bundle"):
        load_bundle(tmp_path)


def test_by_default_only_the_training_tasks_get_a_merged_adapter(params, saved, tmp_path):
    TRAIN_TASKS = load_catalogue().train

    assert params.tracking.bundle_adapters == "train"
    folder = save_bundle(saved[0], params, tmp_path / "lean")
    assert sorted(p.name for p in (folder / "adapters").iterdir()) == sorted(TRAIN_TASKS)
    assert not (save_bundle(saved[0], params, tmp_path / "none", adapters="none") / "adapters").exists()


def test_variant_without_experts_has_no_adapters_and_loads(params, tmp_path):
    model = trained_model(params, "fedplug", seed=1)
    folder = save_bundle(model, params, tmp_path / "plug", variant="fedplug")
    assert not (folder / "adapters").exists()
    loaded, _ = load_bundle(folder)
    assert loaded.m3oe is None
    batch = batch_of(params, "ecg_abnormal", "test", "test")
    options = [["No", "Yes"]] * len(batch["answer"])
    assert torch.equal(model.option_logprobs(batch, "ecg_abnormal", options),
                       loaded.option_logprobs(batch, "ecg_abnormal", options))


def test_weights_that_do_not_fit_the_params_are_named(saved, tmp_path):
    _, folder = saved
    copy = shutil.copytree(folder, tmp_path / "copy")
    raw = yaml.safe_load((copy / "params.yaml").read_text())
    raw["inject"]["rank"] = 2  # consistent hashes, inconsistent shapes: e.g. hand-edited params
    (copy / "params.yaml").write_text(yaml.safe_dump(raw))
    manifest = json.loads((copy / "bundle.json").read_text())
    manifest["files"]["params.yaml"] = hashlib.sha256((copy / "params.yaml").read_bytes()).hexdigest()
    (copy / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"trainable\.safetensors: m3oe do not fit .* written by fedkim 0\.1\.0"):
        load_bundle(copy)
