"""What an orchestrated round computes besides the steps: round ids, backoff, the summary and its printed lines."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fedkim.config import load_params
from fedkim.members import site_pool
from fedkim.orchestration import (check_round_id, completed_summary, mlflow_ui_command, quorum_failure, reporting,
                                  retry_delays, site_wait_s, summary_lines, with_sites)
from fedkim.outcomes import AggregateOutcome, SiteOutcome
from tests.helpers import REPO


@pytest.fixture
def params(tmp_path):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["federation"] |= {"retries": 3, "retry_delay_s": 5, "site_start_s": 60, "site_timeout_s": 100}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    return load_params(tmp_path / "params.yaml")


def sites() -> dict[str, SiteOutcome]:
    gate = {"success": True, "findings": [], "stats": {"seconds": 1.5}}
    return {"a": SiteOutcome("a", "trained", sample_counts={"image": 3}, data_fingerprint="fa", validation=gate),
            "b": SiteOutcome("b", "excluded", "data gate failed", validation={"success": False, "findings": []}),
            "c": SiteOutcome("c", "failed", "timed out"),
            "d": SiteOutcome("d", "reused", data_fingerprint="fd"),
            "e": SiteOutcome("e", "refused", "e: privacy budget exhausted")}


def test_round_ids_follow_the_federation_round_id_rule():
    assert check_round_id("2026-05-01") == "2026-05-01" and check_round_id("7") == "7"
    for bad in ("", "-1", "a/b", "x" * 65, "round 1", "ok\n"):
        with pytest.raises(ValueError, match="use 1-64 letters, digits"):
            check_round_id(bad)


def test_backoff_doubles_and_the_federated_wait_covers_every_attempt(params):
    assert retry_delays(params) == [5, 10, 20]
    assert site_wait_s(params) == 60 + 2 * 100 * 4 + 35
    assert site_pool("a") == "site-a" and site_pool("site-b") == "site-b"


def test_the_summary_keeps_gate_summaries_out_and_sorts_sites_by_outcome():
    outcomes = sites()
    assert reporting(outcomes) == ["a", "d"]
    record = with_sites({"round_id": "3", "status": "started"}, outcomes)
    assert record["status"] == "sites done" and record["sites"]["a"]["validation"]["success"] is True
    aggregated = AggregateOutcome("3", ["a"], {"d": ["update norm too large"], "b": ["no package"]}, "fedavg")
    registered = {"name": "m", "version": 2, "aliases": ["challenger"], "decision": "kept", "reason": "r",
                  "champion_version": 1, "compared_with": {"version": 1}}
    summary = completed_summary(record, outcomes, aggregated, {"losses": [1.0], "steps": 1}, {"mean_auroc": 0.5},
                                registered, "sqlite:///x.db", 12.345)
    assert list(summary["sites"]["a"]) == ["site_id", "status", "reason", "sample_counts", "metrics",
                                           "data_fingerprint", "seconds", "privacy", "gate_seconds"]
    assert summary["sites"]["a"]["gate_seconds"] == 1.5 and summary["sites"]["c"]["gate_seconds"] is None
    assert summary["included"] == ["a"] and summary["failed"] == {"c": "timed out"}
    assert summary["excluded"] == {"b": "data gate failed", "e": "e: privacy budget exhausted",
                                   "d": "package rejected: update norm too large"}
    assert summary["injection"] == {"steps": 1} and summary["metrics"]["train_mean_f1"] is None
    assert "compared_with" not in summary["model"] and summary["seconds"] == 12.3
    assert quorum_failure(RuntimeError("1 acceptable package"), outcomes) == (
        "1 acceptable package; not reporting: b excluded: data gate failed; c failed: timed out; "
        "e refused: e: privacy budget exhausted")


def test_the_printed_lines_name_every_site_left_out(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    summary = {"round_id": "3", "status": "completed", "seconds": 9.5, "included": ["a"],
               "excluded": {"b": "gate"}, "failed": {"c": "crash"}, "mlflow_uri": f"sqlite:///{tmp_path}/m.db",
               "report": str(tmp_path / "reports" / "3" / "report.md"),
               "model": {"name": "m", "version": 2, "aliases": [], "decision": "kept", "reason": "r"}}
    assert summary_lines(summary) == [
        "\nround 3 completed in 9.5 s: 1 site(s) included, 1 excluded, 1 failed", "  b: gate", "  c: crash",
        "registered: m version 2, alias(es) none (kept: r)",
        "MLflow UI:  mlflow ui --backend-store-uri sqlite:///m.db --host 127.0.0.1",
        f"report:     {Path('reports/3/report.md')}"]
    assert mlflow_ui_command("http://127.0.0.1:5000") == "open http://127.0.0.1:5000"
