"""ASGI / Starlette / FastAPI integration, through a real uvicorn server and real HTTP.

The app is wrapped in ``opentelemetry-instrumentation-asgi``'s OpenTelemetryMiddleware
(with the test's tracer provider) so that the polydatum context span must be a child
of the HTTP server span.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any, NamedTuple

import httpx
import pytest
from fastapi import FastAPI, WebSocket
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from polydatum import DataManager, Service
from polydatum.context import DataAccessContext
from polydatum.integrations.asgi import PolydatumMiddleware, default_meta, route_template
from polydatum.integrations.fastapi import DAL, Context
from polydatum.testing import TelemetryCapture
from tests._servers import uvicorn_server, wait_for

META = ("request_id", "method", "route")


class Books(Service):
    async def get(self, book_id: int) -> dict[str, Any]:
        shelf = await self._ctx.aresource("shelf")
        return {"id": book_id, "title": shelf[book_id]}

    def count(self) -> int:
        return len(self._ctx.pool)


class Flaky:
    """A resource whose teardown can be held (to prove it runs after the response was
    sent) or made to fail; ``dispose()`` is async, like an async SQL engine's."""

    def __init__(self) -> None:
        self.hold: threading.Event | None = None
        self.fail = False
        self.log: list[str] = []

    async def __call__(self, ctx: DataAccessContext) -> AsyncIterator[dict[int, str]]:
        self.log.append("setup")
        try:
            yield {1: "Dune", 2: "Emma"}
        except Exception as error:
            self.log.append(f"rollback {type(error).__name__}")
            raise
        if self.hold is not None:
            await asyncio.to_thread(self.hold.wait, 10)
        if self.fail:
            raise OSError("connection reset while closing")
        self.log.append("teardown")

    async def dispose(self) -> None:
        self.log.append("dispose")


class SyncPool:
    def __init__(self) -> None:
        self.disposed = 0

    def __call__(self, ctx: DataAccessContext) -> Iterator[list[str]]:
        yield ["Dune", "Emma"]

    def dispose(self) -> None:
        self.disposed += 1


class Built(NamedTuple):
    app: Any
    dm: DataManager
    shelf: Flaky
    pool: SyncPool


def build_app(cap: TelemetryCapture) -> Built:
    dm = cap.data_manager(meta_attributes=META)
    dm.register_services(books=Books())
    shelf, pool = Flaky(), SyncPool()
    dm.register_resources(shelf=shelf, pool=pool)

    api = FastAPI()

    @api.get("/books/{book_id}")
    async def book(book_id: int, dal: DAL) -> dict[str, Any]:
        result: dict[str, Any] = await dal.books.get(book_id)
        return result

    @api.get("/count")
    def count(dal: DAL, ctx: Context) -> dict[str, Any]:  # sync: runs in the threadpool
        return {"count": dal.books.count(), "request_id": ctx.meta.request_id}

    @api.get("/boom")
    async def boom(dal: DAL) -> None:
        await dal.books.get(1)
        raise RuntimeError("handler failed")

    @api.websocket("/ws")
    async def ws(websocket: WebSocket, dal: DAL, ctx: Context) -> None:
        await websocket.accept()
        while (text := await websocket.receive_text()) != "bye":
            book = await dal.books.get(int(text))
            await websocket.send_text(f"{book['title']} {ctx.meta.method} {ctx.meta.route}")
        await websocket.close()

    api.add_middleware(PolydatumMiddleware, data_manager=dm)
    app = OpenTelemetryMiddleware(
        api, tracer_provider=cap.tracer_provider, exclude_spans=["receive", "send"]
    )
    return Built(app, dm, shelf, pool)


def server_spans_done(cap: TelemetryCapture, count: int) -> bool:
    """Whether ``count`` contexts ended. The ASGI instrumentation ends its server span
    as soon as the response body is sent; the context closes after that."""
    return sum(1 for s in cap.spans() if s.name == "polydatum.context") >= count


def test_http_request_context_is_child_of_server_span(polydatum_telemetry: Any) -> None:
    cap = polydatum_telemetry
    b = build_app(cap)
    with uvicorn_server(b.app) as server:
        response = httpx.get(f"{server.url}/books/2", headers={"x-request-id": "req-42"})
        assert response.status_code == 200
        assert response.json() == {"id": 2, "title": "Emma"}
        assert response.headers["x-request-id"] == "req-42"
        wait_for(lambda: server_spans_done(cap, 1), "the request's server span")
    assert cap.tree() == [
        (
            "GET /books/2",
            [
                (
                    "polydatum.context",
                    [
                        ("books.get", [("polydatum.resource.setup shelf", [])]),
                        ("polydatum.resource.teardown shelf", []),
                    ],
                )
            ],
        )
    ]
    context = cap.span("polydatum.context")
    assert context.status == "UNSET"
    assert {k: v for k, v in context.attributes.items() if k != "polydatum.context.id"} == {
        "polydatum.meta.request_id": "req-42",
        "polydatum.meta.method": "GET",
        "polydatum.meta.route": "/books/{book_id}",
    }
    assert context.trace_id == cap.span("GET /books/2").trace_id
    assert b.shelf.log == ["setup", "teardown", "dispose"]  # dispose: lifespan shutdown
    assert b.pool.disposed == 1


def test_context_closes_after_response_sent_and_teardown_error_links_to_request(
    polydatum_telemetry: Any,
) -> None:
    cap = polydatum_telemetry
    b = build_app(cap)
    b.shelf.hold = threading.Event()
    b.shelf.fail = True
    with uvicorn_server(b.app) as server:
        try:
            response = httpx.get(f"{server.url}/books/1")
            # The client has the whole response while the resource is still tearing down:
            # the server span ended (the instrumentation ends it with the last body
            # chunk), the context span has not.
            assert response.json() == {"id": 1, "title": "Dune"}
            assert b.shelf.log == ["setup"]
            wait_for(lambda: len(cap.spans()) == 3, "the server span to end")
            assert [s.name for s in cap.spans()] == [
                "GET /books/1",
                "books.get",
                "polydatum.resource.setup shelf",
            ]
        finally:
            b.shelf.hold.set()
        wait_for(lambda: server_spans_done(cap, 1), "the request's context span")
    generated_id = response.headers["x-request-id"]
    assert len(generated_id) == 32 and int(generated_id, 16) >= 0
    assert cap.tree() == [
        (
            "GET /books/1",
            [
                (
                    "polydatum.context",
                    [
                        ("books.get", [("polydatum.resource.setup shelf", [])]),
                        ("polydatum.resource.teardown shelf", []),
                    ],
                )
            ],
        )
    ]
    teardown = cap.span("polydatum.resource.teardown shelf")
    assert (teardown.status, teardown.attributes["error.type"]) == ("ERROR", "OSError")
    assert cap.span("polydatum.context").attributes["polydatum.teardown_errors"] == 1
    assert cap.span("polydatum.context").attributes["polydatum.meta.request_id"] == generated_id
    assert cap.span("GET /books/1").status == "UNSET"  # the client got its 200
    warnings = [e for e in cap.events() if e["log_level"] == "warning"]
    assert [(e["event"], e["resource"], e["error_type"]) for e in warnings] == [
        ("polydatum.resource.teardown_error_suppressed", "shelf", "OSError")
    ]


def test_sync_endpoint_in_threadpool_and_hostile_request_id(polydatum_telemetry: Any) -> None:
    cap = polydatum_telemetry
    b = build_app(cap)
    with uvicorn_server(b.app) as server:
        response = httpx.get(f"{server.url}/count", headers={"x-request-id": "a b\tc"})
        wait_for(lambda: server_spans_done(cap, 1), "the request's server span")
    generated = response.headers["x-request-id"]
    assert generated != "a b\tc" and len(generated) == 32
    assert response.json() == {"count": 2, "request_id": generated}
    assert cap.tree() == [
        (
            "GET /count",
            [
                (
                    "polydatum.context",
                    [
                        ("books.count", [("polydatum.resource.setup pool", [])]),
                        ("polydatum.resource.teardown pool", []),
                    ],
                )
            ],
        )
    ]
    assert cap.span("polydatum.context").attributes["polydatum.meta.route"] == "/count"


def test_unhandled_error_reaches_context_and_resources(polydatum_telemetry: Any) -> None:
    cap = polydatum_telemetry
    b = build_app(cap)
    with uvicorn_server(b.app) as server:
        response = httpx.get(f"{server.url}/boom")
        wait_for(lambda: server_spans_done(cap, 1), "the request's server span")
    assert response.status_code == 500
    assert cap.tree() == [
        (
            "GET /boom",
            [
                (
                    "polydatum.context",
                    [
                        ("books.get", [("polydatum.resource.setup shelf", [])]),
                        ("polydatum.resource.teardown shelf", []),
                    ],
                )
            ],
        )
    ]
    context = cap.span("polydatum.context")
    assert (context.status, context.attributes["error.type"]) == ("ERROR", "RuntimeError")
    assert context.events == ("exception",)
    assert b.shelf.log == ["setup", "rollback RuntimeError", "dispose"]


def test_websocket_session_is_one_context(polydatum_telemetry: Any) -> None:
    from websockets.sync.client import connect

    cap = polydatum_telemetry
    b = build_app(cap)
    with uvicorn_server(b.app) as server:
        with connect(server.url.replace("http", "ws") + "/ws") as ws:
            replies = []
            for text in ("1", "2"):
                ws.send(text)
                replies.append(ws.recv())
            ws.send("bye")
        wait_for(lambda: server_spans_done(cap, 1), "the websocket's server span")
    assert replies == ["Dune WEBSOCKET /ws", "Emma WEBSOCKET /ws"]
    assert cap.tree() == [
        (
            "HTTP /ws",  # the ASGI instrumentation names websocket spans so
            [
                (
                    "polydatum.context",
                    [
                        ("books.get", [("polydatum.resource.setup shelf", [])]),
                        ("books.get", []),
                        ("polydatum.resource.teardown shelf", []),
                    ],
                )
            ],
        )
    ]
    assert b.shelf.log == ["setup", "teardown", "dispose"]


def test_lifespan_refuses_to_start_an_invalid_data_manager(
    polydatum_telemetry: Any, caplog: pytest.LogCaptureFixture
) -> None:
    cap = polydatum_telemetry
    b = build_app(cap)

    def meta(ctx: DataAccessContext) -> Iterator[str]:
        yield "collides with ctx.meta"

    b.dm.register_resources(meta=meta)
    with caplog.at_level("ERROR", logger="uvicorn.error"):
        with uvicorn_server(b.app, expect_start=False) as server:
            wait_for(lambda: server.exit_code is not None, "uvicorn to give up")
            assert (server.started, server.exit_code) == (False, 3)
    assert [r.getMessage() for r in caplog.records] == [
        "1 problem(s) in the DataManager registration:\n"
        "  - resource 'meta' collides with DataAccessContext.meta: ctx.meta returns the "
        "attribute, not the resource; rename it",
        "Application startup failed. Exiting.",
    ]
    # The app was asked to shut down (its own handlers ran) and engines were disposed.
    assert b.shelf.log == ["dispose"] and b.pool.disposed == 1


# -- Starlette and bare ASGI apps -----------------------------------------------------


async def starlette_book(request: Any) -> JSONResponse:
    from polydatum.integrations.asgi import get_dal

    dal = get_dal(request)
    return JSONResponse(await dal.books.get(int(request.path_params["book_id"])))


def test_starlette_mount_route_template_and_send_spans(polydatum_telemetry: Any) -> None:
    """Without ``exclude_spans``, the ASGI instrumentation's ``http send`` spans start
    while the context span is current, so they nest under it."""
    cap = polydatum_telemetry
    dm = cap.data_manager(meta_attributes=META)
    dm.register_services(books=Books())
    dm.register_resources(shelf=Flaky())
    inner = Starlette(routes=[Mount("/v1", routes=[Route("/books/{book_id:int}", starlette_book)])])
    inner.add_middleware(PolydatumMiddleware, data_manager=dm)
    app = OpenTelemetryMiddleware(inner, tracer_provider=cap.tracer_provider)
    with uvicorn_server(app) as server:
        response = httpx.get(f"{server.url}/v1/books/1")
        wait_for(lambda: server_spans_done(cap, 1), "the request's server span")
    assert response.json() == {"id": 1, "title": "Dune"}
    assert cap.tree() == [
        (
            "GET /v1/books/1",
            [
                (
                    "polydatum.context",
                    [
                        ("books.get", [("polydatum.resource.setup shelf", [])]),
                        ("GET /v1/books/1 http send", []),
                        ("GET /v1/books/1 http send", []),
                        ("polydatum.resource.teardown shelf", []),
                    ],
                )
            ],
        )
    ]
    assert cap.span("polydatum.context").attributes["polydatum.meta.route"] == (
        "/v1/books/{book_id:int}"
    )


async def test_bare_asgi_app_custom_meta_and_no_middleware_error() -> None:
    """A plain ASGI callable, driven directly: custom meta, route unknown, lifespan."""
    seen: list[Any] = []
    dm = DataManager()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].rsplit(".", 1)[-1]
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        ctx = dm.require_active_context()
        seen.append((dict(ctx.meta.items()), ctx is scope["polydatum.context"]))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    wrapped = PolydatumMiddleware(
        app, dm, meta=lambda scope: {**default_meta(scope), "tenant": "acme"}
    )
    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/x", "headers": [(b"x-request-id", b"r1")]}
    await wrapped(scope, receive=None, send=send)  # type: ignore[arg-type]
    assert seen == [({"request_id": "r1", "method": "POST", "tenant": "acme"}, True)]
    assert sent[0] == {"type": "http.response.start", "status": 204, "headers": [
        (b"x-request-id", b"r1")]}  # fmt: skip
    assert route_template(scope, app) is None

    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])

    async def receive() -> Any:
        return next(messages)

    sent.clear()
    await wrapped({"type": "lifespan"}, receive, send)
    assert sent == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]

    from polydatum.integrations.asgi import get_dal

    with pytest.raises(LookupError, match="add PolydatumMiddleware to the app"):
        get_dal({"type": "http"})
