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
from fastapi import FastAPI, HTTPException, WebSocket
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from polydatum import DataManager, Service
from polydatum.context import DataAccessContext
from polydatum.integrations.asgi import (
    HandledAsSuccess,
    PolydatumMiddleware,
    default_meta,
    route_template,
)
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
    """A resource whose teardown can be held (to prove it runs before the response is
    sent: ``holding`` is set while it waits) or made to fail; ``dispose()`` is async,
    like an async SQL engine's."""

    def __init__(self) -> None:
        self.hold: threading.Event | None = None
        self.holding = threading.Event()
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
            self.holding.set()
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

    @api.get("/taken")
    async def taken(dal: DAL) -> None:
        await dal.books.get(1)
        raise HTTPException(409, "taken")

    @api.get("/missing")
    async def missing(dal: DAL) -> JSONResponse:
        await dal.books.get(1)
        return JSONResponse({"error": "no such shelf"}, status_code=404)

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
    """Whether ``count`` server spans ended. The context ends before the response goes
    out; the ASGI instrumentation ends its server span with the last body message."""
    return sum(1 for s in cap.spans() if s.parent is None) >= count


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


def test_context_ends_before_the_response_and_teardown_error_links_to_request(
    polydatum_telemetry: Any,
) -> None:
    cap = polydatum_telemetry
    b = build_app(cap)
    b.shelf.hold = threading.Event()
    b.shelf.fail = True
    answers: list[httpx.Response] = []
    with uvicorn_server(b.app) as server:
        client = threading.Thread(
            target=lambda: answers.append(httpx.get(f"{server.url}/books/1")), daemon=True
        )
        client.start()
        try:
            assert b.shelf.holding.wait(10), "the resource never started to tear down"
            # The resource is tearing down: the client has nothing yet (not even the
            # status) and the server span has not ended.
            client.join(0.2)
            assert (client.is_alive(), answers) == (True, [])
            assert [s.name for s in cap.spans()] == [
                "books.get",
                "polydatum.resource.setup shelf",
            ]
        finally:
            b.shelf.hold.set()
        client.join(10)
        wait_for(lambda: server_spans_done(cap, 1), "the request's server span")
    [response] = answers
    # A suppressed teardown error does not lose the work: the client gets its 200.
    assert (response.status_code, response.json()) == (200, {"id": 1, "title": "Dune"})
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
    context, request = cap.span("polydatum.context"), cap.span("GET /books/1")
    assert context.end <= request.end  # the context ended before the response went out
    teardown = cap.span("polydatum.resource.teardown shelf")
    assert (teardown.status, teardown.attributes["error.type"]) == ("ERROR", "OSError")
    assert context.attributes["polydatum.teardown_errors"] == 1
    assert context.attributes["polydatum.meta.request_id"] == generated_id
    # The request span was still recording when the context ended: it carries the count.
    assert (request.status, request.attributes["polydatum.teardown_errors"]) == ("UNSET", 1)
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


def test_handled_exception_and_error_status_end_the_context_with_an_error(
    polydatum_telemetry: Any,
) -> None:
    """An HTTPException that FastAPI answered reaches the context (span ERROR, the
    resource rolls back); a 404 returned without an exception ends it with ErrorResponse.
    Both responses go out as the app made them."""
    cap = polydatum_telemetry
    b = build_app(cap)
    with uvicorn_server(b.app) as server, httpx.Client(base_url=server.url) as client:
        taken, missing = client.get("/taken"), client.get("/missing")
        wait_for(lambda: server_spans_done(cap, 2), "the requests' server spans")
    assert (taken.status_code, taken.json()) == (409, {"detail": "taken"})
    assert (missing.status_code, missing.json()) == (404, {"error": "no such shelf"})
    contexts = [s for s in cap.spans() if s.name == "polydatum.context"]
    assert [(s.parent, s.status, s.attributes["error.type"]) for s in contexts] == [
        ("GET /taken", "ERROR", "fastapi.exceptions.HTTPException"),
        ("GET /missing", "ERROR", "polydatum.errors.ErrorResponse"),
    ]
    assert b.shelf.log == [
        "setup",
        "rollback HTTPException",
        "setup",
        "rollback ErrorResponse",
        "dispose",
    ]


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
    """Without ``exclude_spans``, the ASGI instrumentation records an ``http send`` span
    per message. The messages go out once the context has ended: the spans are the
    context span's siblings, after it."""
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
                        ("polydatum.resource.teardown shelf", []),
                    ],
                ),
                ("GET /v1/books/1 http send", []),
                ("GET /v1/books/1 http send", []),
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


# -- the HTTP message protocol, driven directly -----------------------------------------


def ending_dm(log: list[str], fail: bool = False) -> DataManager:
    """A DataManager whose middleware logs how the context ended (into the same list
    as the server's messages), and with ``fail`` raises while tearing down."""
    dm = DataManager()

    def ending(ctx: DataAccessContext) -> Iterator[None]:
        try:
            yield
        except BaseException as error:
            log.append(f"context ended with {type(error).__name__}: {error}")
            raise
        log.append("context ended")
        if fail:
            raise RuntimeError("audit log unavailable")

    dm.register_context_middleware(ending)
    return dm


def describe(message: Any) -> str:
    kind = message["type"]
    if kind == "http.response.start":
        return f"start {message['status']}"
    if kind in ("http.response.body", "http.response.trailers"):
        more = message.get("more_body") or message.get("more_trailers")
        return f"{kind.rsplit('.', 1)[1]} {message.get('body', b'')!r}{' more' if more else ''}"
    return kind.rsplit(".", 1)[1]


async def drive(app: Any, dm: DataManager, log: list[str]) -> BaseException | None:
    """Run one GET through ``PolydatumMiddleware(app)``; the server's side logs what it
    was sent. Returns what the middleware raised."""
    wrapped = PolydatumMiddleware(app, dm, response_header=None)

    async def receive() -> Any:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        log.append(describe(message))

    scope = {"type": "http", "method": "GET", "path": "/", "headers": []}
    try:
        await wrapped(scope, receive, send)
    except BaseException as error:
        return error
    return None


def sending(*messages: dict[str, Any]) -> Any:
    """A bare ASGI app that answers every request with ``messages`` (and supports the
    lifespan protocol, which uvicorn runs)."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (kind := (await receive())["type"]) != "lifespan.shutdown":
                await send({"type": f"{kind}.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        for message in messages:
            await send(message)

    return app


START = {"type": "http.response.start", "status": 200, "headers": []}


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        (
            [START, {"type": "http.response.body", "body": b"whole"}],
            ["context ended", "start 200", "body b'whole'"],
        ),
        (  # the status goes out at once; the context ends before the final message
            [
                START,
                {"type": "http.response.body", "body": b"a", "more_body": True},
                {"type": "http.response.body", "body": b"b", "more_body": True},
                {"type": "http.response.body", "body": b""},
            ],
            ["start 200", "body b'a' more", "body b'b' more", "context ended", "body b''"],
        ),
        (  # a start announcing trailers: everything waits for the last trailers
            [
                {**START, "trailers": True},
                {"type": "http.response.body", "body": b"x"},
                {"type": "http.response.trailers", "headers": [], "more_trailers": True},
                {"type": "http.response.trailers", "headers": []},
            ],
            ["context ended", "start 200", "body b'x'", "trailers b'' more", "trailers b''"],
        ),
        (
            [START, {"type": "http.response.pathsend", "path": "/srv/file.txt"}],
            ["context ended", "start 200", "pathsend"],
        ),
        (  # not part of the response (Starlette's TestClient extension): passed through
            [
                {"type": "http.response.debug", "info": {}},
                START,
                {"type": "http.response.body", "body": b""},
            ],
            ["debug", "context ended", "start 200", "body b''"],
        ),
    ],
    ids=["whole", "streaming", "trailers", "pathsend", "debug"],
)
async def test_response_messages_wait_for_the_context_to_end(
    messages: list[dict[str, Any]], expected: list[str]
) -> None:
    log: list[str] = []
    assert await drive(sending(*messages), ending_dm(log), log) is None
    assert log == expected


@pytest.mark.parametrize(
    ("messages", "sent", "expected"),
    [
        ([], "the response status was never sent", []),
        ([START], "the final body message was never sent", []),
        (
            [START, {"type": "http.response.body", "body": b"a", "more_body": True}],
            "the stream ended without its final body message",
            ["start 200", "body b'a' more"],
        ),
    ],
    ids=["nothing", "start-only", "stream-cut"],
)
async def test_app_returning_before_its_response_is_complete_rolls_back(
    messages: list[dict[str, Any]], sent: str, expected: list[str]
) -> None:
    """Nothing held is forwarded (the server answers 500 or closes the connection);
    the context ends with IncompleteResponse, which is not raised."""
    log: list[str] = []
    assert await drive(sending(*messages), ending_dm(log), log) is None
    assert log == [
        *expected,
        "context ended with IncompleteResponse: the application returned before its "
        f"response was complete ({sent}): the request's work is rolled back",
    ]


async def test_a_failed_end_withholds_the_response_for_good() -> None:
    """Ending the context raised: the 200 is never sent. The app swallows the error and
    tries again; ``send`` raises it again, and the middleware raises it when the app
    returns."""
    log: list[str] = []
    raised: list[BaseException] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        for _ in range(2):
            try:
                await send(START)
                await send({"type": "http.response.body", "body": b"saved"})
            except RuntimeError as error:
                raised.append(error)

    error = await drive(app, ending_dm(log, fail=True), log)
    assert log == ["context ended"]
    assert (type(error), str(error)) == (RuntimeError, "audit log unavailable")
    assert raised == [error, error]


async def test_a_second_response_start_is_an_error() -> None:
    log: list[str] = []
    error = await drive(sending(START, START), ending_dm(log), log)
    assert (type(error), str(error)) == (
        RuntimeError,
        "the ASGI app sent 'http.response.start' twice",
    )
    assert log == ["context ended with RuntimeError: the ASGI app sent 'http.response.start' twice"]


async def test_the_exception_a_response_is_sent_for_ends_the_context() -> None:
    """A bare app sends its responses from ``except`` blocks: a 500 for a ValueError
    stands (the work rolled back); a 200 for one is replaced by HandledAsSuccess."""

    def answering(status: int) -> Any:
        async def app(scope: Any, receive: Any, send: Any) -> None:
            try:
                raise ValueError("bad input")
            except ValueError:
                await send({**START, "status": status})
                await send({"type": "http.response.body", "body": b"answer"})

        return app

    log: list[str] = []
    assert await drive(answering(500), ending_dm(log), log) is None
    assert log == ["context ended with ValueError: bad input", "start 500", "body b'answer'"]
    log.clear()
    error = await drive(answering(200), ending_dm(log), log)
    assert (type(error), str(error), type(error.__cause__)) == (
        HandledAsSuccess,
        "the application answered 200 for ValueError, but the request's work was rolled "
        "back for that exception: the response is not sent",
        ValueError,
    )
    assert log == ["context ended with ValueError: bad input"]


async def test_an_exception_handled_around_the_middleware_is_not_the_responses() -> None:
    """The request arrives while an outer layer handles an exception (it runs the app
    from its ``except`` block): that exception is not the one the response is for."""
    log: list[str] = []
    app = sending(START, {"type": "http.response.body", "body": b"fine"})
    try:
        raise KeyError("outer")
    except KeyError:
        assert await drive(app, ending_dm(log), log) is None
    assert log == ["context ended", "start 200", "body b'fine'"]


def test_bare_asgi_app_whose_context_fails_to_end_gets_uvicorn_500(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log: list[str] = []
    app = PolydatumMiddleware(
        sending(START, {"type": "http.response.body", "body": b"saved"}),
        ending_dm(log, fail=True),
    )
    with caplog.at_level("ERROR", logger="uvicorn.error"):
        with uvicorn_server(app) as server:
            response = httpx.get(f"{server.url}/")
    assert (response.status_code, response.text) == (500, "Internal Server Error")
    assert "x-request-id" not in response.headers  # uvicorn's own answer, not the app's
    assert log == ["context ended"]
    errors = [r.exc_info[1] for r in caplog.records if r.exc_info]
    assert [(type(e), str(e)) for e in errors] == [(RuntimeError, "audit log unavailable")]
