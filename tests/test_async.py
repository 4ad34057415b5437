"""Async contexts: async generators, async services and method middleware, isolation."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import inspect
import threading
import warnings
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from polydatum import DataManager, Service, State, get_active_context
from polydatum.context import DataAccessContext
from polydatum.errors import InvalidMiddleware, MiddlewareSetupException, ResourceException
from polydatum.middleware import DalCommandRequest
from polydatum.testing import TelemetryCapture


class Boom(Exception):
    pass


class Books(Service):
    async def get(self, book_id: int) -> str:
        conn = await self._ctx.aresource("adb")
        await asyncio.sleep(0)
        return f"{conn}:{book_id}:{self._ctx.meta.user}"

    async def shelf(self) -> list[str]:
        assert self._dal is not None
        return [await self._dal.books.get(1), await self._dal.books.get(2)]

    def sync_count(self) -> int:
        return 42

    async def fail(self) -> None:
        raise Boom("async failure")


def build(log: list[str], cap: TelemetryCapture | None = None) -> DataManager:
    dm = cap.data_manager() if cap is not None else DataManager()

    async def amw(ctx: DataAccessContext) -> AsyncIterator[None]:
        log.append("amw setup")
        await asyncio.sleep(0)
        try:
            yield
        except Boom:
            log.append("amw saw Boom")
            raise
        log.append("amw teardown")

    def smw(ctx: DataAccessContext) -> Iterator[None]:
        log.append("smw setup")
        yield
        log.append("smw teardown")

    async def adb(ctx: DataAccessContext) -> AsyncIterator[str]:
        log.append("adb setup")
        await asyncio.sleep(0)
        try:
            yield "adb"
        except BaseException as error:
            log.append(f"adb rollback {type(error).__name__}")
            raise
        log.append("adb commit")

    def sdb(ctx: DataAccessContext) -> Iterator[str]:
        yield "sdb"
        log.append("sdb teardown")

    dm.register_context_middleware(amw, smw)
    dm.register_resources(adb=adb, sdb=sdb)
    dm.register_services(books=Books())
    return dm


async def test_async_context_semantics_match_sync() -> None:
    log: list[str] = []
    dm = build(log)
    async with dm.dal({"user": "ann"}) as dal:
        assert await dal.books.shelf() == ["adb:1:ann", "adb:2:ann"]
        assert dal.books.sync_count() == 42
        assert dm.get_active_context().sdb == "sdb"  # type: ignore[union-attr]
    assert log == [
        "amw setup",
        "smw setup",
        "adb setup",
        "smw teardown",
        "amw teardown",
        "sdb teardown",
        "adb commit",
    ]


async def test_async_error_flow() -> None:
    log: list[str] = []
    dm = build(log)
    with pytest.raises(Boom, match="async failure"):
        async with dm.dal() as dal:
            await dal.books.get(1)
            await dal.books.fail()
    # smw does not catch: the error passes it without a teardown line.
    assert log == ["amw setup", "smw setup", "adb setup", "amw saw Boom", "adb rollback Boom"]


async def test_async_span_tree_matches_sync_shape(polydatum_telemetry: TelemetryCapture) -> None:
    dm = build([], polydatum_telemetry)
    async with dm.dal({"user": "x"}) as dal:
        await dal.books.shelf()
    assert polydatum_telemetry.tree() == [
        (
            "polydatum.context",
            [
                ("polydatum.middleware.setup amw", []),
                ("polydatum.middleware.setup smw", []),
                (
                    "books.shelf",
                    [
                        ("books.get", [("polydatum.resource.setup adb", [])]),
                        ("books.get", []),
                    ],
                ),
                ("polydatum.middleware.teardown smw", []),
                ("polydatum.middleware.teardown amw", []),
                ("polydatum.resource.teardown adb", []),
            ],
        )
    ]


async def test_async_resource_needs_await_in_async_context() -> None:
    dm = build([])
    async with dm.context() as ctx:
        with pytest.raises(ResourceException) as info:
            ctx.adb
        assert str(info.value) == (
            "Resource 'adb' is an async generator; create it with "
            "`await ctx.aresource('adb')` inside `async with dm.context()`."
        )
        assert "adb" not in ctx
        assert await ctx.aresource("adb") == "adb"
        assert ctx.adb == "adb"  # once created, attribute access works


ASYNC_MISUSE = (
    "Resource 'adb' is an async generator; create it with "
    "`await ctx.aresource('adb')` inside `async with dm.context()`."
)


@pytest.mark.parametrize("traced", [False, True], ids=["idle", "traced"])
def test_async_resource_in_a_sync_context_is_a_clear_error_and_leaves_nothing(
    traced: bool,
) -> None:
    """``ctx.adb`` and ``ctx.resource('adb')`` alike; on the idle path the attribute once
    raised a bare ``KeyError`` (the half-created entry was removed twice)."""

    async def adb(ctx: DataAccessContext) -> AsyncIterator[str]:
        yield "adb"

    def db(ctx: DataAccessContext) -> Iterator[str]:
        yield "db"

    # Idle means no capture at all: capturing logs turns INFO on, and with it recording.
    with TelemetryCapture() if traced else contextlib.nullcontext() as cap:
        dm = cap.data_manager() if cap is not None else DataManager()
        dm.register_resources(adb=adb, db=db)
        with dm.context() as ctx:
            assert (ctx._telemetry is None) is not traced  # the path under test
            for attempt in (lambda: ctx.adb, lambda: ctx.resource("adb"), lambda: ctx.adb):
                with pytest.raises(ResourceException) as info:
                    attempt()
                assert str(info.value) == ASYNC_MISUSE
                assert info.value.__context__ is None
                assert "adb" not in ctx
            assert ctx.db == "db"  # the context goes on
        assert ctx.get_resource_exit_errors() == []
        if traced:
            failed = ("polydatum.resource.setup adb", "ERROR", "polydatum.errors.ResourceException")
            assert [
                (s.name, s.status.status_code.name, s.attributes.get("error.type"))
                for s in cap.exporter.get_finished_spans()
                if s.name.startswith("polydatum.resource")
            ] == [
                failed,
                failed,
                failed,
                ("polydatum.resource.setup db", "UNSET", None),
                ("polydatum.resource.teardown db", "UNSET", None),
            ]


def test_async_middleware_in_sync_context_is_a_clear_error() -> None:
    dm = build([])
    with pytest.raises(MiddlewareSetupException) as info, dm.context():
        pass
    assert str(info.value) == (
        "Middleware 'amw' is an async generator: enter the context with "
        "`async with dm.context()` (or register a sync generator)."
    )


async def test_async_method_middleware() -> None:
    seen: list[str] = []

    async def audit(request: DalCommandRequest, handler: Any) -> Any:
        seen.append(f"before {'.'.join(p.name for p in request.path)}")
        result = await handler(request)
        seen.append("after")
        return result

    def passthrough(request: DalCommandRequest, handler: Any) -> Any:
        seen.append("sync passthrough")
        return handler(request)

    dm = build([])
    dm.register_method_middleware(audit, passthrough)
    async with dm.dal({"user": "u"}) as dal:
        assert await dal.books.get(5) == "adb:5:u"
    assert seen == ["before books.get", "sync passthrough", "after"]


SYNC_THROUGH_ASYNC_MW = (
    "dal.books.sync_count is a sync method, but the method middleware audit is async "
    "(it returned an awaitable, not the result). Make the method `async def` and await "
    "it, or make the middleware a plain function that returns handler(request) for "
    "sync methods."
)


@pytest.mark.parametrize("traced", [False, True], ids=["idle", "traced"])
def test_async_method_middleware_around_a_sync_method_is_a_clear_error(traced: bool) -> None:
    """The sync method's call cannot run an ``async def`` middleware: a clear error (and
    the middleware's coroutine closed, never left un-awaited), not a coroutine handed
    back as the result, in async and sync contexts alike."""
    ran: list[str] = []

    async def audit(request: DalCommandRequest, handler: Any) -> Any:
        ran.append("audit")
        result = handler(request)
        return await result if inspect.isawaitable(result) else result

    class Books(Service):
        async def get(self, book_id: int) -> str:
            return f"book {book_id}"

        def sync_count(self) -> int:
            return 42

    with TelemetryCapture() if traced else contextlib.nullcontext() as cap:
        dm = cap.data_manager() if cap is not None else DataManager()
        dm.register_services(books=Books())
        dm.register_method_middleware(audit)

        async def in_async_context() -> Any:
            async with dm.dal({"user": "u"}) as dal:
                assert await dal.books.get(5) == "book 5"  # async methods: fine
                with pytest.raises(InvalidMiddleware) as info:
                    dal.books.sync_count()
                return info.value

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "coroutine ... was never awaited" would fail
            assert str(asyncio.run(in_async_context())) == SYNC_THROUGH_ASYNC_MW
            with pytest.raises(InvalidMiddleware) as info:
                with dm.dal({"user": "u"}) as dal:
                    dal.books.sync_count()
            assert str(info.value) == SYNC_THROUGH_ASYNC_MW
            gc.collect()
        assert ran == ["audit"]  # the sync calls never started it
        if cap is not None:
            assert [
                (s.name, s.status.status_code.name, s.attributes.get("error.type"))
                for s in cap.exporter.get_finished_spans()
                if s.name.startswith("books.")
            ] == [
                ("books.get", "UNSET", None),
                ("books.sync_count", "ERROR", "polydatum.errors.InvalidMiddleware"),
                ("books.sync_count", "ERROR", "polydatum.errors.InvalidMiddleware"),
            ]


async def test_concurrent_tasks_are_isolated() -> None:
    dm = build([])

    async def one(i: int) -> tuple[int, Any, Any]:
        async with dm.context({"user": f"u{i}"}) as ctx:
            await asyncio.sleep(0.001 * (i % 3))
            value = await ctx.dal.books.get(i)
            return i, value, dm.get_active_context() is ctx

    results = await asyncio.gather(*(one(i) for i in range(50)))
    assert results == [(i, f"adb:{i}:u{i}", True) for i in range(50)]
    assert dm.get_active_context() is None


NO_CONTEXT = (
    "A DataAccessContext must be started to access the DAL: use `with dm.dal() as dal:` "
    "or `with dm.context() as ctx:`."
)


def _who_manager() -> DataManager:
    class Who(Service):
        def me(self) -> Any:
            return self._ctx.meta.user

    dm = DataManager()
    dm.register_services(who=Who())
    return dm


def _after_a_foreign_exit(dm: DataManager, ctx: DataAccessContext) -> list[Any]:
    """What this thread or task sees once ``ctx``, entered here, was exited elsewhere: no
    active context, and every way of reaching the DAL or a service's context says so."""
    from polydatum.errors import NoActiveContextError

    who = dm.get_dal()._services["who"]
    seen: list[Any] = [get_active_context()]
    for call in (
        lambda: ctx.dal.who.me(),  # the command resolved and cached by the earlier call
        lambda: dm.get_dal().who.me(),
        lambda: dm.get_dal()["who.me"](),
        lambda: dm.get_dal().who is who,  # reading the service needs no context
        lambda: who.me(),  # its method is the DAL's command: it needs one
        lambda: who._ctx,
    ):
        try:
            seen.append(("returned", call()))
        except NoActiveContextError as error:
            seen.append(str(error))
    return seen


EXPECTED_AFTER_FOREIGN_EXIT = [
    None,
    NO_CONTEXT,
    NO_CONTEXT,
    NO_CONTEXT,
    ("returned", True),
    NO_CONTEXT,
    "Who._ctx used with no context active; call services inside `with dm.context():` "
    "(or `with dm.dal() as dal:`).",
]


def test_a_context_exited_in_another_thread_is_not_active_here_any_more() -> None:
    """The active-context variable of the entering thread cannot be reset from the
    exiting one; what it still holds must read as "no context", not as a dead one."""
    dm = _who_manager()
    ctx = dm.context({"user": "ann"})
    ctx.__enter__()
    assert ctx.dal.who.me() == "ann"
    worker = threading.Thread(target=ctx.__exit__, args=(None, None, None))
    worker.start()
    worker.join()
    assert ctx.state is State.EXITED
    assert _after_a_foreign_exit(dm, ctx) == EXPECTED_AFTER_FOREIGN_EXIT
    with dm.dal({"user": "bob"}) as dal:  # and a new context works as usual
        assert dal.who.me() == "bob"
    assert _after_a_foreign_exit(dm, ctx) == EXPECTED_AFTER_FOREIGN_EXIT


async def test_a_context_exited_in_another_task_is_not_active_here_any_more() -> None:
    dm = _who_manager()
    ctx = dm.context({"user": "ann"})
    await ctx.__aenter__()
    assert ctx.dal.who.me() == "ann"
    await asyncio.create_task(ctx.__aexit__(None, None, None))
    assert ctx.state is State.EXITED
    assert _after_a_foreign_exit(dm, ctx) == EXPECTED_AFTER_FOREIGN_EXIT


def test_threads_are_isolated() -> None:
    dm = DataManager()

    class Who(Service):
        def me(self) -> Any:
            return self._ctx.meta.user

    dm.register_services(who=Who())
    barrier = threading.Barrier(8)
    results: dict[int, list[Any]] = {}

    def worker(i: int) -> None:
        out = []
        with dm.dal({"user": i}) as dal:
            barrier.wait()
            for _ in range(100):
                out.append(dal.who.me())
        results[i] = out

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: [i] * 100 for i in range(8)}


async def test_async_generators_do_not_leak_contextvars() -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("v", default="caller")
    dm = DataManager()

    async def mw(ctx: DataAccessContext) -> AsyncIterator[None]:
        var.set("mw")
        yield
        assert var.get() == "mw"

    dm.register_context_middleware(mw)
    async with dm.context():
        assert var.get() == "caller"
    assert var.get() == "caller"


async def test_cancellation_tears_everything_down() -> None:
    log: list[str] = []
    dm = build(log)
    started = asyncio.Event()

    async def request() -> None:
        async with dm.context() as ctx:
            await ctx.aresource("adb")
            started.set()
            await asyncio.sleep(10)

    task = asyncio.create_task(request())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert log[-1] == "adb rollback CancelledError"
    assert "amw teardown" not in log


@pytest.mark.parametrize("fail", [False, True], ids=["clean", "error"])
async def test_sync_generators_in_an_async_context_that_records_nothing(fail: bool) -> None:
    """The idle fast path of async contexts (sync generators only, nothing to await) keeps
    the order, the error flow and the recorded teardown errors of the general path."""
    log: list[str] = []

    def outer(ctx: DataAccessContext) -> Iterator[None]:
        log.append("outer setup")
        try:
            yield
        except Boom:
            log.append("outer saw Boom")
            raise
        log.append("outer teardown")

    def inner(ctx: DataAccessContext) -> Iterator[None]:
        log.append("inner setup")
        yield
        log.append("inner teardown")

    def db(ctx: DataAccessContext) -> Iterator[str]:
        log.append("db setup")
        yield "db"
        log.append("db teardown")
        raise OSError("connection reset")

    dm = DataManager()
    dm.register_context_middleware(outer, inner)
    dm.register_resources(db=db)
    ctx = dm.context()
    if fail:
        with pytest.raises(Boom, match="in the block"):
            async with ctx:
                assert ctx.db == "db"
                raise Boom("in the block")
    else:
        async with ctx:
            assert ctx.db == "db"
    assert ctx._telemetry is None
    if fail:  # Boom is thrown into each generator: db lets it through (no teardown line)
        assert log == ["outer setup", "inner setup", "db setup", "outer saw Boom"]
        assert ctx.get_resource_exit_errors() == []
    else:
        assert log == [
            "outer setup", "inner setup", "db setup",
            "inner teardown", "outer teardown", "db teardown",
        ]  # fmt: skip
        ((kind, error, _),) = ctx.get_resource_exit_errors()
        assert (kind, str(error)) == (OSError, "connection reset")
    assert ctx.state.value == "exited"
