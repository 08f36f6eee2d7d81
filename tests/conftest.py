"""Shared fixtures. Tests run offline with telemetry off; state goes to temporary folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from tests.helpers import TINY, small_params_dict, write_params

for key, value in {
    "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MPLBACKEND": "Agg",
}.items():
    os.environ.setdefault(key, value)


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
    return generate_federation(params)


@pytest.fixture(scope="session")
def make_params(small_federation, tmp_path_factory):
    """make_params(**overrides): params over the small federation, each in its own folder."""
    def make(**overrides):
        raw = small_params_dict(small_federation.root, **overrides)
        return write_params(tmp_path_factory.mktemp("params"), raw)
    return make


@pytest.fixture(scope="module")
def params(make_params):
    """The tiny FM over the small federation (tests.helpers.TINY)."""
    return make_params(**TINY)


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """A real Prefect server on 127.0.0.1 for the session (started by the first test that asks for it)."""
    from tests.helpers.servers import prefect_server

    with prefect_server(tmp_path_factory.mktemp("prefect-home")):
        yield
