"""Stepping an async generator inside its own :class:`contextvars.Context`.

Sync generators are stepped by the driver itself, with ``cv.run(next, gen, FINISHED)``
and ``cv.run(gen.throw, exc)``. An async generator's step is a coroutine, and every
resumption of it must run inside the generator's context: :class:`RunIn` awaits a
coroutine that way, in the caller's task.
"""

from __future__ import annotations

import contextvars
from collections.abc import AsyncGenerator, Generator
from typing import Any

from polydatum.lifecycle.rules import RETURNED, SUPPRESSED, YIELDED, Outcome, classify

__all__ = ["FINISHED", "RunIn", "aclose", "astep"]

#: What ``next(gen, FINISHED)`` returns when the generator finished: a teardown that
#: returns raises no ``StopIteration`` this way. Private to polydatum, so no
#: generator yields it.
FINISHED: Any = object()


class RunIn:
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


async def _step(
    agen: AsyncGenerator[Any, None], thrown: BaseException | None
) -> tuple[Outcome, Any]:
    try:
        value = await (agen.asend(None) if thrown is None else agen.athrow(thrown))
    except StopAsyncIteration:
        return (RETURNED, FINISHED) if thrown is None else (SUPPRESSED, None)
    except BaseException as raised:
        return classify(thrown, raised), raised
    return YIELDED, value


async def astep(
    agen: AsyncGenerator[Any, None],
    cv: contextvars.Context,
    thrown: BaseException | None,
) -> tuple[Outcome, Any]:
    """Advance an async generator one step (``asend(None)`` or ``athrow(thrown)``)
    inside ``cv``: the outcome, and the value yielded, the exception raised, or
    :data:`FINISHED` when it returned (as ``next(gen, FINISHED)`` gives for a sync one)."""
    result: tuple[Outcome, Any] = await RunIn(cv, _step(agen, thrown))
    return result


async def aclose(agen: AsyncGenerator[Any, None], cv: contextvars.Context) -> None:
    """Close an async generator that yielded when it should have finished."""
    await RunIn(cv, agen.aclose())
