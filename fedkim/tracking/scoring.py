"""Scoring a registered model on a task catalogue and a test folder, without retraining (`fedkim evaluate`).

A new zero-shot task needs only a catalogue entry and its samples: the model answers it from its task and
modality descriptions. The gate keeps the reference descriptions stored in the bundle, so the tasks the model
was trained on are routed exactly as in training whatever the catalogue adds.

    metrics = score_registered("fedkim-foundation@champion", test_dir, params, catalogue="new-tasks.yaml")
"""

from __future__ import annotations

import re
from pathlib import Path

from fedkim.config import Params
from fedkim.data.catalogue import catalogue_of, load_catalogue
from fedkim.tracking.registry import registered_name

_MODEL_URI = re.compile(r"^models:/")


def model_uri(reference: str, name: str | None = None) -> str:
    """`models:/...` as given; `name@alias`, `name/3`; or, for tracking.registered_model, `champion` / `3`."""
    if _MODEL_URI.match(reference):
        return reference
    if "@" in reference or "/" in reference:
        return f"models:/{reference}"
    separator = "/" if reference.isdigit() else "@"
    return f"models:/{registered_name(name)}{separator}{reference}"


def load_registered(reference: str, name: str | None = None):
    """The registered model's (CentralModel, bundle params), loaded the way MLflow serves it."""
    import mlflow

    uri = model_uri(reference, name)
    try:
        served = mlflow.pyfunc.load_model(uri)
    except mlflow.exceptions.MlflowException as exc:
        raise LookupError(f"{uri}: no such registered model version or alias ({exc.message})") from None
    python_model = served.unwrap_python_model()
    return python_model.model, python_model.params


def scoring_params(bundle: Params, params: Params, catalogue: str | Path | None) -> Params:
    """The bundle's shapes (inputs, encoders, FM) with params' evaluation protocol, data root (its public split
    calibrates the yes/no threshold) and the catalogue to score on (None: params' data.catalogue)."""
    data = bundle.data.model_copy(update={
        "root": params.data.root,
        "catalogue": Path(catalogue).resolve() if catalogue is not None else params.data.catalogue})
    catalogue_of(data)  # a bad catalogue fails here, naming its file, task and field
    return bundle.model_copy(update={"data": data, "eval": params.eval})


def score_registered(reference: str, test_dir: str | Path, params: Params, *, catalogue: str | Path | None = None,
                     tasks: tuple[str, ...] | None = None, progress: bool = False) -> dict:
    """Per-task metrics of a registered model (see `model_uri`) on the samples in `test_dir`, for the tasks of
    `catalogue` (default: all of them)."""
    from fedkim.central.evaluate import evaluate
    from fedkim.members import split_dir

    test_dir = Path(test_dir)
    if not (test_dir / "index.parquet").is_file():
        raise FileNotFoundError(f"{test_dir}: not a site-format test folder (no index.parquet)")
    model, bundle = load_registered(reference, params.tracking.registered_model)
    scoring = scoring_params(bundle, params, catalogue)
    chosen = load_catalogue(scoring.data.catalogue)
    unknown = [t for t in tasks or () if t not in chosen]
    if unknown:
        raise KeyError(f"task(s) {unknown} are not in the catalogue {chosen.source}: {', '.join(chosen.tasks)}")
    metrics = evaluate(model, test_dir, scoring.eval, scoring.site, scoring.data, public_dir=split_dir(params, "public"),
                       tasks=tasks, progress=progress)
    metrics["model"] = model_uri(reference, params.tracking.registered_model)
    metrics["catalogue"] = {"file": chosen.source, "sha256": chosen.digest}
    return metrics
