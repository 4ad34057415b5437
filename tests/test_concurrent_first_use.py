"""A resource that several callers of one context ask for first at the same moment.

``asyncio.gather`` of two service calls, or threads sharing a context, may each be the
first to read a resource whose setup takes a while (connecting): the resource is set up
once and every caller gets it. Code *inside* the setup that asks for the resource is
still a cycle, an error. Spec: S-RES-15.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aioredis
from fastapi import FastAPI

import polydatum.lifecycle.core as core
from polydatum import DataManager, Service
from polydatum.context import DataAccessContext
from polydatum.errors import ResourceException
from polydatum.integrations.asgi import PolydatumMiddleware
from polydatum.integrations.fastapi import DAL
from polydatum.lifecycle import State
from polydatum.testing import TelemetryCapture
from tests._servers import uvicorn_server
from tests.conftest import require_service
from tests.sql_backends import held_by_another_thread, in_forked_children


def _cycle(name: str) -> str:
    return (
        f"Resource {name!r} asked for itself while setting up (a cycle): a resource cannot "
        f"use itself; set up what both need in a third resource."
    )


class Client:
    """A stand-in for a network client: numbered, so that two setups show."""

    made = 0

    def __init__(self) -> None:
        Client.made += 1
        self.number = Client.made


def _counting_client(log: list[str], *, fail_first: bool = False) -> Any:
    async def client(ctx: DataAccessContext) -> AsyncIterator[Client]:
        log.append("connect")
        await asyncio.sleep(0.05)  # connecting: the other callers ask meanwhile
        if fail_first and log.count("connect") == 1:
            log.append("refused")
            raise ConnectionRefusedError("first connect refused")
        made = Client()
        yield made
        log.append(f"close {made.number}")

    return client


class Reader(Service):
    async def number(self) -> int:
        client: Client = await self._ctx.aresource("client")
        return client.number


def _reader_data_manager(
    log: list[str], *, fail_first: bool = False, **options: Any
) -> DataManager:
    """A DataManager whose service ``reader`` reads the counting ``client`` resource."""
    dm = DataManager(**options)
    dm.register_services(reader=Reader())
    dm.register_resources(client=_counting_client(log, fail_first=fail_first))
    return dm


@pytest.mark.parametrize("traced", [False, True], ids=["idle", "traced"])
async def test_tasks_asking_first_at_once_share_one_setup(traced: bool) -> None:
    log: list[str] = []
    with TelemetryCapture() if traced else contextlib.nullcontext() as capture:
        options = (
            {"tracer_provider": capture.tracer_provider, "meter_provider": capture.meter_provider}
            if capture is not None
            else {}
        )
        dm = _reader_data_manager(log, **options)
        first = Client.made + 1
        async with dm.dal() as dal:
            numbers = await asyncio.gather(*(dal.reader.number() for _ in range(5)))
        assert numbers == [first] * 5
        assert log == ["connect", f"close {first}"]
        if capture is not None:
            assert [
                (s.name, s.status)
                for s in capture.spans()
                if s.name.startswith("polydatum.resource.")
            ] == [
                ("polydatum.resource.setup client", "UNSET"),
                ("polydatum.resource.teardown client", "UNSET"),
            ]
            assert (
                sorted(s.name for s in capture.spans() if s.name == "reader.number")
                == ["reader.number"] * 5
            )


async def test_a_failed_setup_is_tried_again_by_a_caller_that_waited_for_it() -> None:
    """As if the callers had asked one after the other: the first setup's error goes to
    the caller that ran it, the next caller sets the resource up again."""
    log: list[str] = []
    dm = _reader_data_manager(log, fail_first=True)
    first = Client.made + 1
    async with dm.dal() as dal:
        outcomes = await asyncio.gather(
            dal.reader.number(), dal.reader.number(), dal.reader.number(), return_exceptions=True
        )
    refused, *numbers = outcomes
    assert type(refused) is ConnectionRefusedError
    assert str(refused) == "first connect refused"
    assert numbers == [first, first]
    assert log == ["connect", "refused", "connect", f"close {first}"]


async def test_a_cancelled_waiter_leaves_the_setup_and_the_other_waiters_alone() -> None:
    log: list[str] = []
    dm = _reader_data_manager(log)
    first = Client.made + 1
    async with dm.dal() as dal:
        setting_up = asyncio.ensure_future(dal.reader.number())
        await asyncio.sleep(0.01)  # the setup runs, connecting
        doomed = asyncio.ensure_future(dal.reader.number())
        patient = asyncio.ensure_future(dal.reader.number())
        await asyncio.sleep(0.01)  # both wait
        doomed.cancel()
        assert await setting_up == first
        assert await patient == first
        with pytest.raises(asyncio.CancelledError):
            await doomed
    assert log == ["connect", f"close {first}"]


def test_threads_sharing_a_context_share_one_setup() -> None:
    connecting, connected = threading.Event(), threading.Event()
    log: list[str] = []

    def session(ctx: DataAccessContext) -> Iterator[Client]:
        log.append("connect")
        connecting.set()
        assert connected.wait(10)
        made = Client()
        yield made
        log.append(f"close {made.number}")

    dm = DataManager()
    dm.register_resources(session=session)
    first = Client.made + 1
    got: dict[str, Any] = {}

    def read(label: str, ctx: DataAccessContext) -> None:
        try:
            got[label] = ctx.session.number
        except BaseException as error:  # reported by the assertion below
            got[label] = error

    with dm.context() as ctx:
        threads = [
            threading.Thread(target=contextvars.copy_context().run, args=(read, "first", ctx))
        ]
        threads[0].start()
        assert connecting.wait(10)  # the first thread is inside the setup
        for label in ("second", "third"):
            run = contextvars.copy_context().run
            thread = threading.Thread(target=run, args=(read, label, ctx))
            thread.start()
            threads.append(thread)
        time.sleep(0.05)  # both now wait for the setup
        assert got == {}
        connected.set()
        for thread in threads:
            thread.join(10)
            assert not thread.is_alive()
        assert ctx.session.number == first
    assert got == {"first": first, "second": first, "third": first}
    assert log == ["connect", f"close {first}"]


async def test_sync_resource_read_from_threads_of_an_async_context() -> None:
    """``asyncio.to_thread`` copies the context: two threads read a sync resource first."""
    log: list[str] = []

    def session(ctx: DataAccessContext) -> Iterator[Client]:
        log.append("connect")
        time.sleep(0.1)
        made = Client()
        yield made
        log.append(f"close {made.number}")

    class Sync(Service):
        def number(self) -> int:
            made: Client = self._ctx.session
            return made.number

    dm = DataManager()
    dm.register_services(sync=Sync())
    dm.register_resources(session=session)
    first = Client.made + 1
    async with dm.dal() as dal:
        numbers = await asyncio.gather(
            asyncio.to_thread(dal.sync.number), asyncio.to_thread(dal.sync.number)
        )
    assert numbers == [first, first]
    assert log == ["connect", f"close {first}"]


async def test_a_sync_read_on_the_event_loop_while_another_task_sets_up_is_refused() -> None:
    """Blocking the loop's thread would stop the task that sets the resource up."""
    log: list[str] = []
    dm = _reader_data_manager(log)
    first = Client.made + 1
    async with dm.dal() as dal:
        ctx = dm.get_active_context()
        assert ctx is not None
        setting_up = asyncio.ensure_future(dal.reader.number())
        await asyncio.sleep(0.01)
        with pytest.raises(ResourceException) as info:
            ctx.resource("client")
        assert str(info.value) == (
            "Resource 'client' is being set up by another caller, maybe another asyncio "
            "task of this thread's event loop: a sync read (`ctx.client`, "
            "`ctx.resource('client')`) cannot wait for it without stopping that task for "
            "ever; in async code read it with `await ctx.aresource('client')`."
        )
        assert await setting_up == first
        assert ctx.resource("client").number == first  # set up: a sync read is fine
    assert log == ["connect", f"close {first}"]


def test_a_cycle_through_another_resource_is_still_an_error() -> None:
    def a(ctx: DataAccessContext) -> Iterator[str]:
        ctx.b
        yield "a"

    def b(ctx: DataAccessContext) -> Iterator[str]:
        ctx.a  # a is being set up below us on this stack: a cycle, not a wait
        yield "b"

    dm = DataManager()
    dm.register_resources(a=a, b=b)
    with dm.context() as ctx:
        with pytest.raises(ResourceException) as info:
            ctx.a
        assert str(info.value) == _cycle("a")
        assert "a" not in ctx and "b" not in ctx
    assert ctx.state is State.EXITED


async def test_an_async_cycle_through_another_resource_is_still_an_error() -> None:
    async def a(ctx: DataAccessContext) -> AsyncIterator[str]:
        await asyncio.sleep(0)
        await ctx.aresource("b")
        yield "a"

    async def b(ctx: DataAccessContext) -> AsyncIterator[str]:
        await asyncio.sleep(0)
        await ctx.aresource("a")
        yield "b"

    dm = DataManager()
    dm.register_resources(a=a, b=b)
    async with dm.context() as ctx:
        with pytest.raises(ResourceException) as info:
            await asyncio.wait_for(ctx.aresource("a"), 10)
        assert str(info.value) == _cycle("a")
        assert "a" not in ctx and "b" not in ctx


# ------------------------------------------------------------ over real HTTP, real Redis


@pytest.mark.redis
def test_a_fastapi_endpoint_gathering_calls_that_share_a_redis_client() -> None:
    """An endpoint gathers three service calls that each use the request's Redis
    client first: one client per request, every call answered, Redis holds the sum."""
    require_service("Redis", "127.0.0.1", 6379)
    clients: list[int] = []
    key = f"polydatum-test:gather:{time.monotonic_ns()}"

    async def cache(ctx: DataAccessContext) -> AsyncIterator[Any]:
        client = aioredis.Redis.from_url("redis://127.0.0.1:6379/12")
        await client.ping()  # connecting: the other calls ask meanwhile
        clients.append(id(client))
        try:
            yield client
        finally:
            await client.aclose()

    class Counter(Service):
        async def bump(self, by: int) -> int:
            client = await self._ctx.aresource("cache")
            return int(await client.incrby(key, by))

    dm = DataManager()
    dm.register_services(counter=Counter())
    dm.register_resources(cache=cache)
    app = FastAPI()
    app.add_middleware(PolydatumMiddleware, data_manager=dm)

    @app.post("/bump")
    async def bump(dal: DAL) -> dict[str, Any]:
        totals = await asyncio.gather(*(dal.counter.bump(by) for by in (1, 10, 100)))
        return {"totals": sorted(totals)}

    try:
        with uvicorn_server(app) as server:
            with httpx.Client(base_url=server.url, timeout=10) as http:
                first = http.post("/bump")
                second = http.post("/bump")
        assert first.status_code == 200, first.text
        assert second.status_code == 200, second.text
        # Each call's increment lands once: the largest total is the running sum.
        assert max(first.json()["totals"]) == 111
        assert max(second.json()["totals"]) == 222
        assert len(clients) == 2  # one client per request, not one per call
        assert redis.Redis.from_url("redis://127.0.0.1:6379/12").get(key) == b"222"
    finally:
        redis.Redis.from_url("redis://127.0.0.1:6379/12").delete(key)


async def test_a_lost_wake_up_costs_a_pause_not_a_hang(monkeypatch: pytest.MonkeyPatch) -> None:
    """Should a setup end without waking its waiters (an interrupt at the wrong
    instant), they look again after ``RECHECK_SECONDS`` and get the resource."""
    monkeypatch.setattr(core, "RECHECK_SECONDS", 0.05)
    monkeypatch.setattr(core.LifecycleCore, "wake_waiters", lambda self, name: None)
    log: list[str] = []
    dm = _reader_data_manager(log)
    first = Client.made + 1
    async with dm.dal() as dal:
        numbers = await asyncio.wait_for(
            asyncio.gather(dal.reader.number(), dal.reader.number()), 5
        )
    assert numbers == [first, first]
    assert log == ["connect", f"close {first}"]


# Forking while another thread runs is the point: CPython 3.12+ warns of exactly that.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_gets_a_waiters_lock_of_its_own() -> None:
    """The lock of the setup waiters, held by another thread at the fork, would stay
    held for ever in the child: its first wait for a concurrent setup would hang."""

    def child(_: int) -> None:
        log: list[str] = []
        dm = _reader_data_manager(log)

        async def main() -> list[int]:
            async with dm.dal() as dal:
                return await asyncio.gather(dal.reader.number(), dal.reader.number())

        first, second = asyncio.run(main())
        assert first == second
        assert log == ["connect", f"close {first}"]

    with held_by_another_thread(core._WAITERS_LOCK):
        assert in_forked_children(1, child, timeout=20) == [""]
