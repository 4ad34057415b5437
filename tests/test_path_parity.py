"""The idle fast path behaves exactly like the recording path.

When nothing records, contexts take a separate, shorter path (``_create_idle``, the
flat set-up loop, ``_teardown_idle``). Two bugs once lived only there (a bare
``KeyError`` for an async resource read as an attribute, a misleading state message),
hidden because the recording path was right. This test runs the same sequence of
operations -- reading resources as attributes, through ``resource()`` and
``aresource()``, ``name in ctx``, DAL calls, before entering, inside and after exit --
on a DataManager that records nothing, one that records everything and one that only
logs at INFO (no OpenTelemetry provider anywhere), and asserts that every step ends the
same way: the same value, or the same exception type and message; then the same
exception out of the context and the same exit errors.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polydatum import DataManager, Service
from polydatum.context import DataAccessContext
from polydatum.testing import TelemetryCapture

EXAMPLES = 300


class Fault(Exception):
    pass


# ------------------------------------------------------------------ the registration


def db(ctx: DataAccessContext) -> Iterator[str]:
    yield "db"


async def adb(ctx: DataAccessContext) -> AsyncIterator[str]:
    yield "adb"


def broken(ctx: DataAccessContext) -> Iterator[str]:
    raise Fault("cannot connect")
    yield "never"


def lazy(ctx: DataAccessContext) -> Iterator[str]:
    return
    yield "never"


def twice(ctx: DataAccessContext) -> Iterator[str]:
    yield "twice"
    yield "again"


def bad_close(ctx: DataAccessContext) -> Iterator[str]:
    yield "bad_close"
    raise OSError("close failed")


def selfref(ctx: DataAccessContext) -> Iterator[str]:
    ctx.selfref
    yield "selfref"


def dep(ctx: DataAccessContext) -> Iterator[str]:
    yield f"dep on {ctx.db}"


RESOURCES = {
    "db": db,
    "adb": adb,
    "broken": broken,
    "lazy": lazy,
    "twice": twice,
    "bad_close": bad_close,
    "selfref": selfref,
    "dep": dep,
}
NAMES = [*RESOURCES, "unknown", "_private", "__dunder__", "dal", "meta"]


class Items(Service):
    def read(self, name: str) -> Any:
        return getattr(self._ctx, name)

    async def aread(self, name: str) -> Any:
        return await self._ctx.aresource(name)

    def nested(self, name: str) -> Any:
        assert self._dal is not None
        return ("nested", self._dal.items.read(name))

    def fail(self, name: str) -> None:
        raise Fault(f"service failed on {name}")

    def _hidden(self) -> None:
        pass


def build(mw: tuple[str | None, str | None], log: list[Any], **options: Any) -> DataManager:
    """The registration, with one middleware that reads resource ``mw[0]`` at setup and
    ``mw[1]`` at teardown (``None``: nothing), logging what each read gave."""
    setup_reads, teardown_reads = mw

    def reader(ctx: DataAccessContext) -> Iterator[None]:
        if setup_reads is not None:
            log.append(("mw setup", outcome(lambda: getattr(ctx, setup_reads))))
        try:
            yield
        finally:
            if teardown_reads is not None:
                log.append(("mw teardown", outcome(lambda: getattr(ctx, teardown_reads))))

    def calls(request: Any, handler: Any) -> Any:
        """Method middleware: logs each call's path, and what came back or was raised."""
        path = ".".join(segment.name for segment in request.path)
        try:
            result = handler(request)
        except BaseException as error:
            log.append(("call", path, "raised", type(error).__qualname__, str(error)))
            raise
        log.append(("call", path, "ok", _value(result)))
        return result

    dm = DataManager(**options)
    dm.register_resources(**RESOURCES)
    dm.register_services(items=Items())
    dm.register_context_middleware(reader)
    dm.register_method_middleware(calls)
    return dm


# ------------------------------------------------------------------ the operations

SYNC_OPS = [
    "attr",
    "resource",
    "contains",
    "dal.read",
    "dal.missing",
    "dal._hidden",
    "dal.nested",
    "dal.fail",
    "dal[path]",
]
ASYNC_OPS = [*SYNC_OPS, "aresource", "dal.aread"]


def _value(value: Any) -> Any:
    """Strings and booleans as they are; other objects (the DAL, the Meta) by type."""
    return value if isinstance(value, str | bool | None) else type(value).__qualname__


def outcome(call: Any) -> tuple[Any, ...]:
    try:
        value = call()
    except BaseException as error:  # every outcome is compared
        return ("raised", type(error).__qualname__, str(error))
    return ("ok", _value(value))


async def aoutcome(call: Any) -> tuple[Any, ...]:
    try:
        value = await call()
    except BaseException as error:
        return ("raised", type(error).__qualname__, str(error))
    return ("ok", _value(value))


def sync_call(ctx: Any, op: str, name: str) -> Any:
    if op == "attr":
        return lambda: getattr(ctx, name)
    if op == "resource":
        return lambda: ctx.resource(name)
    if op == "contains":
        return lambda: name in ctx
    if op == "dal.read":
        return lambda: ctx.dal.items.read(name)
    if op == "dal.missing":
        return lambda: ctx.dal.items.missing(name)
    if op == "dal._hidden":
        return lambda: ctx.dal.items._hidden()
    if op == "dal.nested":
        return lambda: ctx.dal.items.nested(name)
    if op == "dal.fail":
        return lambda: ctx.dal.items.fail(name)
    if op == "dal[path]":
        return lambda: ctx.dal["items.read"](name)
    raise AssertionError(op)


def exit_errors(ctx: Any) -> list[tuple[str, str]]:
    return [(t.__qualname__, str(e)) for t, e, _ in ctx.get_resource_exit_errors()]


Steps = list[tuple[str, str]]


def run_sync(
    mw: tuple[str | None, str | None],
    before: Steps,
    inside: Steps,
    after: Steps,
    fail: bool,
    **options: Any,
) -> Any:
    log: list[Any] = []
    ctx = build(mw, log, **options).context()
    log.extend(outcome(sync_call(ctx, op, name)) for op, name in before)

    def block() -> None:
        with ctx:
            log.append(("idle", ctx._telemetry is None))
            log.extend(outcome(sync_call(ctx, op, name)) for op, name in inside)
            if fail:
                raise Fault("block failed")

    log.append(("context", outcome(block)))
    log.extend(outcome(sync_call(ctx, op, name)) for op, name in after)
    log.append(("exit errors", exit_errors(ctx)))
    return log


async def run_async(
    mw: tuple[str | None, str | None],
    before: Steps,
    inside: Steps,
    after: Steps,
    fail: bool,
    **options: Any,
) -> Any:
    log: list[Any] = []
    ctx = build(mw, log, **options).context()

    async def step(op: str, name: str) -> tuple[Any, ...]:
        if op == "aresource":
            return await aoutcome(lambda: ctx.aresource(name))
        if op == "dal.aread":
            return await aoutcome(lambda: ctx.dal.items.aread(name))
        return outcome(sync_call(ctx, op, name))

    log.extend([await step(op, name) for op, name in before])

    async def block() -> None:
        async with ctx:
            log.append(("idle", ctx._telemetry is None))
            for op, name in inside:
                log.append(await step(op, name))
            if fail:
                raise Fault("block failed")

    log.append(("context", await aoutcome(block)))
    log.extend([await step(op, name) for op, name in after])
    log.append(("exit errors", exit_errors(ctx)))
    return log


_READ = st.none() | st.sampled_from(NAMES)
MIDDLEWARE_READS = st.tuples(_READ, _READ)


def steps(ops: list[str], most: int) -> st.SearchStrategy[Steps]:
    return st.lists(st.tuples(st.sampled_from(ops), st.sampled_from(NAMES)), max_size=most)


def _without_path_marker(log: list[Any]) -> list[Any]:
    return [entry for entry in log if not (isinstance(entry, tuple) and entry[0] == "idle")]


def agree(run: Callable[..., list[Any]], *scenario: Any) -> None:
    """Run ``scenario`` idle, logging at INFO only, and recording everything; the idle
    run must match the two others step by step."""
    idle_log = run(*scenario)
    with TelemetryCapture():  # no provider, but capturing logs turns INFO on
        logged_log = run(*scenario)
    with TelemetryCapture() as capture:
        recorded_log = run(
            *scenario,
            tracer_provider=capture.tracer_provider,
            meter_provider=capture.meter_provider,
        )
    assert ("idle", True) in idle_log, "the idle run recorded something"
    assert ("idle", False) in logged_log, "the logged run was idle"
    assert ("idle", False) in recorded_log, "the recorded run was idle"
    for label, other in (("logging only", logged_log), ("recording", recorded_log)):
        pairs = zip(_without_path_marker(idle_log), _without_path_marker(other), strict=True)
        for position, (a, b) in enumerate(pairs):
            assert a == b, f"step {position}: idle {a!r} != {label} {b!r}"


# ------------------------------------------------------------------ the tests

many = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@many
@given(
    mw=MIDDLEWARE_READS,
    before=steps(SYNC_OPS, 2),
    inside=steps(SYNC_OPS, 6),
    after=steps(SYNC_OPS, 2),
    fail=st.booleans(),
)
def test_sync_idle_and_recording_paths_agree(
    mw: tuple[str | None, str | None], before: Steps, inside: Steps, after: Steps, fail: bool
) -> None:
    agree(run_sync, mw, before, inside, after, fail)


@many
@given(
    mw=MIDDLEWARE_READS,
    before=steps(ASYNC_OPS, 2),
    inside=steps(ASYNC_OPS, 6),
    after=steps(ASYNC_OPS, 2),
    fail=st.booleans(),
)
def test_async_idle_and_recording_paths_agree(
    mw: tuple[str | None, str | None], before: Steps, inside: Steps, after: Steps, fail: bool
) -> None:
    agree(
        lambda *args, **options: asyncio.run(run_async(*args, **options)),
        mw,
        before,
        inside,
        after,
        fail,
    )
