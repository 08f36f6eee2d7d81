"""Differential privacy of local training: Opacus' per-sample gradients through every encoder, noise calibrated by
the accountant, the site's ledger and budget, packages with the standard keys."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fedkim.config import ConfigError
from fedkim.data.formats.clinical import STATIC, VARIABLES
from fedkim.digests import settings_digest
from fedkim.site.model import global_model, load_subset
from fedkim.site.privacy import (PrivacyBudgetError, PrivacyLedger, epsilon_of, plan_releases, private_model,
                                 standard_state)
from fedkim.site.train import train_site
from tests.helpers import small_params_dict, write_params

DP = {"site.epochs": 1, "site.batch_size": 8, "site.privacy.enabled": True, "site.privacy.epsilon": 3.0}


@pytest.fixture()
def dp_params(small_federation, tmp_path):
    """DP local training over the small federation, with a ledger of its own."""
    def make(**extra):
        raw = small_params_dict(small_federation.root, **{**DP, "site.privacy.ledger": str(tmp_path / "ledger"),
                                                           **extra})
        return write_params(tmp_path / f"p{len(list(tmp_path.glob('p*')))}", raw)
    return make


def batch_of(params, n: int) -> dict:
    p, d = params.site, params.data
    torch.manual_seed(3)
    return {"image": torch.rand(n, 1, p.image_input, p.image_input),
            "ecg": torch.randn(n, 12, p.ecg_hz * d.ecg_seconds),
            "clinical": torch.randn(n, 24, len(VARIABLES)), "clinical_mask": torch.ones(n, 24, len(VARIABLES)),
            "static": torch.randn(n, len(STATIC)), "static_mask": torch.ones(n, len(STATIC)),
            "label": torch.tensor([1.0, 0.0, 1.0][:n])}


@pytest.mark.parametrize("task", ["lung_opacity", "ecg_abnormal", "mortality"])
def test_per_sample_gradients_are_each_samples_own(dp_params, task):
    """What Opacus clips is each sample's gradient: through DeiT (its tokens by the functorch fallback), the ECG
    encoder (leads folded into the batch inside it) and the ICU transformer (DPMultiheadAttention)."""
    params = dp_params()
    fixed, net = private_model(global_model(params.site, params.data))
    for module in fixed.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0  # the same function for the batch and for each sample alone
    batch = batch_of(params, 3)
    loss = nn.functional.binary_cross_entropy_with_logits(net(batch, task), batch["label"])
    loss.backward()
    trained = [(name, q) for name, q in fixed.named_parameters() if getattr(q, "grad_sample", None) is not None]
    assert any(".encoders." in f".{name}" for name, _ in trained) and any("heads." + task in n for n, _ in trained)
    for i in range(3):
        fixed.zero_grad(set_to_none=True)
        one = {k: v[i:i + 1] for k, v in batch.items()}
        net.disable_hooks()  # the plain gradient of one sample
        nn.functional.binary_cross_entropy_with_logits(fixed(one, task), one["label"]).backward()
        net.enable_hooks()
        for name, q in trained:
            assert torch.allclose(q.grad_sample[i], q.grad, atol=1e-5, rtol=1e-4), (task, name, i)


def test_the_fixed_attention_carries_the_weights_and_packages_keep_the_standard_keys(dp_params):
    params = dp_params()
    model = global_model(params.site, params.data, seed=4)
    original = model.state_dict()
    fixed, _ = private_model(model)
    assert any(".qlinear." in k for k in fixed.state_dict())
    restored = standard_state(fixed.state_dict())
    assert restored.keys() == original.keys()
    for key, value in original.items():
        assert torch.equal(restored[key], value), key
    reloaded = global_model(params.site, params.data, seed=9)
    load_subset(reloaded, restored)
    batch = batch_of(params, 2)
    assert torch.allclose(reloaded.eval()(batch, "mortality"), fixed.eval()(batch, "mortality"), atol=1e-5)


def test_the_noise_reaches_the_target_epsilon_and_shrinks_with_more_samples(dp_params):
    params = dp_params()
    plan = plan_releases({"covid": 40, "mortality": 400}, params.site)
    for task, release in plan.items():
        spent = epsilon_of({task: [release.as_list()]}, params.site.privacy)
        assert 2.9 <= spent <= 3.0, (task, spent)
    assert plan["mortality"].noise_multiplier < plan["covid"].noise_multiplier
    assert plan["covid"].sample_rate == pytest.approx(8 / 40) and plan["covid"].steps == 5
    # tasks hold disjoint samples: one round's ε is the largest task's, rounds compose per task
    one = epsilon_of({t: [r.as_list()] for t, r in plan.items()}, params.site.privacy)
    two = epsilon_of({t: [r.as_list(), r.as_list()] for t, r in plan.items()}, params.site.privacy)
    assert one == pytest.approx(3.0, abs=0.1) and one < two < 2 * one


def test_dp_training_learns_records_what_it_spent_and_uploads_standard_tensors(dp_params, small_federation):
    params = dp_params()
    start = global_model(params.site, params.data).state_dict()
    result = train_site(small_federation.root / "site-a", start, params.site, params.data, seed=1)
    assert set(result.state_dict) == set(start)  # nn.MultiheadAttention's keys: DP and non-DP sites aggregate
    changed = [k for k, v in result.state_dict.items() if v.is_floating_point() and not torch.equal(v, start[k])]
    assert any(k.startswith("encoders.image") for k in changed) and any(k.startswith("encoders.ecg") for k in changed)
    assert any(".self_attn.in_proj_weight" in k for k in changed)
    report = result.privacy
    assert 2.5 < report["epsilon_round"] <= 3.01 and report["epsilon_total"] == report["epsilon_round"]
    assert set(report["tasks"]) == set(result.task_counts) and all(r[0] > 0.3 for r in report["tasks"].values())
    ledger = json.loads((params.site.privacy.ledger / "site-a.json").read_text())
    assert len(ledger["rounds"]) == 1 and ledger["rounds"][0]["tasks"] == report["tasks"]


def test_a_site_refuses_the_round_that_would_exceed_its_budget(dp_params, small_federation):
    params = dp_params(**{"site.privacy.epsilon_max": 4.0})  # two rounds of ε 3 compose to about 4.2
    start = global_model(params.site, params.data).state_dict()
    ledger = PrivacyLedger(params.site.privacy, "site-b", round_id="1")
    first = train_site(small_federation.root / "site-b", start, params.site, params.data, seed=1, ledger=ledger)
    assert first.privacy["epsilon_total"] <= 3.01
    before = ledger.path.read_bytes()
    again = PrivacyLedger(params.site.privacy, "site-b", round_id="2")
    with pytest.raises(PrivacyBudgetError, match=r"site-b: privacy budget exhausted: ε spent [23]\.\d+ \+ this round "
                                                  r"[23]\.\d+ would make 4\.\d+ > epsilon_max 4 "):
        train_site(small_federation.root / "site-b", start, params.site, params.data, seed=1, ledger=again)
    assert ledger.path.read_bytes() == before  # nothing spent, nothing recorded
    roomier = PrivacyLedger(params.site.privacy, "site-b", round_id="2", epsilon_max=6.0)  # members[].epsilon_max
    second = train_site(small_federation.root / "site-b", start, params.site, params.data, seed=1, ledger=roomier)
    assert 3.0 < second.privacy["epsilon_total"] <= 6.0
    assert [e["round_id"] for e in json.loads(ledger.path.read_text())["rounds"]] == ["1", "2"]


def test_an_unreadable_ledger_refuses_rather_than_forgets(dp_params, small_federation):
    params = dp_params()
    path = params.site.privacy.ledger / "site-b.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    start = global_model(params.site, params.data).state_dict()
    with pytest.raises(PrivacyBudgetError, match=r"site-b: privacy ledger .*site-b\.json is unreadable"):
        train_site(small_federation.root / "site-b", start, params.site, params.data, seed=1)
    assert path.read_text() == "{not json"


def test_privacy_settings_are_checked_and_count_in_the_digest_only_when_on(tmp_path, small_federation):
    base = small_params_dict(small_federation.root)
    off = write_params(tmp_path / "off", base)
    on = write_params(tmp_path / "on", small_params_dict(small_federation.root, **{"site.privacy.enabled": True}))
    moved = write_params(tmp_path / "moved", small_params_dict(small_federation.root, **{
        "site.privacy.enabled": True, "site.privacy.ledger": "elsewhere"}))
    assert settings_digest(on) != settings_digest(off) == settings_digest(
        write_params(tmp_path / "off2", small_params_dict(small_federation.root, **{"site.privacy.epsilon": 8.0})))
    assert settings_digest(moved) == settings_digest(on)  # where a site keeps its ledger decides nothing
    with pytest.raises(ConfigError, match="fedprox_mu must be 0 with site.privacy.enabled"):
        write_params(tmp_path / "prox", small_params_dict(small_federation.root, **{
            "site.privacy.enabled": True, "site.fedprox_mu": 0.01}))
    with pytest.raises(ConfigError, match="epsilon 12.0 exceeds site.privacy.epsilon_max 10.0"):
        write_params(tmp_path / "big", small_params_dict(small_federation.root, **{
            "site.privacy.enabled": True, "site.privacy.epsilon": 12.0}))
    with pytest.raises(ConfigError, match="accountant"):
        write_params(tmp_path / "acc", small_params_dict(small_federation.root, **{"site.privacy.accountant": "gdp"}))
