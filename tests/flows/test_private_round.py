"""A round with differential privacy at the sites, through the Prefect flow (real Prefect test API, GX gate, local
store, MLflow on SQLite): each site's ε in MLflow and in its manifest, and a site whose budget a round would
exceed refuses to train while the round goes on and records why."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from fedkim.federation.store import LocalStore, package_prefix
from fedkim.outcomes import REPORTED
from flows.round import fedkim_flow
from tests.helpers import TINY, small_params_dict

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture(autouse=True)
def no_tracking_env(monkeypatch):
    # Empty: tracking.uri decides. mlflow.set_tracking_uri exports the variable; setenv removes it again afterwards
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")


def test_a_private_round_logs_epsilon_and_records_a_refused_site(prefect_api, small_federation, tmp_path):
    federation = shutil.copytree(small_federation.root, tmp_path / "federation")
    raw = small_params_dict(federation, **{
        **TINY, "data.gate.min_samples_per_class": 1, "federation.retries": 0,
        "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "store.root": str(tmp_path / "store"),
        "report.root": str(tmp_path / "reports"), "federation.work_dir": str(tmp_path / "work"),
        "report.comparison": None, "site.privacy.enabled": True, "site.privacy.epsilon": 3.0,
        "site.privacy.ledger": str(tmp_path / "ledger")})
    for member in raw["federation"]["members"]:
        if member["id"] == "site-c":
            member["epsilon_max"] = 2.0  # below one round's ε: this hospital refuses
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))

    summary = fedkim_flow(round_id="1", params_path=str(path))

    assert summary["status"] == "completed"
    assert summary["sites"]["site-c"]["status"] == "refused"
    assert "site-c: privacy budget exhausted" in summary["excluded"]["site-c"] and "epsilon_max 2" in \
        summary["excluded"]["site-c"]
    trained = {s for s, o in summary["sites"].items() if o["status"] in REPORTED}
    assert trained == {"site-a", "site-b", "site-d"} and set(summary["included"]) == trained
    store = LocalStore(tmp_path / "store")
    assert not store.exists(f"{package_prefix('1', 'site-c')}/manifest.json")  # nothing uploaded
    manifest = json.loads((tmp_path / "store" / package_prefix("1", "site-a") / "manifest.json").read_text())
    assert 2.5 < manifest["privacy"]["epsilon_round"] <= 3.01
    assert manifest["privacy"]["epsilon_total"] == manifest["privacy"]["epsilon_round"]
    assert not (tmp_path / "ledger" / "site-c.json").exists()
    assert len(json.loads((tmp_path / "ledger" / "site-a.json").read_text())["rounds"]) == 1

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fedkim")
    site_runs = {r.data.tags["fedkim.site_id"]: r for r in client.search_runs(
        [experiment.experiment_id], "tags.`fedkim.round_id` = '1' and tags.`fedkim.kind` = 'site'")}
    for site in trained:
        metrics = site_runs[site].data.metrics
        assert 2.5 < metrics["privacy.epsilon_round"] <= 3.01 and metrics["privacy.epsilon_total"] >= 2.5
        assert metrics["privacy.delta"] == pytest.approx(1e-5) and metrics["privacy.epsilon_max"] == 10.0
        assert any(k.startswith("privacy.noise.") for k in metrics)
    refused = site_runs["site-c"].data
    assert refused.tags["fedkim.site.status"] == "refused" and "privacy budget" in refused.tags["fedkim.site.reason"]
    assert not any(k.startswith("privacy.") for k in refused.metrics)
