"""Flow `fedkim` (deployment `fedkim/round`): one federated round, wired from the library's idempotent steps.

    start round -> per site: data gate -> training + package upload -> aggregation (screening, quorum)
    -> injection (MLflow nested run) -> evaluation -> bundle, register (alias challenger), promotion gate
    -> finish -> round report (Markdown + PNGs)

Sites run as concurrent Prefect tasks with retries, backoff and a timeout (mode `simulation`), or as the
deployments `fedkim-site/<site-id>` on their own work pools (mode `federated`). A site that fails the gate is
excluded, one that crashes or times out is recorded as failed; the quorum decides whether the round goes on.
Re-running a round id reuses what the store and MLflow already hold (no retraining, no second parent run, no
second registry version).

    python -m flows.round [--round-id ID] [--params params.yaml] [--set key=value ...] [--mode federated]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import re
import shutil
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

# Prefect before fedkim: importing mlflow, GX or transformers first replaces Prefect's log format.
from prefect import flow, get_run_logger, runtime, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed

from fedkim import tracking
from fedkim.config import ConfigError, Params, parse_overrides
from fedkim.data.validate import gate_reason
from fedkim.digests import settings_digest
from fedkim.federation.store import ArtifactStore, package_prefix
from fedkim.rounds import (PhaseTimer, QuorumError, aggregate_step, evaluate_step, finish_round, get_json,
                           inject_step, put_json, read_manifest_from_store, round_key, start_round)
from flows.report import find_comparison, load_baselines, write_report
from flows.site import load, site_pool, site_tasks, store_for, validation_key

ROUND_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # as federation.round_id: a store key part, a run tag


def default_round_id() -> str:
    """A scheduled run is named after its scheduled time (UTC), so a retried run keeps its round id."""
    when = runtime.flow_run.scheduled_start_time or datetime.now(timezone.utc)
    return when.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def _failure(exc: BaseException) -> str:
    return f"{exc.__class__.__name__}: {exc}".strip()


def _outcome(site_id: str, status: str, reason: str = "", validation: dict | None = None, **extra) -> dict:
    return {"site_id": site_id, "status": status, "reason": reason, "sample_counts": {}, "metrics": {},
            "data_fingerprint": "", "seconds": 0.0, **extra, "validation": validation}


# ------------------------------------------------------------------------------------------ central tasks
@task(name="start-round", cache_policy=NO_CACHE)
def start_task(params: Params, store: ArtifactStore, round_id: str) -> str:
    return start_round(params, store, round_id)


@task(name="aggregate", cache_policy=NO_CACHE)
def aggregate_task(params: Params, store: ArtifactStore, round_id: str, site_ids: list[str]) -> dict:
    return asdict(aggregate_step(params, store, round_id, site_ids))


@task(name="inject", cache_policy=NO_CACHE)
def inject_task(params: Params, store: ArtifactStore, round_id: str, work_dir: Path, progress: bool = False):
    return inject_step(params, store, round_id, work_dir, progress=progress)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(params: Params, store: ArtifactStore, round_id: str, model, progress: bool = False) -> dict:
    return evaluate_step(params, store, round_id, model, progress=progress)


@task(name="register", cache_policy=NO_CACHE)
def register_task(params: Params, model, metrics: dict, round_id: str, injection_run_id: str,
                  sites: dict[str, str]) -> dict:
    """Bundle + registry version (alias challenger) + promotion gate; a round id already registered is reused."""
    from mlflow import MlflowClient

    version, decision = tracking.register_round(model, params, injection_run_id, round_id, metrics, sites)
    client = MlflowClient()
    fresh = client.get_model_version(version.name, version.version)
    champion = None
    if decision.previous_champion is not None:  # the champion this version was judged against
        previous = client.get_model_version(version.name, str(decision.previous_champion))
        champion = {"version": decision.previous_champion, "round_id": previous.tags.get(tracking.ROUND),
                    "tasks": tracking.champion_figures(previous)}
    return {"name": version.name, "version": int(version.version), "aliases": sorted(fresh.aliases),
            "decision": decision.decision, "reason": decision.reason, "champion_version": decision.champion,
            "compared_with": champion}


# ------------------------------------------------------------------------------------------------- sites
def run_sites_here(params: Params, store: ArtifactStore, round_id: str, progress: bool) -> dict[str, dict]:
    """Simulation: every site's gate as a concurrent task in this process, then its training, which starts as soon
    as its own gate passes.

    With federation.parallel_sites 1 (the default) the trainings run one at a time in the flow's own thread. Torch
    then keeps one OpenMP team, whose threads spin between operations: every further thread that runs torch makes
    the OpenMP runtime cut that spinning process-wide, which slowed the injection and the evaluation after the
    sites by 10-25 % (measured), and Prefect enforces a sync task's timeout promptly only in the main thread.
    With 0 (all) or more than 1, trainings run concurrently in the task pool, at most that many at once; the limit
    is applied here, before submission, so that waiting never counts against a task's timeout."""
    validate, train = site_tasks(params)
    limit = params.federation.parallel_sites or len(params.data.sites)
    attempts = params.federation.retries + 1
    outcomes: dict[str, dict] = {}
    gates = {validate.submit(params, store, round_id, s.id): s.id for s in params.data.sites}

    def gate_passed(future, site: str) -> dict | None:
        """The gate summary when the site may train; otherwise its outcome is recorded and None returned."""
        try:
            summary = future.result()
        except Exception as exc:  # the gate itself crashed or timed out (bad data only makes findings)
            outcomes[site] = _outcome(site, "failed", f"data gate did not finish: {_failure(exc)}")
            return None
        if not summary["success"]:
            outcomes[site] = _outcome(site, "excluded", gate_reason(summary), summary)
            return None
        return summary

    def trained(site: str, summary: dict, run) -> None:
        try:
            outcomes[site] = {**run(), "validation": summary}
        except Exception as exc:
            outcomes[site] = _outcome(site, "failed", f"training/upload failed after {attempts} attempt(s): "
                                                      f"{_failure(exc)}", summary)

    if limit == 1:
        for future in as_completed(list(gates)):
            site = gates[future]
            if (summary := gate_passed(future, site)) is not None:
                trained(site, summary, lambda: train(params, store, round_id, site, summary, progress=progress))
        return {s.id: outcomes[s.id] for s in params.data.sites}

    ready: list[tuple[str, dict]] = []  # passed the gate, waiting for a training slot
    running: dict = {}
    while gates or running or ready:
        while ready and len(running) < limit:
            site, summary = ready.pop(0)
            running[train.submit(params, store, round_id, site, summary, progress=progress)] = (site, summary)
        by_wrapped = {f.wrapped_future: f for f in [*gates, *running]}
        done, _ = concurrent.futures.wait(list(by_wrapped), return_when=concurrent.futures.FIRST_COMPLETED)
        for future in (by_wrapped[w] for w in done):
            if future in gates:
                site = gates.pop(future)
                if (summary := gate_passed(future, site)) is not None:
                    ready.append((site, summary))
                continue
            site, summary = running.pop(future)
            trained(site, summary, future.result)
    return {s.id: outcomes[s.id] for s in params.data.sites}


@task(name="site-deployment", task_run_name="site-{site_id}", cache_policy=NO_CACHE)
def remote_site_task(store: ArtifactStore, round_id: str, site_id: str, parameters: dict, start_s: float,
                     wait_s: float, key: str) -> dict:
    """Federated: start `fedkim-site/<site>` on the site's pool, wait for it, read its results from the store.
    A run no worker picks up within start_s, or that is not done within wait_s, is cancelled and counts as failed."""
    from prefect import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Cancelled, Cancelling

    name = f"fedkim-site/{site_id}"
    try:
        run = run_deployment(name, parameters={"site_id": site_id, "round_id": round_id, **parameters},
                             timeout=0, idempotency_key=key, tags=[f"round:{round_id}"])
    except ObjectNotFound:
        return _outcome(site_id, "failed", f"deployment {name} not found: run `prefect deploy --all` (prefect.yaml)")
    began = time.monotonic()
    with get_client(sync_client=True) as client:
        while not (state := client.read_flow_run(run.id).state) or not state.is_final():
            waited = time.monotonic() - began
            unclaimed = state is None or state.is_scheduled()  # Scheduled or Late: no worker has taken it
            if (unclaimed and waited > start_s) or waited > wait_s:
                # Never leave it to start into a later round; one that runs is stopped by its worker (Cancelling).
                message = f"round {round_id} stopped waiting"
                client.set_flow_run_state(run.id, Cancelled(message=message) if unclaimed else
                                          Cancelling(message=message), force=True)
                why = (f"no worker picked up site run {run.name} within {start_s:.0f} s (is a worker running on "
                       f"work pool {site_pool(site_id)}?)" if unclaimed else
                       f"site run {run.name} not done within {wait_s:.0f} s (was {state.name})")
                return _outcome(site_id, "failed", why + "; cancelled")
            time.sleep(2)
    gate_key = validation_key(round_id, site_id)
    validation = get_json(store, gate_key) if store.exists(gate_key) else None
    if state.is_completed():
        manifest = read_manifest_from_store(store, package_prefix(round_id, site_id))
        return _outcome(site_id, "trained", validation=validation, sample_counts=dict(manifest.sample_counts),
                        metrics=dict(manifest.local_metrics), data_fingerprint=manifest.data_fingerprint)
    if validation is not None and not validation["success"]:
        return _outcome(site_id, "excluded", gate_reason(validation), validation)
    return _outcome(site_id, "failed", f"site run {run.name} ended {state.name}: {state.message}", validation)


def run_sites_remote(params: Params, store: ArtifactStore, round_id: str, params_path: str | None,
                     overrides: dict | None, progress: bool) -> dict[str, dict]:
    """Federated: all site deployments at once. Each may take site_start_s to be picked up by its worker, then
    every attempt's timeout (gate + training) and backoff."""
    fed = params.federation
    wait_s = fed.site_start_s + 2 * fed.site_timeout_s * (fed.retries + 1) + sum(
        fed.retry_delay_s * 2 ** i for i in range(fed.retries))
    # Sites read their own data root and store settings; only what the caller chose explicitly travels.
    parameters = {"params_path": params_path, "overrides": overrides or {}, "progress": progress}
    flow_run = runtime.flow_run.id or "local"
    futures = {remote_site_task.submit(store, round_id, s.id, parameters, fed.site_start_s, wait_s,
                                       f"{flow_run}/{s.id}"): s.id for s in params.data.sites}
    outcomes = {}
    for future in as_completed(list(futures)):
        site = futures[future]
        try:
            outcomes[site] = future.result()
        except Exception as exc:
            outcomes[site] = _outcome(site, "failed", f"site dispatch failed: {_failure(exc)}")
    return {s.id: outcomes[s.id] for s in params.data.sites}


def inject_and_evaluate(parent, params: Params, store: ArtifactStore, round_id: str, work_dir: Path,
                        progress: bool, timer: PhaseTimer):
    """Injection and evaluation as one nested MLflow run (loss curve, metrics, gate, comparison with the champion).
    A re-run round keeps its finished injection run instead of adding another. Returns (model, injection summary,
    metrics, injection run id)."""
    done = tracking.find_child_run(parent, "injection")
    if done is not None and done.info.status == "FINISHED":
        with timer("inject"):
            model, injection = inject_task(params, store, round_id, work_dir, progress)
        with timer("evaluate"):
            metrics = evaluate_task(params, store, round_id, model, progress)
        return model, injection, metrics, done.info.run_id
    with tracking.injection_run(parent) as run:
        with timer("inject"):
            model, injection = inject_task(params, store, round_id, work_dir, progress)
        with timer("tracking"):
            run.log_injection(injection["losses"], injection["lrs"], injection["tasks"])
        with timer("evaluate"):
            metrics = evaluate_task(params, store, round_id, model, progress)
        with timer("tracking"):
            run.log_evaluation(metrics)
            run.compare_with_champion(metrics)
    return model, injection, metrics, run.run_id


# ------------------------------------------------------------------------------------------------- the flow
@flow(name="fedkim")
def fedkim_flow(round_id: str | None = None, params_path: str | None = None,
                overrides: dict[str, Any] | None = None, mode: Literal["simulation", "federated"] | None = None,
                progress: bool = False) -> dict:
    """One federated round (see the module docstring). Returns the round summary; raises QuorumError when fewer
    than federation.quorum sites delivered an acceptable package."""
    import mlflow
    from mlflow import MlflowClient

    started = time.perf_counter()
    timer = PhaseTimer()  # wall seconds per phase, in the summary (the orchestration benchmark's breakdown)
    logger = get_run_logger()
    round_id = str(round_id or default_round_id())
    if not ROUND_ID.fullmatch(round_id):
        raise ValueError(f"round id {round_id!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a "
                         f"letter or digit (e.g. 7 or 2026-05-01)")
    params, base = load(params_path, overrides)
    mode = mode or params.federation.mode
    store = store_for(params, base)
    uri = tracking.configure(params.tracking, base)
    sites_invited = [s.id for s in params.data.sites]
    record = {"round_id": round_id, "mode": mode, "status": "started", "params_hash": settings_digest(params),
              "prefect_flow_run_id": str(runtime.flow_run.id or ""), "sites_invited": sites_invited,
              "foundation_model": params.inject.foundation_model, "store": store.uri(round_key(round_id))}
    manifest_key = round_key(round_id, "round.json")
    logger.info("round %s: %d site(s) %s, %s mode, store %s, MLflow %s", round_id, len(sites_invited),
                ", ".join(sites_invited), mode, record["store"], uri)

    timer.seconds["setup"] = round(time.perf_counter() - started, 2)
    with tracking.round_run(params, round_id, sites={s: "" for s in sites_invited},
                            params_hash=record["params_hash"]) as parent:
        with timer("tracking"):
            record["mlflow_run_id"] = parent.info.run_id
            mlflow.set_tags({"fedkim.mode": mode, "fedkim.prefect_flow_run_id": record["prefect_flow_run_id"]})
        with timer("start"):
            put_json(store, manifest_key, record, overwrite=True)
            start_task(params, store, round_id)

        with timer("sites"):
            sites = (run_sites_here(params, store, round_id, progress) if mode == "simulation" else
                     run_sites_remote(params, store, round_id, params_path, overrides, progress))
        with timer("tracking"):
            for site, info in sites.items():
                tracking.log_site(parent, site, metrics=info["metrics"], sample_counts=info["sample_counts"],
                                  validation=info["validation"] or {"success": "unknown"},
                                  fingerprint=info["data_fingerprint"] or None)
                mlflow.set_tags({f"fedkim.site.{site}.status": info["status"],
                                 f"fedkim.site.{site}.fingerprint": info["data_fingerprint"] or "unknown"})
                (logger.info if info["status"] in ("trained", "reused") else logger.warning)(
                    "%s: %s%s", site, info["status"], f" ({info['reason']})" if info["reason"] else "")
        record |= {"status": "sites done", "sites": sites}
        put_json(store, manifest_key, record, overwrite=True)

        reported = [s for s, info in sites.items() if info["status"] in ("trained", "reused")]
        try:
            with timer("aggregate"):
                aggregate = aggregate_task(params, store, round_id, reported)
        except QuorumError as exc:
            left_out = "; ".join(f"{s} {info['status']}: {info['reason']}" for s, info in sites.items()
                                 if info["status"] not in ("trained", "reused"))
            message = f"{exc}" + (f"; not reporting: {left_out}" if left_out else "")
            put_json(store, manifest_key, record | {"status": "failed", "error": message}, overwrite=True)
            raise QuorumError(message) from None

        work_dir = params.federation.work_dir / round_id
        model, injection, metrics, injection_run_id = inject_and_evaluate(parent, params, store, round_id, work_dir,
                                                                          progress, timer)
        fingerprints = {s: sites[s]["data_fingerprint"] for s in aggregate["accepted"]}
        with timer("register"):
            registered = register_task(params, model, metrics, round_id, injection_run_id, fingerprints)
        finish_round(store, round_id)
        shutil.rmtree(work_dir, ignore_errors=True)  # checkpoints only serve an unfinished injection

        excluded = {s: info["reason"] for s, info in sites.items() if info["status"] == "excluded"}
        excluded |= {s: "package rejected: " + "; ".join(r) for s, r in aggregate["rejected"].items() if s in reported}
        summary = record | {
            "status": "completed",
            "sites": {s: {k: v for k, v in info.items() if k != "validation"}
                      | {"gate_seconds": ((info["validation"] or {}).get("stats") or {}).get("seconds")}
                      for s, info in sites.items()},
            "included": aggregate["accepted"], "excluded": excluded,
            "failed": {s: info["reason"] for s, info in sites.items() if info["status"] == "failed"},
            "aggregate": aggregate, "injection": {k: v for k, v in injection.items()
                                                  if k not in ("losses", "lrs", "tasks")},
            "metrics": {k: metrics.get(k) for k in ("train_mean_f1", "zeroshot_mean", "mean_auroc")},
            "model": {k: v for k, v in registered.items() if k != "compared_with"},
            "mlflow_uri": uri, "seconds": round(time.perf_counter() - started, 1),
        }
        with timer("report"):
            comparison = find_comparison(params.report.comparison, params.report.root.parent)
            baselines, meta = load_baselines(comparison)
            folder = params.report.root / round_id
            summary["report"] = str(folder / "report.md")
            write_report(folder, summary, metrics, injection, champion=registered["compared_with"],
                         baselines=baselines, baseline_meta=meta, mlflow_ui=mlflow_ui_command(uri))
            MlflowClient().log_artifacts(parent.info.run_id, str(folder), "report")
        summary |= {"seconds": round(time.perf_counter() - started, 1), "timings": timer.seconds}
        put_json(store, manifest_key, summary, overwrite=True)
    logger.info("round %s completed in %.1f s: %s v%s (%s), report %s", round_id, summary["seconds"],
                registered["name"], registered["version"], ", ".join(registered["aliases"]), summary["report"])
    return summary


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


# ------------------------------------------------------------------------------------------------------ CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.round", description=__doc__.splitlines()[0])
    parser.add_argument("--round-id", help="default: the UTC time, e.g. 20260501T020000Z")
    parser.add_argument("--params", help="params.yaml (default: FEDKIM_PARAMS or the repo's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. --set inject.foundation_model=tiny (repeatable)")
    parser.add_argument("--mode", choices=["simulation", "federated"], help="default: federation.mode")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        overrides = parse_overrides(args.overrides)
    except ConfigError as exc:
        parser.error(str(exc))
    try:
        summary = fedkim_flow(round_id=args.round_id, params_path=args.params,
                              overrides=overrides, mode=args.mode, progress=not args.no_progress)
    except QuorumError as exc:
        print(f"\nround failed: {exc}", file=sys.stderr)
        return 1
    model = summary["model"]
    print(f"\nround {summary['round_id']} {summary['status']} in {summary['seconds']} s: "
          f"{len(summary['included'])} site(s) included, {len(summary['excluded'])} excluded, "
          f"{len(summary['failed'])} failed")
    for site, reason in {**summary["excluded"], **summary["failed"]}.items():
        print(f"  {site}: {reason}")
    print(f"registered: {model['name']} version {model['version']}, alias(es) {', '.join(model['aliases']) or 'none'}"
          f" ({model['decision']}: {model['reason']})")
    print(f"MLflow UI:  {mlflow_ui_command(summary['mlflow_uri'])}")
    report = Path(summary["report"])
    print(f"report:     {report.relative_to(Path.cwd()) if report.is_relative_to(Path.cwd()) else report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
