"""WSGI: one polydatum context per request, for any WSGI framework.

Wrap the application (inside any tracing middleware, so the context span is a child
of the request span)::

    app = PolydatumWSGIMiddleware(app, dm)
    app = OpenTelemetryMiddleware(app)   # opentelemetry-instrumentation-wsgi, optional

The context is entered before the app is called and is active -- services and
``dm.get_active_context()`` work -- while the app runs and while its body is
produced. The request's context is ``environ["polydatum.context"]``.

The request boundary
--------------------
The context ends *before the response status goes out* (the rule is
:func:`polydatum.integrations.close_for_response`): a 2xx means the work is committed.
PEP 3333 servers send the status with the first body bytes, so the middleware holds
the response back. It calls the app, keeps the status and headers it passes to
``start_response`` and collects its body, up to ``buffer_limit`` bytes (default
:data:`DEFAULT_BUFFER_LIMIT`, 1 MiB). When the body ends within the limit, the
middleware closes the app's iterable, ends the context, and only then calls the
server's ``start_response`` and returns the collected body:

* the context ends with the exception the app passed to ``start_response`` as
  ``exc_info`` (the app turned it into that response), else with
  :class:`~polydatum.errors.ErrorResponse` when ``error_status(status)`` (default:
  ``status >= 400``), else normally (commit);
* if ending it raises (a failed commit: :class:`~polydatum.errors.CommitError`, or
  the database's error under ``transaction_middleware``), the middleware raises that
  error instead of responding. Nothing has been sent, so the server answers 500
  (werkzeug and waitress send their own "500 Internal Server Error" page);
* an exception raised by the app, or while its body is produced, ends the context
  with that exception (rollback) and propagates: the server answers 500 too.

A body larger than the limit is *streamed*: the status and the bytes collected so far
go out, the rest is passed on as the app produces it, and the context stays open until
the body is exhausted. It ends then -- before the server finishes the response -- with
the same rule; if ending it fails, the error is raised from the iteration, so the
server aborts the transfer: the client gets an incomplete response (a chunked body
without its final chunk, or fewer bytes than the ``Content-Length``), never a complete
2xx. An error while streaming rolls back and breaks the transfer the same way. If the
server closes the body before it was exhausted (the client disconnected, a write
failed), the context ends with :class:`~polydatum.errors.IncompleteResponse`
(:data:`CLOSED_EARLY`): rollback. (An HTTP/1.0 response without ``Content-Length``
ends when the connection closes, so such a client cannot tell a broken stream from a
complete one: serve streams over HTTP/1.1.)

``buffer_limit=None`` always collects the whole body; ``buffer_limit=0`` streams every
non-empty body. The collected body is held in memory, per request in flight.

Meta comes from ``meta(environ)`` (default :func:`default_meta`: ``request_id`` from
the ``X-Request-Id`` header or generated, and ``method``; WSGI has no route
template, so there is no ``route``). The request id is echoed in the
``x-request-id`` response header. No framework is needed; for Flask prefer
:mod:`polydatum.integrations.flask`, which knows the route.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import Token
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry.context import Context

from polydatum.context import observer_of
from polydatum.errors import IncompleteResponse
from polydatum.integrations import (
    ErrorStatus,
    accept_request_id,
    close_for_response,
    is_error_status,
)
from polydatum.meta import Meta
from polydatum.telemetry import span_context_of

if TYPE_CHECKING:
    from polydatum.context import DataAccessContext
    from polydatum.registry import DataManager

__all__ = [
    "CLOSED_EARLY",
    "DEFAULT_BUFFER_LIMIT",
    "ENVIRON_KEY",
    "IncompleteResponse",
    "PolydatumWSGIMiddleware",
    "ResponseBody",
    "default_meta",
    "get_context",
]

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]
#: ``(status code, the exception the application turned into the response or None)``.
Outcome = tuple[int, BaseException | None]

#: The environ key holding the request's :class:`~polydatum.context.DataAccessContext`.
ENVIRON_KEY = "polydatum.context"

#: How many body bytes the middleware holds back by default before streaming (1 MiB).
DEFAULT_BUFFER_LIMIT = 1024 * 1024


#: Why a streamed body's context ends with :class:`~polydatum.errors.IncompleteResponse`.
CLOSED_EARLY = (
    "the server closed the response before its body was complete "
    "(the client disconnected or a write failed)"
)


def request_id(environ: Mapping[str, Any], header: str = "x-request-id") -> str:
    """The client's request id from ``header`` if well-formed (1-128 characters of
    letters, digits, ``._:-``), else a new one."""
    return accept_request_id(environ.get("HTTP_" + header.upper().replace("-", "_")))


def default_meta(environ: Mapping[str, Any]) -> dict[str, Any]:
    """Meta for one WSGI request: ``request_id`` and ``method`` (never headers wholesale)."""
    return {"request_id": request_id(environ), "method": environ.get("REQUEST_METHOD", "GET")}


class PolydatumWSGIMiddleware:
    """WSGI middleware: one context per request, ended before the status goes out.

    ``meta(environ)`` builds the Meta (default :func:`default_meta`);
    ``response_header`` is where the request id is echoed (``None``: not echoed);
    ``error_status(status)`` tells which statuses roll the work back (default
    :func:`~polydatum.integrations.is_error_status`: ``>= 400``); ``buffer_limit`` is
    how many body bytes are held back before the response is streamed instead (see the
    module docs; ``None``: no limit).
    """

    def __init__(
        self,
        app: WSGIApp,
        data_manager: DataManager,
        *,
        meta: Callable[[Environ], Mapping[str, Any] | Meta] | None = None,
        response_header: str | None = "x-request-id",
        error_status: ErrorStatus = is_error_status,
        buffer_limit: int | None = DEFAULT_BUFFER_LIMIT,
    ) -> None:
        if buffer_limit is not None and buffer_limit < 0:
            raise ValueError(f"buffer_limit must be >= 0 or None, not {buffer_limit!r}")
        self.app = app
        self.data_manager = data_manager
        self.meta = meta or default_meta
        self.response_header = response_header
        self.error_status = error_status
        self.buffer_limit = buffer_limit

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        meta = self.meta(environ)
        ctx = self.data_manager.context(meta if isinstance(meta, Meta) else dict(meta))
        rid = meta.get("request_id")
        header = self.response_header
        if header is not None and isinstance(rid, str):
            start_response = _echo(start_response, header, rid)
        response = _HeldResponse(start_response, self.buffer_limit)
        ctx.__enter__()
        environ[ENVIRON_KEY] = ctx
        try:
            app_body = self.app(environ, response.start_response)
        except BaseException:
            ctx.__exit__(*sys.exc_info())
            raise  # even if middleware suppressed it: there is no response to send
        body = ResponseBody(app_body, ctx, response.outcome, self.error_status, response.chunks)
        if response.streaming:  # write() went past the limit: the status is out already
            return body
        if body.prefetch(self.buffer_limit):
            response.send()  # the context has ended: the status may go out
            return response.chunks
        try:
            response.send()  # too big to hold back: stream it
        except BaseException as error:
            body.abort(error)
            raise
        return body


def _echo(start_response: StartResponse, header: str, rid: str) -> StartResponse:
    lower = header.lower()

    def start_with_id(status: str, headers: list[tuple[str, str]], *exc_info: Any) -> Any:
        if not any(name.lower() == lower for name, _ in headers):
            headers = [*headers, (header, rid)]
        return start_response(status, headers, *exc_info)

    return start_with_id


class _HeldResponse:
    """One request's status, headers and first body bytes, held back from the server.

    The app gets :meth:`start_response`; :meth:`send` passes what it gave on to the
    server's ``start_response``. Bytes the app passes to the ``write()`` callable are
    collected with the body; past the limit they start the response (streaming).
    """

    def __init__(self, server_start_response: StartResponse, limit: int | None) -> None:
        self._server_start_response = server_start_response
        self._limit = limit
        self.status: str | None = None
        self.headers: list[tuple[str, str]] = []
        self.handled: BaseException | None = None
        self.chunks: list[bytes] = []
        self._size = 0
        self._sent = False  # the status went to the server
        self._server_write: Callable[[bytes], object] | None = None

    @property
    def streaming(self) -> bool:
        """Whether the response went to the server while the app was still writing."""
        return self._server_write is not None

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], None]:
        if exc_info is not None:
            try:
                if self._sent:  # the server raises if the status is out already
                    self._server_start_response(status, headers, exc_info)
                self.handled = exc_info[1]
            finally:
                exc_info = None  # no traceback cycle (PEP 3333)
        elif self.status is not None:
            raise AssertionError("start_response() called a second time without exc_info")
        self.status, self.headers = status, list(headers)
        return self.write

    def write(self, data: bytes) -> None:
        """PEP 3333's imperative ``write()``: collected, or passed on once streaming."""
        if self._server_write is not None:
            self._server_write(data)
            return
        if self.status is None:
            raise AssertionError("write() called before start_response()")
        self.chunks.append(data)
        self._size += len(data)
        if self._limit is not None and self._size > self._limit:
            self._server_write = self.send()
            for chunk in self.chunks:
                self._server_write(chunk)
            self.chunks.clear()

    def outcome(self) -> Outcome:
        """The status code the app answered with and the exception it handled, if any."""
        if self.status is None:
            raise AssertionError("the application returned without calling start_response()")
        return int(self.status.split(" ", 1)[0]), self.handled

    def send(self) -> Callable[[bytes], object]:
        """Pass the held status and headers on to the server's ``start_response``."""
        if self.status is None:
            raise AssertionError("the application returned without calling start_response()")
        write: Callable[[bytes], object] = self._server_start_response(self.status, self.headers)
        self._sent = True
        return write


class ResponseBody:
    """A response body that ends the request's context once it has been produced.

    ``body`` is the application's iterable; ``ctx`` the request's context (``None``
    while there is none: :meth:`adopt` hands over one opened while the body runs);
    ``outcome()`` gives the response's status code and the exception the application
    turned into it, when the body is exhausted; ``buffered`` are chunks collected
    before (they are sent first).

    Iterating pulls the application's chunks with the context's span current (service
    calls made while streaming nest under it). When the body is exhausted it is closed
    and the context ends with :func:`~polydatum.integrations.close_for_response`:
    whatever that raises (a failed commit) is raised from the iteration, so the server
    aborts the transfer. An error raised by the body ends the context with that error
    and propagates. :meth:`close` before the end (the server gave up: the client
    disconnected) closes the body and ends the context with
    :class:`~polydatum.errors.IncompleteResponse` (rollback). :meth:`prefetch`
    collects the body up to a size, so that the context can end before the status is
    sent.
    """

    def __init__(
        self,
        body: Iterable[bytes],
        ctx: DataAccessContext | None,
        outcome: Callable[[], Outcome],
        error_status: ErrorStatus = is_error_status,
        buffered: list[bytes] | None = None,
    ) -> None:
        self._body = body
        self._chunks: Iterator[bytes] | None = None
        self._ctx = ctx
        self._outcome = outcome
        self._error_status = error_status
        self._buffered: list[bytes] = buffered if buffered is not None else []
        self._sent = 0  # how many of the buffered chunks iteration has handed out
        self._ended = False  # the body was closed and the context ended
        self._released = False  # the context is someone else's to end

    def adopt(self, ctx: DataAccessContext) -> None:
        """Make ``ctx`` (opened while the body runs) the context this body ends."""
        if self._ctx is None and not self._released and not self._ended:
            self._ctx = ctx

    def release(self) -> DataAccessContext | None:
        """Stop owning the context, and return it for the caller to end.

        The body itself is still produced and closed as usual; it just ends no context.
        """
        ctx, self._ctx = self._ctx, None
        self._released = True
        return ctx

    def prefetch(self, limit: int | None) -> bool:
        """Collect the body until it ends or exceeds ``limit`` bytes (``None``: no limit).

        True when it ended: then the body is closed and the context has ended (the
        collected chunks may be sent with any status); raises what ending raised.
        False when the limit was exceeded: the rest is produced by iterating.
        """
        size = sum(len(chunk) for chunk in self._buffered)
        while limit is None or size <= limit:
            chunk = self._pull()
            if chunk is None:
                return True
            self._buffered.append(chunk)
            size += len(chunk)
        return False

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self._sent < len(self._buffered):
            self._sent += 1
            return self._buffered[self._sent - 1]
        if self._buffered:
            self._buffered.clear()
            self._sent = 0
        chunk = self._pull()
        if chunk is None:
            raise StopIteration
        return chunk

    def _pull(self) -> bytes | None:
        """The application's next chunk; None once exhausted (and the context ended)."""
        if self._ended:
            return None
        span_ctx = _span_context(self._ctx)
        token = otel_context.attach(span_ctx) if span_ctx is not None else None
        try:
            try:
                if self._chunks is None:
                    self._chunks = iter(self._body)
                return next(self._chunks)
            finally:
                if token is not None:
                    _release_current(token, span_ctx)
        except StopIteration:
            pass
        except BaseException as error:
            self._end(error)
            raise
        self._end(None)
        return None

    def close(self) -> None:
        """PEP 3333's ``close()``: before the body was exhausted, the transfer was cut short."""
        self.abort(IncompleteResponse(CLOSED_EARLY))

    def abort(self, error: BaseException) -> None:
        """Close the body and end the context with ``error`` (rollback), unless it has
        ended already. ``error`` itself is not raised; an error that ending raises is."""
        if not self._ended:
            self._end(error)

    def _end(self, error: BaseException | None) -> None:
        """Close the application's body, then end the context.

        ``error``: None when the body was exhausted (the response's status decides),
        else what broke it off (the context ends with it; it is not raised from here).
        """
        self._ended = True
        ctx, self._ctx = self._ctx, None
        outcome: Outcome | None = None
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
            if error is None:
                outcome = self._outcome()
        except BaseException as failure:
            if ctx is not None:
                _end_in_place(ctx, _end_with, ctx, failure if error is None else error)
            raise
        if ctx is None:
            return
        if outcome is None:
            assert error is not None
            _end_in_place(ctx, _end_with, ctx, error)
        else:
            status, handled = outcome
            _end_in_place(ctx, close_for_response, ctx, status, handled, self._error_status)


def _end_with(ctx: DataAccessContext, error: BaseException) -> None:
    """End ``ctx`` with ``error`` (its work rolls back). Only an error that ending
    raised in its place (a teardown or middleware error) propagates."""
    try:
        ctx.__exit__(type(error), error, error.__traceback__)
    except BaseException as raised:
        if raised is not error:
            raise


def _span_context(ctx: DataAccessContext | None) -> Any:
    """The OpenTelemetry context in which ``ctx``'s span is current (None: not recording)."""
    return span_context_of(observer_of(ctx)) if ctx is not None else None


def _release_current(token: Token[Context], attached: Any) -> None:
    """Undo ``attach(attached)`` unless the body's own code has changed the current
    OpenTelemetry context meanwhile (Flask ends its request span in a teardown that
    ``stream_with_context`` runs at the end of the body): then its change stands."""
    if otel_context.get_current() is attached:
        otel_context.detach(token)


def _end_in_place(ctx: DataAccessContext, end: Callable[..., None], *args: Any) -> None:
    """Run ``end(*args)`` (which exits ``ctx``) without disturbing the current OpenTelemetry
    context of the server's thread.

    Exiting a context resets the token it attached when it was entered, bringing back
    what was current then. That is right only while the context's span is still
    current; a streamed body ends its context after the framework or the tracing
    middleware reset their own, later, tokens, and must not revive a request span
    that has ended.
    """
    current = otel_context.get_current()
    span_ctx = _span_context(ctx)
    try:
        end(*args)
    finally:
        if span_ctx is not None and current is not span_ctx:
            otel_context.attach(current)  # the token is dropped: this is the thread's state


def get_context(environ: Mapping[str, Any]) -> DataAccessContext:
    """The request's context (``LookupError`` when the middleware is not installed)."""
    ctx = environ.get(ENVIRON_KEY)
    if ctx is None:
        raise LookupError(
            "no polydatum context for this request: wrap the app in PolydatumWSGIMiddleware"
        )
    return ctx  # type: ignore[no-any-return]
