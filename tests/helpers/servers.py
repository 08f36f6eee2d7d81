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


@contextmanager
def prefect_server(home) -> Iterator[str]:
    """A real Prefect server on 127.0.0.1 (Prefect's test harness) with its state under `home`; yields its API
    URL, which this process's Prefect client uses while the block runs."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with temporary_settings({PREFECT_HOME: home}):
        with prefect_test_harness(server_startup_timeout=180):
            yield PREFECT_API_URL.value()
