"""Shared fixtures. Tests run offline with telemetry off; state goes to temporary folders."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

for key, value in {
    "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MPLBACKEND": "Agg",
}.items():
    os.environ.setdefault(key, value)

REPO = Path(__file__).resolve().parents[1]

# A federation small enough for tests: same sites and knobs as the default, fewer and shorter samples.
SMALL = {
    "data.sizes": {"site_train": 24, "val_fraction": 0.25, "public": 12, "test": 12},
    "data.image_size": 64,
    "data.ecg_seconds": 6,
    "data.workers": 1,
}


def small_params_dict(root: Path, **extra) -> dict:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for dotted, value in {**SMALL, "data.root": str(root), **extra}.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = copy.deepcopy(value)
    return raw


@pytest.fixture(scope="session")
def small_params_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("params")
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(small_params_dict(folder / "federation")))
    return path


@pytest.fixture(scope="session")
def small_federation(small_params_file):
    """The small default federation, generated once per test session."""
    from fedkim.config import load_params
    from fedkim.data.synth.federation import generate_federation

    params = load_params(small_params_file)
    return generate_federation(params.data)
