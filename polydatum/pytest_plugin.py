"""The polydatum pytest plugin (registered through the ``pytest11`` entry point).

Fixtures:

* ``polydatum_telemetry`` -- a :class:`~polydatum.testing.TelemetryCapture`: an
  isolated tracer and meter provider with in-memory exporters, and captured
  structlog events. Build DataManagers with ``polydatum_telemetry.data_manager()``.
* ``polydatum_override`` -- ``polydatum_override(dm, users=FakeUsers())`` replaces
  services/resources for the rest of the test and restores them afterwards.
* ``assert_resources_torn_down`` -- call it with the capture at the end of a test to
  check every resource that was set up was torn down exactly once.
* ``polydatum_logs`` -- the polydatum log events captured so far (a callable:
  ``polydatum_logs()`` returns the event dicts, ``polydatum_logs("warning")`` those of
  one level), through the same capture as ``polydatum_telemetry``.
* ``polydatum_metrics`` -- ``polydatum_metrics("polydatum.context.duration")`` returns
  the current :class:`~polydatum.testing.MetricPoint` list of an instrument.

The plugin is registered through the ``pytest11`` entry point: installing polydatum
is enough, no ``conftest.py`` line is needed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest


@pytest.fixture
def polydatum_telemetry() -> Iterator[Any]:
    """Isolated in-memory telemetry for one test."""
    from polydatum.testing import TelemetryCapture

    with TelemetryCapture() as capture:
        yield capture


@pytest.fixture
def polydatum_override() -> Iterator[Callable[..., Any]]:
    """Replace services/resources of a DataManager until the end of the test."""
    from polydatum.testing import override

    with ExitStack() as stack:

        def apply(dm: Any, **replacements: Any) -> Any:
            return stack.enter_context(override(dm, **replacements))

        yield apply


@pytest.fixture
def assert_resources_torn_down() -> Callable[[Any], None]:
    """``assert_resources_torn_down(capture)``: every resource set up was torn down once."""
    from polydatum.testing import assert_resources_torn_down as check

    return check


@pytest.fixture
def polydatum_logs(polydatum_telemetry: Any) -> Callable[..., list[dict[str, Any]]]:
    """``polydatum_logs(level=None)``: captured polydatum log events, in order."""

    def events(level: str | None = None) -> list[dict[str, Any]]:
        return [
            e for e in polydatum_telemetry.events() if level is None or e.get("log_level") == level
        ]

    return events


@pytest.fixture
def polydatum_metrics(polydatum_telemetry: Any) -> Callable[..., list[Any]]:
    """``polydatum_metrics(name=None)``: current metric points (of one instrument)."""
    return polydatum_telemetry.metrics  # type: ignore[no-any-return]
