"""A KeyboardInterrupt at every instant of polydatum's core leaves nothing behind.

Issue 15, point 5. A trace function counts the bytecode instructions polydatum's core
runs for one request (two middleware, two resources -- one created by a service, one
by a middleware's teardown -- and a service call through the DAL), then the request is
replayed once per instant with a ``KeyboardInterrupt`` raised at exactly that
instruction, as a signal handler would raise it there. After each run:

* no context is active and none is open (``open_lifecycles()``);
* the context reached ``exited`` (or was never entered, when the interrupt came before
  ``__enter__``);
* every middleware and resource generator that started has finished, exactly once;
* with tracing on, the context span has ended and the current span is the one the
  request started under;
* the interrupt came out as itself;
* and the next request on the same DataManager runs normally.

Instants excluded, because Python's ``with`` statement gives no handler there (the same
holds for :mod:`contextlib`): the one-line ``__enter__``/``__exit__`` delegates of
:class:`~polydatum.context.DataAccessContext`, and the instructions of the driver's
``enter``/``exit`` that no ``try`` covers -- the state check before it, which changes
nothing, and the jump and ``return`` after it, once the context is active. The
telemetry layer's own instructions are not interrupted here (only the core's, with
the observer calls in them): between the SDK returning a span and polydatum storing
it there is no instant that Python lets a library protect.
"""

from __future__ import annotations

import dis
import os
import sys
from collections import Counter
from collections.abc import Iterator
from types import CodeType, FrameType
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider

import polydatum
from polydatum import DataManager, Service
from polydatum.context import DataAccessContext, get_active_context
from polydatum.lifecycle import State, open_lifecycles
from polydatum.lifecycle import _sync_driver as sync_driver

PACKAGE = os.path.dirname(polydatum.__file__)
#: The core: everything a request runs through but the telemetry layer.
CORE_FILES = {
    os.path.join(PACKAGE, name)
    for name in (
        "access.py",
        "context.py",
        "meta.py",
        "middleware.py",
        "registry.py",
        "resources.py",
        "services.py",
    )
} | {
    os.path.join(PACKAGE, "lifecycle", name)
    for name in os.listdir(os.path.join(PACKAGE, "lifecycle"))
    if name.endswith(".py")
}


class Interrupt(KeyboardInterrupt):
    """The injected interrupt (a subclass: never confused with a real Ctrl-C)."""


def _unguarded(function: Any) -> set[int]:
    """The instruction offsets of a driver entry point that no ``try`` covers: the
    state check before it (which changes nothing) and the jump and ``return`` after
    it, once the context is active (where Python's ``with`` statement has not yet set
    up the handler that would call ``__exit__``)."""
    bytecode = dis.Bytecode(function)
    covered = set()
    for entry in bytecode.exception_entries:
        covered.update(range(entry.start, entry.end))
    return {i.offset for i in bytecode if i.offset not in covered}


EXCLUDED_CODE = {
    DataAccessContext.__enter__.__code__,
    DataAccessContext.__exit__.__code__,
}
EXCLUDED_OFFSETS: dict[CodeType, set[int]] = {
    function.__code__: _unguarded(function)
    for function in (sync_driver.SyncDriver.enter, sync_driver.SyncDriver.exit)
}


class Injector:
    """Counts the core's instructions; raises :class:`Interrupt` at instant ``at``."""

    def __init__(self, at: int | None) -> None:
        self.at = at
        self.count = 0
        self.fired = False

    def _local(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "opcode" and not self.fired:
            code = frame.f_code
            offsets = EXCLUDED_OFFSETS.get(code)
            if offsets is None or frame.f_lasti not in offsets:
                self.count += 1
                if self.count == self.at:
                    self.fired = True
                    raise Interrupt(f"instant {self.at}")
        return self._local

    def _global(self, frame: FrameType, event: str, arg: Any) -> Any:
        code = frame.f_code
        if code.co_filename in CORE_FILES and code not in EXCLUDED_CODE:
            frame.f_trace_opcodes = True
            return self._local
        return None

    def __enter__(self) -> Injector:
        sys.settrace(self._global)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.settrace(None)


class App:
    """One application: what its generators did, and a DataManager to run it."""

    def __init__(self, provider: TracerProvider | None = None) -> None:
        self.started: Counter[str] = Counter()
        self.finished: Counter[str] = Counter()
        #: The contexts the middleware saw.
        self.contexts: list[DataAccessContext] = []
        dm = self.dm = DataManager(tracer_provider=provider)

        def generator(name: str) -> Any:
            def gen(ctx: Any) -> Iterator[str]:
                self.contexts.append(ctx)
                self.started[name] += 1
                try:
                    yield name
                finally:
                    self.finished[name] += 1

            gen.__name__ = name
            return gen

        def audit(ctx: Any) -> Iterator[None]:
            self.started["audit"] += 1
            try:
                yield
                ctx.cache  # created while middleware tear down
            finally:
                self.finished["audit"] += 1

        class Notes(Service):
            def get(self, key: str) -> str:
                return f"{self._ctx.db}:{key}"

        dm.register_context_middleware(generator("outer"), audit)
        dm.register_resources(db=generator("db"), cache=generator("cache"))
        dm.register_services(notes=Notes())

    def request(self) -> str:
        with self.dm.dal() as dal:
            result: str = dal.notes.get("k")
        return result


def _run(app: App, at: int | None, traced: bool) -> tuple[Injector, BaseException | None]:
    injector = Injector(at)
    raised: BaseException | None = None
    with injector:
        try:
            app.request()
        except Interrupt as error:
            raised = error
    return injector, raised


def _check_clean(app: App, at: int, raised: BaseException | None) -> None:
    where = f"interrupt at instant {at}"
    assert isinstance(raised, Interrupt) and str(raised) == f"instant {at}", where
    assert get_active_context() is None, where
    assert open_lifecycles() == [], where
    assert app.started == app.finished, f"{where}: {app.started} vs {app.finished}"


@pytest.fixture
def sdk() -> Iterator[tuple[TracerProvider, ContextSpans]]:
    counts = ContextSpans()
    provider = TracerProvider()
    provider.add_span_processor(counts)
    yield provider, counts
    provider.shutdown()


def _instants(traced: bool, provider: TracerProvider | None) -> int:
    app = _app(provider)
    injector, raised = _run(app, None, traced)
    assert raised is None and app.started == app.finished
    return injector.count


def _app(provider: TracerProvider | None) -> App:
    return App(provider)


class ContextSpans(SpanProcessor):
    """Counts the context spans started and ended."""

    def __init__(self) -> None:
        self.started = 0
        self.ended = 0

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        if span.name == "polydatum.context":
            self.started += 1

    def on_end(self, span: ReadableSpan) -> None:
        if span.name == "polydatum.context":
            self.ended += 1


def test_a_request_runs_a_known_number_of_core_instants() -> None:
    """The injector sees the core (a sanity check: hundreds of instants, not zero)."""
    assert _instants(False, None) > 300


def test_idle_interrupt_at_every_instant_leaves_nothing_behind() -> None:
    total = _instants(False, None)
    for at in range(1, total + 1):
        app = _app(None)
        _, raised = _run(app, at, False)
        _check_clean(app, at, raised)
        for ctx in app.contexts:
            assert ctx.state is State.EXITED, f"instant {at}: {ctx.state}"
        assert app.request() == "db:k"  # the next request runs normally
        assert app.started == app.finished


def test_traced_interrupt_at_every_instant_ends_the_context_span(
    sdk: tuple[TracerProvider, ContextSpans],
) -> None:
    provider, counts = sdk
    total = _instants(True, provider)
    assert counts.started == counts.ended == 1
    tracer = provider.get_tracer("test")
    for at in range(1, total + 1):
        app = _app(provider)
        with tracer.start_as_current_span("request") as root:
            _, raised = _run(app, at, True)
            assert trace.get_current_span() is root, f"instant {at}: current span not restored"
        _check_clean(app, at, raised)
        assert counts.started == counts.ended, f"instant {at}: a context span never ended"
        before = counts.ended
        assert app.request() == "db:k"
        assert counts.started == counts.ended == before + 1
