"""Hostile exceptions never break the recording of a request (issue 15, points 1, 2, 9).

An application's exception may have a ``__str__`` that raises, a cyclic cause chain or a
message of megabytes. Recording it must give the application its own exception back,
tear every generator down once, end every span, and record bounded text.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from polydatum import DataManager, Service, get_active_context
from polydatum.context import DataAccessContext
from polydatum.lifecycle.core import open_lifecycles
from polydatum.telemetry import (
    MESSAGE_LIMIT,
    STACKTRACE_LIMIT,
    exception_message,
    exception_stacktrace,
    truncate,
)
from polydatum.testing import TelemetryCapture


class Unprintable(Exception):
    """An exception whose ``__str__`` raises (it formats ``None``)."""

    def __str__(self) -> str:
        return "%d items" % None  # type: ignore[str-format]  # noqa: UP031


class Jobs(Service):
    def fail(self, error: BaseException) -> None:
        raise error


def build(cap: TelemetryCapture | None, closed: list[str]) -> DataManager:
    dm = cap.data_manager() if cap is not None else DataManager()

    def db(ctx: DataAccessContext) -> Iterator[str]:
        try:
            yield "db"
        finally:
            closed.append("db")

    def mw(ctx: DataAccessContext) -> Iterator[None]:
        try:
            yield
        finally:
            closed.append("mw")

    dm.register_services(jobs=Jobs())
    dm.register_resources(db=db)
    dm.register_context_middleware(mw)
    return dm


def test_truncate_marks_what_it_cut() -> None:
    assert truncate("abcdef", 6) == "abcdef"
    assert truncate("abcdefgh", 6) == "abcdef…[truncated 2 chars]"


def test_formatting_never_raises() -> None:
    assert exception_message(Unprintable()) == "<unprintable Unprintable>"
    trace = exception_stacktrace(Unprintable())
    assert trace.startswith(f"{__name__}.Unprintable: <exception str() failed>")


def test_an_unprintable_exception_is_returned_and_everything_ends(
    polydatum_telemetry: TelemetryCapture,
) -> None:
    closed: list[str] = []
    dm = build(polydatum_telemetry, closed)
    error = Unprintable()
    with pytest.raises(Unprintable) as caught, dm.context() as ctx:
        assert ctx.db == "db"
        ctx.dal.jobs.fail(error)
    assert caught.value is error
    assert closed == ["mw", "db"]  # each generator torn down once
    assert get_active_context() is None
    assert open_lifecycles() == []
    spans = {s.name: s for s in polydatum_telemetry.finished_spans()}
    assert set(spans) == {
        "polydatum.context",
        "polydatum.middleware.setup mw",
        "polydatum.resource.setup db",
        "jobs.fail",
        "polydatum.resource.teardown db",
        "polydatum.middleware.teardown mw",
    }
    call = spans["jobs.fail"]
    assert call.status.description == "<unprintable Unprintable>"
    assert call.attributes is not None
    assert call.attributes["error.type"] == f"{__name__}.Unprintable"
    (event,) = call.events
    assert event.attributes is not None
    assert event.attributes["exception.message"] == "<unprintable Unprintable>"


def test_a_long_message_is_bounded_everywhere(polydatum_telemetry: TelemetryCapture) -> None:
    closed: list[str] = []
    dm = build(polydatum_telemetry, closed)
    message = "A" * 100_000  # one token: base64, compact JSON
    started = time.perf_counter()
    with pytest.raises(ValueError), dm.dal() as dal:
        dal.jobs.fail(ValueError(message))
    assert time.perf_counter() - started < 2
    (call,) = [s for s in polydatum_telemetry.finished_spans() if s.name == "jobs.fail"]
    bounded = "A" * MESSAGE_LIMIT + f"…[truncated {100_000 - MESSAGE_LIMIT} chars]"
    assert call.status.description == bounded
    (event,) = call.events
    assert event.attributes is not None
    assert event.attributes["exception.message"] == bounded
    stack = event.attributes["exception.stacktrace"]
    assert isinstance(stack, str)
    assert len(stack) <= STACKTRACE_LIMIT + len("…[truncated 0000000 chars]")
    assert stack.endswith(" chars]")


def test_a_cyclic_cause_chain_in_a_teardown_error_finishes_quietly(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """structlog unconfigured (rich installed): the warning goes to the stdlib logger
    ``polydatum`` as text; nothing is printed and nothing loops."""
    assert not structlog.is_configured()

    def flaky(ctx: DataAccessContext) -> Iterator[str]:
        yield "flaky"
        first = OSError("first")
        second = RuntimeError("second")
        first.__cause__ = second
        second.__cause__ = first
        raise first

    dm = DataManager()
    dm.register_resources(flaky=flaky)
    started = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="polydatum"), dm.context() as ctx:
        ctx.flaky
    assert time.perf_counter() - started < 2
    ((kind, _, _),) = ctx.get_resource_exit_errors()
    assert kind is OSError
    (record,) = [r for r in caplog.records if r.name == "polydatum"]
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert message.startswith("event='polydatum.resource.teardown_error_suppressed'")
    assert "resource='flaky' error_type='OSError'" in message
    assert "RuntimeError: second" in message and "OSError: first" in message
    assert record.exc_info is None
    assert capsys.readouterr() == ("", "")


def test_a_failed_ping_with_an_unprintable_error_does_not_raise(
    polydatum_telemetry: TelemetryCapture,
) -> None:
    dm = polydatum_telemetry.data_manager()

    def cache(ctx: DataAccessContext) -> Iterator[int]:
        yield 1

    def down() -> Any:
        raise Unprintable()

    cache.ping = down  # type: ignore[attr-defined]
    dm.register_resources(cache=cache)
    result = dm.ping()["cache"]
    assert (result.ok, result.error) == (
        False,
        f"{__name__}.Unprintable: <unprintable Unprintable>",
    )
    (span,) = polydatum_telemetry.finished_spans()
    assert span.status.description == "<unprintable Unprintable>"


class Outer(Service):
    def run(self) -> None:
        self._dal.inner.fail()


class Inner(Service):
    def fail(self) -> None:
        raise KeyError("missing")


def test_an_exception_is_recorded_once_where_it_came_out(
    polydatum_telemetry: TelemetryCapture,
) -> None:
    dm = polydatum_telemetry.data_manager()
    dm.register_services(outer=Outer(), inner=Inner())
    with pytest.raises(KeyError), dm.dal() as dal:
        dal.outer.run()
    spans = {s.name: s for s in polydatum_telemetry.finished_spans()}
    assert set(spans) == {"polydatum.context", "outer.run", "inner.fail"}
    assert [e.name for e in spans["inner.fail"].events] == ["exception"]
    for name in ("inner.fail", "outer.run", "polydatum.context"):
        span = spans[name]
        assert span.status.description == "'missing'"
        assert span.attributes is not None
        assert span.attributes["error.type"] == "KeyError"
    assert spans["outer.run"].events == ()
    assert spans["polydatum.context"].events == ()
