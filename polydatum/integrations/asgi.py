"""ASGI: one polydatum context per HTTP request and per websocket session.

Works with any ASGI application (Starlette, FastAPI, Quart, a bare ASGI callable);
needs no framework import. Add it as the innermost layer you trace, for example::

    app = Starlette(routes=[...])
    app.add_middleware(PolydatumMiddleware, data_manager=dm)
    app = OpenTelemetryMiddleware(app)          # optional: the HTTP server span

For each HTTP request and websocket session the middleware builds Meta with
``meta(scope)`` (default :func:`default_meta`: ``request_id`` from the
``x-request-id`` header or freshly generated, ``method``, and ``route``, the route
*template* when the app exposes Starlette-style routes -- never the headers
wholesale, which carry cookies and tokens) and enters ``async with
data_manager.context(meta)``, so that the context span is a child of whatever span
is current (the HTTP server span of ``opentelemetry-instrumentation-asgi``, when
installed). It echoes the request id in the ``x-request-id`` response header
(unless the app set one), so that a client can quote it.

The request boundary (HTTP)
---------------------------
The context -- and so its transaction -- ends *before the response status goes
out*, so that a 2xx always means the work is committed (the rule of
:mod:`polydatum.integrations`, applied with
:func:`~polydatum.integrations.aclose_for_response`):

* The middleware holds ``http.response.start``. When the response is complete (the
  body message with ``more_body`` false; the last ``http.response.trailers`` when
  the start announced trailers; an ``http.response.pathsend``) it ends the context
  and only then forwards the held messages. If ending it raises (a failed commit, a
  middleware or teardown error that propagates), the held messages are never sent:
  the error is raised out of ``send``, so Starlette's / FastAPI's
  ServerErrorMiddleware answers 500 (for a bare ASGI app, the server does).
* An exception the framework turned into a response reaches the context. Starlette
  (and so FastAPI) sends an exception handler's response from inside its ``except``
  block, so the exception being handled when the response starts
  (``sys.exc_info()``) is the one the response stands for: the context ends with it,
  middleware see it and resources roll back. This covers ``HTTPException``,
  ``@app.exception_handler`` (sync or async), FastAPI's ``RequestValidationError``,
  at the route level and in the app's ExceptionMiddleware. Its limit: a response
  started in another task carries no exception (a ``BaseHTTPMiddleware`` between
  this middleware and the endpoint relays the endpoint's response from its own
  task; a handler answering with a ``StreamingResponse`` streams it from a task of
  its own); then the status rule below applies.
* Otherwise an error status -- ``error_status(status)``, by default
  :func:`~polydatum.integrations.is_error_status`: 4xx and 5xx -- ends the context
  with :class:`~polydatum.errors.ErrorResponse` (the work rolls back; the response
  is sent as the app made it); 1xx-3xx commit.
* A handler that answers a success status for an exception cannot have it both
  ways: the context rolled back for the exception, so the response is not sent and
  :class:`HandledAsSuccess` is raised (the client gets 500). A context middleware
  that suppresses the exception on purpose makes the work commit and the response
  stand.
* Streaming: when the first body message has ``more_body`` true, the status and the
  chunks go out as the app produces them (the context stays open, so the stream
  may use the DAL); the context ends before the final body message is forwarded.
  If ending it fails, the final message is not sent and the error propagates: the
  server aborts the connection and the client sees an incomplete response, never a
  complete 2xx.
* If the app returns before its response is complete (the client disconnected
  during a stream and Starlette stopped it; an app that never finished), the
  context ends with :class:`IncompleteResponse`: the work rolls back.
* An exception raised out of the app ends the context with it and is re-raised
  (the framework or server answers 5xx).
* Ending the context is shielded from cancellation (with anyio, which Starlette and
  FastAPI use): a client disconnect that cancels a response stream cannot stop a
  commit or a rollback half-way.
* Background tasks (Starlette / FastAPI) run after the response, so after the
  request's context ended: the request's DAL raises
  :class:`~polydatum.errors.NoActiveContextError` there. A background task opens
  its own context: ``async with dm.dal() as dal: ...``.

A resource teardown error that was suppressed is recorded as usual; the request
span also gets ``polydatum.teardown_errors`` (the count).

Websocket sessions get one context each, ended when the session ends.

On the ``lifespan`` protocol it validates the DataManager (:meth:`DataManager.validate`)
when the app reports startup complete. A failure turns into ``lifespan.startup.failed``
with the problems as its message (the server refuses to start), the app is then
asked to shut down (its own shutdown handlers run, resources are disposed), and the
:class:`~polydatum.errors.ValidationError` is raised out of the lifespan call, the way
Starlette reports a failed startup: ``with TestClient(app):`` raises it. At shutdown
complete it disposes every resource with a ``dispose()`` (SQL engine pools). Apps
without lifespan support: call ``dm.validate()`` yourself and
:func:`polydatum.integrations.adispose_resources`.

In a handler, the context is ``scope["polydatum.context"]`` (and is the active
context, so services and ``data_manager.get_active_context()`` work as usual);
:func:`get_context` / :func:`get_dal` read it from a scope or a Starlette request.
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

from opentelemetry import trace

from polydatum.errors import HandledAsSuccess, IncompleteResponse, ValidationError
from polydatum.integrations import (
    ErrorStatus,
    accept_request_id,
    aclose_for_response,
    adispose_resources,
    is_error_status,
)
from polydatum.meta import Meta

try:
    from anyio import CancelScope as _CancelScope
except ImportError:  # pragma: no cover - anyio comes with Starlette, FastAPI and httpx
    _CancelScope = None  # type: ignore[assignment,misc]

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from polydatum.access import DataAccessLayer
    from polydatum.context import DataAccessContext
    from polydatum.registry import DataManager

__all__ = [
    "SCOPE_KEY",
    "HandledAsSuccess",
    "IncompleteResponse",
    "PolydatumMiddleware",
    "default_meta",
    "get_context",
    "get_dal",
    "route_template",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
MetaFactory = Callable[[Scope], "Mapping[str, Any] | Meta"]

#: The scope key holding the request's :class:`~polydatum.context.DataAccessContext`.
SCOPE_KEY = "polydatum.context"


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            try:
                return bytes(value).decode("latin-1")
            except (TypeError, ValueError):
                return None
    return None


def request_id(scope: Scope, header: str = "x-request-id") -> str:
    """The request id the client sent in ``header`` if well-formed, else a new one
    (see :func:`polydatum.integrations.accept_request_id`)."""
    return accept_request_id(_header(scope, header.lower().encode("latin-1")))


def route_template(scope: Scope, app: Any = None) -> str | None:
    """The template of the route that will serve ``scope`` (``/books/{book_id}``), or None.

    Uses Starlette-style routing (``app.routes``, each with ``matches(scope)``):
    Starlette and FastAPI expose it; for other frameworks this returns ``None``.
    ``app`` is tried first (when it has routes), then ``scope["app"]``, which
    Starlette sets before its middleware runs. Mounted sub-applications are
    followed (their prefix is included).
    """
    for router in (app, scope.get("app")):
        if getattr(router, "routes", None) is not None:
            return _match(router, dict(scope), "")
    return None


def _match(router: Any, scope: dict[str, Any], prefix: str) -> str | None:
    routes = getattr(router, "routes", None)
    if routes is None:
        return None
    partial: str | None = None
    for route in routes:
        matches = getattr(route, "matches", None)
        if matches is None:
            continue
        try:
            match, child = matches(scope)
        except Exception:  # a route that cannot judge this scope type
            continue
        kind = getattr(match, "name", "")
        if kind == "FULL":
            path = getattr(route, "path", "")
            sub = getattr(route, "app", None)
            if getattr(sub, "routes", None) is not None and not hasattr(route, "endpoint"):
                inner = _match(sub, {**scope, **child}, prefix + path)
                return inner if inner is not None else prefix + path
            return prefix + path
        if kind == "PARTIAL" and partial is None:  # e.g. the method is not allowed
            partial = prefix + getattr(route, "path", "")
    return partial


def default_meta(scope: Scope, app: Any = None) -> dict[str, Any]:
    """Meta for one request: ``request_id``, ``method`` and, when known, ``route``.

    ``method`` is the HTTP method, or ``"WEBSOCKET"`` for a websocket session.
    Extend it rather than replace it::

        def meta(scope):
            return {**default_meta(scope), "user_id": scope["user"].id}
    """
    meta: dict[str, Any] = {
        "request_id": request_id(scope),
        "method": scope.get("method", "GET") if scope["type"] == "http" else "WEBSOCKET",
    }
    route = route_template(scope, app)
    if route is not None:
        meta["route"] = route
    return meta


#: The messages that carry a response body (``pathsend``: the whole body at once).
_BODY = frozenset({"http.response.body", "http.response.zerocopysend", "http.response.pathsend"})


#: What an app sends when it has shut down (resources are disposed then).
_SHUTDOWN_DONE = frozenset({"lifespan.shutdown.complete", "lifespan.shutdown.failed"})


def _shielded() -> AbstractContextManager[Any]:
    """A scope that cancellation cannot enter (anyio's), or nothing without anyio."""
    if _CancelScope is None:  # pragma: no cover - see the import
        return nullcontext()
    return _CancelScope(shield=True)


class _Exchange:
    """One HTTP request's boundary: holds the response until its context has ended.

    ``send`` is what the app is given. It holds ``http.response.start`` (and, for a
    response with trailers, what comes before the last trailers), ends the context
    when the response is complete and forwards the held messages only if that
    succeeded. A response whose first body message announces more is streamed: the
    start and the chunks go out as they come, and only the final message waits for
    the context to end. See the module docs for the rules.
    """

    __slots__ = (
        "ctx",
        "downstream",
        "error_status",
        "failure",
        "handled",
        "held",
        "open",
        "outer",
        "request_id",
        "request_span",
        "response_header",
        "status",
        "streaming",
        "trailers",
    )

    def __init__(
        self,
        ctx: DataAccessContext,
        downstream: Send,
        error_status: ErrorStatus,
        response_header: bytes | None,
        request_id: object,
    ) -> None:
        self.ctx = ctx
        self.downstream = downstream
        self.error_status = error_status
        self.response_header = response_header if isinstance(request_id, str) else None
        self.request_id = request_id
        #: The span current when the request arrived (the HTTP server span, if any).
        self.request_span: Span = trace.get_current_span()
        #: The exception already being handled when the request arrived (an outer
        #: ``except`` block re-running the app): never one the response stands for.
        self.outer = sys.exc_info()[1]
        self.open = True  # the context has not been ended yet
        self.failure: BaseException | None = None  # ending it raised: nothing more goes out
        self.held: list[Message] = []  # what waits for the context to end
        self.status: int | None = None  # the response's, once it started
        self.handled: BaseException | None = None
        self.streaming = False
        self.trailers = False

    async def send(self, message: Message) -> None:
        """The app's ``send``: see the class docs."""
        if self.failure is not None:  # the response was withheld: nothing may replace it
            raise self.failure
        if not self.open:  # the response went out (a later message is the server's business)
            await self.downstream(message)
            return
        kind = message["type"]
        if kind == "http.response.start":
            if self.status is not None:
                raise RuntimeError("the ASGI app sent 'http.response.start' twice")
            self._hold_start(message)
            return
        if self.status is None or (kind not in _BODY and kind != "http.response.trailers"):
            await self.downstream(message)  # not part of a response (http.response.debug...)
            return
        if self._completes(kind, message):
            await self._end_for_response()
            held, self.held = self.held, []
            for earlier in held:
                await self.downstream(earlier)
            await self.downstream(message)
            return
        if not self.streaming and kind != "http.response.trailers" and message.get("more_body"):
            self.streaming = True  # the first body message announces more: stream it
            held, self.held = self.held, []
            for earlier in held:
                await self.downstream(earlier)
        if self.streaming:
            await self.downstream(message)
        else:
            self.held.append(message)  # a body before the trailers the start announced

    def _hold_start(self, message: Message) -> None:
        header = self.response_header
        if header is not None:
            headers = list(message.get("headers") or ())
            if not any(bytes(k).lower() == header for k, _ in headers):
                assert isinstance(self.request_id, str)
                headers.append((header, self.request_id.encode("latin-1")))
                message = {**message, "headers": headers}
        self.held.append(message)
        self.status = int(message["status"])
        self.trailers = bool(message.get("trailers"))
        # Starlette sends an exception handler's response inside its ``except`` block.
        handled = sys.exc_info()[1]
        self.handled = handled if handled is not self.outer else None

    def _completes(self, kind: str, message: Message) -> bool:
        """Whether ``message`` is the last one of the response."""
        if self.trailers:
            return kind == "http.response.trailers" and not message.get("more_trailers")
        return kind == "http.response.pathsend" or (
            kind != "http.response.trailers" and not message.get("more_body")
        )

    async def _end_for_response(self) -> None:
        """End the context for the complete response; raises what must replace it."""
        self.open = False
        status, handled = self.status, self.handled
        assert status is not None
        try:
            with _shielded():
                await aclose_for_response(self.ctx, status, handled, self.error_status)
        except BaseException as error:
            self.held = []
            self.failure = error
            raise
        finally:
            self.handled = None  # a traceback holds frames: do not keep it past the end
            self._report_teardown_errors()

    async def end_with(self, error: BaseException) -> None:
        """End the context with ``error``, which the app raised or which stands for a
        response it never completed. Raises only what replaced ``error``."""
        self.open = False
        try:
            with _shielded():
                await self.ctx.__aexit__(type(error), error, error.__traceback__)
        finally:
            self._report_teardown_errors()

    def incomplete(self) -> IncompleteResponse:
        """The error for an app that returned without completing its response."""
        if self.status is None:
            sent = "the response status was never sent"
        elif not self.streaming:
            sent = "the final body message was never sent"
        else:
            sent = "the stream ended without its final body message"
        return IncompleteResponse(
            f"the application returned before its response was complete ({sent})"
        )

    def _report_teardown_errors(self) -> None:
        errors = self.ctx.get_resource_exit_errors()
        if errors and self.request_span.is_recording():
            self.request_span.set_attribute("polydatum.teardown_errors", len(errors))


class PolydatumMiddleware:
    """ASGI middleware: one context per request / websocket session; lifespan hooks.

    ``meta(scope)`` builds the Meta (default :func:`default_meta`); ``error_status``
    decides which response statuses produced without an exception roll the request's
    work back (default :func:`~polydatum.integrations.is_error_status`: 4xx and 5xx);
    ``validate`` and ``dispose`` turn the lifespan behaviour off when false;
    ``response_header`` is the header the request id is echoed in (``None``: do not
    echo). See the module docs for the request boundary.
    """

    def __init__(
        self,
        app: ASGIApp,
        data_manager: DataManager,
        *,
        meta: MetaFactory | None = None,
        error_status: ErrorStatus = is_error_status,
        validate: bool = True,
        dispose: bool = True,
        response_header: str | None = "x-request-id",
    ) -> None:
        self.app = app
        self.data_manager = data_manager
        self.meta = meta
        self.error_status = error_status
        self.validate = validate
        self.dispose = dispose
        self.response_header = (
            response_header.lower().encode("latin-1") if response_header is not None else None
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def _context(self, scope: Scope) -> tuple[DataAccessContext, Mapping[str, Any] | Meta]:
        meta = self.meta(scope) if self.meta is not None else default_meta(scope, self.app)
        return self.data_manager.context(meta if isinstance(meta, Meta) else dict(meta)), meta

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx, meta = self._context(scope)
        exchange = _Exchange(
            ctx, send, self.error_status, self.response_header, meta.get("request_id")
        )
        await ctx.__aenter__()
        scope[SCOPE_KEY] = ctx
        try:
            await self.app(scope, receive, exchange.send)
        except BaseException as error:
            if exchange.open:
                await exchange.end_with(error)
            raise
        if exchange.failure is not None:  # the app swallowed what its send raised
            raise exchange.failure
        if exchange.open:
            await exchange.end_with(exchange.incomplete())

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx, _ = self._context(scope)
        request_span = trace.get_current_span()
        try:
            async with ctx:
                scope[SCOPE_KEY] = ctx
                await self.app(scope, receive, send)
        finally:
            errors = ctx.get_resource_exit_errors()
            if errors and request_span.is_recording():
                request_span.set_attribute("polydatum.teardown_errors", len(errors))

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal: ValidationError | None = None

        async def lifespan_receive() -> Message:
            if refusal is not None:  # the server will not ask: let the app undo its startup
                return {"type": "lifespan.shutdown"}
            return await receive()

        async def lifespan_send(message: Message) -> None:
            nonlocal refusal
            kind = message["type"]
            if kind == "lifespan.startup.complete" and self.validate:
                try:
                    self.data_manager.validate()
                except ValidationError as error:
                    refusal = error
                    await send({"type": "lifespan.startup.failed", "message": str(error)})
                    return
            elif self.dispose and kind in _SHUTDOWN_DONE:
                await adispose_resources(self.data_manager)
            if refusal is None:  # after a refusal the server expects no more messages
                await send(message)

        try:
            await self.app(scope, lifespan_receive, lifespan_send)
        finally:
            if refusal is not None:
                # As Starlette reports a failed startup (``with TestClient(app):`` raises
                # it); an error the app's own shutdown raised becomes its __context__.
                raise refusal


def get_context(connection: Any) -> DataAccessContext:
    """The context of a request: pass an ASGI scope or anything with ``.scope``."""
    scope = getattr(connection, "scope", connection)
    ctx = scope.get(SCOPE_KEY) if isinstance(scope, Mapping) else None
    if ctx is None:
        raise LookupError(
            "no polydatum context for this request: add PolydatumMiddleware to the app "
            "(app.add_middleware(PolydatumMiddleware, data_manager=dm))"
        )
    return ctx  # type: ignore[no-any-return]


def get_dal(connection: Any) -> DataAccessLayer:
    """The DAL of a request's context (see :func:`get_context`)."""
    return get_context(connection).dal
