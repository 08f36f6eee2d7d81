"""The gate judges samples, not only sites: sample-level findings quarantine their samples (left out of training
and evaluation, never changed), the counts are judged on what remains, and each rule's action is a setting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedkim.config import ConfigError, DataParams, GateParams, SiteTrainingParams
from fedkim.data.batches import task_dataset
from fedkim.data.formats.clinical import read_long, write_long
from fedkim.data.siteformat import REPORTS_DIR
from fedkim.data.validate import gate_summary, validate_site
from fedkim.data.validate.report import ACTIONS, SAMPLE_RULES
from fedkim.site.model import global_model
from fedkim.site.train import train_site
from tests.helpers import small_params_dict, write_params
from tests.helpers.sites import CLINICAL_N, refinalize

N = CLINICAL_N
TINY_SITE = SiteTrainingParams(epochs=1, batch_size=8, token_dim=16, clinical_heads=2, head_hidden=8,
                               device="cpu", decode_cache_mb=0)
DATA = DataParams()



def out_of_range(site: Path, samples: list[str]) -> None:
    """One heart rate of 400 bpm for each sample (a recording error)."""
    rel = site / "clinical" / "train.parquet"
    frame = read_long(rel)
    for sample in samples:
        row = frame.index[(frame["sample_id"] == sample) & (frame["variable"] == "heart_rate")][3]
        frame.loc[row, "value"] = 400.0
    write_long(rel, frame)
    refinalize(site)


def check(site: Path, **gate) -> object:
    return validate_site(site, GateParams(**gate), write_docs=False)


def test_two_out_of_range_values_quarantine_their_samples(site, tmp_path):
    bad = ["mortality-train-0-1", "mortality-train-1-2"]
    out_of_range(site, bad)
    reports = tmp_path / "elsewhere" / "reports"
    report = validate_site(site, reports_dir=reports)
    assert report.success, report.summary()
    assert report.quarantined == sorted(bad)
    assert report.quarantine == {b: ["clinical.physiological_range"] for b in sorted(bad)}
    assert [f.action for f in report.findings] == ["quarantine"] and report.blocking == []
    assert "2 sample(s) quarantined" in report.summary()

    # the report stays with the site's chosen folder; the provided directory is not written to
    saved = json.loads((reports / "validation.json").read_text())
    assert sorted(saved["quarantine"]) == sorted(bad) and (reports / "gx" / "index.html").is_file()
    assert not (site / REPORTS_DIR).exists()

    # what leaves the site: counts per rule, never the ids
    summary = gate_summary(report)
    assert summary["quarantined"] == {"samples": 2, "per_rule": {"clinical.physiological_range": 2}}
    assert summary["findings"][0]["count"] == 2 and summary["findings"][0]["action"] == "quarantine"
    assert not any(b in json.dumps(summary) for b in bad)

    # training and evaluation leave them out
    kept = task_dataset(site, "mortality", "train", TINY_SITE, DATA, exclude=report.quarantined)
    assert len(task_dataset(site, "mortality", "train", TINY_SITE, DATA)) == 2 * N
    assert len(kept) == 2 * N - 2 and not set(bad) & set(kept.index["sample_id"])
    state = global_model(TINY_SITE, DATA).state_dict()
    local = train_site(site, state, TINY_SITE, DATA, exclude=report.quarantined)
    assert local.task_counts == {"mortality": 2 * N - 2}


def test_the_site_is_never_changed_by_a_quarantine(site):
    out_of_range(site, ["mortality-train-0-1"])
    before = {p: p.read_bytes() for p in site.rglob("*") if p.is_file()}
    assert validate_site(site).quarantined == ["mortality-train-0-1"]
    after = {p: p.read_bytes() for p in site.rglob("*") if p.is_file() and REPORTS_DIR not in p.parts}
    assert after == before


def test_action_block_fails_the_site(site):
    out_of_range(site, ["mortality-train-0-1"])
    report = check(site, actions={"clinical.physiological_range": "block"})
    assert not report.success and report.quarantined == []
    assert [f.rule for f in report.blocking] == ["clinical.physiological_range"]


def test_action_warn_keeps_the_sample(site):
    out_of_range(site, ["mortality-train-0-1"])
    report = check(site, actions={"clinical.physiological_range": "warn"})
    assert report.success and report.quarantined == []
    assert [f.rule for f in report.warnings] == ["clinical.physiological_range"]
    assert report.warnings[0].samples == ["mortality-train-0-1"]


def test_too_few_samples_after_the_quarantine_fail_the_site(site):
    out_of_range(site, ["mortality-train-1-0", "mortality-train-1-1"])  # label 1 keeps 4 of 6
    report = check(site)
    assert not report.success
    assert [f.rule for f in report.blocking] == ["counts.per_class"]
    assert "(after 2 quarantined)" in report.blocking[0].message
    assert report.blocking[0].examples == ["mortality/train/label 1: n=4"]
    assert check(site, min_samples_per_class=4).success


def test_too_few_samples_per_site_after_the_quarantine(site):
    out_of_range(site, ["mortality-train-1-0"])
    report = check(site, min_samples_per_site=4 * N, min_samples_per_class=1)
    assert [f.rule for f in report.blocking] == ["counts.per_site"]


def test_sample_rules_quarantine_by_default_and_the_rest_blocks():
    assert all(ACTIONS[rule] == "quarantine" for rule in SAMPLE_RULES)
    for rule in ("index.schema", "manifest.fingerprint", "index.duplicate_ids", "counts.per_class",
                 "counts.per_site", "clinical.schema", "gate.error"):
        assert ACTIONS[rule] == "block"


@pytest.mark.parametrize("actions, words", [
    ({"counts.per_class": "quarantine"}, ["counts.per_class", "always block"]),
    ({"manifest.fingerprint": "warn"}, ["manifest.fingerprint", "allowed: block"]),
    ({"file.decodes": "warn"}, ["file.decodes", "allowed: quarantine, block"]),
    ({"clinical.no_such_rule": "warn", "image.sise": "block"}, ["clinical.no_such_rule", "image.sise"]),
])
def test_actions_that_cannot_be_set_are_config_errors(tmp_path, actions, words):
    raw = small_params_dict(tmp_path / "federation", **{"data.gate.actions": actions})
    with pytest.raises(ConfigError) as error:
        write_params(tmp_path / "params", raw)
    assert all(w in str(error.value) for w in words), str(error.value)


def test_the_replaced_missingness_share_is_a_config_error(tmp_path):
    raw = small_params_dict(tmp_path / "federation", **{"data.gate.clinical_max_missing": 0.85})
    with pytest.raises(ConfigError, match="clinical_max_missing: unknown key; allowed here: .*clinical_min_hours"):
        write_params(tmp_path / "params", raw)


def test_a_quarantined_file_names_every_sample_that_uses_it(site):
    (site / "clinical" / "val.parquet").write_bytes(b"not parquet")
    refinalize(site)
    report = check(site, min_samples_per_class=1, min_samples_per_site=1)
    decodes = [f for f in report.findings if f.rule == "file.decodes"][0]
    assert decodes.action == "quarantine" and len(decodes.samples) == 2 * N
    assert all(s.startswith("mortality-val-") for s in report.quarantined)
    assert not report.success  # the val split is gone: its counts are 0
    assert {f.rule for f in report.blocking} == {"counts.per_class"}
    assert report.quarantined == decodes.samples


@pytest.mark.slow
def test_a_round_step_trains_without_the_quarantined_samples(params, tmp_path):
    from fedkim.data.siteformat import read_index
    from fedkim.federation.store import LocalStore
    from fedkim.members import site_dir
    from fedkim.rounds import gated_site, package_validation, start_round, train_site_step

    store = LocalStore(tmp_path / "store")
    start_round(params, store, "1")
    site = params.member_ids()[0]
    index = read_index(site_dir(params, site))
    train = index[(index["split"] == "train") & (index["modality"] == "clinical")]
    left_out = list(train["sample_id"][:3])
    summary, excluded = gated_site(params, site)
    assert excluded is None
    outcome = train_site_step(params, store, "1", site, validation=package_validation(summary), quarantined=left_out)
    assert outcome.status == "trained" and outcome.sample_counts["clinical"] == len(train) - 3
