"""Fault injection over the whole context lifecycle, checked against a reference model.

Hypothesis generates scenarios (:class:`reference_model.Scenario`): up to four sync
or async middleware and up to four sync or async resources, resources created from
middleware setup, from the block and from middleware teardown, and a failure at
any step -- raising (an ``Exception``, a hostile one whose ``__str__`` raises and
whose cause is itself, a ``KeyboardInterrupt`` or a real asyncio cancellation), never
yielding, yielding twice, suppressing, replacing -- and, around some scenarios, a span
processor raising in ``on_start`` or ``on_end``. Each scenario
runs on a real DataManager with in-memory telemetry and is compared with what
:func:`reference_model.predict` says, which was written from DESIGN.md §2 alone:

* the order of every setup and teardown, and the exception each teardown saw;
* the exception that escapes the ``with`` block, by identity (or its exact type and
  message when polydatum makes it);
* every suppressed resource teardown error in ``get_resource_exit_errors()``, on its
  teardown span, as a warning log event and in the teardown-error counter;
* every span ended, complete (one trace, every parent present), with the right
  parent, status, ``polydatum.outcome``, ``error.type`` and exception event; a hostile
  error's message recorded as its placeholder; with a processor raising in ``on_start``
  every span polydatum tried to start lost (and nothing else), in ``on_end`` every
  span still exported exactly;
* the current span and the active polydatum context restored afterwards.

Scenarios per run: ``SYNC_EXAMPLES + ASYNC_EXAMPLES`` (plus the explicit examples).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.sdk.trace import SpanProcessor
from reference_model import (
    CONTEXT_SPAN,
    Err,
    Expected,
    FaultKind,
    HostileError,
    InjectedError,
    InjectedInterrupt,
    MiddlewareSpec,
    ResourceSpec,
    Scenario,
    SpanSpec,
    predict,
)
from span_faults import RaisingProcessor

from polydatum import DataManager, State, get_active_context
from polydatum import telemetry as polydatum_telemetry
from polydatum.context import DataAccessContext
from polydatum.testing import TelemetryCapture

SYNC_EXAMPLES = 1500
ASYNC_EXAMPLES = 1500

# ----------------------------------------------------------------------------- harness


def type_name(cls: type[BaseException]) -> str:
    """``module.QualName`` (builtins unqualified), as OpenTelemetry's ``error.type``."""
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


FAULT_TYPES: dict[str, str] = {
    "error": type_name(InjectedError),
    "hostile": type_name(HostileError),
    "interrupt": type_name(InjectedInterrupt),
    "cancel": type_name(asyncio.CancelledError),
}


def expected_type(err: Err) -> str:
    if err.kind is not None:
        return FAULT_TYPES[err.kind]
    assert err.type_name is not None
    return err.type_name


class Harness:
    """Runs one scenario: the generators log each step and register each exception
    they inject, so that identity can be checked afterwards."""

    def __init__(self) -> None:
        self.log: list[tuple[object, ...]] = []
        self.injected: dict[str, BaseException] = {}
        self.attempts: Counter[str] = Counter()
        # Whether the context was idle (nothing recording), as each generator and the
        # block saw it: the scenario must run on the path it is meant to test.
        self.idle_seen: set[bool] = set()

    def make(self, label: str, kind: FaultKind) -> BaseException:
        error: BaseException
        if kind == "error":
            error = InjectedError(label)
        elif kind == "hostile":
            error = HostileError(label)
        elif kind == "interrupt":
            error = InjectedInterrupt(label)
        else:
            error = asyncio.CancelledError(label)
        self.injected[label] = error
        return error

    async def afail(self, label: str, kind: FaultKind) -> None:
        """Raise the fault; a ``cancel`` is a real cancellation of the running task."""
        if kind != "cancel":
            raise self.make(label, kind)
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError as error:
            self.injected[label] = error
            raise
        raise AssertionError("the cancellation was not delivered")

    def describe(self, error: BaseException | None) -> object:
        """A comparable description of an actual exception."""
        if error is None:
            return None
        for label, injected in self.injected.items():
            if injected is error:
                return ("injected", label)
        if isinstance(error, BaseExceptionGroup):
            return (
                type_name(type(error)),
                error.message,
                tuple(self.describe(e) for e in error.exceptions),
                self.describe(error.__cause__),
            )
        return (type_name(type(error)), str(error))


def describe_expected(err: Err | None) -> object:
    """The same description, for what the model expects."""
    if err is None:
        return None
    if err.label is not None:
        return ("injected", err.label)
    if err.members:
        return (
            err.type_name,
            err.message,
            tuple(describe_expected(m) for m in err.members),
            describe_expected(err.cause),
        )
    return (err.type_name, err.message)


def sync_middleware(i: int, spec: MiddlewareSpec, h: Harness) -> Callable[..., Any]:
    def middleware(ctx: DataAccessContext) -> Iterator[None]:
        h.log.append(("mw.setup", i))
        h.idle_seen.add(ctx._telemetry is None)
        for name in spec.setup_creates:
            getattr(ctx, name)
        if spec.setup == "raise":
            raise h.make(f"mw{i}.setup", spec.setup_fault)
        if spec.setup == "never_yield":
            return
        try:
            yield
        except BaseException as exc:
            h.log.append(("mw.teardown", i, exc))
            for name in spec.teardown_creates:
                getattr(ctx, name)
            if spec.teardown == "pass":
                raise
            if spec.teardown == "suppress":
                return
            if spec.teardown == "replace":
                raise h.make(f"mw{i}.teardown", spec.teardown_fault) from None
            yield
            return
        h.log.append(("mw.teardown", i, None))
        for name in spec.teardown_creates:
            getattr(ctx, name)
        if spec.teardown == "replace":
            raise h.make(f"mw{i}.teardown", spec.teardown_fault)
        if spec.teardown == "twice":
            yield

    middleware.__name__ = f"mw{i}"
    return middleware


def async_middleware(i: int, spec: MiddlewareSpec, h: Harness) -> Callable[..., Any]:
    async def middleware(ctx: DataAccessContext) -> AsyncIterator[None]:
        h.log.append(("mw.setup", i))
        h.idle_seen.add(ctx._telemetry is None)
        for name in spec.setup_creates:
            await ctx.aresource(name)
        if spec.setup == "raise":
            await h.afail(f"mw{i}.setup", spec.setup_fault)
        if spec.setup == "never_yield":
            return
        try:
            yield
        except BaseException as exc:
            h.log.append(("mw.teardown", i, exc))
            for name in spec.teardown_creates:
                await ctx.aresource(name)
            if spec.teardown == "pass":
                raise
            if spec.teardown == "suppress":
                return
            if spec.teardown == "replace":
                await h.afail(f"mw{i}.teardown", spec.teardown_fault)
            yield
            return
        h.log.append(("mw.teardown", i, None))
        for name in spec.teardown_creates:
            await ctx.aresource(name)
        if spec.teardown == "replace":
            await h.afail(f"mw{i}.teardown", spec.teardown_fault)
        if spec.teardown == "twice":
            yield

    middleware.__name__ = f"mw{i}"
    return middleware


def sync_resource(spec: ResourceSpec, h: Harness) -> Callable[..., Any]:
    name = spec.name

    def resource(ctx: DataAccessContext) -> Iterator[str]:
        h.idle_seen.add(ctx._telemetry is None)
        attempt = h.attempts[name]
        h.attempts[name] += 1
        h.log.append(("res.setup", name))
        if spec.setup == "raise":
            raise h.make(f"{name}.setup#{attempt}", spec.setup_fault)
        if spec.setup == "never_yield":
            return
        try:
            yield f"value of {name}"
        except BaseException as exc:
            h.log.append(("res.teardown", name, exc))
            if spec.teardown == "pass":
                raise
            if spec.teardown == "suppress":
                return
            if spec.teardown == "raise":
                raise h.make(f"{name}.teardown", spec.teardown_fault) from None
            yield "again"
            return
        h.log.append(("res.teardown", name, None))
        if spec.teardown == "raise":
            raise h.make(f"{name}.teardown", spec.teardown_fault)
        if spec.teardown == "twice":
            yield "again"

    return resource


def async_resource(spec: ResourceSpec, h: Harness) -> Callable[..., Any]:
    name = spec.name

    async def resource(ctx: DataAccessContext) -> AsyncIterator[str]:
        h.idle_seen.add(ctx._telemetry is None)
        attempt = h.attempts[name]
        h.attempts[name] += 1
        h.log.append(("res.setup", name))
        if spec.setup == "raise":
            await h.afail(f"{name}.setup#{attempt}", spec.setup_fault)
        if spec.setup == "never_yield":
            return
        try:
            yield f"value of {name}"
        except BaseException as exc:
            h.log.append(("res.teardown", name, exc))
            if spec.teardown == "pass":
                raise
            if spec.teardown == "suppress":
                return
            if spec.teardown == "raise":
                await h.afail(f"{name}.teardown", spec.teardown_fault)
            yield "again"
            return
        h.log.append(("res.teardown", name, None))
        if spec.teardown == "raise":
            await h.afail(f"{name}.teardown", spec.teardown_fault)
        if spec.teardown == "twice":
            yield "again"

    return resource


class OpenSpans(SpanProcessor):
    """Counts spans started and ended: every started span must end."""

    def __init__(self) -> None:
        self.started = 0
        self.ended = 0

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        self.started += 1

    def on_end(self, span: Any) -> None:
        self.ended += 1


def build(s: Scenario, h: Harness, cap: TelemetryCapture) -> DataManager:
    if s.telemetry:
        dm = cap.data_manager(teardown_errors=s.policy)
    else:
        dm = DataManager(teardown_errors=s.policy)
    dm.register_context_middleware(
        *(
            (async_middleware if m.is_async else sync_middleware)(i, m, h)
            for i, m in enumerate(s.middleware)
        )
    )
    dm.register_resources(
        **{r.name: (async_resource if r.is_async else sync_resource)(r, h) for r in s.resources}
    )
    return dm


def run_sync(s: Scenario, h: Harness, dm: DataManager) -> tuple[Any, BaseException | None]:
    ctx = dm.context({"scenario": "sync"})
    try:
        with ctx as entered:
            h.idle_seen.add(entered._telemetry is None)
            for name in s.block_creates:
                assert getattr(entered, name) == f"value of {name}"
            if s.block_end == "raise":
                raise h.make("block", s.block_fault)
    except BaseException as error:
        return ctx, error
    return ctx, None


async def run_async(s: Scenario, h: Harness, dm: DataManager) -> tuple[Any, BaseException | None]:
    ctx = dm.context({"scenario": "async"})
    try:
        async with ctx as entered:
            h.idle_seen.add(entered._telemetry is None)
            for name in s.block_creates:
                if s.resource(name).is_async:
                    value = await entered.aresource(name)
                else:
                    value = getattr(entered, name)
                assert value == f"value of {name}"
            if s.block_end == "raise":
                await h.afail("block", s.block_fault)
    except BaseException as error:
        return ctx, error
    return ctx, None


def span_rows(specs: list[SpanSpec]) -> list[tuple[object, ...]]:
    """The rows of the expected spans, in the order they end: an exception is recorded
    (an ``exception`` event) once, on the first span it fails; the spans it propagates
    through afterwards have ERROR and ``error.type`` only."""
    recorded: list[Err] = []
    rows = []
    for spec in specs:
        # Identity: the model passes on the Err it made for an exception as that
        # exception propagates (two framework-made errors may be equal yet distinct).
        first = spec.status == "ERROR" and all(spec.error is not seen for seen in recorded)
        if first and spec.error is not None:
            recorded.append(spec.error)
        rows.append(span_row(spec, first))
    return rows


def span_row(spec: SpanSpec, recorded: bool) -> tuple[object, ...]:
    teardown = ".teardown " in spec.name
    return (
        spec.name,
        spec.parent,
        spec.status,
        expected_type(spec.error) if spec.error is not None else None,
        ("exception",) if recorded else (),
        spec.outcome if teardown else None,
        expected_type(spec.seen) if teardown and spec.seen is not None else None,
    )


@dataclass
class Capture:
    """The shared capture, its open-span tracker and the processor that raises on
    demand (``where`` is ``"none"`` outside a scenario that asks for it)."""

    cap: TelemetryCapture
    tracker: OpenSpans
    raising: RaisingProcessor
    lost: int = 0  # spans whose on_start raised: started, never ended

    def teardown_error_counts(self) -> dict[tuple[Any, Any], float]:
        return {
            (p.attributes["polydatum.resource.name"], p.attributes["error.type"]): p.value
            for p in self.cap.metrics("polydatum.resource.teardown.errors")
        }


def check(s: Scenario, expected: Expected, h: Harness, capture: Capture, run: Any) -> None:
    """Compare one run with the model; every assertion names what differs."""
    cap, tracker = capture.cap, capture.tracker
    cap.clear()
    counts_before = capture.teardown_error_counts() if s.telemetry else {}
    outer_dm = DataManager()
    outer = outer_dm.context() if s.nested else None
    tracer = cap.tracer_provider.get_tracer("fault-injection")
    if outer is not None:
        outer.__enter__()
    with tracer.start_as_current_span("scenario") as root:
        started, ended = tracker.started, tracker.ended
        if not s.telemetry:
            # Nothing records: the lifecycle takes its idle fast path.
            polydatum_telemetry.disable()
        capture.raising.where = s.processor
        try:
            ctx, escaped = run()
        finally:
            capture.raising.where = "none"
            polydatum_telemetry.enable()
        assert h.idle_seen == {not s.telemetry}, f"idle as seen inside: {h.idle_seen}"
        assert trace.get_current_span() is root, "the current span was not restored"
        assert get_active_context() is outer, "the active context was not restored"
    if outer is not None:
        outer.__exit__(None, None, None)
    assert get_active_context() is None

    # generators ran in the expected order and saw the expected exceptions
    actual_log = [(*e[:2], h.describe(e[2])) if len(e) == 3 else e for e in h.log]  # type: ignore[arg-type]
    expected_log = [
        (*e[:2], describe_expected(e[2])) if len(e) == 3 else e for e in expected.events
    ]  # type: ignore[arg-type]
    assert actual_log == expected_log
    # the escaping exception, by identity for injected ones
    assert h.describe(escaped) == describe_expected(expected.escaped)
    assert ctx.state is State.EXITED
    # every suppressed error, in order, in get_resource_exit_errors()
    exit_errors = ctx.get_resource_exit_errors()
    assert [h.describe(e) for _, e, _ in exit_errors] == [
        describe_expected(err) for _, err in expected.recorded
    ]
    # (an interrupt raised again at exit has its traceback grown by that raise)
    assert all(t is type(e) and (tb is e.__traceback__ or e is escaped) for t, e, tb in exit_errors)
    # ... in the logs
    warnings = [
        (e["resource"], e["error_type"], e["log_level"])
        for e in cap.logs
        if e.get("event") == "polydatum.resource.teardown_error_suppressed"
    ]
    assert warnings == [(name, expected_type(err), "warning") for name, err in expected.recorded]
    if not s.telemetry:
        assert cap.names() == ["scenario"]  # the DataManager recorded nothing
        return
    # ... in the counter
    after = capture.teardown_error_counts()  # cumulative: compare the increase
    counted = {k: v - counts_before.get(k, 0.0) for k, v in after.items()}
    want = Counter((name, expected_type(err)) for name, err in expected.recorded)
    assert {k: v for k, v in counted.items() if v} == {k: float(v) for k, v in want.items()}
    # ... and the spans: every one ended, one complete trace, exact rows
    if s.processor == "on_start":
        # Every span polydatum tried to start was lost, and nothing but spans.
        capture.lost += tracker.started - started
        assert cap.names() == ["scenario"]
        # (the one span ended since is the scenario's own)
        assert (tracker.started - started, tracker.ended - ended) == (len(expected.spans), 1)
        return
    assert tracker.started == tracker.ended + capture.lost, "a span was started, never ended"
    records = cap.spans()
    ids = {r.span_id for r in records}
    assert {r.trace_id for r in records} == {root.get_span_context().trace_id}
    assert all(r.parent_id in ids for r in records if r.name != "scenario")
    actual_rows = sorted(
        (
            (
                r.name,
                r.parent,
                r.status,
                r.attributes.get("error.type"),
                r.events,
                r.attributes.get("polydatum.outcome"),
                r.attributes.get("polydatum.exception.seen"),
            )
            for r in records
            if r.name != "scenario"
        ),
        key=repr,
    )
    assert actual_rows == sorted(span_rows(expected.spans), key=repr)
    # A hostile error's message is its placeholder, in the status and in the event.
    unprintable = f"<unprintable {HostileError.__name__}>"
    for span in cap.exporter.get_finished_spans():
        if (span.attributes or {}).get("error.type") == FAULT_TYPES["hostile"]:
            assert span.status.description == unprintable
            messages = {e.attributes.get("exception.message") for e in span.events if e.attributes}
            assert messages <= {unprintable}
    context = cap.span(CONTEXT_SPAN)
    if expected.recorded:
        assert context.attributes["polydatum.teardown_errors"] == len(expected.recorded)
    else:
        assert "polydatum.teardown_errors" not in context.attributes
    suppressed = context.attributes.get("polydatum.suppressed_error.type")
    assert suppressed == (
        expected_type(expected.suppressed) if expected.suppressed is not None else None
    )


# ---------------------------------------------------------------------------- strategies

FAULTS = st.sampled_from(["error", "error", "hostile", "interrupt", "cancel"])


@st.composite
def scenarios(draw: st.DrawFn, is_async: bool) -> Scenario:
    resources = []
    for j in range(draw(st.integers(0, 4))):
        resources.append(
            ResourceSpec(
                name=f"r{j}",
                is_async=is_async and draw(st.booleans()),
                setup=draw(st.sampled_from(["ok", "ok", "ok", "raise", "never_yield"])),
                setup_fault=draw(FAULTS),
                teardown=draw(st.sampled_from(["pass", "pass", "suppress", "raise", "twice"])),
                teardown_fault=draw(FAULTS),
            )
        )
    every = [r.name for r in resources]
    sync_only = [r.name for r in resources if not r.is_async]

    def creates(code_is_async: bool) -> tuple[str, ...]:
        pool = every if code_is_async else sync_only
        if not pool:
            return ()
        return tuple(draw(st.lists(st.sampled_from(pool), max_size=3)))

    middleware = []
    for _ in range(draw(st.integers(0, 4))):
        mw_async = is_async and draw(st.booleans())
        middleware.append(
            MiddlewareSpec(
                is_async=mw_async,
                setup_creates=creates(mw_async),
                setup=draw(st.sampled_from(["ok", "ok", "ok", "ok", "raise", "never_yield"])),
                setup_fault=draw(FAULTS),
                teardown_creates=creates(mw_async),
                teardown=draw(st.sampled_from(["pass", "pass", "suppress", "replace", "twice"])),
                teardown_fault=draw(FAULTS),
            )
        )
    return Scenario(
        is_async=is_async,
        middleware=tuple(middleware),
        resources=tuple(resources),
        block_creates=creates(is_async),
        block_end=draw(st.sampled_from(["ok", "raise"])),
        block_fault=draw(FAULTS),
        policy=draw(st.sampled_from(["record", "record", "raise"])),
        telemetry=draw(st.sampled_from([True, True, True, False])),
        nested=draw(st.booleans()),
        processor=draw(st.sampled_from(["none", "none", "none", "on_start", "on_end"])),
    )


def _settings(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )


# A resource whose teardown raises only a BaseException, under the strict policy.
_BASE_ONLY = Scenario(
    is_async=False,
    middleware=(),
    resources=(ResourceSpec("r0", False, teardown="raise", teardown_fault="interrupt"),),
    block_creates=("r0",),
    policy="raise",
)
# Middleware suppressing a setup error: the original still propagates.
_SUPPRESSED_SETUP = Scenario(
    is_async=False,
    middleware=(
        MiddlewareSpec(False, setup_creates=("r0",), teardown="suppress"),
        MiddlewareSpec(False, setup="raise"),
    ),
    resources=(ResourceSpec("r0", False, teardown="raise"),),
)


@_settings(SYNC_EXAMPLES)
@given(scenarios(is_async=False))
@example(_BASE_ONLY)
@example(_SUPPRESSED_SETUP)
def test_sync_lifecycle_matches_the_reference_model(capture: Capture, scenario: Scenario) -> None:
    expected = predict(scenario)
    h = Harness()
    dm = build(scenario, h, capture.cap)
    check(scenario, expected, h, capture, lambda: run_sync(scenario, h, dm))


@pytest.fixture(scope="module")
def capture() -> Iterator[Capture]:
    """One in-memory telemetry capture for every scenario (cleared between them)."""
    with TelemetryCapture() as cap:
        tracker = OpenSpans()
        cap.tracer_provider.add_span_processor(tracker)
        raising = RaisingProcessor("none")
        cap.tracer_provider.add_span_processor(raising)  # last: after exporter and tracker
        capture = Capture(cap, tracker, raising)
        yield capture
    assert tracker.started == tracker.ended + capture.lost


@pytest.fixture(scope="module")
def runner() -> Iterator[asyncio.Runner]:
    with asyncio.Runner() as r:
        yield r


@_settings(ASYNC_EXAMPLES)
@given(scenarios(is_async=True))
@example(
    Scenario(
        is_async=True,
        middleware=(MiddlewareSpec(True, teardown="suppress"),),
        resources=(ResourceSpec("r0", True, teardown="raise", teardown_fault="cancel"),),
        block_creates=("r0",),
        block_end="raise",
        block_fault="cancel",
    )
)
def test_async_lifecycle_matches_the_reference_model(
    runner: asyncio.Runner, capture: Capture, scenario: Scenario
) -> None:
    expected = predict(scenario)
    h = Harness()
    dm = build(scenario, h, capture.cap)

    def run() -> tuple[Any, BaseException | None]:
        async def main() -> tuple[Any, BaseException | None, object, object]:
            # The current span and active context must be restored inside the task.
            before = (trace.get_current_span(), get_active_context())
            result = await run_async(scenario, h, dm)
            after = (trace.get_current_span(), get_active_context())
            assert after[0] is before[0], "the current span was not restored in the task"
            assert after[1] is before[1], "the active context was not restored in the task"
            return (*result, before, after)

        # The Runner keeps one context of its own: run in a copy of this one.
        ctx, escaped, _, _ = runner.run(main(), context=contextvars.copy_context())
        return ctx, escaped

    check(scenario, expected, h, capture, run)


def test_the_model_itself_on_a_hand_checked_scenario() -> None:
    """The model, checked by hand once, so that a bug in it cannot hide a bug in polydatum."""
    scenario = Scenario(
        is_async=False,
        middleware=(
            MiddlewareSpec(False, setup_creates=("r0",), teardown="suppress"),
            MiddlewareSpec(False, teardown_creates=("r1",), teardown="replace"),
        ),
        resources=(ResourceSpec("r0", False), ResourceSpec("r1", False, teardown="raise")),
        block_end="raise",
    )
    expected = predict(scenario)
    block = Err(label="block", kind="error")
    replaced = Err(label="mw1.teardown", kind="error")
    assert expected.events == [
        ("mw.setup", 0),
        ("res.setup", "r0"),
        ("mw.setup", 1),
        ("mw.teardown", 1, block),
        ("res.setup", "r1"),
        ("mw.teardown", 0, replaced),
        ("res.teardown", "r1", None),
        ("res.teardown", "r0", None),
    ]
    assert expected.escaped is None
    assert expected.suppressed == block
    assert expected.recorded == [("r1", Err(label="r1.teardown", kind="error"))]
