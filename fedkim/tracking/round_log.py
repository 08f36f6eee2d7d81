"""A round's record in MLflow, the one sequence the Prefect flow and the DVC `register` stage share: inside the
round's parent run (`round_run`), a nested run per site, then the server's injection and evaluation in a nested run,
then the bundle, its registry version (alias challenger) and the promotion gate.

    with round_run(params, round_id, sites=fingerprints, params_hash=h) as parent:
        log_sites(parent, outcomes)                      # fedkim.rounds.SiteOutcome of each site
        tag_sites(parent, outcomes)                      # their status (orchestrated rounds)
        logged = log_round(parent, params, round_id, sites=fingerprints, inject=..., evaluate=...)
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.entities import RunTag

from fedkim.central.datacard import data_record
from fedkim.config import Params
from fedkim.data.catalogue import catalogue_of
from fedkim.members import SERVER_SPLITS
from fedkim.tracking.connection import ROUND, SPLIT_TAG, client
from fedkim.tracking.promotion import PromotionResult, promote
from fedkim.tracking.registry import champion_figures, find_version, register
from fedkim.tracking.runs import find_child_run, injection_run, log_site

if TYPE_CHECKING:
    from fedkim.outcomes import SiteOutcome

Timer = Callable[[str], AbstractContextManager]  # fedkim.rounds.PhaseTimer: `with timer("inject"): ...`


def _untimed(phase: str) -> AbstractContextManager:
    return contextlib.nullcontext()


def log_sites(parent, outcomes: Iterable[SiteOutcome]) -> None:
    """A nested run per site (local metrics, sample counts, its data gate's summary), or per server split whose
    gate ran (kind split: public, test); those logged before under this parent are left as they are."""
    for outcome in outcomes:
        log_site(parent, outcome.site_id, metrics=outcome.metrics, sample_counts=outcome.sample_counts,
                 validation=outcome.validation or {"success": "unknown"},
                 fingerprint=outcome.data_fingerprint or None, privacy=outcome.privacy,
                 status=outcome.status, reason=outcome.reason,
                 kind="split" if outcome.site_id in SERVER_SPLITS else "site")


def tag_sites(parent, outcomes: Iterable[SiteOutcome]) -> None:
    """Each site's status and data fingerprint as tags of the round run (what an orchestrated round knows)."""
    tags = {}
    for o in outcomes:
        tags |= {f"fedkim.site.{o.site_id}.status": o.status,
                 f"fedkim.site.{o.site_id}.fingerprint": o.data_fingerprint or "unknown"}
    client().log_batch(parent.info.run_id, tags=[RunTag(k, v) for k, v in tags.items()])


@dataclass(frozen=True)
class LoggedRound:
    """What the server's part of a round produced, as tracked: the injected model, the injection summary (losses,
    learning rates, tasks per step), the evaluation metrics, the injection run, and the registry outcome."""

    model: Any
    injection: dict
    metrics: dict  # the test split's: reported
    injection_run_id: str
    version: Any  # the registered mlflow ModelVersion
    decision: PromotionResult
    registered: dict  # name, version, aliases, decision, decided_on, reason, champion_version, compared_with
    decided_on: dict | None = None  # the validation split's metrics promotion decided on (None: the test's)


def log_round(parent, params: Params, round_id: str, *, sites: dict[str, str],
              inject: Callable[[], tuple[Any, dict]], evaluate: Callable[[Any], dict],
              register: Callable[..., tuple[Any, PromotionResult]] | None = None,
              timer: Timer = _untimed, validate: Callable[[Any], dict] | None = None,
              outcomes: Iterable[SiteOutcome] = ()) -> LoggedRound:
    """Run `inject` () -> (model, injection summary) and `evaluate` (model) -> metrics inside the round's injection
    run (loss curve, evaluation, gate, comparison with the champion), then bundle, register and judge the model
    with `register` (default register_round; an orchestrator may pass it wrapped as its own task).

    `sites`: {site id: data fingerprint} of the sites whose packages went into the model (the bundle records them).
    A finished injection run of an earlier try of this round is kept instead of adding another, an unfinished one
    (crashed) is reopened and finished; a round id already registered gets its version back, judged once. `timer` times the phases inject, evaluate, tracking, register.
    `validate` (model) -> metrics on the server's validation split: promotion decides on them (logged as val.*);
    None (a federation without one): on the test metrics. `outcomes`: the sites' and server splits' outcomes
    (their gate summaries), for the bundle's data card."""
    done = find_child_run(parent, "injection")
    if done is not None and done.info.status == "FINISHED":
        with timer("inject"):
            model, injection = inject()
        with timer("evaluate"):
            metrics = evaluate(model)
            decided_on = validate(model) if validate else None
        run_id = done.info.run_id
    else:  # a new injection run, or the one an earlier try of this round left unfinished, completed
        with injection_run(parent, resume=done) as run:
            with timer("inject"):
                model, injection = inject()
            with timer("tracking"):
                run.log_injection(injection["losses"], injection["lrs"], injection["tasks"])
            with timer("evaluate"):
                metrics = evaluate(model)
                decided_on = validate(model) if validate else None
            with timer("tracking"):
                catalogue = catalogue_of(params.data)
                run.log_evaluation(metrics, catalogue)
                if decided_on is not None:
                    run.log_validation(decided_on)
                run.compare_with_champion(decided_on or metrics, tasks=catalogue.train)
        run_id = run.run_id
    with timer("register"):
        card = data_record(params, outcomes, sites if isinstance(sites, dict) else dict.fromkeys(sites, ""))
        version, decision = (register or register_round)(model, params, run_id, round_id, metrics, sites,
                                                         decided_on=decided_on, data=card)
        registered = registry_outcome(version, decision)
    return LoggedRound(model, injection, metrics, run_id, version, decision, registered, decided_on)


def register_round(model, params: Params, run_id: str, round_id: str, metrics: dict,
                   sites: dict[str, str] | list[str], decided_on: dict | None = None, data: dict | None = None):
    """Bundle the injected model, register it (alias challenger) and run the promotion gate on `decided_on` (the
    validation split's metrics; None: the test split's `metrics`). A round id already registered gets its version
    back, judged once. `data`: the data card's record (fedkim.central.datacard), written into the bundle and
    logged on the injection run under data_card/. Returns (version, PromotionResult)."""
    from fedkim.central.bundle import DATA_CARD, DATA_CARD_JSON, save_bundle

    split = "validation" if decided_on is not None else "test"
    version = find_version(round_id)
    if version is None:
        with tempfile.TemporaryDirectory(prefix="fedkim-bundle-") as tmp:
            folder = save_bundle(model, params, Path(tmp) / "bundle", round_id=round_id, sites=sites,
                                 metrics=metrics, data=data)
            for name in (DATA_CARD, DATA_CARD_JSON):
                client().log_artifact(run_id, str(folder / name), "data_card")
            version = register(folder, run_id, round_id, metrics, decided_on=decided_on, split=split)
    return version, promote(version, decided_on or metrics, tasks=catalogue_of(params.data).train, split=split)


def registry_outcome(version, decision: PromotionResult) -> dict:
    """The registered version as the round summary and report show it: its aliases now, the decision, and the
    champion it was judged against (version, round id, per-task figures; None when there was none)."""
    registry = client()
    fresh = registry.get_model_version(version.name, version.version)
    champion = None
    if decision.previous_champion is not None:
        previous = registry.get_model_version(version.name, str(decision.previous_champion))
        champion = {"version": decision.previous_champion, "round_id": previous.tags.get(ROUND),
                    "tasks": champion_figures(previous)}
    return {"name": version.name, "version": int(version.version), "aliases": sorted(fresh.aliases),
            "decision": decision.decision, "decided_on": fresh.tags.get(SPLIT_TAG, "test"), "reason": decision.reason, "champion_version": decision.champion,
            "compared_with": champion}


def log_report(parent, folder: str | Path) -> None:
    """The round report's files as artifacts of the round run, under report/."""
    client().log_artifacts(parent.info.run_id, str(folder), "report")
