"""Flow `fedkim` (deployment `fedkim/round`): one federated round, wired from the library's idempotent steps.

    start round -> per site (flows/dispatch.py): data gate -> training + package upload -> aggregation (screening,
    quorum) -> injection, evaluation (test: reported; validation: decides), bundle, registry version and promotion
    gate (fedkim.tracking.log_round)
    -> finish -> round report (fedkim.report)

Re-running a round id reuses what the store and MLflow already hold (no retraining, no second parent run, no
second registry version). A round id runs once at a time: the flow holds the round's lock in the store before it
opens the MLflow parent run, so a second trigger is refused (or waits: federation.round_lock).

    python -m flows.round [--round-id ID] [--params params.yaml] [--set key=value ...] [--mode federated]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from datetime import datetime, timezone
from typing import Any, Literal

# Prefect before fedkim: importing mlflow, GX or transformers first replaces Prefect's log format.
from prefect import flow, get_run_logger, runtime, task
from prefect.cache_policies import NO_CACHE

from fedkim import tracking
from fedkim.config import ConfigError, parse_overrides
from fedkim.federation.signing import SignatureError
from fedkim.federation.store import open_store
from fedkim.members import server_splits
from fedkim.orchestration import (REPORTED, check_round_id, completed_summary, load_settings, mlflow_ui_command,
                                  quorum_failure, reporting, round_record, summary_lines, with_sites)
from fedkim.report import write_round_report
from fedkim.round_chain import LatestError
from fedkim.round_lock import RoundLockedError, round_lock
from fedkim.progress import PhaseTimer
from fedkim.outcomes import SiteOutcome
from fedkim.rounds import (QuorumError, SplitGateError, aggregate_step, evaluate_step,
                           finish_round, inject_step, latest_round, put_json, round_key, start_round,
                           validate_split_step)
from flows.dispatch import run_sites_here, run_sites_remote


def default_round_id() -> str:
    """A scheduled run is named after its scheduled time (UTC), so a retried run keeps its round id."""
    when = runtime.flow_run.scheduled_start_time or datetime.now(timezone.utc)
    return when.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


# The library's steps as Prefect tasks: each a task run of its own, with its state and logs, in the round's flow run.
start_task = task(start_round, name="start-round", cache_policy=NO_CACHE)
aggregate_task = task(aggregate_step, name="aggregate", cache_policy=NO_CACHE)
inject_task = task(inject_step, name="inject", cache_policy=NO_CACHE)
evaluate_task = task(evaluate_step, name="evaluate", cache_policy=NO_CACHE)
split_gate_task = task(validate_split_step, name="validate-split", task_run_name="validate-{split}",
                       cache_policy=NO_CACHE)
register_task = task(tracking.register_round, name="register", cache_policy=NO_CACHE)


@flow(name="fedkim")
def fedkim_flow(round_id: str | None = None, params_path: str | None = None,
                overrides: dict[str, Any] | None = None, mode: Literal["simulation", "federated"] | None = None,
                progress: bool = False) -> dict:
    """One federated round (see the module docstring). Returns the round summary; raises QuorumError when fewer
    than federation.quorum sites delivered an acceptable package."""
    import mlflow

    started = time.perf_counter()
    timer = PhaseTimer()  # wall seconds per phase, in the summary (the orchestration benchmark's breakdown)
    logger = get_run_logger()
    round_id = check_round_id(str(round_id or default_round_id()))
    params, base = load_settings(params_path, overrides)
    mode = mode or params.federation.mode
    store = open_store(params.store, base_dir=base)
    uri = tracking.configure(params.tracking, base)
    record = round_record(params, store, round_id, mode, str(runtime.flow_run.id or ""))
    manifest_key, invited = round_key(round_id, "round.json"), record["sites_invited"]
    logger.info("round %s: %d site(s) %s, %s mode, store %s, MLflow %s", round_id, len(invited), ", ".join(invited),
                mode, record["store"], uri)

    timer.seconds["setup"] = round(time.perf_counter() - started, 2)
    with round_lock(store, round_id, params.federation.round_lock,
                    owner=f"prefect flow run {record['prefect_flow_run_id'] or '(none)'}"), \
            tracking.round_run(params, round_id, sites=dict.fromkeys(invited, ""),
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
            tracking.log_sites(parent, sites.values())
            tracking.tag_sites(parent, sites.values())
        for site, outcome in sites.items():
            (logger.info if outcome.status in REPORTED else logger.warning)(
                "%s: %s%s", site, outcome.status, f" ({outcome.reason})" if outcome.reason else "")
        record = with_sites(record, sites)
        put_json(store, manifest_key, record, overwrite=True)

        try:
            with timer("aggregate"):
                aggregate = aggregate_task(params, store, round_id, reporting(sites))
        except QuorumError as exc:
            message = quorum_failure(exc, sites)
            put_json(store, manifest_key, record | {"status": "failed", "error": message}, overwrite=True)
            raise QuorumError(message) from None

        try:  # the server's own splits pass the gate before injection and evaluation use them
            with timer("gate"):
                splits = {name: split_gate_task(params, name) for name in server_splits(params)}
        except SplitGateError as exc:
            put_json(store, manifest_key, record | {"status": "failed", "error": str(exc)}, overwrite=True)
            raise
        tracking.log_sites(parent, [SiteOutcome(name, "gated", validation=s) for name, s in splits.items()])
        record |= {"splits": splits}
        work_dir = params.federation.work_dir / round_id
        logged = tracking.log_round(
            parent, params, round_id, sites={s: sites[s].data_fingerprint for s in aggregate.accepted},
            inject=lambda: inject_task(params, store, round_id, work_dir, progress=progress),
            evaluate=lambda model: evaluate_task(params, store, round_id, model, progress=progress), register=register_task,
            timer=timer, validate=(lambda model: evaluate_task(params, store, round_id, model, progress=progress,
                                                               split="validation", recompute=True))
            if "validation" in splits else None,
            outcomes=[*sites.values(), *(SiteOutcome(name, "gated", validation=s) for name, s in splits.items())])
        if not finish_round(store, round_id, params):  # an old round id again, or one started from an older LATEST
            logger.warning("round %s: rounds/LATEST.json stays at round %s", round_id, latest_round(store, params))
        shutil.rmtree(work_dir, ignore_errors=True)  # checkpoints only serve an unfinished injection

        summary = completed_summary(record, sites, aggregate, logged.injection, logged.metrics, logged.registered,
                                    uri, time.perf_counter() - started)
        with timer("report"):
            folder = write_round_report(params, summary, logged.metrics, logged.injection,
                                        champion=logged.registered["compared_with"], mlflow_ui=mlflow_ui_command(uri))
            tracking.log_report(parent, folder)
        summary |= {"seconds": round(time.perf_counter() - started, 1), "timings": timer.seconds}
        put_json(store, manifest_key, summary, overwrite=True)
    model = summary["model"]
    logger.info("round %s completed in %.1f s: %s v%s (%s), report %s", round_id, summary["seconds"],
                model["name"], model["version"], ", ".join(model["aliases"]), summary["report"])
    return summary


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
    except (QuorumError, SplitGateError) as exc:
        print(f"\nround failed: {exc}", file=sys.stderr)
        return 1
    except (RoundLockedError, LatestError, SignatureError) as exc:
        print(f"\nround not run: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(summary_lines(summary)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
