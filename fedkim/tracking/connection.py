"""Where fedkim's MLflow data lives: `configure` points MLflow (tracking and registry) at the configured store and
selects the experiment; every other module reaches it through `client()`. Also the tag names all modules share.

Its own module because both the runs (which compare with the champion) and the registry need the configured client.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from fedkim.config import REPO_ROOT, TrackingParams

CHAMPION, CHALLENGER = "champion", "challenger"
KIND, ROUND, SITE = "fedkim.kind", "fedkim.round_id", "fedkim.site_id"
PARAMS_HASH, GIT_SHA, PARENT = "fedkim.params_hash", "fedkim.git_sha", "mlflow.parentRunId"
DECISION, REASON, COMPARED = "fedkim.promotion.decision", "fedkim.promotion.reason", "fedkim.promotion.compared_to"
SPLIT_TAG = "fedkim.promotion.split"  # the server split whose figures the decision (and fedkim.metrics) are on
METRICS_TAG, ROUND_RUN_TAG = "fedkim.metrics", "fedkim.round_run_id"
SUMMARY = ("train_mean_f1", "zeroshot_mean", "mean_auroc")


class TrackingError(RuntimeError):
    """Tracking misuse or a store in an unexpected state; the message says what to do."""


@dataclass(frozen=True)
class Settings:
    uri: str
    experiment_id: str
    registered_model: str


_settings: Settings | None = None


def current() -> Settings:
    if _settings is None:
        raise TrackingError("fedkim.tracking is not configured: call configure(params.tracking, base_dir) first")
    return _settings


def client() -> MlflowClient:
    return MlflowClient(current().uri, registry_uri=current().uri)


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
    _settings = Settings(uri, experiment_id, tracking_params.registered_model)
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


def _experiment(mlflow_client: MlflowClient, name: str, artifacts: str | None) -> str:
    found = mlflow_client.get_experiment_by_name(name)
    if found is None:
        try:
            return mlflow_client.create_experiment(name, artifact_location=artifacts)
        except MlflowException:  # another process created it first
            found = mlflow_client.get_experiment_by_name(name)
            if found is None:
                raise
    if found.lifecycle_stage == "deleted":
        mlflow_client.restore_experiment(found.experiment_id)
    return found.experiment_id


def quoted(value: str) -> str:
    """A value for an MLflow search filter, in single quotes."""
    if "'" in str(value):
        raise TrackingError(f"identifier {value!r} must not contain a single quote")
    return f"'{value}'"
