"""Interrupts, cancellations and generators that misbehave while closing (issue 15, points 3, 4).

A :class:`BaseException` that is no :class:`Exception` -- KeyboardInterrupt, SystemExit,
``asyncio.CancelledError`` and the TimeoutError ``asyncio.timeout`` makes of a
cancellation -- comes out of a context as itself under both teardown policies, with
the teardown errors attached (``polydatum_teardown_errors`` and a note) and recorded
the four ways a suppressed teardown error is recorded. A cancellation that arrives
while a resource tears down is not swallowed: the rest is torn down, then the task
ends cancelled. And whatever a generator raises while polydatum closes it is kept.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from polydatum import DataManager
from polydatum.context import DataAccessContext
from polydatum.errors import TeardownErrors
from polydatum.lifecycle import State, open_lifecycles
from polydatum.testing import TelemetryCapture


class FlushError(Exception):
    """A resource's teardown failure."""


class CleanupError(Exception):
    """What a generator's ``finally`` raises when polydatum closes it."""


def _log_and_fail_teardown(log: list[str]) -> Any:
    def cache(ctx: DataAccessContext) -> Iterator[str]:
        try:
            yield "cache"
        finally:  # the block's exception is thrown in at the yield
            log.append("cache teardown")
            raise FlushError("flush failed")

    return cache


def _db(log: list[str]) -> Any:
    def db(ctx: DataAccessContext) -> Iterator[str]:
        try:
            yield "db"
        finally:
            log.append("db teardown")

    return db


def _assert_recorded_four_ways(cap: TelemetryCapture, ctx: DataAccessContext) -> FlushError:
    """The teardown error of ``cache`` is in the exit errors, on its teardown span, in a
    warning and in the counter; returns it."""
    ((kind, error, _),) = ctx.get_resource_exit_errors()
    assert kind is FlushError
    span = cap.span("polydatum.resource.teardown cache")
    assert span.status == "ERROR"
    assert span.attributes["error.type"] == f"{__name__}.FlushError"
    (warning,) = [e for e in cap.logs if e["log_level"] == "warning"]
    assert warning["event"] == "polydatum.resource.teardown_error_suppressed"
    assert warning["resource"] == "cache"
    (point,) = cap.metrics("polydatum.resource.teardown.errors")
    assert point.value == 1
    assert isinstance(error, FlushError)
    return error


def _assert_nothing_left(ctx: DataAccessContext) -> None:
    assert ctx.state is State.EXITED
    assert open_lifecycles() == []
    assert DataManager().get_active_context() is None


@pytest.mark.parametrize("policy", ["record", "raise"])
@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_an_interrupt_from_the_block_comes_out_as_itself_under_both_policies(
    polydatum_telemetry: TelemetryCapture, policy: str, interrupt: type[BaseException]
) -> None:
    log: list[str] = []
    dm = polydatum_telemetry.data_manager(teardown_errors=policy)
    dm.register_resources(cache=_log_and_fail_teardown(log), db=_db(log))
    raised = interrupt()
    with pytest.raises(interrupt) as caught, dm.context() as ctx:
        ctx.db
        ctx.cache
        raise raised
    assert caught.value is raised  # not TeardownErrors: `except Exception` does not catch it
    assert log == ["cache teardown", "db teardown"]
    error = _assert_recorded_four_ways(polydatum_telemetry, ctx)
    if policy == "raise":
        group = raised.polydatum_teardown_errors  # type: ignore[attr-defined]
        assert isinstance(group, TeardownErrors)
        assert group.exceptions == (error,)
        assert raised.__notes__ == [
            "polydatum: 1 resource(s) failed to tear down (1 sub-exception) while this "
            "propagated; see its polydatum_teardown_errors"
        ]
    else:
        assert not hasattr(raised, "polydatum_teardown_errors")
        assert not hasattr(raised, "__notes__")
    _assert_nothing_left(ctx)


def test_an_exception_from_the_block_under_the_strict_policy_is_the_groups_cause() -> None:
    log: list[str] = []
    dm = DataManager(teardown_errors="raise")
    dm.register_resources(cache=_log_and_fail_teardown(log))
    failure = LookupError("no such user")
    with pytest.raises(TeardownErrors) as caught, dm.context() as ctx:
        ctx.cache
        raise failure
    assert caught.value.__cause__ is failure
    assert [type(e) for e in caught.value.exceptions] == [FlushError]
    _assert_nothing_left(ctx)


async def _aflush_fails(ctx: DataAccessContext) -> AsyncIterator[str]:
    try:
        yield "acache"
    finally:  # the cancellation is thrown in at the yield
        raise FlushError("flush failed")


@pytest.mark.parametrize("policy", ["record", "raise"])
def test_a_task_cancelled_in_the_block_ends_cancelled_under_both_policies(policy: str) -> None:
    dm = DataManager(teardown_errors=policy)
    dm.register_resources(cache=_aflush_fails)
    seen: dict[str, Any] = {}

    async def request() -> None:
        try:
            async with dm.context() as ctx:
                seen["ctx"] = ctx
                await ctx.aresource("cache")
                await asyncio.sleep(10)
        except asyncio.CancelledError as cancelled:
            seen["cancelled"] = cancelled
            raise

    async def main() -> asyncio.Task[None]:
        task = asyncio.create_task(request())
        await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return task

    task = asyncio.run(main())
    assert task.cancelled()
    cancelled = seen["cancelled"]
    assert type(cancelled) is asyncio.CancelledError
    ((kind, error, _),) = seen["ctx"].get_resource_exit_errors()
    assert kind is FlushError
    if policy == "raise":
        assert cancelled.polydatum_teardown_errors.exceptions == (error,)
    _assert_nothing_left(seen["ctx"])


def test_asyncio_timeout_raises_timeout_error_under_the_strict_policy() -> None:
    dm = DataManager(teardown_errors="raise")
    dm.register_resources(cache=_aflush_fails)
    seen: dict[str, Any] = {}

    async def request() -> None:
        async with asyncio.timeout(0.01), dm.context() as ctx:
            seen["ctx"] = ctx
            await ctx.aresource("cache")
            await asyncio.sleep(10)

    with pytest.raises(TimeoutError) as caught:
        asyncio.run(request())
    cancelled = caught.value.__cause__
    assert type(cancelled) is asyncio.CancelledError
    ((_, error, _),) = seen["ctx"].get_resource_exit_errors()
    assert cancelled.polydatum_teardown_errors.exceptions == (error,)  # type: ignore[attr-defined]
    _assert_nothing_left(seen["ctx"])


def test_a_cancellation_during_resource_teardown_tears_the_rest_down_then_ends_cancelled() -> None:
    log: list[str] = []
    flushing = asyncio.Event()

    async def slow_flush(ctx: DataAccessContext) -> AsyncIterator[str]:
        yield "queue"
        if flushing.is_set():
            return  # later requests (there must be none) flush at once
        log.append("flush started")
        flushing.set()
        await asyncio.sleep(10)
        log.append("flush finished")  # never: the task is cancelled while it waits

    async def conn(ctx: DataAccessContext) -> AsyncIterator[str]:
        yield "conn"
        log.append("conn closed")

    dm = DataManager()
    dm.register_resources(conn=conn, queue=slow_flush)
    contexts: list[DataAccessContext] = []
    served: list[int] = []

    async def worker() -> None:
        # A worker loop (bounded, so that a swallowed cancellation fails rather than
        # hangs): it must stop when cancelled, not keep serving.
        for _ in range(3):
            async with dm.context() as ctx:
                contexts.append(ctx)
                await ctx.aresource("conn")
                await ctx.aresource("queue")
                served.append(len(contexts))

    async def main() -> asyncio.Task[None]:
        task = asyncio.create_task(worker())
        await flushing.wait()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return task

    task = asyncio.run(main())
    assert task.cancelled()
    assert served == [1]
    assert log == ["flush started", "conn closed"]
    (ctx,) = contexts
    ((kind, _, _),) = ctx.get_resource_exit_errors()  # recorded, and then raised
    assert kind is asyncio.CancelledError
    _assert_nothing_left(ctx)


def _twice_yielding_with_failing_cleanup(log: list[str]) -> Any:
    def twice(ctx: DataAccessContext) -> Iterator[str]:
        try:
            yield "first"
            yield "second"
        finally:
            log.append("cleanup")
            raise CleanupError("cleanup failed")

    return twice


def test_a_twice_yielding_resource_whose_cleanup_raises_keeps_both_errors() -> None:
    log: list[str] = []
    dm = DataManager()
    dm.register_resources(twice=_twice_yielding_with_failing_cleanup(log))
    with dm.context() as ctx:
        assert ctx.twice == "first"
    assert log == ["cleanup"]  # closed exactly once
    (twice_error, cleanup_error) = [error for _, error, _ in ctx.get_resource_exit_errors()]
    assert type(twice_error) is RuntimeError
    assert str(twice_error) == (
        "Resource 'twice' yielded more than once; a resource generator must yield exactly once."
    )
    assert type(cleanup_error) is CleanupError
    assert str(cleanup_error) == "cleanup failed"
    assert twice_error.__cause__ is cleanup_error
    _assert_nothing_left(ctx)


def test_a_twice_yielding_middleware_whose_cleanup_raises_has_it_in_the_chain() -> None:
    log: list[str] = []
    dm = DataManager()
    dm.register_context_middleware(_twice_yielding_with_failing_cleanup(log))
    with pytest.raises(RuntimeError) as caught, dm.context() as ctx:
        pass
    assert str(caught.value) == (
        "Middleware 'twice' yielded more than once; a middleware generator must yield exactly once."
    )
    assert log == ["cleanup"]
    cleanup_error = caught.value.__cause__
    assert type(cleanup_error) is CleanupError
    assert str(cleanup_error) == "cleanup failed"
    _assert_nothing_left(ctx)


def test_a_twice_yielding_async_resource_whose_cleanup_raises_keeps_both_errors() -> None:
    log: list[str] = []

    async def twice(ctx: DataAccessContext) -> AsyncIterator[str]:
        try:
            yield "first"
            yield "second"
        finally:
            log.append("cleanup")
            raise CleanupError("cleanup failed")

    dm = DataManager()
    dm.register_resources(twice=twice)
    seen: dict[str, Any] = {}

    async def request() -> None:
        async with dm.context() as ctx:
            seen["ctx"] = ctx
            assert await ctx.aresource("twice") == "first"

    asyncio.run(request())
    assert log == ["cleanup"]
    errors = [error for _, error, _ in seen["ctx"].get_resource_exit_errors()]
    assert [type(e) for e in errors] == [RuntimeError, CleanupError]
    assert errors[0].__cause__ is errors[1]
    _assert_nothing_left(seen["ctx"])
