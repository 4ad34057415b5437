"""The core's part of the request-boundary promises (DESIGN.md §2, "Request boundaries").

* A resource that could not commit raises :class:`CommitError`, which the lifecycle never
  suppresses: the ``with`` block raises it, whether or not anything records.
* The HTTP integrations' shared rule, :func:`close_for_response`, ends a request's
  context with what its response says.
* An ``async def`` service method called from a sync context is an error that says
  what to do, and no coroutine is left un-awaited.
* ``ctx.enclosing`` names the context a nested one was entered in.
"""

from __future__ import annotations

import asyncio
import gc
import warnings
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from polydatum import DataManager, Service
from polydatum.errors import (
    CommitError,
    ContextStateError,
    ErrorResponse,
    HandledAsSuccess,
    TeardownErrors,
)
from polydatum.integrations import aclose_for_response, close_for_response, is_error_status
from polydatum.testing import TelemetryCapture


class Boom(Exception):
    pass


def _app(log: list[str], *, fail_commit: bool, **options: Any) -> DataManager:
    """A DataManager with a transactional resource ``db`` and a plain one ``cache``."""

    def db(ctx: Any) -> Iterator[str]:
        try:
            yield "db"
        except BaseException as error:
            log.append(f"db rollback {type(error).__name__}")
            raise
        if fail_commit:
            log.append("db commit failed")
            raise CommitError("the commit failed: nothing was saved") from Boom("disk full")
        log.append("db commit")

    def cache(ctx: Any) -> Iterator[str]:
        yield "cache"
        log.append("cache closed")

    dm = DataManager(**options)
    dm.register_resources(db=db, cache=cache)
    return dm


@pytest.mark.parametrize("recording", [False, True], ids=["idle", "recording"])
def test_a_commit_error_is_raised_out_of_the_block_not_suppressed(recording: bool) -> None:
    log: list[str] = []
    with TelemetryCapture() as cap:
        dm = (
            _app(log, fail_commit=True, tracer_provider=cap.tracer_provider)
            if recording
            else _app(log, fail_commit=True)
        )
        with pytest.raises(CommitError, match="^the commit failed: nothing was saved$") as info:
            with dm.context() as ctx:
                assert ctx.cache == "cache"
                assert ctx.db == "db"
        assert isinstance(info.value.__cause__, Boom)
        # Every other resource still tears down; the commit error is raised, not recorded
        # as a suppressed one.
        assert log == ["db commit failed", "cache closed"]
        assert ctx.get_resource_exit_errors() == []
        if recording:
            assert cap.span("polydatum.resource.teardown db").status == "ERROR"
            context_span = cap.span("polydatum.context")
            assert context_span.status == "ERROR"
            assert context_span.attributes["error.type"] == "polydatum.errors.CommitError"
            assert "polydatum.teardown_errors" not in context_span.attributes


def test_a_commit_error_after_a_suppressed_error_is_still_raised() -> None:
    """A middleware that suppresses the block's error lets the resource commit; if that
    commit fails the block raises, it does not complete as if the work were saved."""
    log: list[str] = []
    dm = _app(log, fail_commit=True)

    def forgiving(ctx: Any) -> Iterator[None]:
        try:
            yield
        except Boom:
            log.append("suppressed")

    dm.register_context_middleware(forgiving)
    with pytest.raises(CommitError), dm.context() as ctx:
        ctx.db
        raise Boom("caught by the middleware")
    assert log == ["suppressed", "db commit failed"]


def test_a_commit_error_with_the_strict_policy_is_grouped_with_the_other_teardown_errors() -> None:
    log: list[str] = []
    dm = _app(log, fail_commit=True, teardown_errors="raise")

    def broken(ctx: Any) -> Iterator[str]:
        yield "broken"
        raise ConnectionResetError("went away")

    dm.register_resources(broken=broken)
    with pytest.raises(TeardownErrors) as info, dm.context() as ctx:
        ctx.db
        ctx.broken
    assert [type(e) for e in info.value.exceptions] == [ConnectionResetError]
    assert isinstance(info.value.__cause__, CommitError)


async def test_an_async_resource_commit_error_is_raised() -> None:
    log: list[str] = []

    async def db(ctx: Any) -> AsyncIterator[str]:
        yield "adb"
        log.append("adb commit failed")
        raise CommitError("async commit failed")

    dm = DataManager()
    dm.register_resources(db=db)
    with pytest.raises(CommitError, match="^async commit failed$"):
        async with dm.context() as ctx:
            assert await ctx.aresource("db") == "adb"
    assert log == ["adb commit failed"]


# ----------------------------------------------------------- close_for_response


def _recorder(log: list[str]) -> DataManager:
    def db(ctx: Any) -> Iterator[str]:
        try:
            yield "db"
        except BaseException as error:
            log.append(f"rollback {type(error).__name__}")
            raise
        log.append("commit")

    dm = DataManager()
    dm.register_resources(db=db)
    return dm


@pytest.mark.parametrize(
    ("status", "expected"),
    [(200, "commit"), (201, "commit"), (303, "commit"), (404, "rollback ErrorResponse")],
)
def test_close_for_response_commits_success_and_rolls_back_error_statuses(
    status: int, expected: str
) -> None:
    log: list[str] = []
    ctx = _recorder(log).context()
    ctx.__enter__()
    ctx.db
    close_for_response(ctx, status)  # the response may be sent: nothing raised
    assert log == [expected]


def test_close_for_response_throws_the_handled_exception_in_and_keeps_the_error_response() -> None:
    log: list[str] = []
    ctx = _recorder(log).context()
    ctx.__enter__()
    ctx.db
    close_for_response(ctx, 409, Boom("conflict"))
    assert log == ["rollback Boom"]


def test_close_for_response_raises_when_a_success_status_answers_a_rolled_back_request() -> None:
    log: list[str] = []
    ctx = _recorder(log).context()
    ctx.__enter__()
    ctx.db
    handled = Boom("handled into a 200")
    with pytest.raises(HandledAsSuccess) as info:
        close_for_response(ctx, 200, handled)
    assert str(info.value) == (
        "the application answered 200 for Boom, but the request's work was rolled back "
        "for that exception: the response is not sent"
    )
    assert info.value.__cause__ is handled
    assert (info.value.status, info.value.handled) == (200, handled)
    assert log == ["rollback Boom"]


def test_close_for_response_raises_a_commit_error_instead_of_the_success_response() -> None:
    log: list[str] = []
    ctx = _app(log, fail_commit=True).context()
    ctx.__enter__()
    ctx.db
    with pytest.raises(CommitError):
        close_for_response(ctx, 200)


def test_close_for_response_honours_a_custom_error_status_rule() -> None:
    log: list[str] = []
    ctx = _recorder(log).context()
    ctx.__enter__()
    ctx.db
    close_for_response(ctx, 404, error_status=lambda status: status >= 500)
    assert log == ["commit"]
    assert is_error_status(400) and not is_error_status(399)


async def test_aclose_for_response_is_the_same_rule_for_async_contexts() -> None:
    log: list[str] = []
    dm = _recorder(log)
    ctx = dm.context()
    await ctx.__aenter__()
    await ctx.aresource("db")
    await aclose_for_response(ctx, 500)
    assert log == ["rollback ErrorResponse"]
    assert str(ErrorResponse(500)) == (
        "the response status is 500, an error: the request's work is rolled back"
    )


# ------------------------------------------------------------------ async misuse


class Reports(Service):
    async def daily(self) -> list[str]:
        return ["report"]


def test_an_async_method_called_from_a_sync_context_says_what_to_do() -> None:
    dm = DataManager()
    dm.register_services(reports=Reports())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an un-awaited coroutine would warn
        with dm.dal() as dal, pytest.raises(ContextStateError) as info:
            dal.reports.daily()
        assert str(info.value) == (
            "dal.reports.daily is an `async def` method, but the active context was entered "
            "with a sync `with`: enter it with `async with dm.context()` (or `async with "
            "dm.dal()`) and call `await dal.reports.daily(...)`."
        )
        with dm.dal() as dal, pytest.raises(ContextStateError):
            dal["reports.daily"]()
        gc.collect()  # a coroutine made and dropped would warn (an error here) now


async def test_an_async_call_awaited_after_its_context_ended_is_refused() -> None:
    calls: list[str] = []

    def audit(request: Any, handler: Any) -> Any:
        calls.append(".".join(p.name for p in request.path))
        return handler(request)

    dm = DataManager(method_middleware=[audit])
    dm.register_services(reports=Reports())
    async with dm.dal() as dal:
        pending = dal.reports.daily()
    with pytest.raises(ContextStateError) as info:
        await pending
    assert str(info.value) == (
        "dal.reports.daily(...) was awaited after its context ended: await a DAL call "
        "inside the `async with dm.context()` block that made it."
    )
    assert calls == []  # the method middleware never ran against the exited context
    async with dm.dal() as dal:
        assert await dal.reports.daily() == ["report"]
    assert calls == ["reports.daily"]


# --------------------------------------------------------------------- enclosing


def test_enclosing_names_the_outer_context_while_both_are_open() -> None:
    dm = DataManager()
    outer = dm.context()
    assert outer.enclosing is None  # not entered
    with outer:
        assert outer.enclosing is None
        with dm.context() as inner:
            assert inner.enclosing is outer
        assert inner.enclosing is None  # exited


async def test_enclosing_is_per_task() -> None:
    dm = DataManager()
    seen: list[Any] = []

    async def elsewhere() -> None:
        async with dm.context() as other:
            seen.append(other.enclosing)

    async with dm.context() as outer:
        async with dm.context() as inner:
            assert inner.enclosing is outer
        # A task started inside a context inherits it as the active one, so a context
        # entered there is nested in it too.
        await asyncio.create_task(elsewhere())
    assert seen == [outer]
