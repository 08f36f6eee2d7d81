"""Model bundles: a saved central model loads back with identical outputs, and tampering is caught by name."""

import hashlib
import json
import shutil

import pytest
import torch
import yaml

from fedkim.central.bundle import BundleError, load_bundle, save_bundle
from fedkim.config import load_params
from fedkim.data.catalogue import TASKS
from fedkim.central.variants import VARIANTS, build_central
from fedkim.data.batches import task_loader
from tests.conftest import small_params_dict

TINY = {"inject.foundation_model": "tiny", "inject.num_experts": 4, "inject.rank": 4}
METRICS = {"tasks": {"lung_opacity": {"role": "train", "primary": 0.61, "f1": 0.61, "auroc": 0.7, "accuracy": 0.6}},
           "train_mean_f1": 0.61, "zeroshot_mean": float("nan"), "mean_auroc": 0.7}


@pytest.fixture(scope="module")
def params(small_federation, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bundle")
    (folder / "params.yaml").write_text(yaml.safe_dump(small_params_dict(small_federation.root, **TINY)))
    return load_params(folder / "params.yaml")


def trained_model(params, variant="fedkim", seed=0):
    """A model whose every trainable tensor and tag row differs from a fresh build (stands in for injection)."""
    model = build_central(params, VARIANTS[variant])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        tags = [model.tokenizer.convert_tokens_to_ids(t) for t in ("<image>", "</image>", "<ecg>", "</ecg>")]
        model.fm.get_input_embeddings().weight[tags] += 0.1
    return model.eval()


def batch_of(params, task, n=4):
    site = params.site.model_copy(update={"batch_size": n})
    return next(iter(task_loader(params.data.root / "test", task, "test", site, params.data, shuffle=False, seed=0)))


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
        batch = batch_of(params, task)
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
    from fedkim.data.catalogue import TRAIN_TASKS

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
    batch = batch_of(params, "ecg_abnormal")
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
