"""ASGI: one polydatum context per HTTP request and per websocket session.

Works with any ASGI application (Starlette, FastAPI, Quart, a bare ASGI callable);
needs no framework import. Add it as the innermost layer you trace, for example::

    app = Starlette(routes=[...])
    app.add_middleware(PolydatumMiddleware, data_manager=dm)
    app = OpenTelemetryMiddleware(app)          # optional: the HTTP server span

For each HTTP request and websocket session the middleware:

* builds Meta with ``meta(scope)`` (default :func:`default_meta`: ``request_id``
  from the ``x-request-id`` header or freshly generated, ``method``, and ``route``,
  the route *template* when the app exposes Starlette-style routes -- never the
  headers wholesale, which carry cookies and tokens);
* enters ``async with data_manager.context(meta)`` so that the context span is a
  child of whatever span is current (the HTTP server span of
  ``opentelemetry-instrumentation-asgi``, when installed);
* runs the app, then closes the context *after* the app returned, that is after the
  response was sent: resource teardown (commit, close) never delays the client, and
  teardown spans and errors are still recorded inside the request's trace (the
  context span stays a child of the request span even if the request span already
  ended -- ``opentelemetry-instrumentation-asgi`` ends it with the last body chunk).
  When a resource failed to tear down and the request span is still recording (a
  websocket session, other instrumentations), it also gets
  ``polydatum.teardown_errors`` (the count).
* echoes the request id in the ``x-request-id`` response header (unless the app set
  one), so a client can quote it.

On the ``lifespan`` protocol it validates the DataManager (:meth:`DataManager.validate`)
when the app reports startup complete -- a failure turns into ``lifespan.startup.failed``
(the server refuses to start; the app is then asked to shut down, so its own shutdown
handlers still run) -- and disposes every resource with a ``dispose()`` (SQL engine
pools) when the app reports shutdown complete. Apps without lifespan support: call
``dm.validate()`` yourself and :func:`polydatum.integrations.adispose_resources`.

In a handler, the context is ``scope["polydatum.context"]`` (and is the active
context, so services and ``data_manager.get_active_context()`` work as usual);
:func:`get_context` / :func:`get_dal` read it from a scope or a Starlette request.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

from opentelemetry import trace

from polydatum.errors import ValidationError
from polydatum.integrations import accept_request_id, adispose_resources
from polydatum.meta import Meta

if TYPE_CHECKING:
    from polydatum.context import DataAccessContext
    from polydatum.dal import DataAccessLayer, DataManager

__all__ = [
    "SCOPE_KEY",
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


class PolydatumMiddleware:
    """ASGI middleware: one context per request / websocket session; lifespan hooks.

    ``meta(scope)`` builds the Meta (default :func:`default_meta`); ``validate`` and
    ``dispose`` turn the lifespan behaviour off when false; ``response_header`` is
    the header the request id is echoed in (``None``: do not echo).
    """

    def __init__(
        self,
        app: ASGIApp,
        data_manager: DataManager,
        *,
        meta: MetaFactory | None = None,
        validate: bool = True,
        dispose: bool = True,
        response_header: str | None = "x-request-id",
    ) -> None:
        self.app = app
        self.data_manager = data_manager
        self.meta = meta
        self.validate = validate
        self.dispose = dispose
        self.response_header = (
            response_header.lower().encode("latin-1") if response_header is not None else None
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        meta = self.meta(scope) if self.meta is not None else default_meta(scope, self.app)
        if kind == "http" and self.response_header is not None:
            send = self._echo_request_id(send, meta)
        request_span = trace.get_current_span()
        ctx = self.data_manager.context(meta if isinstance(meta, Meta) else dict(meta))
        try:
            async with ctx:
                scope[SCOPE_KEY] = ctx
                await self.app(scope, receive, send)
        finally:
            errors = ctx.get_resource_exit_errors()
            if errors and request_span.is_recording():
                request_span.set_attribute("polydatum.teardown_errors", len(errors))

    def _echo_request_id(self, send: Send, meta: Mapping[str, Any] | Meta) -> Send:
        header = self.response_header
        rid = meta.get("request_id")
        if header is None or not isinstance(rid, str):
            return send

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or ())
                if not any(bytes(k).lower() == header for k, _ in headers):
                    headers.append((header, rid.encode("latin-1")))
                    message = {**message, "headers": headers}
            await send(message)

        return send_with_id

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        refused = False

        async def lifespan_receive() -> Message:
            if refused:  # the server will not ask: let the app undo its own startup
                return {"type": "lifespan.shutdown"}
            return await receive()

        async def lifespan_send(message: Message) -> None:
            nonlocal refused
            kind = message["type"]
            if kind == "lifespan.startup.complete" and self.validate:
                try:
                    self.data_manager.validate()
                except ValidationError as error:
                    refused = True
                    await send({"type": "lifespan.startup.failed", "message": str(error)})
                    return
            elif kind == "lifespan.shutdown.complete":
                if self.dispose:
                    await adispose_resources(self.data_manager)
                if refused:
                    return
            await send(message)

        await self.app(scope, lifespan_receive, lifespan_send)


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
