"""MLflow runs of a round: one parent run per federated round, a nested run per site and one for the server's
injection and evaluation.

    uri = configure(params.tracking, base_dir)          # SQLite under mlruns/ unless MLFLOW_TRACKING_URI is set
    with round_run(params, "3", sites={"site-a": fingerprint}, params_hash=h) as parent:
        log_site(parent, "site-a", metrics=local.metrics, validation={"success": True}, sample_counts=counts)
        with injection_run(parent) as inj:
            inj.log_injection(result.losses, result.lrs, result.tasks)
            inj.log_evaluation(metrics)                  # eval.<task>.<metric>, metrics.json, gate heatmap
            inj.compare_with_champion(metrics)

Every run-level call talks to MLflow through an explicit run id (MlflowClient), so the calls may come from
different threads or processes (Prefect tasks); only `round_run` also makes its run the active one.

Re-running a round id (after it completed, or after a crash) adds no run: the parent is found by its tags (set when
it is created) and resumed, a finished site run is kept as it is, and a site or injection run left unfinished by a
crash (FAILED, or RUNNING after a killed process) is reopened, completed with what it lacks and finished.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, RunTag

from fedkim.config import REPO_ROOT, Params
from fedkim.tracking.connection import (GIT_SHA, KIND, PARAMS_HASH, PARENT, ROUND, SITE, SUMMARY, TrackingError,
                                        client, current, quoted)
from fedkim.tracking.promotion import compare, training_tasks
from fedkim.tracking.registry import champion_figures, champion_version


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


def find_round_run(round_id: str):
    """The parent run of `round_id` in the configured experiment (newest if several), or None."""
    runs = client().search_runs(
        [current().experiment_id],
        filter_string=f"tags.`{ROUND}` = {quoted(round_id)} and tags.`{KIND}` = 'round'",
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
    # The tags go with the creation: a run that a crash left without them could not be found (and so resumed).
    with mlflow.start_run(run_id=run_id, experiment_id=current().experiment_id, tags=tags,
                          run_name=None if run_id else f"round-{round_id}") as run:
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
    query = f"tags.`{PARENT}` = {quoted(_run_id(parent))} and tags.`{KIND}` = {quoted(kind)}"
    if site_id is not None:
        query += f" and tags.`{SITE}` = {quoted(site_id)}"
    runs = client().search_runs([current().experiment_id], filter_string=query, max_results=1,
                                order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def _child(parent, kind: str, name: str, tags: dict[str, str]) -> tuple[str, str]:
    """Create a nested run of `parent`; return (run id, round id of the parent)."""
    mlflow_client = client()
    parent_id = _run_id(parent)
    round_id = mlflow_client.get_run(parent_id).data.tags.get(ROUND, "")
    run = mlflow_client.create_run(current().experiment_id, run_name=f"round-{round_id}/{name}",
                                   tags={PARENT: parent_id, KIND: kind, ROUND: round_id, **tags})
    return run.info.run_id, round_id


def _reopen(run) -> tuple[str, dict[str, float]]:
    """An unfinished nested run of an earlier try (crashed: FAILED, or RUNNING after a killed process), running
    again: (its run id, the metrics it holds already)."""
    client().update_run(run.info.run_id, status="RUNNING")
    return run.info.run_id, dict(run.data.metrics)


# ---------------------------------------------------------------------------------------------------- sites
def numeric_items(values: dict, prefix: str) -> dict[str, float]:
    """Finite numbers of a (nested) dict as dotted metric keys; strings, bools, NaN and lists are left out. A
    character MLflow refuses in a name (the '+' of a modality such as image+text) becomes '_'."""
    out: dict[str, float] = {}
    for key, value in values.items():
        key = re.sub(r"[^\w\-. :/]", "_", str(key))
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out |= numeric_items(value, name)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


def _log_values(run_id: str, values: dict[str, float], step: int = 0, logged: dict[str, float] | None = None) -> None:
    """Log `values` at `step`; those a reopened run holds already with the same value (`logged`) are not logged
    again (their history would show them twice)."""
    values = {k: v for k, v in values.items() if (logged or {}).get(k) != v}
    stamp = _now_ms()
    client().log_batch(run_id, metrics=[Metric(k, v, stamp, step) for k, v in values.items()])  # chunked there


def _now_ms() -> int:
    return int(time.time() * 1000)


def log_site(parent, site_id: str, *, metrics: dict, validation: dict | Any, sample_counts: dict[str, int],
             fingerprint: str | None = None, kind: str = "site", privacy: dict | None = None, status: str = "",
             reason: str = "") -> str:
    """A finished nested run for one site's contribution: local validation metrics (local.<task>.<metric>),
    sample counts (samples.<modality>), the data gate's summary (tag + validation.json), what DP training spent
    (privacy.epsilon_round, privacy.epsilon_total, privacy.noise.<task>) and the site's status and reason when
    it has no package (tags). Returns its run id; a site already logged under this parent is returned as is
    (re-run rounds do not log twice), and one an earlier try left unfinished is completed and finished. kind
    "split": a server split's gate (public, test), logged the same way."""
    existing = find_child_run(parent, kind, site_id)
    if existing is not None and existing.info.status == "FINISHED":
        return existing.info.run_id
    summary = validation.model_dump(mode="json") if hasattr(validation, "model_dump") else dict(validation)
    tags = {SITE: site_id, "fedkim.validation.success": str(summary.get("success", "unknown")).lower()}
    if fingerprint:
        tags["fedkim.data_fingerprint"] = fingerprint
    tags |= {k: v for k, v in {"fedkim.site.status": status, "fedkim.site.reason": reason[:4000]}.items() if v}
    if existing is None:
        (run_id, _), logged = _child(parent, kind, f"{kind}-{site_id}", tags), {}
    else:
        run_id, logged = _reopen(existing)
        client().log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    mlflow_client = client()
    try:
        values = numeric_items(metrics, "local") | numeric_items(summary, "validation")
        values |= {f"samples.{k}": float(v) for k, v in sample_counts.items()}
        values["samples.total"] = float(sum(sample_counts.values()))
        if privacy:
            values |= numeric_items({k: v for k, v in privacy.items() if k != "tasks"}, "privacy")
            values |= {f"privacy.noise.{t}": float(r[0]) for t, r in privacy.get("tasks", {}).items()}
        _log_values(run_id, values, logged=logged)
        mlflow_client.log_dict(run_id, summary, "validation.json")
        mlflow_client.log_dict(run_id, {"sample_counts": sample_counts, "metrics": metrics}, "site.json")
    except BaseException:
        mlflow_client.set_terminated(run_id, "FAILED")
        raise
    mlflow_client.set_terminated(run_id, "FINISHED")
    return run_id


# ------------------------------------------------------------------------------------------------ injection
@contextmanager
def injection_run(parent, *, name: str = "injection", resume=None) -> Iterator["InjectionRun"]:
    """A nested run for the server's injection and evaluation; FINISHED on exit, FAILED on an exception.
    `resume`: the unfinished injection run of an earlier try of the round, reopened instead of adding another."""
    if resume is None:
        (run_id, round_id), logged = _child(parent, "injection", name, {}), {}
    else:
        (run_id, logged), round_id = _reopen(resume), resume.data.tags.get(ROUND, "")
    mlflow_client = client()
    try:
        yield InjectionRun(run_id, round_id, logged)
    except BaseException:
        mlflow_client.set_terminated(run_id, "FAILED")
        raise
    mlflow_client.set_terminated(run_id, "FINISHED")


class InjectionRun:
    def __init__(self, run_id: str, round_id: str, logged: dict[str, float] | None = None):
        self.run_id, self.round_id = run_id, round_id
        self.logged = logged or {}  # what a reopened run holds already: not logged twice

    def log_injection(self, losses: list[float], lrs: list[float], tasks: list[str]) -> None:
        """Loss and learning rate per step (inject.loss, inject.lr, inject.loss.<task>), a table and a PNG."""
        if not len(losses) == len(lrs) == len(tasks):
            raise ValueError(f"one loss, lr and task per step: got {len(losses)} losses, {len(lrs)} lrs, "
                             f"{len(tasks)} tasks")
        stamp = _now_ms()
        metrics, done = [], self._logged_steps(set(tasks))
        for step, (loss, lr, task) in enumerate(zip(losses, lrs, tasks)):
            if step in done:
                continue
            metrics += [Metric("inject.loss", float(loss), stamp, step), Metric("inject.lr", float(lr), stamp, step),
                        Metric(f"inject.loss.{task}", float(loss), stamp, step)]
        client().log_batch(self.run_id, metrics=metrics)
        if losses:
            _log_values(self.run_id, {"inject.steps": float(len(losses)), "inject.first_loss": float(losses[0]),
                                      "inject.last_loss": float(losses[-1])}, logged=self.logged)
        steps = [{"step": i, "task": t, "loss": float(l), "lr": float(r)}
                 for i, (l, r, t) in enumerate(zip(losses, lrs, tasks))]
        client().log_dict(self.run_id, steps, "injection/steps.json")
        with tempfile.TemporaryDirectory() as tmp:
            if losses:
                client().log_artifact(self.run_id, str(plot_loss_curve(losses, lrs, tasks,
                                                                       Path(tmp) / "loss_curve.png")), "injection")

    def _logged_steps(self, tasks: set[str]) -> set[int]:
        """The steps a reopened run holds already: those with their last metric (inject.loss.<task>) logged."""
        if not self.logged:
            return set()
        return {m.step for task in tasks for m in client().get_metric_history(self.run_id, f"inject.loss.{task}")}

    def log_gate(self, table: dict[str, list[float]], catalogue=None) -> None:
        """Gate weights per task as gate/gate_table.json and gate/gate_heatmap.png."""
        from fedkim.central.evaluate import plot_gate_heatmap

        if not table:
            return
        client().log_dict(self.run_id, table, "gate/gate_table.json")
        with tempfile.TemporaryDirectory() as tmp:
            client().log_artifact(self.run_id, str(plot_gate_heatmap(table, Path(tmp) / "gate_heatmap.png", catalogue)), "gate")

    def log_evaluation(self, metrics: dict, catalogue=None) -> None:
        """eval.<task>.<metric> and eval.<summary> metrics, metrics.json; the gate too when metrics hold it
        (catalogue: labels the gate heatmap's rows; None: the shipped one)."""
        values = numeric_items(metrics.get("tasks", {}), "eval")
        values |= {f"eval.{k}": float(metrics[k]) for k in (*SUMMARY, "seconds")
                   if isinstance(metrics.get(k), (int, float)) and math.isfinite(metrics[k])}
        _log_values(self.run_id, values, logged=self.logged)
        client().log_text(self.run_id, json.dumps(metrics, indent=2, sort_keys=True, default=float), "metrics.json")
        if metrics.get("gate"):
            self.log_gate(metrics["gate"], catalogue)

    def log_validation(self, metrics: dict) -> None:
        """The validation split's figures (those promotion decides on): val.<task>.<metric>, val.<summary> and
        validation_metrics.json, beside the test split's eval.*."""
        values = numeric_items(metrics.get("tasks", {}), "val")
        values |= {f"val.{k}": float(metrics[k]) for k in SUMMARY
                   if isinstance(metrics.get(k), (int, float)) and math.isfinite(metrics[k])}
        _log_values(self.run_id, values, logged=self.logged)
        client().log_text(self.run_id, json.dumps(metrics, indent=2, sort_keys=True, default=float),
                          "validation_metrics.json")

    def compare_with_champion(self, metrics: dict, *, tasks: tuple[str, ...] | None = None) -> dict:
        """Deltas (this run − current champion) per task and for the promotion score; logged as vs_champion.*
        metrics and champion_comparison.json. Without a champion, only the JSON (champion: null) is written.
        tasks: the catalogue's training tasks (None: those the metrics record as training tasks)."""
        tasks = training_tasks(metrics) if tasks is None else tasks
        champion = champion_version()
        comparison = compare(metrics, champion_figures(champion) if champion else None, tasks)
        comparison["champion_version"] = int(champion.version) if champion else None
        comparison["champion_round_id"] = champion.tags.get(ROUND) if champion else None
        if champion is not None:
            _log_values(self.run_id, numeric_items(comparison["delta"], "vs_champion"), logged=self.logged)
            client().set_tag(self.run_id, "fedkim.compared_to_champion", str(champion.version))
        client().log_dict(self.run_id, comparison, "champion_comparison.json")
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
