"""The exception rules of the lifecycle, each spelled once.

One step of a middleware or resource generator ends in an :class:`Outcome`. What the
outcome *means* is decided here, and only here:

* :func:`classify` -- whether an exception out of a generator is the one thrown into
  it (it let the context's exception through) or one of its own;
* :func:`after_middleware_teardown` -- the exception that travels on after a middleware
  is torn down (0.9.1's semantics: return from the ``yield`` to suppress, raise to
  replace, anything else lets it through);
* :func:`is_teardown_error` -- whether a resource's teardown step failed (recorded
  and suppressed) or merely let the context's exception through;
* :func:`setup_problem` -- what a middleware or resource callable returned that the
  lifecycle cannot drive (not a generator; an async generator in a sync context);
* the messages of the errors the lifecycle raises, with what to do about them.
"""

from __future__ import annotations

import enum
from types import AsyncGeneratorType
from typing import TYPE_CHECKING, Any

from polydatum.errors import (
    ContextStateError,
    MiddlewareSetupException,
    PolydatumException,
    ResourceException,
    ResourceSetupException,
)

if TYPE_CHECKING:
    from polydatum.lifecycle.records import Registration
    from polydatum.lifecycle.states import State

__all__ = [
    "PROPAGATED",
    "RAISED",
    "RETURNED",
    "SUPPRESSED",
    "YIELDED",
    "Outcome",
    "after_middleware_teardown",
    "cannot_create",
    "cannot_use",
    "classify",
    "dal_not_entered",
    "did_not_yield",
    "is_teardown_error",
    "resource_cycle",
    "resource_set_up_by_another_task",
    "setup_problem",
    "twice_yielded",
]


class Outcome(enum.Enum):
    """What one step of a generator did."""

    YIELDED = "yielded"  # produced a value (setup ok, or a second yield on teardown)
    RETURNED = "returned"  # finished without an exception (never yielded, or clean teardown)
    SUPPRESSED = "suppressed"  # an exception was thrown in and the generator returned
    PROPAGATED = "propagated"  # the exception thrown in came back out unchanged
    RAISED = "raised"  # the generator raised an exception of its own


YIELDED = Outcome.YIELDED
RETURNED = Outcome.RETURNED
SUPPRESSED = Outcome.SUPPRESSED
PROPAGATED = Outcome.PROPAGATED
RAISED = Outcome.RAISED


def classify(thrown: BaseException | None, raised: BaseException) -> Outcome:
    """PROPAGATED when ``raised`` is the exception thrown in, else RAISED."""
    if raised is thrown:
        return PROPAGATED
    if (
        thrown is not None
        and isinstance(thrown, StopIteration | StopAsyncIteration)
        and isinstance(raised, RuntimeError)
        and raised.__cause__ is thrown
    ):
        # PEP 479 turned the StopIteration thrown in into a RuntimeError.
        return PROPAGATED
    return RAISED


def after_middleware_teardown(
    current: BaseException | None, outcome: Outcome, error: BaseException | None
) -> BaseException | None:
    """The exception that travels on to the next (outer) middleware and to the resources.

    Middleware are torn down innermost first, each seeing the exception as it stands:
    returning from the ``yield`` suppresses it, raising another replaces it (a second
    ``yield`` counts as raising :func:`twice_yielded`'s error), anything else lets it
    through. Resources, torn down after all middleware, see the exception left at the
    end; errors they raise never change it (see :func:`is_teardown_error`).
    """
    if outcome is SUPPRESSED:
        return None
    if outcome is RAISED or outcome is YIELDED:
        return error
    return current


def is_teardown_error(outcome: Outcome, error: BaseException | None) -> bool:
    """Whether a resource's teardown step failed: it raised an exception of its own or
    yielded again. Letting the context's exception through is no failure."""
    return error is not None and outcome is not PROPAGATED


def setup_problem(registration: Registration, made: Any, awaits: bool) -> PolydatumException | None:
    """What is wrong with ``made``, the object a middleware or resource callable returned
    when it is not a sync generator; ``None`` for an async generator in a driver that
    ``awaits``."""
    is_async_generator = isinstance(made, AsyncGeneratorType)
    name = registration.name
    if registration.kind == "middleware":
        if not is_async_generator:
            return MiddlewareSetupException(
                f"Middleware {name!r} returned {type(made).__name__}, not a generator: "
                f"middleware must be a generator function that yields once."
            )
        if awaits:
            return None
        return MiddlewareSetupException(
            f"Middleware {name!r} is an async generator: enter the context with "
            f"`async with dm.context()` (or register a sync generator)."
        )
    if not is_async_generator:
        return ResourceSetupException(
            f"Resource {name!r} returned {type(made).__name__}, not a generator: "
            f"resources must be generator callables that yield once."
        )
    if awaits:
        return None
    return ResourceException(
        f"Resource {name!r} is an async generator; create it with "
        f"`await ctx.aresource({name!r})` inside `async with dm.context()`."
    )


def did_not_yield(registration: Registration) -> PolydatumException:
    """A generator that finished on setup without yielding (0.9.1's messages)."""
    if registration.kind == "middleware":
        return MiddlewareSetupException(f"Middleware {registration.name} did not yield on setup.")
    return ResourceSetupException(f"Resource {registration.name} did not yield on setup.")


def twice_yielded(registration: Registration) -> RuntimeError:
    """The error for a generator that yielded again on teardown."""
    kind = registration.kind
    return RuntimeError(
        f"{kind.capitalize()} {registration.name!r} yielded more than once; "
        f"a {kind} generator must yield exactly once."
    )


def resource_cycle(name: str) -> ResourceException:
    """A resource that asked for itself while setting up."""
    return ResourceException(
        f"Resource {name!r} asked for itself while setting up (a cycle): a resource "
        f"cannot use itself; set up what both need in a third resource."
    )


def resource_set_up_by_another_task(name: str) -> ResourceException:
    """A sync read, in a thread running an event loop, of a resource being set up."""
    return ResourceException(
        f"Resource {name!r} is being set up by another caller, maybe another asyncio "
        f"task of this thread's event loop: a sync read (`ctx.{name}`, "
        f"`ctx.resource({name!r})`) cannot wait for it without stopping that task for "
        f"ever; in async code read it with `await ctx.aresource({name!r})`."
    )


def cannot_use(name: str, state: State) -> ContextStateError:
    """A resource read outside the states that allow it."""
    if state.value == "created":
        return ContextStateError(
            f"Cannot use resource {name!r}: the context is in state 'created' "
            f"(not entered yet); use it inside `with dm.context() as ctx:`."
        )
    return ContextStateError(
        f"Cannot use resource {name!r}: the context is in state '{state.value}'; "
        f"resources can only be used while the context is active. "
        f"Open a new context with dm.context()."
    )


def dal_not_entered(name: str) -> ContextStateError:
    """``dm.dal().<name>``: the DAL read from a context that was never entered."""
    return ContextStateError(
        f"Cannot use {name!r}: `dm.dal()` gives a context, not the DAL, and this one was "
        f"never entered; use `with dm.dal() as dal:` (or `async with`), then `dal.{name}`."
    )


def cannot_create(name: str, state: State) -> ContextStateError:
    """A resource created first outside the states that allow it."""
    if state.value != "tearing_down_resources":  # not entered yet, or exited
        return cannot_use(name, state)
    return ContextStateError(
        f"Cannot create resource {name!r}: the context is in state "
        f"'{state.value}' and resources are being torn down; create it "
        f"earlier (during setup, in the block, or in middleware teardown)."
    )
