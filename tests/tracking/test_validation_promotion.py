"""Promotion decides on the server's validation split, never on the test split; the bundle carries a data card."""

import json
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from fedkim import tracking
from fedkim.central.datacard import data_record
from fedkim.data.catalogue import load_catalogue
from fedkim.outcomes import SiteOutcome
from fedkim.tracking.round_log import log_round
from tests.helpers import TINY, small_params_dict, write_params
from tests.helpers.models import trained_model

CATALOGUE = load_catalogue()
GATE_FAIL = {"site_id": "site-d", "success": False, "stats": {},
             "findings": [{"rule": "image.size", "action": "block", "file": "images/x.png", "column": None,
                           "message": "too small", "count": 1},
                          {"rule": "image.colour", "action": "warn", "file": None, "column": None,
                           "message": "colour", "count": 2}],
             "quarantined": {"samples": 3, "per_rule": {"image.size": 3}}}
GATE_PASS = {"site_id": "site-a", "success": True, "findings": [], "quarantined": {"samples": 0, "per_rule": {}},
             "stats": {}}


def figures(primary: float, auroc: float = 0.7) -> dict:
    """evaluate()'s layout over the training tasks with chosen figures."""
    tasks = {t: {"role": "train", "kind": "binary", "n": 8, "primary": primary, "f1": primary, "auroc": auroc}
             for t in CATALOGUE.train}
    return {"tasks": tasks, "train_mean_f1": primary, "zeroshot_mean": 0.3, "mean_auroc": auroc}


@pytest.fixture(scope="module")
def rounds(small_federation, tmp_path_factory):
    """Three rounds whose validation and test figures disagree: validation 0.5 / 0.6 / 0.55, test 0.9 / 0.4 / 0.99."""
    folder = tmp_path_factory.mktemp("validation-promotion")
    params = write_params(folder, small_params_dict(small_federation.root, **TINY))
    model = trained_model(params)
    outcomes = [SiteOutcome("site-a", "trained", sample_counts={"lung_opacity": {"train": 18, "val": 6}},
                            data_fingerprint="a" * 64, validation=GATE_PASS),
                SiteOutcome("site-d", "excluded", reason="gate", validation=GATE_FAIL),
                SiteOutcome("validation", "gated", validation=GATE_PASS)]
    out = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        tracking.configure(params.tracking, folder)
        for round_id, (val, test) in {"r1": (0.5, 0.9), "r2": (0.6, 0.4), "r3": (0.55, 0.99)}.items():
            with tracking.round_run(params, round_id, sites={"site-a": "a" * 64}, params_hash="h") as parent:
                logged = log_round(parent, params, round_id, sites={"site-a": "a" * 64},
                                   inject=lambda: (model, {"losses": [1.0], "lrs": [0.1], "tasks": ["covid"]}),
                                   evaluate=lambda m, test=test: figures(test),
                                   validate=lambda m, val=val: figures(val), outcomes=outcomes)
            out[round_id] = logged
        yield {"rounds": out, "params": params, "folder": folder}


def test_the_decision_follows_validation_when_test_disagrees(rounds):
    r1, r2, r3 = (rounds["rounds"][r] for r in ("r1", "r2", "r3"))
    assert r1.decision.decision == "promoted"
    assert r2.decision.decision == "promoted"  # better on validation (0.6 > 0.5), although worse on test
    assert r3.decision.decision == "kept"  # best on test (0.99), worse on validation (0.55 < 0.6)
    assert "on the validation split" in r3.decision.reason and "0.5500" in r3.decision.reason
    assert "0.9900" not in r3.decision.reason
    client = MlflowClient()
    assert int(client.get_model_version_by_alias("fedkim-foundation", "champion").version) == 2
    v3 = client.get_model_version("fedkim-foundation", "3")
    assert v3.tags["fedkim.promotion.split"] == "validation"
    assert json.loads(v3.tags["fedkim.metrics"])["covid"]["primary"] == pytest.approx(0.55)  # compared figures
    assert float(v3.tags["fedkim.train_mean_f1"]) == pytest.approx(0.99)  # reported: the test split's
    assert r3.registered["decided_on"] == "validation"
    assert [row["decided_on"] for row in tracking.registry_show()] == ["validation"] * 3


def test_both_splits_go_to_mlflow(rounds):
    logged = MlflowClient().get_run(rounds["rounds"]["r2"].injection_run_id).data.metrics
    assert logged["val.covid.primary"] == pytest.approx(0.6) and logged["eval.covid.primary"] == pytest.approx(0.4)
    assert logged["vs_champion.score.primary"] == pytest.approx(0.1)  # compared on validation: 0.6 − 0.5


def test_the_bundle_and_the_run_carry_the_data_card(rounds):
    version = MlflowClient().get_model_version("fedkim-foundation", "1")
    model_dir = mlflow.artifacts.download_artifacts(f"models:/fedkim-foundation/{version.version}")
    bundles = list(Path(model_dir).rglob("DATA_CARD.md"))
    assert len(bundles) == 1
    card = bundles[0].read_text()
    assert "| site-a | trained | `aaaaaaaaaaaaaaaa` | lung_opacity 24 | pass | – | 0 |" in card
    assert "| site-d | excluded |" in card and "| fail | image.size | 3 |" in card
    assert "| validation | pass |" in card and CATALOGUE.digest in card
    record = json.loads((bundles[0].parent / "data_card.json").read_text())
    assert record["sites"]["site-d"]["gate"] == {"success": False, "blocking": ["image.size"],
                                                 "warnings": ["image.colour"], "quarantined": 3,
                                                 "quarantined_per_rule": {"image.size": 3}}
    assert record["tasks"]["zero_shot"] == list(CATALOGUE.zero_shot)
    logged = mlflow.artifacts.download_artifacts(run_id=rounds["rounds"]["r1"].injection_run_id,
                                                 artifact_path="data_card/data_card.json")
    assert json.loads(open(logged).read()) == record


def test_a_card_without_outcomes_lists_the_contributors(rounds):
    record = data_record(rounds["params"], fingerprints={"site-b": "b" * 64})
    assert record["sites"] == {"site-b": {"status": "contributed", "fingerprint": "b" * 64, "samples_per_task": {},
                                          "gate": None}}
