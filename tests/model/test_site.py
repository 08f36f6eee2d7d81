"""Site encoders, heads and local training."""

import logging

import pytest
import torch

from fedkim.config import ConfigError, load_params
from fedkim.site.model import ImageEncoder, SiteModel, global_model, load_subset
from fedkim.site.train import augment_images, binary_metrics, train_site


@pytest.fixture(scope="module")
def site_params(make_params):
    """Two short epochs: enough for training to move the weights."""
    return make_params(**{"site.epochs": 2, "site.batch_size": 8})


def test_encoders_emit_token_sequences(site_params):
    model = global_model(site_params.site, site_params.data)
    p, d = site_params.site, site_params.data
    batch = {"image": torch.rand(3, 1, p.image_input, p.image_input),
             "ecg": torch.randn(3, 12, p.ecg_hz * d.ecg_seconds),
             "clinical": torch.randn(3, 24, 9), "clinical_mask": torch.ones(3, 24, 9)}
    patches = (p.image_input // p.image_patch) ** 2
    assert model.encoders["image"](batch).shape == (3, patches + 2, p.image_hidden)
    assert model.encoders["ecg"](batch).shape == (3, 12, p.token_dim)
    assert model.encoders["clinical"](batch).shape == (3, 24, p.token_dim)
    assert model(batch, "mortality").shape == (3,)


def test_clinical_encoder_does_not_mix_samples(site_params):
    """batch_first=True: a sample's tokens do not depend on the other samples of its batch."""
    encoder = global_model(site_params.site, site_params.data).encoders["clinical"].eval()
    x = {"clinical": torch.randn(4, 24, 9), "clinical_mask": torch.ones(4, 24, 9)}
    alone = encoder({k: v[:1] for k, v in x.items()})
    assert torch.allclose(encoder(x)[:1], alone, atol=1e-5)


def test_state_dict_naming_and_partial_sites(site_params):
    full = global_model(site_params.site, site_params.data)
    keys = full.state_dict().keys()
    assert all(k.startswith(("encoders.", "heads.")) for k in keys)
    assert {k.split(".")[1] for k in keys if k.startswith("heads.")} == {"lung_opacity", "covid", "ecg_abnormal",
                                                                          "mortality"}
    ecg_only = SiteModel(["ecg"], site_params.site, site_params.data, seed=5)
    assert set(ecg_only.heads) == {"ecg_abnormal"}
    load_subset(ecg_only, full.state_dict())
    for k, v in ecg_only.state_dict().items():
        assert torch.equal(v, full.state_dict()[k])


def test_local_training_learns_and_touches_only_held_modalities(site_params, small_federation):
    start = global_model(site_params.site, site_params.data).state_dict()
    result = train_site(small_federation.root / "site-b", start, site_params.site, site_params.data, seed=1)
    assert set(result.sample_counts) == {"ecg", "clinical"}
    assert result.sample_counts["ecg"] == result.task_counts["ecg_abnormal"] > 0
    assert not any(k.startswith("encoders.image") for k in result.state_dict)
    changed = [k for k, v in result.state_dict.items() if v.is_floating_point() and not torch.equal(v, start[k])]
    assert any(k.startswith("encoders.ecg") for k in changed) and any(k.startswith("heads.mortality") for k in changed)
    assert set(result.metrics) == {"ecg_abnormal", "mortality"}
    assert all(0 <= m["accuracy"] <= 1 for m in result.metrics.values())
    assert result.data_fingerprint and len(result.losses) > 0


def test_training_is_deterministic_on_cpu(site_params, small_federation):
    start = global_model(site_params.site, site_params.data).state_dict()
    a = train_site(small_federation.root / "site-d", start, site_params.site, site_params.data, seed=3)
    b = train_site(small_federation.root / "site-d", start, site_params.site, site_params.data, seed=3)
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)


def test_training_logs_its_progress_per_epoch(site_params, small_federation, caplog):
    caplog.set_level(logging.INFO, logger="fedkim")
    start = global_model(site_params.site, site_params.data).state_dict()
    result = train_site(small_federation.root / "site-d", start, site_params.site, site_params.data, seed=3)
    lines = [r.getMessage() for r in caplog.records if r.name == "fedkim.site.train"]
    steps = len(result.losses)
    assert len(lines) >= 2 and lines[0].startswith("site-d training: ") and "ETA" in lines[0]
    assert any(" epoch 1/2 loss " in line for line in lines)
    assert lines[-1].startswith(f"site-d training: {steps}/{steps} (100%) done in ") and " epoch 2/2 loss " in lines[-1]


def test_training_on_cached_decoded_samples_equals_decoding_every_epoch(site_params, small_federation):
    start = global_model(site_params.site, site_params.data).state_dict()
    cached = train_site(small_federation.root / "site-a", start, site_params.site, site_params.data, seed=2)
    fresh_params = site_params.site.model_copy(update={"decode_cache_mb": 0})
    fresh = train_site(small_federation.root / "site-a", start, fresh_params, site_params.data, seed=2)
    assert site_params.site.decode_cache_mb > 0 and cached.losses == fresh.losses
    assert all(torch.equal(cached.state_dict[k], fresh.state_dict[k]) for k in cached.state_dict)


def test_fedprox_keeps_weights_closer_to_the_global_model(site_params, small_federation):
    start = global_model(site_params.site, site_params.data).state_dict()
    plain = train_site(small_federation.root / "site-d", start, site_params.site, site_params.data, seed=3)
    prox_params = site_params.site.model_copy(update={"fedprox_mu": 50.0})
    prox = train_site(small_federation.root / "site-d", start, prox_params, site_params.data, seed=3)
    distance = lambda r: sum(float(((r.state_dict[k] - start[k]) ** 2).sum()) for k in r.state_dict
                             if r.state_dict[k].is_floating_point() and "running" not in k)
    assert distance(prox) < distance(plain)


def test_binary_metrics_use_sklearn_definitions():
    import numpy as np

    m = binary_metrics(np.array([0, 0, 1, 1]), np.array([0.1, 0.6, 0.4, 0.9]))
    assert m["accuracy"] == 0.5 and m["auroc"] == 0.75 and m["f1"] == 0.5


def test_conv_stem_keeps_the_token_grid(site_params):
    """The conv stem replaces DeiT's patch projection: log2(patch) stride-2 3x3 convolutions + a 1x1 projection,
    the same number of tokens; `patch` (the default) keeps DeiT's single projection."""
    p = site_params.site
    conv = ImageEncoder(p.model_copy(update={"image_stem": "conv"}))
    stem = conv.vit.embeddings.patch_embeddings.projection
    strided = [m for m in stem.modules() if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2)]
    assert len(strided) == p.image_patch.bit_length() - 1
    patch = ImageEncoder(p)
    assert isinstance(patch.vit.embeddings.patch_embeddings.projection, torch.nn.Conv2d)
    x = {"image": torch.rand(2, 1, p.image_input, p.image_input)}
    assert conv(x).shape == patch(x).shape
    with pytest.raises(ConfigError, match="power-of-2 image_patch"):
        load_params(overrides={"site.image_stem": "conv", "site.image_patch": 6, "site.image_input": 60})


def test_image_augmentation_jitters_without_flipping():
    """Shift, rotation and gamma only: deterministic per generator, in range, and a finding stays on its side."""
    images = torch.zeros(4, 1, 32, 32)
    images[:, :, 12:20, 4:10] = 0.8  # a bright blob on the image's left
    a = augment_images(images, torch.Generator().manual_seed(1))
    b = augment_images(images, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == images.shape and 0 <= a.min() and a.max() <= 1
    assert not torch.equal(a, images) and not torch.equal(a, augment_images(images, torch.Generator().manual_seed(2)))
    left, right = a[..., :16].sum(dim=(1, 2, 3)), a[..., 16:].sum(dim=(1, 2, 3))
    assert (left > 5 * right).all()


def test_only_tasks_restricts_local_training(site_params, small_federation):
    start = global_model(site_params.site, site_params.data).state_dict()
    result = train_site(small_federation.root / "site-a", start, site_params.site, site_params.data, seed=1,
                        only_tasks=["lung_opacity", "covid"])
    assert set(result.metrics) == {"lung_opacity", "covid"} and set(result.sample_counts) == {"image"}
    assert not any(k.startswith(("encoders.ecg", "encoders.clinical")) for k in result.state_dict)
