"""Fixtures of the data tests: a clinical-only site (N stays per task, split and label), copied per test."""

import shutil
from pathlib import Path

import pytest

from tests.helpers.sites import CLINICAL_N, build_site


@pytest.fixture(scope="module")
def clinical_template(tmp_path_factory) -> Path:
    return build_site(tmp_path_factory.mktemp("template"), n_per_class=CLINICAL_N, modalities=("clinical",))


@pytest.fixture
def site(clinical_template, tmp_path) -> Path:
    """A fresh copy of the clinical template, free to change."""
    return Path(shutil.copytree(clinical_template, tmp_path / "site"))
