"""The context lifecycle: its states, its legal transitions, and how generators are driven.

Everything a :class:`~polydatum.context.DataAccessContext` does between ``with`` and
the end of the block is a step of this module's state machine:

============================  =================  ===========================
state                         event              next state
============================  =================  ===========================
``created``                   ``enter``          ``setting_up``
``setting_up``                ``setup_done``     ``active``
``setting_up``                ``setup_failed``   ``tearing_down_middleware``
``active``                    ``exit``           ``tearing_down_middleware``
``tearing_down_middleware``   ``middleware_done`` ``tearing_down_resources``
``tearing_down_resources``    ``resources_done`` ``exited``
============================  =================  ===========================

The table is :data:`TRANSITIONS`; every state change is looked up in it, through
:func:`transition` or its per-event views (:data:`ON_EXIT` and the like, which the
context's hot paths use to save a call), and anything not in the table is refused by
:func:`transition` with an error naming the state and what to do. Resources may be
*created* while setting up, active or tearing down middleware (middleware teardown may
need one), and *used* until resources are torn down (:data:`RESOURCE_CREATE_STATES`,
:data:`RESOURCE_USE_STATES`).

Generators (middleware and resources) are driven one step at a time by
:func:`drive` / :func:`adrive`, each inside the generator's own
:class:`contextvars.Context`, so that whatever a generator sets (a contextvar, an
OpenTelemetry current span) never leaks into the caller. The outcome of a step is
classified into an :class:`Outcome`; what the outcome *means* (suppression,
replacement, a recorded teardown error) is decided by :func:`after_middleware_teardown`
and :func:`step_error`, which hold the exception semantics of DESIGN.md §2 for both the
sync and the async driver in :mod:`polydatum.context`. This module knows nothing of
OpenTelemetry: telemetry is reached through the opaque ``scope`` objects a
:class:`StepObserver` hands out.
"""

from __future__ import annotations

import contextvars
import enum
from collections.abc import AsyncGenerator, Generator
from operator import itemgetter
from typing import Any, Protocol

from polydatum.errors import ContextStateError


class State(enum.Enum):
    """The states of one context, in the order a successful context visits them."""

    CREATED = "created"
    SETTING_UP = "setting_up"
    ACTIVE = "active"
    TEARING_DOWN_MIDDLEWARE = "tearing_down_middleware"
    TEARING_DOWN_RESOURCES = "tearing_down_resources"
    EXITED = "exited"

    # Members are singletons: identity hashing (C-level) instead of Enum's
    # Python-level hash of the name, which showed up in profiles of the hot path.
    __hash__ = object.__hash__


#: ``(state, event) -> next state``: every legal transition, and nothing else.
TRANSITIONS: dict[tuple[State, str], State] = {
    (State.CREATED, "enter"): State.SETTING_UP,
    (State.SETTING_UP, "setup_done"): State.ACTIVE,
    (State.SETTING_UP, "setup_failed"): State.TEARING_DOWN_MIDDLEWARE,
    (State.ACTIVE, "exit"): State.TEARING_DOWN_MIDDLEWARE,
    (State.TEARING_DOWN_MIDDLEWARE, "middleware_done"): State.TEARING_DOWN_RESOURCES,
    (State.TEARING_DOWN_RESOURCES, "resources_done"): State.EXITED,
}

#: States in which a resource not yet created may be set up on first access.
RESOURCE_CREATE_STATES = frozenset({State.SETTING_UP, State.ACTIVE, State.TEARING_DOWN_MIDDLEWARE})
#: States in which an already-created resource may be used.
RESOURCE_USE_STATES = RESOURCE_CREATE_STATES | {State.TEARING_DOWN_RESOURCES}

_ADVICE: dict[tuple[State, str], str] = {
    (State.ACTIVE, "enter"): "a context is single-use and this one is already entered; "
    "call dm.context() again for a new one",
    (State.SETTING_UP, "enter"): "a context is single-use and this one is already entered; "
    "call dm.context() again for a new one",
    (State.EXITED, "enter"): "a context is single-use; call dm.context() again for a new one",
    (State.CREATED, "exit"): "it was never entered; use `with dm.context() as ctx:` "
    "(or `async with`) so that enter and exit pair up",
    (State.EXITED, "exit"): "it has already exited; exit a context exactly once",
}


def _on(event: str) -> dict[State, State]:
    return {state: target for (state, e), target in TRANSITIONS.items() if e == event}


#: :data:`TRANSITIONS` seen one event at a time, for the context's hot paths:
#: ``ON_EXIT.get(state) or transition(state, "exit")`` takes the step the table allows
#: with one look-up and no call, and leaves refusals to :func:`transition` (which
#: raises). The table decides either way; these views are derived from it.
ON_ENTER = _on("enter")
ON_SETUP_DONE = _on("setup_done")
ON_SETUP_FAILED = _on("setup_failed")
ON_EXIT = _on("exit")
ON_MIDDLEWARE_DONE = _on("middleware_done")
ON_RESOURCES_DONE = _on("resources_done")


def transition(state: State, event: str) -> State:
    """Return the state after ``event``; :class:`ContextStateError` if the table forbids it."""
    target = TRANSITIONS.get((state, event))
    if target is not None:
        return target
    advice = _ADVICE.get((state, event))
    if advice is None:
        allowed = sorted(e for (s, e) in TRANSITIONS if s is state) or ["none"]
        advice = f"events allowed in this state: {', '.join(allowed)}"
    raise ContextStateError(
        f"Cannot {event.replace('_', ' ')} a context in state '{state.value}': {advice}."
    )


#: What ``next(gen, FINISHED)`` returns when the generator finished: stepping a
#: generator this way costs no ``StopIteration`` (an exception per teardown otherwise).
#: Private to this package, so no generator can yield it.
FINISHED: Any = object()


class Outcome(enum.Enum):
    """What one step of a generator did."""

    YIELDED = "yielded"  # produced a value (setup ok, or a second yield on teardown)
    RETURNED = "returned"  # finished without an exception (never yielded, or clean teardown)
    SUPPRESSED = "suppressed"  # an exception was thrown in and the generator returned
    PROPAGATED = "propagated"  # the exception thrown in came back out unchanged
    RAISED = "raised"  # the generator raised an exception of its own


# The members as module constants, for the code that runs at every step: CPython 3.11's
# EnumType has a ``__getattr__``, so ``Outcome.YIELDED`` is an unspecialised look-up
# through it each time (about the cost of a small function call).
YIELDED = Outcome.YIELDED
RETURNED = Outcome.RETURNED
SUPPRESSED = Outcome.SUPPRESSED
PROPAGATED = Outcome.PROPAGATED
RAISED = Outcome.RAISED


class StepScope(Protocol):
    """What the telemetry layer hands out for one step; entered inside the generator's context.

    ``enter`` runs at the start of the step, inside the generator's own
    :class:`contextvars.Context`. That context is private to the generator and runs
    nothing between its steps, so whatever ``enter`` sets there (the step's span as
    the current span) needs no undoing: the next step's ``enter`` replaces it, and
    the caller never sees it.
    """

    def enter(self) -> None: ...


def callable_name(obj: Any) -> str:
    """The name a middleware is known by: its ``__name__``, else its class's name."""
    name = getattr(obj, "__name__", None)
    return name if isinstance(name, str) else type(obj).__name__


class GeneratorRecord(tuple[Any, ...]):
    """A middleware or resource generator in flight, with the context it runs in.

    ``GeneratorRecord.new(kind, name, position, gen, is_async, source)``. ``cv`` is a
    copy of the caller's :class:`contextvars.Context` taken when the generator is
    created; every step of the generator runs inside it.

    A tuple underneath: one is made per middleware and per resource of every
    context, and a tuple is built without running any Python code, its fields read
    through C-level ``itemgetter`` properties.
    """

    __slots__ = ()

    kind: str = property(itemgetter(0))  # type: ignore[assignment]  # "middleware" / "resource"
    _name: str | None = property(itemgetter(1))  # type: ignore[assignment]
    position: int = property(itemgetter(2))  # type: ignore[assignment]
    gen: Any = property(itemgetter(3))  # a Generator or an AsyncGenerator
    is_async: bool = property(itemgetter(4))  # type: ignore[assignment]
    #: The middleware callable (its name is derived from it lazily) or the resource factory.
    source: Any = property(itemgetter(5))
    cv: contextvars.Context = property(itemgetter(6))  # type: ignore[assignment]

    @classmethod
    def new(
        cls,
        kind: str,
        name: str | None,
        position: int,
        gen: Any,
        is_async: bool,
        source: Any = None,
    ) -> GeneratorRecord:
        """A record for ``gen``, with a copy of the current context for it to run in."""
        return cls((kind, name, position, gen, is_async, source, contextvars.copy_context()))

    @property
    def name(self) -> str:
        """The resource's registered name, or the middleware callable's name.

        Derived lazily: the idle fast path needs a name only when something fails.
        """
        name: str | None = self[1]
        return name if name is not None else callable_name(self[5])


def as_record(rec: tuple[Any, ...]) -> GeneratorRecord:
    """``rec`` as a :class:`GeneratorRecord`: the idle path keeps its records as plain
    tuples of the same fields (built in one step) and wraps them only when a name or
    a field by name is needed (an error, an async teardown)."""
    return rec if type(rec) is GeneratorRecord else GeneratorRecord(rec)


def classify(exc: BaseException | None, raised: BaseException) -> Outcome:
    """PROPAGATED when ``raised`` is the exception thrown in (``exc``), else RAISED."""
    if raised is exc:
        return PROPAGATED
    if (
        exc is not None
        and isinstance(exc, StopIteration | StopAsyncIteration)
        and isinstance(raised, RuntimeError)
        and raised.__cause__ is exc
    ):
        # PEP 479 turned the StopIteration we threw in into a RuntimeError.
        return PROPAGATED
    return RAISED


def step(
    gen: Generator[Any, None, None], exc: BaseException | None, scope: StepScope | None
) -> tuple[Outcome, Any]:
    """Advance a sync generator one step; call it inside the generator's context
    (``rec.cv.run(step, rec.gen, exc, scope)``), as :func:`drive` does."""
    if scope is not None:
        scope.enter()
    try:
        if exc is None:
            value = next(gen, FINISHED)  # a generator that returns raises nothing here
            if value is FINISHED:
                return RETURNED, None
        else:
            value = gen.throw(exc)
    except StopIteration:
        return (RETURNED if exc is None else SUPPRESSED), None
    except BaseException as raised:
        return classify(exc, raised), raised
    return YIELDED, value


def drive(
    rec: GeneratorRecord, exc: BaseException | None, scope: StepScope | None
) -> tuple[Outcome, Any]:
    """Advance a sync generator one step (``next`` or ``throw(exc)``) in its own context.

    Returns the outcome and the yielded value or the exception raised.
    """
    return rec.cv.run(step, rec.gen, exc, scope)


async def _step_async(
    agen: AsyncGenerator[Any, None], exc: BaseException | None, scope: StepScope | None
) -> tuple[Outcome, Any]:
    if scope is not None:
        scope.enter()
    try:
        value = await (agen.asend(None) if exc is None else agen.athrow(exc))
    except StopAsyncIteration:
        return (RETURNED if exc is None else SUPPRESSED), None
    except BaseException as raised:
        return classify(exc, raised), raised
    return YIELDED, value


class _RunIn:
    """Await a coroutine with every resumption inside ``cv`` (no extra task needed)."""

    __slots__ = ("coro", "cv")

    def __init__(self, cv: contextvars.Context, coro: Any) -> None:
        self.cv = cv
        self.coro = coro

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, cv = self.coro, self.cv
        send: Any = None
        thrown: BaseException | None = None
        while True:
            try:
                yielded = cv.run(coro.send, send) if thrown is None else cv.run(coro.throw, thrown)
            except StopIteration as stop:
                return stop.value
            try:
                send = yield yielded
                thrown = None
            except BaseException as error:  # cancellation and friends go into the coroutine
                thrown = error


async def adrive(
    rec: GeneratorRecord, exc: BaseException | None, scope: StepScope | None
) -> tuple[Outcome, Any]:
    """Advance a generator one step; async generators are awaited in their own context."""
    if not rec.is_async:
        return drive(rec, exc, scope)
    result: tuple[Outcome, Any] = await _RunIn(rec.cv, _step_async(rec.gen, exc, scope))
    return result


def close_quietly(rec: GeneratorRecord) -> BaseException | None:
    """Close a sync generator that yielded when it should have finished."""
    try:
        rec.cv.run(rec.gen.close)
    except BaseException as error:
        return error
    return None


async def aclose_quietly(rec: GeneratorRecord) -> BaseException | None:
    """Async twin of :func:`close_quietly`."""
    if not rec.is_async:
        return close_quietly(rec)
    try:
        await _RunIn(rec.cv, rec.gen.aclose())
    except BaseException as error:
        return error
    return None


def twice_yielded(rec: GeneratorRecord) -> RuntimeError:
    """The error for a generator that yielded again on teardown."""
    return RuntimeError(
        f"{rec.kind.capitalize()} {rec.name!r} yielded more than once; "
        f"a {rec.kind} generator must yield exactly once."
    )


def step_error(rec: GeneratorRecord, outcome: Outcome, value: Any) -> BaseException | None:
    """The exception a teardown step ended with (``None`` when it finished cleanly).

    A second ``yield`` becomes :func:`twice_yielded`'s ``RuntimeError``.
    """
    if outcome is RAISED or outcome is PROPAGATED:
        error: BaseException = value
        return error
    if outcome is YIELDED:
        return twice_yielded(rec)
    return None


def after_middleware_teardown(
    exc: BaseException | None, outcome: Outcome, error: BaseException | None
) -> BaseException | None:
    """The exception that travels on to the next (outer) middleware and to the resources.

    This is the heart of DESIGN.md §2: middleware are torn down innermost first, each
    seeing the exception as it stands; returning from the ``yield`` suppresses it,
    raising another replaces it (a second ``yield`` counts as raising
    ``RuntimeError``), anything else lets it through. Resources, torn down after
    all middleware (most recently created first), all see the exception left at the
    end, and errors they raise never change it: they are recorded instead.
    """
    if outcome is SUPPRESSED:
        return None
    if outcome is RAISED or outcome is YIELDED:
        return error
    return exc


class StepObserver(Protocol):
    """The lifecycle events the telemetry layer is told about (see :mod:`polydatum.telemetry`)."""

    def step_started(self, kind: str, phase: str, name: str, position: int) -> StepScope: ...

    def step_finished(
        self,
        scope: StepScope,
        outcome: Outcome,
        error: BaseException | None,
        seen: BaseException | None,
    ) -> None: ...
