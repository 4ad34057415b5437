"""Framework integrations: one module per framework, each a thin adapter.

* :mod:`polydatum.integrations.asgi` -- any ASGI app (Starlette, FastAPI, ...): a
  middleware opening one async context per HTTP request / websocket session, and
  lifespan handling (validate at startup, dispose engines at shutdown).
* :mod:`polydatum.integrations.fastapi` -- a dependency giving the request's DAL.
* :mod:`polydatum.integrations.wsgi` -- any WSGI app: one context per request, ended
  before the status goes out (the body is buffered up to ``buffer_limit``; a larger
  or streamed body keeps the context open until the server closes it).
* :mod:`polydatum.integrations.flask` -- Flask: one context per request, ``dal()`` in views.
* :mod:`polydatum.integrations.celery` -- Celery: one context per task, Meta and trace
  carried from the producer across the broker.

Importing a module whose framework is not installed raises :class:`ImportError`
naming the extra to install. This package itself only holds what they share:
the request-boundary rule (:func:`close_for_response`), disposing resources at
shutdown and generating request ids.

The request boundary
--------------------
Every HTTP integration ends the request's context *before* the response status goes
out, with what the response says about the request:

* an exception the framework turned into a response itself (an ``HTTPException``, an
  exception handler, ``abort``) ends the context with that exception: middleware see
  it, resources roll back;
* otherwise an error status -- by default ``status >= 400``, configurable with
  ``error_status=`` -- ends it with :class:`~polydatum.errors.ErrorResponse`: the work
  rolls back and the response is sent as the application made it;
* otherwise the context ends normally and commits.

If ending the context raises (a failed commit, a middleware or teardown error that
propagates), the application's response is not sent: the error goes to the
framework, which answers 5xx. If the context rolled back for an exception while the
application answered with a success status, :class:`~polydatum.errors.HandledAsSuccess`
is raised (from that exception): a 2xx or 3xx would claim work that was rolled back.
"""

from __future__ import annotations

import inspect
import re
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

import structlog

from polydatum.errors import ErrorResponse, HandledAsSuccess

if TYPE_CHECKING:
    from polydatum.context import DataAccessContext
    from polydatum.registry import DataManager

__all__ = [
    "ErrorStatus",
    "accept_request_id",
    "aclose_for_response",
    "adispose_resources",
    "close_for_response",
    "dispose_resources",
    "is_error_status",
    "new_request_id",
]

#: Decides whether a response status is an error, whose request's work rolls back.
ErrorStatus = Callable[[int], bool]


def is_error_status(status: int) -> bool:
    """The default rule: 4xx and 5xx roll the request's work back; 1xx-3xx commit it.

    3xx commit because a redirect after a successful POST is how web forms answer.
    """
    return status >= 400


def _ending(
    status: int, handled: BaseException | None, error_status: ErrorStatus
) -> BaseException | None:
    """The exception a request's context ends with, given its response."""
    if handled is not None:
        return handled
    if error_status(status):
        return ErrorResponse(status)
    return None


def _surfaced(
    status: int, ending: BaseException | None, raised: BaseException | None
) -> BaseException | None:
    """What must replace the application's response, given what ending the context
    with ``ending`` raised (``raised``; None if it exited normally); None if it stands."""
    if raised is None:
        return None  # committed, or a middleware suppressed the error on purpose
    if raised is not ending:
        return raised  # a failed commit, or a teardown / middleware error
    # The error the request ended with came back: its work rolled back, as it should.
    # The response stands if it says so (an error status); a success status would lie.
    if isinstance(raised, ErrorResponse) or status >= 400:
        return None
    return HandledAsSuccess(status, raised)


def close_for_response(
    ctx: DataAccessContext,
    status: int,
    handled: BaseException | None = None,
    error_status: ErrorStatus = is_error_status,
) -> None:
    """End a request's (sync) context before its response goes out (see the module docs).

    ``status`` is the response the application made, ``handled`` the exception the
    framework turned into it (if any). Returns when the response may be sent; raises
    the error that must replace it (the framework then answers 5xx).
    """
    ending = _ending(status, handled, error_status)
    raised: BaseException | None
    try:
        if ending is None:
            ctx.__exit__(None, None, None)
            raised = None
        else:
            suppressed = ctx.__exit__(type(ending), ending, ending.__traceback__)
            raised = None if suppressed else ending
    except BaseException as error:
        raised = error
    replacement = _surfaced(status, ending, raised)
    if replacement is None:
        return
    if replacement is raised:
        raise replacement
    raise replacement from raised


async def aclose_for_response(
    ctx: DataAccessContext,
    status: int,
    handled: BaseException | None = None,
    error_status: ErrorStatus = is_error_status,
) -> None:
    """:func:`close_for_response` for a context entered with ``async with``."""
    ending = _ending(status, handled, error_status)
    raised: BaseException | None
    try:
        if ending is None:
            await ctx.__aexit__(None, None, None)
            raised = None
        else:
            suppressed = await ctx.__aexit__(type(ending), ending, ending.__traceback__)
            raised = None if suppressed else ending
    except BaseException as error:
        raised = error
    replacement = _surfaced(status, ending, raised)
    if replacement is None:
        return
    if replacement is raised:
        raise replacement
    raise replacement from raised


def missing_framework(module: str, package: str, extra: str, error: ImportError) -> NoReturn:
    """Raise the ImportError an integration module gives when its framework is missing."""
    raise ImportError(
        f"{module} needs {package}, which is not installed: pip install 'polydatum[{extra}]'"
    ) from error


_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def new_request_id() -> str:
    """A fresh request id (32 hex digits) for requests that arrive without one."""
    return uuid.uuid4().hex


def accept_request_id(value: object) -> str:
    """``value`` if it is a well-formed request id, else a new one.

    A client-supplied id is kept only if it is 1-128 characters of letters, digits
    and ``._:-``; anything else (too long, spaces, control characters) is replaced
    so that hostile input never reaches logs and spans verbatim.
    """
    if isinstance(value, str) and _REQUEST_ID.fullmatch(value):
        return value
    return new_request_id()


def _disposables(dm: DataManager) -> list[tuple[str, Any]]:
    """``(name, dispose)`` for every registered resource that has a ``dispose`` method.

    A resource object registered under two names is disposed once.
    """
    seen: set[int] = set()
    found: list[tuple[str, Any]] = []
    for name, resource in dm.registered_resources().items():
        dispose = getattr(resource, "dispose", None)
        if not callable(dispose) or id(resource) in seen:
            continue
        seen.add(id(resource))
        found.append((name, dispose))
    return found


def _failed(name: str, error: BaseException) -> None:
    structlog.get_logger("polydatum").warning(
        "polydatum.resource.dispose_failed",
        resource=name,
        error_type=type(error).__qualname__,
        exc_info=(type(error), error, error.__traceback__),
    )


def dispose_resources(dm: DataManager) -> dict[str, Exception]:
    """Call ``dispose()`` on every registered resource that has one (closing SQL pools).

    For process shutdown in synchronous servers and workers (Flask, WSGI, Celery).
    An async ``dispose()`` (an :class:`~polydatum.sql.AsyncSQLResource`) is run to
    completion with :func:`asyncio.run`; from inside a running event loop use
    :func:`adispose_resources` instead. Every resource is disposed even if one
    fails: failures are logged (``polydatum.resource.dispose_failed``) and returned
    by resource name.
    """
    import asyncio

    failures: dict[str, Exception] = {}
    for name, dispose in _disposables(dm):
        try:
            result = dispose()
            if inspect.isawaitable(result):
                asyncio.run(_await(result))
        except Exception as error:
            _failed(name, error)
            failures[name] = error
    return failures


async def _await(awaitable: Any) -> Any:
    return await awaitable


async def adispose_resources(dm: DataManager) -> dict[str, Exception]:
    """:func:`dispose_resources` for asyncio code: async ``dispose()`` methods are awaited."""
    failures: dict[str, Exception] = {}
    for name, dispose in _disposables(dm):
        try:
            result = dispose()
            if inspect.isawaitable(result):
                await result
        except Exception as error:
            _failed(name, error)
            failures[name] = error
    return failures
