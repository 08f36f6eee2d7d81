"""The model registry (`tracking.registered_model`): a registered version per round, alias `challenger` on the newest
and `champion` on the one the promotion gate (fedkim.tracking.promotion) chose; each version carries its round id,
its round run and its per-task figures in tags.

    version = register(save_bundle(model, params, folder), injection_run_id, "3", metrics)
    registry_show()                                       # one row per version: aliases, round, lineage, decision
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException

from fedkim.tracking.connection import (CHALLENGER, CHAMPION, DECISION, METRICS_TAG, PARENT, REASON, ROUND,
                                        ROUND_RUN_TAG, SPLIT_TAG, SUMMARY, client, current, quoted)
from fedkim.tracking.serving import FedKIMPyfunc, serving_signature


def registered_name(name: str | None = None) -> str:
    """`name`, else the configured tracking.registered_model."""
    return name or current().registered_model


def find_version(round_id: str, name: str | None = None):
    """The registered version tagged with this round id (lowest version if several), or None."""
    found = client().search_model_versions(
        f"name = {quoted(registered_name(name))} and tags.`{ROUND}` = {quoted(round_id)}")
    if not found:
        return None
    first = min(found, key=lambda v: int(v.version))
    return client().get_model_version(first.name, first.version)  # search results carry no aliases


def champion_version(name: str | None = None):
    """The version aliased `champion`, or None."""
    try:
        return client().get_model_version_by_alias(registered_name(name), CHAMPION)
    except MlflowException:  # no such model or no such alias yet
        return None


def champion_figures(version) -> dict[str, dict[str, float]]:
    """Per-task primary/AUROC of a version: its fedkim.metrics tag, else its source run's eval.* metrics."""
    if version.tags.get(METRICS_TAG):
        return json.loads(version.tags[METRICS_TAG])
    logged = client().get_run(version.run_id).data.metrics if version.run_id else {}
    table: dict[str, dict[str, float]] = defaultdict(dict)
    for key, value in logged.items():
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "eval" and parts[2] in ("primary", "auroc"):
            table[parts[1]][parts[2]] = value
    return dict(table)


def per_task(metrics: dict) -> dict[str, dict[str, float]]:
    """{task: {primary, auroc}}: the compact form kept in a version's tags."""
    return {t: {k: float(m[k]) for k in ("primary", "auroc") if isinstance(m.get(k), (int, float))}
            for t, m in metrics.get("tasks", {}).items()}


# What loading and answering with the pyfunc imports (fedkim's own imports along the chain; a test keeps the list
# complete): the model, its tokenizer, the bundle's files, and the site format's readers of the query's inputs.
SERVING_PACKAGES = ("torch", "transformers", "tokenizers", "peft", "safetensors", "pandas", "numpy", "pyarrow",
                    "pyyaml", "pydantic", "mlflow", "pillow", "pydicom", "wfdb", "scipy", "scikit-learn",
                    "matplotlib", "rich", "boto3", "botocore", "cryptography")


FEDKIM_CODE = Path(__file__).resolve().parents[1]  # the fedkim package, shipped inside each logged model (code/)


def requirements() -> list[str]:
    """Pins of the served model's Python dependencies, as installed here (requirements.lock.txt's pins)."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in SERVING_PACKAGES:
        try:
            pins.append(f"{package}=={version(package).split('+')[0]}")  # no local label (+cpu): see stack notes
        except PackageNotFoundError:
            continue
    return pins


def register(bundle_folder: str | Path, run_id: str, round_id: str, metrics: dict, *, name: str | None = None,
             decided_on: dict | None = None, split: str = "test"):
    """Log the bundle as a pyfunc model on `run_id` (the injection run), register it, alias it `challenger` and
    tag it with the round id and its figures: the summary of `metrics` (the test split's, reported) and, in
    fedkim.metrics, the per-task figures promotion compares (`decided_on`, the `split` it decides on; None: the
    test figures). A round id that already has a version gets that version back."""
    from mlflow.models import Model

    from fedkim.central.bundle import verify_bundle

    name = registered_name(name)
    existing = find_version(round_id, name)
    if existing is not None:
        return existing
    model_uri = logged_model_uri(run_id, round_id)
    if model_uri is None:
        verify_bundle(bundle_folder)  # fail here, not at serving time
        model_uri = Model.log(artifact_path=None, name="model", flavor=mlflow.pyfunc, run_id=run_id,
                              python_model=FedKIMPyfunc(), artifacts={"bundle": str(bundle_folder)},
                              pip_requirements=requirements(), signature=serving_signature(),
                              code_paths=[str(FEDKIM_CODE)],  # it answers where only its requirements are installed
                              metadata={"fedkim.round_id": str(round_id)}, tags={ROUND: str(round_id)}).model_uri
    parent = client().get_run(run_id).data.tags.get(PARENT, "")
    tags = {ROUND: str(round_id), ROUND_RUN_TAG: parent, DECISION: "pending",
            METRICS_TAG: json.dumps(per_task(decided_on or metrics), separators=(",", ":")), SPLIT_TAG: split}
    tags |= {f"fedkim.{k}": f"{metrics[k]:.6f}" for k in SUMMARY if isinstance(metrics.get(k), (int, float))}
    version = mlflow.register_model(model_uri, name, tags=tags)
    client().set_registered_model_alias(name, CHALLENGER, version.version)
    return client().get_model_version(name, version.version)


def logged_model_uri(run_id: str, round_id: str) -> str | None:
    """The model an earlier try of this round logged on `run_id` and did not get to register (a crash between the
    two), to register now instead of logging a second one; None when there is none. An incomplete one (PENDING
    or FAILED: the crash came while logging it) is deleted, so that one logged model per round remains."""
    mlflow_client = client()
    found = mlflow_client.search_logged_models(
        [current().experiment_id], filter_string=f"source_run_id = {quoted(run_id)} and tags.`{ROUND}` = "
                                                 f"{quoted(str(round_id))}")
    kept = next((m.model_id for m in found if m.status == LoggedModelStatus.READY), None)
    for model in found:
        if model.model_id != kept:
            mlflow_client.delete_logged_model(model.model_id)
    return f"models:/{kept}" if kept else None


def registry_show(name: str | None = None) -> list[dict]:
    """One dict per version (oldest first): aliases, round, source run, round run, figures, promotion decision."""
    registry = client()
    name = registered_name(name)
    try:
        aliases = registry.get_registered_model(name).aliases  # {alias: version}
    except MlflowException:
        return []
    by_version: dict[str, list[str]] = defaultdict(list)
    for alias, number in sorted(aliases.items()):
        by_version[str(number)].append(alias)
    rows = []
    for v in sorted(registry.search_model_versions(f"name = {quoted(name)}"), key=lambda v: int(v.version)):
        rows.append({
            "version": int(v.version), "aliases": by_version.get(str(v.version), []),
            "round_id": v.tags.get(ROUND, ""), "run_id": v.run_id or "", "round_run_id": v.tags.get(ROUND_RUN_TAG, ""),
            **{k: _float(v.tags.get(f"fedkim.{k}")) for k in SUMMARY},
            "decision": v.tags.get(DECISION, "pending"), "reason": v.tags.get(REASON, ""),
            "decided_on": v.tags.get(SPLIT_TAG, "test"),
            "created": pd.Timestamp(v.creation_timestamp, unit="ms").isoformat(timespec="seconds"),
        })
    return rows


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
