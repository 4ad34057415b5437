"""Plain WSGI middleware through a real (werkzeug) server, inside
``opentelemetry-instrumentation-wsgi``'s OpenTelemetryMiddleware."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterable, Iterator
from typing import Any

import httpx
import pytest
from opentelemetry import context as otel_context
from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware

from polydatum import DataManager, Service
from polydatum.context import DataAccessContext
from polydatum.integrations import dispose_resources
from polydatum.integrations.wsgi import (
    DEFAULT_BUFFER_LIMIT,
    PolydatumWSGIMiddleware,
    get_context,
)
from polydatum.testing import TelemetryCapture
from tests._servers import wait_for, wsgi_server

#: What werkzeug's server answers when the application raises before responding.
WERKZEUG_500 = (
    "<!doctype html>\n<html lang=en>\n<title>500 Internal Server Error</title>\n"
    "<h1>Internal Server Error</h1>\n<p>The server encountered an internal error and was "
    "unable to complete your request. Either the server is overloaded or there is an "
    "error in the application.</p>\n"
)
#: What httpx raises for a chunked body that breaks off (no final chunk).
INCOMPLETE = (
    "peer closed connection without sending complete message body (incomplete chunked read)"
)


class Books(Service):
    def title(self, book_id: int) -> str:
        return self._ctx.shelf[book_id]


class Shelf:
    def __init__(self) -> None:
        self.log: list[str] = []
        self.disposed = 0

    def __call__(self, ctx: DataAccessContext) -> Iterator[dict[int, str]]:
        self.log.append("setup")
        try:
            yield {1: "Dune", 2: "Emma"}
        except Exception as error:
            self.log.append(f"rollback {type(error).__name__}")
            raise
        self.log.append("commit")

    def dispose(self) -> None:
        self.disposed += 1


def build(cap: TelemetryCapture, **options: Any) -> tuple[Any, DataManager, Shelf]:
    dm = cap.data_manager(meta_attributes=("request_id", "method"))
    dm.register_services(books=Books())
    shelf = Shelf()
    dm.register_resources(shelf=shelf)

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        ctx = get_context(environ)
        assert dm.get_active_context() is ctx
        start_response("200 OK", [("Content-Type", "text/plain")])

        def body() -> Iterator[bytes]:
            # Runs while the body is produced: the context is still open.
            for book_id in (1, 2):
                if environ["PATH_INFO"] == "/broken" and book_id == 2:
                    raise LookupError("book 2 vanished mid-stream")
                yield (ctx.dal.books.title(book_id) + "\n").encode()

        return body()

    wrapped = OpenTelemetryMiddleware(
        PolydatumWSGIMiddleware(app, dm, **options), tracer_provider=cap.tracer_provider
    )
    return wrapped, dm, shelf


def test_context_stays_open_while_the_body_streams(polydatum_telemetry: Any) -> None:
    cap = polydatum_telemetry
    app, dm, shelf = build(cap)
    with wsgi_server(app) as url:
        response = httpx.get(f"{url}/books", headers={"x-request-id": "req-7"})
        wait_for(lambda: any(s.name.startswith("GET /") for s in cap.spans()), "the request span")
    assert (response.text, response.headers["x-request-id"]) == ("Dune\nEmma\n", "req-7")
    assert cap.tree() == [
        (
            "GET /books",
            [
                (
                    "polydatum.context",
                    [
                        ("books.title", [("polydatum.resource.setup shelf", [])]),
                        ("books.title", []),
                        ("polydatum.resource.teardown shelf", []),
                    ],
                )
            ],
        )
    ]
    context = cap.span("polydatum.context")
    assert (context.attributes["polydatum.meta.request_id"], context.status) == ("req-7", "UNSET")
    assert shelf.log == ["setup", "commit"]
    assert dispose_resources(dm) == {} and shelf.disposed == 1


def test_error_while_producing_the_body_reaches_the_context(polydatum_telemetry: Any) -> None:
    """Within the buffer limit nothing has been sent: the server answers 500."""
    cap = polydatum_telemetry
    app, _dm, shelf = build(cap)
    with wsgi_server(app) as url:
        response = httpx.get(f"{url}/broken")
        wait_for(lambda: any(s.name.startswith("GET /") for s in cap.spans()), "the request span")
    assert (response.status_code, response.text) == (500, WERKZEUG_500)
    context = cap.span("polydatum.context")
    assert (context.status, context.attributes["error.type"]) == ("ERROR", "LookupError")
    assert shelf.log == ["setup", "rollback LookupError"]
    assert [s.name for s in cap.spans()] == [
        "GET /broken",
        "polydatum.context",
        "books.title",
        "polydatum.resource.setup shelf",
        "polydatum.resource.teardown shelf",
    ]


def test_error_while_streaming_reaches_the_context(polydatum_telemetry: Any) -> None:
    """Past the buffer limit the status is out: the transfer breaks off."""
    cap = polydatum_telemetry
    app, _dm, shelf = build(cap, buffer_limit=0)
    with wsgi_server(app) as url:
        with pytest.raises(httpx.RemoteProtocolError) as raised:
            httpx.get(f"{url}/broken")  # headers sent, then the body breaks off
        wait_for(lambda: any(s.name.startswith("GET /") for s in cap.spans()), "the request span")
    assert str(raised.value) == INCOMPLETE
    context = cap.span("polydatum.context")
    assert (context.status, context.attributes["error.type"]) == ("ERROR", "LookupError")
    assert shelf.log == ["setup", "rollback LookupError"]
    assert [s.name for s in cap.spans()] == [
        "GET /broken",
        "polydatum.context",
        "books.title",
        "polydatum.resource.setup shelf",
        "polydatum.resource.teardown shelf",
    ]


def test_app_raising_before_responding_closes_the_context() -> None:
    dm = DataManager()
    shelf = Shelf()
    dm.register_resources(shelf=shelf)

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        get_context(environ).shelf
        raise PermissionError("no")

    with pytest.raises(PermissionError, match="no"):
        PolydatumWSGIMiddleware(app, dm)({"REQUEST_METHOD": "GET"}, lambda *a: None)
    assert shelf.log == ["setup", "rollback PermissionError"]
    assert dm.get_active_context() is None
    with pytest.raises(LookupError, match="wrap the app in PolydatumWSGIMiddleware"):
        get_context({})


class Server:
    """What a PEP 3333 server does with ``start_response``, ``write`` and the body,
    logged in one list with the resource's log (so their order shows)."""

    def __init__(self, log: list[str], fail_start: bool = False) -> None:
        self.log = log
        self.fail_start = fail_start
        self.headers: list[tuple[str, str]] = []
        self.headers_sent = False

    def start_response(self, status: str, headers: Any, exc_info: Any = None) -> Any:
        if exc_info is not None and self.headers_sent:
            raise exc_info[1].with_traceback(exc_info[2])
        if self.fail_start:
            raise ValueError("the server refused the headers")
        self.log.append(f"start_response {status}")
        self.headers = list(headers)
        return self.write

    def write(self, data: bytes) -> None:
        self.headers_sent = True
        self.log.append(f"write {data.decode()}")

    def run(self, app: Any, path: str = "/") -> Iterable[bytes]:
        """Call ``app``, send every chunk, close the body; returns the body object."""
        body: Iterable[bytes] = app(
            {"REQUEST_METHOD": "GET", "PATH_INFO": path}, self.start_response
        )
        try:
            for chunk in body:
                self.write(chunk)
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()
        return body


def logged_dm(log: list[str]) -> DataManager:
    """A DataManager whose ``shelf`` resource logs its setup, commit or rollback to ``log``."""
    dm = DataManager()

    def shelf(ctx: DataAccessContext) -> Iterator[str]:
        log.append("setup")
        try:
            yield "Dune"
        except BaseException as error:
            log.append(f"rollback {type(error).__name__}: {error}")
            raise
        log.append("commit")

    dm.register_resources(shelf=shelf)
    return dm


def chunked(*chunks: str) -> Any:
    """An app answering 200 with ``chunks``; the first one uses the context's shelf."""

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])

        def body() -> Iterator[bytes]:
            get_context(environ).shelf
            for chunk in chunks:
                yield chunk.encode()

        return body()

    return app


@pytest.mark.parametrize("limit", [DEFAULT_BUFFER_LIMIT, 6, None])
def test_the_status_goes_out_after_the_context_ended(limit: int | None) -> None:
    log: list[str] = []
    app = PolydatumWSGIMiddleware(chunked("ab", "cd", "ef"), logged_dm(log), buffer_limit=limit)
    body = Server(log).run(app)
    assert log == ["setup", "commit", "start_response 200 OK", "write ab", "write cd", "write ef"]
    assert body == [b"ab", b"cd", b"ef"]  # the collected list, handed to the server


def test_a_body_over_the_limit_is_streamed_and_ends_the_context_at_its_end() -> None:
    log: list[str] = []
    app = PolydatumWSGIMiddleware(chunked("ab", "cd", "ef"), logged_dm(log), buffer_limit=3)
    Server(log).run(app)
    assert log == ["setup", "start_response 200 OK", "write ab", "write cd", "write ef", "commit"]


def test_the_write_callable_is_collected_then_streamed_past_the_limit() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        write = start_response("200 OK", [])
        get_context(environ).shelf
        write(b"ab")
        write(b"cd")
        write(b"gh")
        return [b"ef"]

    log: list[str] = []
    Server(log).run(PolydatumWSGIMiddleware(app, logged_dm(log)))
    sent = ["write ab", "write cd", "write gh", "write ef"]
    assert log == ["setup", "commit", "start_response 200 OK", *sent]
    log.clear()
    Server(log).run(PolydatumWSGIMiddleware(app, logged_dm(log), buffer_limit=3))
    assert log == ["setup", "start_response 200 OK", *sent, "commit"]


def test_start_response_misuse_is_an_error_that_rolls_back() -> None:
    def never(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        get_context(environ).shelf
        return [b"no status"]

    def twice(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        get_context(environ).shelf
        start_response("200 OK", [])
        start_response("201 Created", [])
        return []

    def early(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        get_context(environ).shelf
        start_response.__self__.write(b"before start_response")
        return []

    log: list[str] = []
    never_called = "the application returned without calling start_response()"
    for app, limit, message in [
        (never, DEFAULT_BUFFER_LIMIT, never_called),
        (never, 0, never_called),  # too big to hold back, and no status to send
        (twice, DEFAULT_BUFFER_LIMIT, "start_response() called a second time without exc_info"),
        (early, DEFAULT_BUFFER_LIMIT, "write() called before start_response()"),
    ]:
        with pytest.raises(AssertionError, match=rf"^{re.escape(message)}$"):
            Server(log).run(PolydatumWSGIMiddleware(app, logged_dm(log), buffer_limit=limit))
    assert log == [
        "setup",
        f"rollback AssertionError: {never_called}",
        "setup",
        f"rollback AssertionError: {never_called}",
        "setup",
        "rollback AssertionError: start_response() called a second time without exc_info",
        "setup",
        "rollback AssertionError: write() called before start_response()",
    ]


def test_the_buffer_limit_is_not_negative() -> None:
    with pytest.raises(ValueError, match=r"^buffer_limit must be >= 0 or None, not -1$"):
        PolydatumWSGIMiddleware(chunked(), DataManager(), buffer_limit=-1)


def test_an_app_handling_an_error_after_the_status_went_out_rolls_back() -> None:
    """Streaming, the app passes exc_info to start_response: the server re-raises it
    (PEP 3333), and it ends the context."""

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [])

        def body() -> Iterator[bytes]:
            get_context(environ).shelf
            yield b"ab"
            try:
                raise KeyError("gone")
            except KeyError:
                start_response("500 Internal Server Error", [], sys.exc_info())
            yield b"never"

        return body()

    log: list[str] = []
    with pytest.raises(KeyError, match="gone"):
        Server(log).run(PolydatumWSGIMiddleware(app, logged_dm(log), buffer_limit=0))
    assert log == ["setup", "start_response 200 OK", "write ab", "rollback KeyError: 'gone'"]


def test_a_body_whose_close_fails_rolls_back_with_that_error() -> None:
    class Body:
        def __init__(self, ctx: DataAccessContext) -> None:
            self.ctx = ctx

        def __iter__(self) -> Iterator[bytes]:
            yield self.ctx.shelf.encode()

        def close(self) -> None:
            raise OSError("close failed")

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [])
        return Body(get_context(environ))

    for limit in (DEFAULT_BUFFER_LIMIT, 0):
        log: list[str] = []
        with pytest.raises(OSError, match="close failed"):
            Server(log).run(PolydatumWSGIMiddleware(app, logged_dm(log), buffer_limit=limit))
        assert log[0] == "setup" and log[-1] == "rollback OSError: close failed"


def test_an_error_a_middleware_raises_in_place_of_the_bodys_propagates() -> None:
    """The body fails; a context middleware replaces that error while the context
    ends: the replacement is what the server gets (the body's error is its context)."""

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [])

        def body() -> Iterator[bytes]:
            get_context(environ).shelf
            raise KeyError("body failed")
            yield b"never"

        return body()

    def replace(ctx: DataAccessContext) -> Iterator[None]:
        try:
            yield
        except KeyError as error:
            raise RuntimeError("replaced by middleware") from error

    log: list[str] = []
    dm = logged_dm(log)
    dm.register_context_middleware(replace)
    with pytest.raises(RuntimeError, match="^replaced by middleware$") as raised:
        Server(log).run(PolydatumWSGIMiddleware(app, dm))
    assert repr(raised.value.__cause__) == "KeyError('body failed')"
    assert log == ["setup", "rollback RuntimeError: replaced by middleware"]


def test_a_server_refusing_a_streamed_status_rolls_back() -> None:
    log: list[str] = []
    app = PolydatumWSGIMiddleware(chunked("ab", "cd"), logged_dm(log), buffer_limit=1)
    with pytest.raises(ValueError, match="the server refused the headers"):
        Server(log, fail_start=True).run(app)
    assert log == ["setup", "rollback ValueError: the server refused the headers"]


def test_a_body_closed_before_its_end_rolls_back() -> None:
    """The server closes the body early (the client went away): IncompleteResponse."""
    log: list[str] = []
    app = PolydatumWSGIMiddleware(chunked("ab", "cd", "ef"), logged_dm(log), buffer_limit=0)
    server = Server(log)
    body = app({"REQUEST_METHOD": "GET"}, server.start_response)
    assert next(iter(body)) == b"ab"
    body.close()  # type: ignore[attr-defined]
    body.close()  # type: ignore[attr-defined]  # a second close does nothing
    assert log == [
        "setup",
        "start_response 200 OK",
        "rollback IncompleteResponse: the server closed the response before its body was "
        "complete (the client disconnected or a write failed): the request's work is "
        "rolled back",
    ]
    assert list(body) == []


def test_ending_a_streamed_context_leaves_the_threads_current_context_alone(
    polydatum_telemetry: Any,
) -> None:
    """A framework may reset its own (earlier) OpenTelemetry token inside the body's last
    step (as ``stream_with_context`` did before Flask 3.1.2): the context, ended after
    it, must not make the framework's span current again."""
    cap = polydatum_telemetry
    dm = cap.data_manager()
    dm.register_resources(shelf=lambda ctx: (yield "Dune"))
    request_scope = otel_context.set_value("scope", "the framework's request")

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [])

        def body() -> Iterator[bytes]:
            yield get_context(environ).shelf.encode()
            otel_context.detach(environ["framework.token"])  # the request scope ends

        return body()

    before = otel_context.get_current()
    environ = {"REQUEST_METHOD": "GET", "framework.token": otel_context.attach(request_scope)}
    body = PolydatumWSGIMiddleware(app, dm, buffer_limit=0)(environ, lambda *a: None)
    assert list(body) == [b"Dune"]
    assert otel_context.get_current() is before
    assert [s.status for s in cap.spans()] == ["UNSET", "UNSET", "UNSET"]


@pytest.mark.parametrize(
    ("module", "missing", "extra"),
    [
        ("polydatum.integrations.flask", "flask", "flask"),
        ("polydatum.integrations.fastapi", "fastapi", "fastapi"),
        ("polydatum.integrations.celery", "celery", "celery"),
    ],
)
def test_missing_framework_names_the_extra(module: str, missing: str, extra: str) -> None:
    """Simulate an uninstalled framework (``sys.modules[name] = None`` makes its import
    fail) in a fresh interpreter."""
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules[{missing!r}] = None
        try:
            import {module}
        except ImportError as error:
            print(error)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert result.stderr == ""
    assert result.stdout.strip().endswith(f"pip install 'polydatum[{extra}]'")
    assert result.stdout.startswith(f"{module} needs ")


def test_asgi_and_wsgi_need_no_framework() -> None:
    code = (
        "import sys\n"
        "for name in ('starlette', 'fastapi', 'flask', 'celery', 'werkzeug'):\n"
        "    sys.modules[name] = None\n"
        "import polydatum.integrations.asgi, polydatum.integrations.wsgi\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert (result.stdout, result.stderr) == ("ok\n", "")
