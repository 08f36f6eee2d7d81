"""MLflow tracking for fedkim: one parent run per federated round, nested runs per site and for the injection,
the model registry (`tracking.registered_model`) with aliases `challenger` / `champion`, and the promotion gate.

    uri = configure(params.tracking, base_dir)          # SQLite under mlruns/ unless MLFLOW_TRACKING_URI is set
    with round_run(params, "3", sites={"site-a": fingerprint}, params_hash=h) as parent:
        log_site(parent, "site-a", metrics=local.metrics, validation={"success": True}, sample_counts=counts)
        with injection_run(parent) as inj:
            inj.log_injection(result.losses, result.lrs, result.tasks)
            inj.log_evaluation(metrics)                  # eval.<task>.<metric>, metrics.json, gate heatmap
            inj.compare_with_champion(metrics)
        version = register(save_bundle(model, params, folder), inj.run_id, "3", metrics)
        promote(version, metrics)

Every run-level call talks to MLflow through an explicit run id (MlflowClient), so the calls may come from
different threads or processes (Prefect tasks); only `round_run` also makes its run the active one.

Promotion rule (`promote`): the score is the mean primary figure (F1 for the yes/no tasks) over the training
tasks on the evaluation split. The challenger takes `champion` when there is no champion, or when its score beats
the champion's by more than 1e-6, or when the scores tie within 1e-6 and its mean AUROC over the same tasks is
higher by more than 1e-6. Otherwise the champion stays. A version's decision is recorded once, in its tags; asking
again returns the recorded decision (a re-run round does not re-judge).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from fedkim.config import REPO_ROOT, Params, TrackingParams
from fedkim.data.catalogue import TASKS, TRAIN_TASKS

CHAMPION, CHALLENGER = "champion", "challenger"
KIND, ROUND, SITE = "fedkim.kind", "fedkim.round_id", "fedkim.site_id"
PARAMS_HASH, GIT_SHA, PARENT = "fedkim.params_hash", "fedkim.git_sha", "mlflow.parentRunId"
DECISION, REASON, COMPARED = "fedkim.promotion.decision", "fedkim.promotion.reason", "fedkim.promotion.compared_to"
METRICS_TAG, ROUND_RUN_TAG = "fedkim.metrics", "fedkim.round_run_id"
SUMMARY = ("train_mean_f1", "zeroshot_mean", "mean_auroc")
TOLERANCE = 1e-6


class TrackingError(RuntimeError):
    """Tracking misuse or a store in an unexpected state; the message says what to do."""


@dataclass(frozen=True)
class _Settings:
    uri: str
    experiment_id: str
    registered_model: str


_settings: _Settings | None = None


def _current() -> _Settings:
    if _settings is None:
        raise TrackingError("fedkim.tracking is not configured: call configure(params.tracking, base_dir) first")
    return _settings


def _client() -> MlflowClient:
    return MlflowClient(_current().uri, registry_uri=_current().uri)


# ------------------------------------------------------------------------------------------------- configure
def configure(tracking_params: TrackingParams, base_dir: str | Path = REPO_ROOT) -> str:
    """Point MLflow (tracking and registry) at the configured store and select the experiment; return the URI.

    MLFLOW_TRACKING_URI overrides `tracking.uri` (e.g. a served http://127.0.0.1:5000). A relative
    sqlite:///path is resolved against base_dir (the folder of params.yaml); its folder is created and holds the
    artifacts of a new experiment under `artifacts/` (the tracking data itself stays in SQLite)."""
    global _settings
    uri, artifacts = resolve_uri(os.environ.get("MLFLOW_TRACKING_URI") or tracking_params.uri, Path(base_dir))
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    experiment_id = _experiment(MlflowClient(uri, registry_uri=uri), tracking_params.experiment, artifacts)
    mlflow.set_experiment(experiment_id=experiment_id)
    _settings = _Settings(uri, experiment_id, tracking_params.registered_model)
    return uri


def resolve_uri(uri: str, base_dir: Path) -> tuple[str, str | None]:
    """(tracking URI with an absolute SQLite path, artifact location for a new experiment or None)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri.endswith(":memory:"):
        return uri, None  # a server or another database decides where artifacts go
    path = Path(uri[len(prefix):])
    path = path if path.is_absolute() else Path(base_dir).resolve() / path
    path.parent.mkdir(parents=True, exist_ok=True)
    return prefix + path.as_posix(), (path.parent / "artifacts").as_uri()


def _experiment(client: MlflowClient, name: str, artifacts: str | None) -> str:
    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name, artifact_location=artifacts)
        except MlflowException:  # another process created it first
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    if found.lifecycle_stage == "deleted":
        client.restore_experiment(found.experiment_id)
    return found.experiment_id


# ----------------------------------------------------------------------------------------------- round runs
def current_git_sha(cwd: str | Path = REPO_ROOT) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def flatten_params(params: Params) -> dict[str, str]:
    """Every setting as a dotted key (inject.rank, federation.strategy, data.sites.site-a.prevalence, ...)."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        elif isinstance(value, list) and value and all(isinstance(v, dict) and "id" in v for v in value):
            flat[prefix] = ",".join(str(v["id"]) for v in value)  # sites: keyed by id, not by position
            for item in value:
                walk(f"{prefix}.{item['id']}", {k: v for k, v in item.items() if k != "id"})
        else:
            flat[prefix] = json.dumps(value) if isinstance(value, list) else str(value)

    walk("", params.model_dump(mode="json"))
    return flat


def _quoted(value: str) -> str:
    if "'" in str(value):
        raise TrackingError(f"identifier {value!r} must not contain a single quote")
    return f"'{value}'"


def find_round_run(round_id: str):
    """The parent run of `round_id` in the configured experiment (newest if several), or None."""
    runs = _client().search_runs(
        [_current().experiment_id],
        filter_string=f"tags.`{ROUND}` = {_quoted(round_id)} and tags.`{KIND}` = 'round'",
        max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


@contextmanager
def round_run(params: Params, round_id: str, *, sites: dict[str, str], params_hash: str,
              git_sha: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """The round's parent run, active in this thread while the block runs; resumed when the round id already has
    one (a re-run round logs into the same run). A round id already used with other params is an error."""
    existing = find_round_run(round_id)
    if existing is not None and existing.data.tags.get(PARAMS_HASH) != params_hash:
        raise TrackingError(
            f"round {round_id!r} is already tracked in run {existing.info.run_id} with params hash "
            f"{existing.data.tags.get(PARAMS_HASH)!r}, not {params_hash!r}: use a new round id for new params")
    sha = git_sha or current_git_sha()
    tags = {KIND: "round", ROUND: str(round_id), PARAMS_HASH: params_hash, GIT_SHA: sha,
            "mlflow.source.git.commit": sha, "fedkim.sites": ",".join(sorted(sites)),
            "fedkim.foundation_model": params.inject.foundation_model}
    tags |= {f"fedkim.site.{site}.fingerprint": fp or "unknown" for site, fp in sites.items()}
    run_id = existing.info.run_id if existing is not None else None
    with mlflow.start_run(run_id=run_id, experiment_id=_current().experiment_id,
                          run_name=None if run_id else f"round-{round_id}") as run:
        mlflow.set_tags(tags)
        logged = existing.data.params if existing is not None else {}
        mlflow.log_params({k: v for k, v in flatten_params(params).items() if k not in logged})
        yield run


def _run_id(run) -> str:
    if isinstance(run, str):
        return run
    info = getattr(run, "info", None)
    if info is None:
        raise TypeError(f"expected a run or a run id, got {type(run).__name__}")
    return info.run_id


def find_child_run(parent, kind: str, site_id: str | None = None):
    """A nested run of `parent` with tag fedkim.kind = kind (and the site id), newest first, or None."""
    query = f"tags.`{PARENT}` = {_quoted(_run_id(parent))} and tags.`{KIND}` = {_quoted(kind)}"
    if site_id is not None:
        query += f" and tags.`{SITE}` = {_quoted(site_id)}"
    runs = _client().search_runs([_current().experiment_id], filter_string=query, max_results=1,
                                 order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def _child(parent, kind: str, name: str, tags: dict[str, str]) -> tuple[str, str]:
    """Create a nested run of `parent`; return (run id, round id of the parent)."""
    client = _client()
    parent_id = _run_id(parent)
    round_id = client.get_run(parent_id).data.tags.get(ROUND, "")
    run = client.create_run(_current().experiment_id, run_name=f"round-{round_id}/{name}",
                            tags={PARENT: parent_id, KIND: kind, ROUND: round_id, **tags})
    return run.info.run_id, round_id


# ---------------------------------------------------------------------------------------------------- sites
def numeric_items(values: dict, prefix: str) -> dict[str, float]:
    """Finite numbers of a (nested) dict as dotted metric keys; strings, bools, NaN and lists are left out."""
    out: dict[str, float] = {}
    for key, value in values.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out |= numeric_items(value, name)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


def _log_values(run_id: str, values: dict[str, float], step: int = 0) -> None:
    stamp = _now_ms()
    _client().log_batch(run_id, metrics=[Metric(k, v, stamp, step) for k, v in values.items()])  # chunked there


def _now_ms() -> int:
    return int(time.time() * 1000)


def log_site(parent, site_id: str, *, metrics: dict, validation: dict | Any, sample_counts: dict[str, int],
             fingerprint: str | None = None) -> str:
    """A finished nested run for one site's contribution: local validation metrics (local.<task>.<metric>),
    sample counts (samples.<modality>), the data gate's summary (tag + validation.json). Returns its run id; a site
    already logged under this parent is returned as is (re-run rounds do not log twice)."""
    existing = find_child_run(parent, "site", site_id)
    if existing is not None:
        return existing.info.run_id
    summary = validation.model_dump(mode="json") if hasattr(validation, "model_dump") else dict(validation)
    tags = {SITE: site_id, "fedkim.validation.success": str(summary.get("success", "unknown")).lower()}
    if fingerprint:
        tags["fedkim.data_fingerprint"] = fingerprint
    run_id, _ = _child(parent, "site", f"site-{site_id}", tags)
    client = _client()
    try:
        values = numeric_items(metrics, "local") | numeric_items(summary, "validation")
        values |= {f"samples.{k}": float(v) for k, v in sample_counts.items()}
        values["samples.total"] = float(sum(sample_counts.values()))
        _log_values(run_id, values)
        client.log_dict(run_id, summary, "validation.json")
        client.log_dict(run_id, {"sample_counts": sample_counts, "metrics": metrics}, "site.json")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id


# ------------------------------------------------------------------------------------------------ injection
@contextmanager
def injection_run(parent, *, name: str = "injection") -> Iterator["InjectionRun"]:
    """A nested run for the server's injection and evaluation; FINISHED on exit, FAILED on an exception."""
    run_id, round_id = _child(parent, "injection", name, {})
    client = _client()
    try:
        yield InjectionRun(run_id, round_id)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")


class InjectionRun:
    def __init__(self, run_id: str, round_id: str):
        self.run_id, self.round_id = run_id, round_id

    def log_injection(self, losses: list[float], lrs: list[float], tasks: list[str]) -> None:
        """Loss and learning rate per step (inject.loss, inject.lr, inject.loss.<task>), a table and a PNG."""
        if not len(losses) == len(lrs) == len(tasks):
            raise ValueError(f"one loss, lr and task per step: got {len(losses)} losses, {len(lrs)} lrs, "
                             f"{len(tasks)} tasks")
        stamp = _now_ms()
        metrics = []
        for step, (loss, lr, task) in enumerate(zip(losses, lrs, tasks)):
            metrics += [Metric("inject.loss", float(loss), stamp, step), Metric("inject.lr", float(lr), stamp, step),
                        Metric(f"inject.loss.{task}", float(loss), stamp, step)]
        _client().log_batch(self.run_id, metrics=metrics)
        if losses:
            _log_values(self.run_id, {"inject.steps": float(len(losses)), "inject.first_loss": float(losses[0]),
                                      "inject.last_loss": float(losses[-1])})
        steps = [{"step": i, "task": t, "loss": float(l), "lr": float(r)}
                 for i, (l, r, t) in enumerate(zip(losses, lrs, tasks))]
        _client().log_dict(self.run_id, steps, "injection/steps.json")
        with tempfile.TemporaryDirectory() as tmp:
            if losses:
                _client().log_artifact(self.run_id, str(plot_loss_curve(losses, lrs, tasks,
                                                                        Path(tmp) / "loss_curve.png")), "injection")

    def log_gate(self, table: dict[str, list[float]]) -> None:
        """Gate weights per task as gate/gate_table.json and gate/gate_heatmap.png."""
        from fedkim.central.evaluate import plot_gate_heatmap

        if not table:
            return
        _client().log_dict(self.run_id, table, "gate/gate_table.json")
        with tempfile.TemporaryDirectory() as tmp:
            _client().log_artifact(self.run_id, str(plot_gate_heatmap(table, Path(tmp) / "gate_heatmap.png")), "gate")

    def log_evaluation(self, metrics: dict) -> None:
        """eval.<task>.<metric> and eval.<summary> metrics, metrics.json; the gate too when metrics hold it."""
        values = numeric_items(metrics.get("tasks", {}), "eval")
        values |= {f"eval.{k}": float(metrics[k]) for k in (*SUMMARY, "seconds")
                   if isinstance(metrics.get(k), (int, float)) and math.isfinite(metrics[k])}
        _log_values(self.run_id, values)
        _client().log_text(self.run_id, json.dumps(metrics, indent=2, sort_keys=True, default=float), "metrics.json")
        if metrics.get("gate"):
            self.log_gate(metrics["gate"])

    def compare_with_champion(self, metrics: dict, *, tasks: tuple[str, ...] = TRAIN_TASKS) -> dict:
        """Deltas (this run − current champion) per task and for the promotion score; logged as vs_champion.*
        metrics and champion_comparison.json. Without a champion, only the JSON (champion: null) is written."""
        champion = champion_version()
        comparison = compare(metrics, champion_figures(champion) if champion else None, tasks)
        comparison["champion_version"] = int(champion.version) if champion else None
        comparison["champion_round_id"] = champion.tags.get(ROUND) if champion else None
        if champion is not None:
            _log_values(self.run_id, numeric_items(comparison["delta"], "vs_champion"))
            _client().set_tag(self.run_id, "fedkim.compared_to_champion", str(champion.version))
        _client().log_dict(self.run_id, comparison, "champion_comparison.json")
        return comparison


def plot_loss_curve(losses: list[float], lrs: list[float], tasks: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    by_task: dict[str, list[int]] = defaultdict(list)
    for step, task in enumerate(tasks):
        by_task[task].append(step)
    ax.plot(range(len(losses)), losses, color="0.8", linewidth=0.8)
    for task, steps in by_task.items():
        ax.scatter(steps, [losses[s] for s in steps], s=6, label=task)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (answer tokens)")
    ax.legend(fontsize=7, markerscale=2)
    lr_axis = ax.twinx()
    lr_axis.plot(range(len(lrs)), lrs, color="black", linestyle="--", linewidth=0.8)
    lr_axis.set_ylabel("learning rate")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------- figures and deltas
@dataclass(frozen=True)
class Figures:
    """The promotion score of one model: mean primary figure and mean AUROC over the compared tasks."""

    primary: float
    auroc: float
    missing: tuple[str, ...] = ()

    def text(self) -> str:
        return f"mean primary {self.primary:.4f}, mean AUROC {self.auroc:.4f}"


def per_task(metrics: dict) -> dict[str, dict[str, float]]:
    """{task: {primary, auroc}}: the compact form kept in a version's tags."""
    return {t: {k: float(m[k]) for k in ("primary", "auroc") if isinstance(m.get(k), (int, float))}
            for t, m in metrics.get("tasks", {}).items()}


def figures(table: dict[str, dict[str, float]], tasks: tuple[str, ...]) -> Figures:
    def mean(key: str) -> float:
        values = [table[t][key] for t in tasks if t in table and math.isfinite(table[t].get(key, math.nan))]
        return sum(values) / len(values) if values else math.nan

    return Figures(mean("primary"), mean("auroc"), tuple(t for t in tasks if t not in table))


def compare(metrics: dict, champion: dict[str, dict[str, float]] | None, tasks: tuple[str, ...]) -> dict:
    mine = per_task(metrics)
    out: dict = {"tasks": list(tasks), "challenger": asdict(figures(mine, tasks)), "champion": None, "delta": {}}
    if champion is None:
        return out
    theirs = figures(champion, tasks)
    out["champion"] = asdict(theirs)
    delta = {t: {k: mine[t][k] - champion[t][k] for k in mine[t] if k in champion[t]
                 and math.isfinite(mine[t][k] - champion[t][k])} for t in mine if t in champion}
    ours = figures(mine, tasks)
    delta["score"] = {k: v for k, v in {"primary": ours.primary - theirs.primary,
                                        "auroc": ours.auroc - theirs.auroc}.items() if math.isfinite(v)}
    out["delta"] = delta
    return out


# ------------------------------------------------------------------------------------------------- registry
def _name(name: str | None) -> str:
    return name or _current().registered_model


def find_version(round_id: str, name: str | None = None):
    """The registered version tagged with this round id (lowest version if several), or None."""
    found = _client().search_model_versions(
        f"name = {_quoted(_name(name))} and tags.`{ROUND}` = {_quoted(round_id)}")
    if not found:
        return None
    first = min(found, key=lambda v: int(v.version))
    return _client().get_model_version(first.name, first.version)  # search results carry no aliases


def champion_version(name: str | None = None):
    try:
        return _client().get_model_version_by_alias(_name(name), CHAMPION)
    except MlflowException:  # no such model or no such alias yet
        return None


def champion_figures(version) -> dict[str, dict[str, float]]:
    """Per-task primary/AUROC of a version: its fedkim.metrics tag, else its source run's eval.* metrics."""
    if version.tags.get(METRICS_TAG):
        return json.loads(version.tags[METRICS_TAG])
    logged = _client().get_run(version.run_id).data.metrics if version.run_id else {}
    table: dict[str, dict[str, float]] = defaultdict(dict)
    for key, value in logged.items():
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "eval" and parts[2] in ("primary", "auroc"):
            table[parts[1]][parts[2]] = value
    return dict(table)


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in ("torch", "transformers", "peft", "safetensors", "pandas", "pyyaml", "pydantic", "mlflow"):
        try:
            pins.append(f"{package}=={version(package).split('+')[0]}")  # no local label (+cpu): see stack notes
        except PackageNotFoundError:
            continue
    return pins


def register(bundle_folder: str | Path, run_id: str, round_id: str, metrics: dict, *, name: str | None = None):
    """Log the bundle as a pyfunc model on `run_id` (the injection run), register it, alias it `challenger` and
    tag it with the round id and its figures. A round id that already has a version gets that version back."""
    from mlflow.models import Model

    from fedkim.central.bundle import verify_bundle

    name = _name(name)
    existing = find_version(round_id, name)
    if existing is not None:
        return existing
    verify_bundle(bundle_folder)  # fail here, not at serving time
    info = Model.log(artifact_path=None, name="model", flavor=mlflow.pyfunc, run_id=run_id,
                     python_model=FedKIMPyfunc(), artifacts={"bundle": str(bundle_folder)},
                     pip_requirements=_requirements(), signature=serving_signature(),
                     metadata={"fedkim.round_id": str(round_id), "requires": "the fedkim package importable"})
    parent = _client().get_run(run_id).data.tags.get(PARENT, "")
    tags = {ROUND: str(round_id), ROUND_RUN_TAG: parent, DECISION: "pending",
            METRICS_TAG: json.dumps(per_task(metrics), separators=(",", ":"))}
    tags |= {f"fedkim.{k}": f"{metrics[k]:.6f}" for k in SUMMARY if isinstance(metrics.get(k), (int, float))}
    version = mlflow.register_model(info.model_uri, name, tags=tags)
    _client().set_registered_model_alias(name, CHALLENGER, version.version)
    return _client().get_model_version(name, version.version)


@dataclass(frozen=True)
class PromotionResult:
    decision: str  # "promoted" | "kept"
    version: int
    champion: int  # the champion version after the decision
    previous_champion: int | None
    reason: str


def register_round(model, params: Params, run_id: str, round_id: str, metrics: dict,
                   sites: dict[str, str] | list[str]):
    """Bundle the injected model, register it (alias challenger) and run the promotion gate: the one path that
    the Prefect flow and the DVC stage share. A round id already registered gets its version back, judged once."""
    from fedkim.central.bundle import save_bundle

    version = find_version(round_id)
    if version is None:
        with tempfile.TemporaryDirectory(prefix="fedkim-bundle-") as tmp:
            folder = save_bundle(model, params, Path(tmp) / "bundle", round_id=round_id, sites=sites,
                                 metrics=metrics)
            version = register(folder, run_id, round_id, metrics)
    return version, promote(version, metrics)


def promote(version, metrics: dict, *, tasks: tuple[str, ...] = TRAIN_TASKS,
            name: str | None = None) -> PromotionResult:
    """Move `champion` to `version` when it beats the current champion (rule in the module docstring); tag the
    version with the decision and a reason that quotes the figures."""
    client = _client()
    name = version.name if getattr(version, "name", None) else _name(name)
    version = client.get_model_version(name, str(version.version))
    current = champion_version(name)
    recorded = version.tags.get(DECISION)
    if recorded in ("promoted", "kept"):  # decided before: a re-run round keeps the first judgement
        return PromotionResult(recorded, int(version.version), int(current.version) if current else 0,
                               _int(version.tags.get(COMPARED)), version.tags.get(REASON, ""))
    if current is not None and current.version == version.version:
        return _record(client, version, "promoted", version, None, "already the champion")
    mine = figures(per_task(metrics), tasks)
    theirs = figures(champion_figures(current), tasks) if current is not None else None
    promoted, reason = decide(mine, theirs, int(version.version), int(current.version) if current else None, tasks)
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    return _record(client, version, "promoted" if promoted else "kept", version if promoted else current, current,
                   reason)


def decide(mine: Figures, theirs: Figures | None, version: int, champion: int | None,
           tasks: tuple[str, ...]) -> tuple[bool, str]:
    over = f"over {len(tasks)} training task(s)"
    if mine.missing:  # the figures average the tasks that were evaluated; say which were not
        over += f" ({', '.join(mine.missing)} not evaluated)"
    if not math.isfinite(mine.primary):
        return False, f"v{version} has no finite primary figure {over}; champion unchanged"
    if theirs is None:
        return True, f"no champion yet: v{version} becomes champion with {mine.text()} {over}"
    champion_primary = theirs.primary if math.isfinite(theirs.primary) else -math.inf
    if mine.primary > champion_primary + TOLERANCE:
        return True, (f"v{version} {mine.text()} beats champion v{champion} ({theirs.text()}) on mean primary "
                      f"{over}")
    tie = abs(mine.primary - champion_primary) <= TOLERANCE
    champion_auroc = theirs.auroc if math.isfinite(theirs.auroc) else -math.inf
    if tie and math.isfinite(mine.auroc) and mine.auroc > champion_auroc + TOLERANCE:
        return True, (f"v{version} ties champion v{champion} on mean primary {mine.primary:.4f} and wins the "
                      f"tie-break on mean AUROC {mine.auroc:.4f} > {theirs.auroc:.4f} {over}")
    return False, (f"v{version} {mine.text()} does not beat champion v{champion} ({theirs.text()}) {over}; "
                   f"champion stays v{champion}")


def _record(client, version, decision: str, champion, previous, reason: str) -> PromotionResult:
    compared = str(previous.version) if previous is not None else "none"
    for key, value in {DECISION: decision, REASON: reason, COMPARED: compared}.items():
        client.set_model_version_tag(version.name, version.version, key, value)
    round_run_id = version.tags.get(ROUND_RUN_TAG)
    if round_run_id:  # lineage on the round run as well: what this round produced and what happened to it
        client.set_tag(round_run_id, "fedkim.registered_version", str(version.version))
        client.set_tag(round_run_id, DECISION, decision)
    return PromotionResult(decision, int(version.version), int(champion.version) if champion else 0,
                           int(previous.version) if previous is not None else None, reason)


def _int(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() else None


def registry_show(name: str | None = None) -> list[dict]:
    """One dict per version (oldest first): aliases, round, source run, round run, figures, promotion decision."""
    client = _client()
    name = _name(name)
    try:
        aliases = client.get_registered_model(name).aliases  # {alias: version}
    except MlflowException:
        return []
    by_version: dict[str, list[str]] = defaultdict(list)
    for alias, number in sorted(aliases.items()):
        by_version[str(number)].append(alias)
    rows = []
    for v in sorted(client.search_model_versions(f"name = {_quoted(name)}"), key=lambda v: int(v.version)):
        rows.append({
            "version": int(v.version), "aliases": by_version.get(str(v.version), []),
            "round_id": v.tags.get(ROUND, ""), "run_id": v.run_id or "", "round_run_id": v.tags.get(ROUND_RUN_TAG, ""),
            **{k: _float(v.tags.get(f"fedkim.{k}")) for k in SUMMARY},
            "decision": v.tags.get(DECISION, "pending"), "reason": v.tags.get(REASON, ""),
            "created": pd.Timestamp(v.creation_timestamp, unit="ms").isoformat(timespec="seconds"),
        })
    return rows


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


# -------------------------------------------------------------------------------------------------- serving
OPTIONAL_COLUMNS = ("modality", "sample_id", "image_path", "ecg_path", "clinical_path", "text_path", "question",
                    "options")


def serving_signature():
    """Input schema of the served model: `task` plus optional string columns (options: "A|B" or a JSON list)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("string", "task")]
                                        + [ColSpec("string", c, required=False) for c in OPTIONAL_COLUMNS]))


class FedKIMPyfunc(mlflow.pyfunc.PythonModel):
    """Serves a bundle: one row per query with `task`, optional `modality` (must be the task's), and the inputs the
    task needs: image_path / ecg_path / clinical_path (+ sample_id when the Parquet file holds several samples) and,
    for questions, `question` (+ `options`, "A|B" or a JSON list) or text_path + sample_id. Returns `task`,
    `answer` (the best-scoring option) and `scores` ({option: summed log-probability})."""

    def load_context(self, context) -> None:
        from fedkim.central.bundle import load_bundle

        self.model, self.params = load_bundle(context.artifacts["bundle"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        return answer_frame(self.model, self.params, model_input)


def answer_frame(model, params: Params, frame: pd.DataFrame) -> pd.DataFrame:
    """Answer every row of `frame` (grouped by task: the model scores one task per batch), in row order."""
    from fedkim.data.loaders import collate

    if "task" not in frame.columns:
        raise ValueError(f"input needs a 'task' column; got columns {list(frame.columns)}")
    rows = frame.to_dict("records")
    groups: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        groups[_task_of(row, i)].append(i)
    answers: list[dict] = [{} for _ in rows]
    model.eval()
    for task, index in groups.items():
        items = [query_item(rows[i], task, params, i) for i in index]
        batch = collate(items)
        options = batch.get("options") or [list(TASKS[task].answers)] * len(items)
        scores = model.option_logprobs(batch, task, options)
        for row_scores, opts, i in zip(scores, options, index):
            values = [float(s) for s in row_scores[: len(opts)]]
            answers[i] = {"task": task, "answer": opts[max(range(len(opts)), key=values.__getitem__)],
                          "scores": dict(zip(opts, values))}
    return pd.DataFrame(answers, columns=["task", "answer", "scores"])


def _task_of(row: dict, i: int) -> str:
    task = row.get("task")
    if task not in TASKS:
        raise ValueError(f"row {i}: unknown task {task!r}; known: {', '.join(TASKS)}")
    modality = row.get("modality")
    if _present(modality) and modality != TASKS[task].modality:
        raise ValueError(f"row {i}: task {task!r} takes modality {TASKS[task].modality!r}, got {modality!r}")
    return task


def _present(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value)) and value != ""


def query_item(row: dict, task: str, params: Params, i: int) -> dict:
    """One sample shaped like the test loaders' items (same readers, same sizes as the bundle's params)."""
    from fedkim.data.formats.clinical import read_long, to_grid
    from fedkim.data.formats.text import read_jsonl
    from fedkim.data.loaders import load_ecg, load_image, standardise_clinical
    from fedkim.data.batches import icu_windows

    def need(column: str) -> str:
        if not _present(row.get(column)):
            raise ValueError(f"row {i} (task {task}): needs column {column!r}")
        return str(row[column])

    item: dict = {"task": task, "modality": TASKS[task].modality}
    inputs = TASKS[task].inputs
    if "image" in inputs:
        item["image"] = load_image(Path(need("image_path")), params.site.image_input)
    if "ecg" in inputs:
        item["ecg"] = load_ecg(Path(need("ecg_path")), params.site.ecg_hz, params.data.ecg_seconds)
    if "clinical" in inputs:
        frame = read_long(need("clinical_path"))
        if _present(row.get("sample_id")):
            frame = frame[frame["sample_id"] == row["sample_id"]]
        if frame.empty or frame["sample_id"].nunique() != 1:
            raise ValueError(f"row {i} (task {task}): {row['clinical_path']} must hold exactly one sample "
                             f"(give sample_id to pick one)")
        hours = icu_windows(params.data)[task]  # as task_dataset windows them; the model reads the recent part
        item["clinical"], item["clinical_mask"] = standardise_clinical(to_grid(frame, hours))
    if "text" in inputs:
        item |= _question(row, task, i, need, read_jsonl)
    return item


def _question(row: dict, task: str, i: int, need, read_jsonl) -> dict:
    if _present(row.get("question")):
        options = row.get("options")
        if isinstance(options, str):
            options = json.loads(options) if options.startswith("[") else [o.strip() for o in options.split("|")]
        if options is None or (isinstance(options, float) and math.isnan(options)):
            options = list(TASKS[task].answers)
        return {"question": str(row["question"]), "options": list(options)}
    questions = read_jsonl(need("text_path"))
    sample = need("sample_id")
    if sample not in questions:
        raise ValueError(f"row {i} (task {task}): {row['text_path']} has no question for sample {sample!r}")
    return {"question": questions[sample]["question"], "options": list(questions[sample]["options"])}
