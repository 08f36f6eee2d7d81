"""A site's part of a round as Prefect tasks, and flow `fedkim-site` (deployments `fedkim-site/<site-id>` on work
pools `site-<site-id>`) that runs them at a hospital with only the Prefect API and the object store reachable.
What leaves a site: the knowledge package and the gate summary (rules, files, counts; never examples or values).
"""

from __future__ import annotations

from typing import Any

# Prefect before fedkim: importing mlflow, GX or transformers first replaces Prefect's log format.
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from fedkim.config import Params, default_params_path
from fedkim.data.validate import gate_reason, gate_summary
from fedkim.federation.store import ArtifactStore, open_store, package_prefix
from fedkim.members import site_dir
from fedkim.orchestration import load_settings, retry_delays
from fedkim.outcomes import SiteOutcome
from fedkim.site.privacy import PrivacyBudgetError
from fedkim.rounds import (get_json, package_validation, put_json, train_site_step, validate_site_step,
                           validation_key)


class DataGateError(RuntimeError):
    """A site's data failed the Great Expectations gate: the site is left out of the round."""


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
               progress: bool = False) -> SiteOutcome:
    """Local training from the round's global model, then the package upload (idempotent per round)."""
    outcome = train_site_step(params, store, round_id, site_id, progress=progress,
                              validation=package_validation(validation))
    get_run_logger().info("%s: %s, %s samples, %.1f s%s", site_id, outcome.status,
                          sum(outcome.sample_counts.values()), outcome.seconds,
                          f", ε {outcome.privacy['epsilon_round']:.2f} this round, {outcome.privacy['epsilon_total']:.2f}"
                          f" in all" if outcome.privacy else f": {outcome.reason}" if outcome.reason else "")
    return outcome


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
    when the data fails the gate, or when training would exceed the site's privacy budget, so the site's own
    pool shows the run red."""
    params, base = load_settings(params_path, overrides)
    if site_id not in params.member_ids():
        raise ValueError(f"site {site_id!r} is not in federation.members of {params_path or default_params_path()}")
    store = open_store(params.store, base_dir=base)
    validate, train = site_tasks(params)
    validation = validate(params, store, round_id, site_id)
    if not validation["success"]:
        raise DataGateError(f"{site_id}: {gate_reason(validation)} (summary in the store at "
                            f"{validation_key(round_id, site_id)}; the examples: `fedkim data validate "
                            f"{site_dir(params, site_id)} --no-docs` at the site)")
    outcome = train(params, store, round_id, site_id, validation, progress=progress)
    if outcome.status == "refused":  # the coordinator reads why from this run's state (flows.dispatch)
        raise PrivacyBudgetError(outcome.reason)
    return outcome.as_dict()
