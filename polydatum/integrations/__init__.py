"""Framework integrations: one module per framework, each a thin adapter.

* :mod:`polydatum.integrations.asgi` -- any ASGI app (Starlette, FastAPI, ...): a
  middleware opening one async context per HTTP request / websocket session, and
  lifespan handling (validate at startup, dispose engines at shutdown).
* :mod:`polydatum.integrations.fastapi` -- a dependency giving the request's DAL.
* :mod:`polydatum.integrations.wsgi` -- any WSGI app: one context per request, open
  until the server closes the response iterable.
* :mod:`polydatum.integrations.flask` -- Flask: one context per request, ``dal()`` in views.
* :mod:`polydatum.integrations.celery` -- Celery: one context per task, Meta and trace
  carried from the producer across the broker.

Importing a module whose framework is not installed raises :class:`ImportError`
naming the extra to install. This package itself only holds what they share:
disposing resources at shutdown and generating request ids.
"""

from __future__ import annotations

import inspect
import re
import uuid
from typing import TYPE_CHECKING, Any, NoReturn

import structlog

if TYPE_CHECKING:
    from polydatum.dal import DataManager

__all__ = [
    "accept_request_id",
    "adispose_resources",
    "dispose_resources",
    "new_request_id",
]


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
    for name, resource in dm._resource_manager.items():
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
