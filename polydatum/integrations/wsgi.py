"""WSGI: one polydatum context per request, for any WSGI framework.

Wrap the application (inside any tracing middleware, so the context span is a child
of the request span)::

    app = PolydatumWSGIMiddleware(app, dm)
    app = OpenTelemetryMiddleware(app)   # opentelemetry-instrumentation-wsgi, optional

The context is entered before the app is called and stays open -- and active, so
services and ``dm.get_active_context()`` work -- while the server iterates the
response body; it closes when the server calls ``close()`` on the response iterable
(PEP 3333 guarantees it does, after the last byte, on errors and on client
disconnects). An error raised by the app or while producing the body reaches the
context (middleware and resources see it: rollback). The request's context is
``environ["polydatum.context"]``.

Meta comes from ``meta(environ)`` (default :func:`default_meta`: ``request_id`` from
the ``X-Request-Id`` header or generated, and ``method``; WSGI has no route
template, so there is no ``route``). The request id is echoed in the
``x-request-id`` response header. No framework is needed; for Flask prefer
:mod:`polydatum.integrations.flask`, which knows the route.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context

from polydatum.integrations import accept_request_id
from polydatum.meta import Meta

if TYPE_CHECKING:
    from polydatum.context import DataAccessContext
    from polydatum.dal import DataManager

__all__ = ["ENVIRON_KEY", "PolydatumWSGIMiddleware", "default_meta", "get_context"]

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]

#: The environ key holding the request's :class:`~polydatum.context.DataAccessContext`.
ENVIRON_KEY = "polydatum.context"


def request_id(environ: Mapping[str, Any], header: str = "x-request-id") -> str:
    """The client's request id from ``header`` if well-formed (1-128 characters of
    letters, digits, ``._:-``), else a new one."""
    return accept_request_id(environ.get("HTTP_" + header.upper().replace("-", "_")))


def default_meta(environ: Mapping[str, Any]) -> dict[str, Any]:
    """Meta for one WSGI request: ``request_id`` and ``method`` (never headers wholesale)."""
    return {"request_id": request_id(environ), "method": environ.get("REQUEST_METHOD", "GET")}


class PolydatumWSGIMiddleware:
    """WSGI middleware: one context per request, closed when the response is closed.

    ``meta(environ)`` builds the Meta (default :func:`default_meta`);
    ``response_header`` is where the request id is echoed (``None``: not echoed).
    """

    def __init__(
        self,
        app: WSGIApp,
        data_manager: DataManager,
        *,
        meta: Callable[[Environ], Mapping[str, Any] | Meta] | None = None,
        response_header: str | None = "x-request-id",
    ) -> None:
        self.app = app
        self.data_manager = data_manager
        self.meta = meta or default_meta
        self.response_header = response_header

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        meta = self.meta(environ)
        ctx = self.data_manager.context(meta if isinstance(meta, Meta) else dict(meta))
        rid = meta.get("request_id")
        header = self.response_header
        if header is not None and isinstance(rid, str):
            start_response = _echo(start_response, header, rid)
        ctx.__enter__()
        environ[ENVIRON_KEY] = ctx
        try:
            body = self.app(environ, start_response)
        except BaseException:
            ctx.__exit__(*sys.exc_info())
            raise  # even if middleware suppressed it: there is no response to send
        return _ClosingBody(body, ctx)


def _echo(start_response: StartResponse, header: str, rid: str) -> StartResponse:
    lower = header.lower()

    def start_with_id(status: str, headers: list[tuple[str, str]], *exc_info: Any) -> Any:
        if not any(name.lower() == lower for name, _ in headers):
            headers = [*headers, (header, rid)]
        return start_response(status, headers, *exc_info)

    return start_with_id


class _ClosingBody:
    """The app's response iterable; closing it closes the context (once)."""

    def __init__(self, body: Iterable[bytes], ctx: DataAccessContext) -> None:
        self._body = body
        self._ctx: DataAccessContext | None = ctx
        self._error: tuple[type[BaseException], BaseException, TracebackType | None] | None = None

    def __iter__(self) -> Iterator[bytes]:
        # Tracing middleware outside (opentelemetry-instrumentation-wsgi) makes its
        # request span current while it iterates; make the context span current for
        # each chunk instead, so that service calls made while streaming nest under
        # it. Attached and detached around each ``next`` -- never across a yield.
        ctx = self._ctx
        telemetry = ctx._telemetry if ctx is not None else None
        span_context = getattr(telemetry, "parent_ctx", None)
        chunks = iter(self._body)
        while True:
            token = otel_context.attach(span_context) if span_context is not None else None
            try:
                chunk = next(chunks)
            except StopIteration:
                return
            except BaseException as error:
                self._error = (type(error), error, error.__traceback__)
                raise
            finally:
                if token is not None:
                    otel_context.detach(token)
            yield chunk

    def close(self) -> None:
        ctx, self._ctx = self._ctx, None
        if ctx is None:
            return
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        except BaseException as error:
            if self._error is None:
                self._error = (type(error), error, error.__traceback__)
            raise
        finally:
            if self._error is not None:
                ctx.__exit__(*self._error)
            else:
                ctx.__exit__(None, None, None)


def get_context(environ: Mapping[str, Any]) -> DataAccessContext:
    """The request's context (``LookupError`` when the middleware is not installed)."""
    ctx = environ.get(ENVIRON_KEY)
    if ctx is None:
        raise LookupError(
            "no polydatum context for this request: wrap the app in PolydatumWSGIMiddleware"
        )
    return ctx  # type: ignore[no-any-return]
