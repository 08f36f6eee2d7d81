"""What an orchestrated round needs around the steps of fedkim.rounds, whichever orchestrator runs it (the Prefect
flows in flows/ are thin wiring over this): the round id check, the params and the folder they resolve against,
retry delays and waiting budgets, the round's record in the store and its final summary, and the lines a finished
round prints.

Site outcomes are fedkim.rounds.SiteOutcome: trained or reused (the site's package is in the store), excluded (the
data gate failed; `reason` names the rules) or failed (crashed, timed out or never started; `reason` says how).
"""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fedkim.config import ROUND_ID_PATTERN, Params, default_params_path, load_params
from fedkim.digests import settings_digest
from fedkim.federation.store import ArtifactStore
from fedkim.outcomes import REPORTED, AggregateOutcome, SiteOutcome
from fedkim.rounds import round_key
from fedkim.tracking.connection import SUMMARY



def check_round_id(round_id: str) -> str:
    """The round id when it is usable as a store key part and an MLflow tag (as federation.round_id), else an error."""
    if not re.fullmatch(ROUND_ID_PATTERN, round_id):
        raise ValueError(f"round id {round_id!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a "
                         f"letter or digit (e.g. 7 or 2026-05-01)")
    return round_id


def load_settings(params_path: str | Path | None, overrides: dict[str, Any] | None) -> tuple[Params, Path]:
    """Params and the folder relative paths resolve against (the folder of params.yaml)."""
    path = Path(params_path) if params_path else default_params_path()
    return load_params(path, overrides or {}), path.resolve().parent


# ------------------------------------------------------------------------------------------ retries and waiting
def retry_delays(params: Params) -> list[float]:
    """Exponential backoff between a site's training attempts: retry_delay_s, then twice that, and so on."""
    return [params.federation.retry_delay_s * 2 ** i for i in range(params.federation.retries)]


def site_wait_s(params: Params) -> float:
    """Federated: how long the round waits for a site's run: site_start_s for a worker to pick it up, then every
    attempt's timeout (gate + training) and backoff."""
    fed = params.federation
    return fed.site_start_s + 2 * fed.site_timeout_s * (fed.retries + 1) + sum(retry_delays(params))


def failure_text(exc: BaseException) -> str:
    return f"{exc.__class__.__name__}: {exc}".strip()


# ------------------------------------------------------------------------------------------ the round's record
def round_record(params: Params, store: ArtifactStore, round_id: str, mode: str, flow_run_id: str) -> dict:
    """The round's record as it starts (rounds/<r>/round.json); the flow adds to it as the round goes on."""
    return {"round_id": round_id, "mode": mode, "status": "started", "params_hash": settings_digest(params),
            "prefect_flow_run_id": flow_run_id, "sites_invited": params.member_ids(),
            "foundation_model": params.inject.foundation_model, "store": store.uri(round_key(round_id))}


def reporting(sites: dict[str, SiteOutcome]) -> list[str]:
    """The sites whose packages are in the store, in order."""
    return [s for s, outcome in sites.items() if outcome.status in REPORTED]


def with_sites(record: dict, sites: dict[str, SiteOutcome]) -> dict:
    """The record once the sites are done: every outcome, gate summary included."""
    return record | {"status": "sites done", "sites": {s: asdict(outcome) for s, outcome in sites.items()}}


def quorum_failure(error: Exception, sites: dict[str, SiteOutcome]) -> str:
    """The quorum error with the reason of every site that did not report."""
    left_out = "; ".join(f"{s} {o.status}: {o.reason}" for s, o in sites.items() if o.status not in REPORTED)
    return f"{error}" + (f"; not reporting: {left_out}" if left_out else "")


def completed_summary(record: dict, sites: dict[str, SiteOutcome], aggregated: AggregateOutcome, injection: dict,
                      metrics: dict, registered: dict, mlflow_uri: str, seconds: float) -> dict:
    """The summary of a completed round (round.json, summary.json, the flow's return value): each site's outcome
    and gate time, who was included, excluded (gate or screening) or failed, the aggregation, the injection, the
    headline metrics and the registered version (`registered`: fedkim.tracking.registry_outcome)."""
    aggregate = asdict(aggregated)
    excluded = {s: o.reason for s, o in sites.items() if o.status in ("excluded", "refused")}
    excluded |= {s: "package rejected: " + "; ".join(r) for s, r in aggregate["rejected"].items()
                 if s in reporting(sites)}
    return record | {
        "status": "completed",
        "sites": {s: o.as_dict() | {"gate_seconds": ((o.validation or {}).get("stats") or {}).get("seconds")}
                  for s, o in sites.items()},
        "included": aggregate["accepted"], "excluded": excluded,
        "failed": {s: o.reason for s, o in sites.items() if o.status == "failed"},
        "aggregate": aggregate, "injection": {k: v for k, v in injection.items() if k not in ("losses", "lrs", "tasks")},
        "metrics": {k: metrics.get(k) for k in SUMMARY},
        "model": {k: v for k, v in registered.items() if k != "compared_with"},
        "mlflow_uri": mlflow_uri, "seconds": round(seconds, 1),
    }


# ------------------------------------------------------------------------------------------ what it prints
def mlflow_ui_command(uri: str) -> str:
    """The `mlflow ui` command for this tracking URI, with the SQLite path relative when it is under the cwd."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        try:
            uri = "sqlite:///" + path.relative_to(Path.cwd()).as_posix()
        except ValueError:
            pass
        return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1"
    return f"open {uri}"


def summary_lines(summary: dict) -> list[str]:
    """What a completed round prints: counts, the reason of each site left out, the registry, MLflow, the report."""
    model = summary["model"]
    lines = [f"\nround {summary['round_id']} {summary['status']} in {summary['seconds']} s: "
             f"{len(summary['included'])} site(s) included, {len(summary['excluded'])} excluded, "
             f"{len(summary['failed'])} failed"]
    lines += [f"  {site}: {reason}" for site, reason in {**summary["excluded"], **summary["failed"]}.items()]
    lines.append(f"registered: {model['name']} version {model['version']}, alias(es) "
                 f"{', '.join(model['aliases']) or 'none'} ({model['decision']}: {model['reason']})")
    lines.append(f"MLflow UI:  {mlflow_ui_command(summary['mlflow_uri'])}")
    report = Path(summary["report"])
    lines.append(f"report:     {report.relative_to(Path.cwd()) if report.is_relative_to(Path.cwd()) else report}")
    return lines
