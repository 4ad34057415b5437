"""Shared test helpers.

``require_service(name, host, port)`` skips a test when a real backend (PostgreSQL,
Redis, RabbitMQ...) is unreachable -- except under CI (``CI=true``) or with
``POLYDATUM_REQUIRE_SERVICES=1`` (set by ``.ci/run``), where it fails instead:
a missing service must never turn into a silently green run.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator

import pytest
import structlog

POSTGRES_URL = os.environ.get(
    "POLYDATUM_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def services_required() -> bool:
    return os.environ.get("CI", "").lower() == "true" or os.environ.get(
        "POLYDATUM_REQUIRE_SERVICES", ""
    ) in ("1", "true")


def require_service(name: str, host: str, port: int) -> None:
    """Skip (developer laptop) or fail (CI) when ``host:port`` does not accept connections."""
    try:
        with socket.create_connection((host, port), timeout=2):
            return
    except OSError as error:
        message = f"{name} is not reachable at {host}:{port} ({error})"
    if services_required():
        pytest.fail(f"{message}; CI requires it", pytrace=False)
    pytest.skip(message)


def require_binary(name: str) -> str:
    """Skip (laptop) or fail (CI) when an executable is not on PATH; returns its path."""
    path = shutil.which(name)
    if path is None:
        message = f"the {name!r} executable is not installed"
        if services_required():
            pytest.fail(f"{message}; CI requires it (.ci/run installs it)", pytrace=False)
        pytest.skip(message)
    return path


@pytest.fixture
def postgres_url() -> str:
    """The URL of the test PostgreSQL server (fails under CI when it is down)."""
    require_service("PostgreSQL", "127.0.0.1", 5432)
    return POSTGRES_URL


def _global_telemetry() -> dict[str, object]:
    """What decides, process-wide, whether a context records (besides structlog)."""
    from opentelemetry import metrics, trace

    from polydatum import telemetry

    # The public getters return the provider set, or else the API's proxy (one object
    # per process), so their identity changes exactly when the global provider does.
    return {
        "polydatum enabled": telemetry._ENABLED,
        "polydatum default tracer provider": telemetry._DEFAULT_TRACER_PROVIDER,
        "polydatum default meter provider": telemetry._DEFAULT_METER_PROVIDER,
        "global tracer provider": trace.get_tracer_provider(),
        "global meter provider": metrics.get_meter_provider(),
    }


@pytest.fixture(autouse=True)
def _telemetry_left_as_found() -> Iterator[None]:
    """Every test starts with telemetry as the run started, so that whether a context
    records (the idle path or not) never depends on which tests ran before.

    structlog is put back: a test that configures it and "restores" it with
    ``structlog.configure(**saved)`` leaves it *configured*, INFO on, and every later
    context would record. The providers cannot be put back (OpenTelemetry sets its
    global ones once): a test that changes them fails, naming what it left behind."""
    was_configured = structlog.is_configured()
    saved = structlog.get_config()
    before = _global_telemetry()
    yield
    if was_configured:
        structlog.configure(**saved)
    else:
        structlog.reset_defaults()
    leaked = [k for k, v in _global_telemetry().items() if v is not before[k]]
    assert not leaked, f"the test changed process-wide telemetry: {', '.join(leaked)}"
