"""A site's part of a round as Prefect tasks, and flow `fedkim-site` that runs them at a hospital.

Simulation mode: the round flow submits `validate_task` and `train_task` itself, all sites concurrently.
Federated mode: each site runs deployment `fedkim-site/<site-id>` on its own work pool `site-<site-id>`; the flow
needs only the Prefect API (outbound) and the object store. It receives the round id (and params path/overrides),
reads the round's global model from the store and writes its knowledge package and gate summary back there.

What leaves a site: the knowledge package and the gate summary (rules, files, counts; never examples or values).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Prefect before fedkim: importing mlflow, GX or transformers first replaces Prefect's log format.
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from fedkim.config import Params, default_params_path, load_params
from fedkim.data.validate import gate_reason, gate_summary
from fedkim.federation.package import ValidationSummary
from fedkim.federation.store import ArtifactStore, open_store, package_prefix
from fedkim.rounds import get_json, put_json, round_key, train_site_step, validate_site_step


class DataGateError(RuntimeError):
    """A site's data failed the Great Expectations gate: the site is left out of the round."""


def load(params_path: str | Path | None, overrides: dict[str, Any] | None) -> tuple[Params, Path]:
    """Params and the folder relative paths resolve against (the folder of params.yaml)."""
    path = Path(params_path) if params_path else default_params_path()
    return load_params(path, overrides or {}), path.resolve().parent


def store_for(params: Params, base_dir: Path) -> ArtifactStore:
    return open_store(params.store, base_dir=base_dir)


def site_pool(site_id: str) -> str:
    """The work pool of a site: `site-<id>`, or the id itself when it already starts with `site-`."""
    return site_id if site_id.startswith("site-") else f"site-{site_id}"


def validation_key(round_id: str, site_id: str) -> str:
    # Beside the packages, not inside them: the aggregator downloads rounds/<r>/sites/<site>/ as the package.
    return round_key(round_id, "validation", f"{site_id}.json")


def retry_delays(params: Params) -> list[float]:
    """Exponential backoff: retry_delay_s, then twice that, and so on."""
    return [params.federation.retry_delay_s * 2 ** i for i in range(params.federation.retries)]


@task(name="validate-site", task_run_name="validate-{site_id}", cache_policy=NO_CACHE)
def validate_task(params: Params, store: ArtifactStore, round_id: str, site_id: str) -> dict:
    """The GX gate on the site's data; its summary goes to the store. Bad data is a result, not an exception."""
    logger = get_run_logger()
    key = validation_key(round_id, site_id)
    if store.exists(f"{package_prefix(round_id, site_id)}/manifest.json") and store.exists(key):
        return get_json(store, key)  # the site passed and reported in an earlier run of this round
    report = validate_site_step(params, site_id)
    summary = gate_summary(report)
    put_json(store, key, summary, overwrite=True)
    if report.success:
        logger.info("%s: data gate passed (%s samples, %s expectations)", site_id,
                    summary["stats"].get("samples"), summary["stats"].get("expectations"))
    else:
        logger.warning("%s: %s", site_id, gate_reason(summary))
    return summary


@task(name="train-site", task_run_name="train-{site_id}", cache_policy=NO_CACHE)
def train_task(params: Params, store: ArtifactStore, round_id: str, site_id: str, validation: dict,
               progress: bool = False) -> dict:
    """Local training from the round's global model, then the package upload (idempotent per round)."""
    outcome = train_site_step(params, store, round_id, site_id, progress=progress,
                              validation=ValidationSummary(success=validation["success"],
                                                           findings=len(validation["findings"])))
    get_run_logger().info("%s: %s, %s samples, %.1f s", site_id, outcome.status,
                          sum(outcome.sample_counts.values()), outcome.seconds)
    return outcome.as_dict()


def site_tasks(params: Params):
    """The two tasks with this round's timeout, retries and backoff. The gate is not retried: bad data stays bad."""
    timeout = params.federation.site_timeout_s
    train = train_task.with_options(retries=params.federation.retries, timeout_seconds=timeout,
                                    retry_delay_seconds=retry_delays(params) or 0)
    return validate_task.with_options(timeout_seconds=timeout), train


@flow(name="fedkim-site")
def site_flow(site_id: str, round_id: str, params_path: str | None = None,
              overrides: dict[str, Any] | None = None, progress: bool = False) -> dict:
    """One site's round at the hospital: gate, then training + upload. Fails (after uploading the gate summary)
    when the data fails the gate, so the site's own pool shows the run red."""
    params, base = load(params_path, overrides)
    if site_id not in {s.id for s in params.data.sites}:
        raise ValueError(f"site {site_id!r} is not in data.sites of {params_path or default_params_path()}")
    store = store_for(params, base)
    validate, train = site_tasks(params)
    validation = validate(params, store, round_id, site_id)
    if not validation["success"]:
        raise DataGateError(f"{site_id}: {gate_reason(validation)} (summary in the store at "
                            f"{validation_key(round_id, site_id)}; full report at the site in reports/)")
    return train(params, store, round_id, site_id, validation, progress=progress)
