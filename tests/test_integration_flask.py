"""Flask integration through a real (werkzeug) server, traced by
``opentelemetry-instrumentation-flask`` with the test's tracer provider."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import structlog
from flask import Flask, Response, abort, got_request_exception, request, stream_with_context
from opentelemetry.instrumentation.flask import FlaskInstrumentor
from werkzeug.exceptions import Conflict, InternalServerError

from polydatum import DataManager, Service
from polydatum.context import DataAccessContext
from polydatum.errors import CommitError, ValidationError
from polydatum.integrations import flask as pd_flask
from polydatum.testing import TelemetryCapture
from tests._servers import wait_for, wsgi_server

META = ("request_id", "method", "route")


class Books(Service):
    def get(self, book_id: int) -> dict[str, Any]:
        return {"id": book_id, "title": self._ctx.shelf[book_id]}


class Shelf:
    def __init__(self) -> None:
        self.log: list[str] = []
        self.fail = False

    def __call__(self, ctx: DataAccessContext) -> Iterator[dict[int, str]]:
        self.log.append(f"setup {ctx.meta.route}")
        try:
            yield {1: "Dune", 2: "Emma"}
        except Exception as error:
            self.log.append(f"rollback {type(error).__name__}")
            raise
        if self.fail:
            raise OSError("connection reset while closing")
        self.log.append("commit")


def build(cap: TelemetryCapture) -> tuple[Flask, Shelf]:
    dm = cap.data_manager(meta_attributes=META)
    dm.register_services(books=Books())
    shelf = Shelf()
    dm.register_resources(shelf=shelf)
    app = Flask(__name__)

    @app.get("/books/<int:book_id>")
    def book(book_id: int) -> Any:
        return pd_flask.dal().books.get(book_id)

    @app.get("/health")
    def health() -> str:
        return "ok"

    @app.get("/boom")
    def boom() -> str:
        pd_flask.dal().books.get(1)
        raise RuntimeError("view failed")

    # polydatum first, instrumentation second: the order must not matter.
    pd_flask.init_app(app, dm)
    FlaskInstrumentor().instrument_app(app, tracer_provider=cap.tracer_provider)
    return app, shelf


def contexts_done(cap: TelemetryCapture, count: int) -> bool:
    return sum(1 for s in cap.spans() if s.parent is None) >= count


def test_one_context_per_request_child_of_flask_span(polydatum_telemetry: Any) -> None:
    cap = polydatum_telemetry
    app, shelf = build(cap)
    with wsgi_server(app) as url:
        first = httpx.get(f"{url}/books/1", headers={"x-request-id": "req-1"})
        second = httpx.get(f"{url}/books/2")
        health = httpx.get(f"{url}/health")
        wait_for(lambda: contexts_done(cap, 3), "three request spans")
    assert (first.json(), first.headers["x-request-id"]) == ({"id": 1, "title": "Dune"}, "req-1")
    assert second.json() == {"id": 2, "title": "Emma"}
    assert len(second.headers["x-request-id"]) == 32
    assert (health.text, "x-request-id" in health.headers) == ("ok", False)  # no data used
    request_tree = (
        "GET /books/<int:book_id>",
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
    assert cap.tree() == [request_tree, request_tree, ("GET /health", [])]
    contexts = [s for s in cap.spans() if s.name == "polydatum.context"]
    assert [
        {k: v for k, v in s.attributes.items() if k != "polydatum.context.id"} for s in contexts
    ] == [
        {
            "polydatum.meta.request_id": "req-1",
            "polydatum.meta.method": "GET",
            "polydatum.meta.route": "/books/<int:book_id>",
        },
        {
            "polydatum.meta.request_id": second.headers["x-request-id"],
            "polydatum.meta.method": "GET",
            "polydatum.meta.route": "/books/<int:book_id>",
        },
    ]
    # The context span ends before the request span: it closed before the
    # instrumentation's teardown_request ended the request span.
    request_spans = [s for s in cap.spans() if s.name == "GET /books/<int:book_id>"]
    assert [c.end <= r.end for c, r in zip(contexts, request_spans, strict=True)] == [True, True]
    assert shelf.log == ["setup /books/<int:book_id>", "commit"] * 2


def test_view_error_rolls_back_and_teardown_error_is_recorded(polydatum_telemetry: Any) -> None:
    cap = polydatum_telemetry
    app, shelf = build(cap)
    with wsgi_server(app) as url:
        failed = httpx.get(f"{url}/boom")
        wait_for(lambda: contexts_done(cap, 1), "the failed request's span")
        shelf.fail = True
        ok = httpx.get(f"{url}/books/2")
        wait_for(lambda: contexts_done(cap, 2), "the second request's span")
    assert (failed.status_code, ok.status_code) == (500, 200)
    assert shelf.log == ["setup /boom", "rollback RuntimeError", "setup /books/<int:book_id>"]
    boom_context, ok_context = [s for s in cap.spans() if s.name == "polydatum.context"]
    assert (boom_context.status, boom_context.attributes["error.type"]) == ("ERROR", "RuntimeError")
    assert (ok_context.status, ok_context.attributes["polydatum.teardown_errors"]) == ("UNSET", 1)
    teardowns = [s for s in cap.spans() if s.name == "polydatum.resource.teardown shelf"]
    assert [(s.status, s.attributes.get("error.type")) for s in teardowns] == [
        ("UNSET", None),
        ("ERROR", "OSError"),
    ]
    assert [
        (e["event"], e["resource"], e["error_type"])
        for e in cap.events()
        if e["log_level"] == "warning"
    ] == [("polydatum.resource.teardown_error_suppressed", "shelf", "OSError")]


def test_accessors_outside_a_request_and_before_init_app(polydatum_telemetry: Any) -> None:
    app = Flask(__name__)
    with app.app_context():
        with pytest.raises(RuntimeError, match=r"only available during a request"):
            pd_flask.dal()
    with app.test_request_context("/"):
        with pytest.raises(RuntimeError, match=r"call polydatum.integrations.flask.init_app"):
            pd_flask.dal()


def test_init_app_validates_the_data_manager() -> None:
    dm = DataManager()

    def meta(ctx: DataAccessContext) -> Iterator[None]:
        yield

    dm.register_resources(meta=meta)
    with pytest.raises(ValidationError, match=r"resource 'meta' collides with"):
        pd_flask.init_app(Flask(__name__), dm)


# ------------------------------------------------------- the request boundary

#: What httpx raises for a chunked body that breaks off (no final chunk).
INCOMPLETE = (
    "peer closed connection without sending complete message body (incomplete chunked read)"
)
#: What Flask answers for an unhandled error (werkzeug's InternalServerError page).
FLASK_500 = (
    "<!doctype html>\n<html lang=en>\n<title>500 Internal Server Error</title>\n"
    "<h1>Internal Server Error</h1>\n<p>The server encountered an internal error and was "
    "unable to complete your request. Either the server is overloaded or there is an "
    "error in the application.</p>\n"
)


class Ledger:
    """A resource recording what became of the request's work; ``refuse`` makes its
    COMMIT fail the way the SQL resource's does (``CommitError``)."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.refuse = False

    def __call__(self, ctx: DataAccessContext) -> Iterator[list[str]]:
        entries: list[str] = []
        try:
            yield entries
        except BaseException as error:
            self.log.append(f"rollback {type(error).__name__}")
            raise
        if self.refuse:
            self.log.append(f"refused {entries}")
            raise CommitError("the database refused the COMMIT")
        self.log.append(f"commit {entries}")


def ledger_app(**options: Any) -> tuple[Flask, Ledger]:
    dm = DataManager()
    ledger = Ledger()
    dm.register_resources(ledger=ledger)

    def replace(ctx: DataAccessContext) -> Iterator[None]:
        """Replaces the request's error when the client asks for it (``x-replace``)."""
        try:
            yield
        except KeyError as error:
            if ctx.meta.replace:
                raise RuntimeError("replaced by middleware") from error
            raise

    dm.register_context_middleware(replace)
    app = Flask(__name__)

    def meta() -> dict[str, Any]:
        return {**pd_flask.default_meta(), "replace": "x-replace" in request.headers}

    pd_flask.init_app(app, dm, meta=meta, **options)

    @app.post("/write/<name>")
    def write(name: str) -> Any:
        pd_flask.context().ledger.append(name)
        return "written", 201

    return app, ledger


def test_init_app_replaces_no_method_of_the_app() -> None:
    """Only public registration API: nothing is assigned on the app object, one
    after_request and one teardown_request function are registered."""
    app = Flask(__name__)
    dm = DataManager()
    before = {name: id(value) for name, value in vars(app).items()}
    pd_flask.init_app(app, dm)
    assert {name: id(value) for name, value in vars(app).items()} == before
    assert {k: len(v) for k, v in app.after_request_funcs.items()} == {None: 1}
    assert {k: len(v) for k, v in app.teardown_request_funcs.items()} == {None: 1}
    assert set(app.extensions) == {"polydatum"}
    with app.test_request_context("/"):
        assert pd_flask.get_data_manager() is dm


def test_a_failed_commit_raised_by_after_request_becomes_flasks_500() -> None:
    """Flask handles what the after_request function raises like any error of the
    request: ``got_request_exception``, then the 500 handler with the error as
    ``original_exception``, whose response is sent."""
    app, ledger = ledger_app()
    seen: list[BaseException | None] = []
    reported: list[str] = []

    @app.errorhandler(500)
    def server_error(error: InternalServerError) -> Any:
        seen.append(error.original_exception)
        return "could not save", 500

    got_request_exception.connect(
        lambda sender, exception, **extra: reported.append(repr(exception)), app, weak=False
    )
    ledger.refuse = True
    with wsgi_server(app) as url:
        response = httpx.post(f"{url}/write/a")
    assert (response.status_code, response.text) == (500, "could not save")
    assert len(response.headers["x-request-id"]) == 32  # echoed on the 500 too
    assert [(type(e), str(e)) for e in seen] == [(CommitError, "the database refused the COMMIT")]
    assert reported == ["CommitError('the database refused the COMMIT')"]
    assert ledger.log == ["refused ['a']"]


def test_a_failed_commit_propagates_out_of_a_testing_app() -> None:
    """With PROPAGATE_EXCEPTIONS (``app.testing``), Flask re-raises it to the caller."""
    app, ledger = ledger_app()
    app.testing = True
    ledger.refuse = True
    with pytest.raises(CommitError, match=r"^the database refused the COMMIT$"):
        app.test_client().post("/write/a")
    ledger.refuse = False
    assert app.test_client().post("/write/b").status_code == 201
    assert ledger.log == ["refused ['a']", "commit ['b']"]


def test_abort_and_error_handlers_after_writes_roll_back() -> None:
    app, ledger = ledger_app()

    class Refused(Exception):
        pass

    @app.errorhandler(Refused)
    def refused(error: Refused) -> Any:
        return "refused", 422

    @app.post("/abort")
    def aborting() -> Any:
        pd_flask.context().ledger.append("abort")
        abort(409)

    @app.post("/refuse")
    def refusing() -> Any:
        pd_flask.context().ledger.append("refuse")
        raise Refused()

    client = app.test_client()
    answers = [client.post("/abort"), client.post("/refuse"), client.post("/write/ok")]
    assert [(r.status_code, r.text) for r in answers] == [
        (409, Conflict().get_body()),
        (422, "refused"),
        (201, "written"),
    ]
    assert ledger.log == ["rollback ErrorResponse", "rollback ErrorResponse", "commit ['ok']"]


def test_an_error_handler_answering_success_commits() -> None:
    """Documented limitation: Flask does not tell which exception a handler handled,
    so a handler that answers 2xx for an exception commits (the status rule)."""
    app, ledger = ledger_app()

    class Ignorable(Exception):
        pass

    @app.errorhandler(Ignorable)
    def ignore(error: Ignorable) -> Any:
        return "never mind", 200

    @app.post("/ignorable")
    def ignorable() -> Any:
        pd_flask.context().ledger.append("kept")
        raise Ignorable()

    response = app.test_client().post("/ignorable")
    assert (response.status_code, response.text) == (200, "never mind")
    assert ledger.log == ["commit ['kept']"]


def test_unhandled_error_reaches_the_context_even_if_the_500_handler_says_200() -> None:
    """The unhandled exception (from ``got_request_exception``) ends the context; a 500
    handler answering 200 would claim rolled-back work, so polydatum answers 500."""
    app, ledger = ledger_app()

    @app.errorhandler(500)
    def lenient(error: InternalServerError) -> Any:
        return "all good", 200

    @app.post("/crash")
    def crash() -> Any:
        pd_flask.context().ledger.append("lost")
        raise KeyError("crash")

    response = app.test_client().post("/crash")
    assert (response.status_code, response.text) == (500, FLASK_500)
    assert ledger.log == ["rollback KeyError"]


def test_the_dal_is_usable_until_the_context_ends() -> None:
    """after_request functions registered after init_app run before polydatum's and
    share the request's context; those registered before run after it ended."""
    dm = DataManager()
    ledger = Ledger()
    dm.register_resources(ledger=ledger)
    app = Flask(__name__)
    late: list[str] = []

    @app.after_request
    def too_late(response: Any) -> Any:
        try:
            pd_flask.dal()
        except RuntimeError as error:
            late.append(str(error))
        return response

    pd_flask.init_app(app, dm)

    @app.after_request
    def in_time(response: Any) -> Any:
        pd_flask.context().ledger.append("after_request")
        return response

    @app.post("/write")
    def write() -> Any:
        pd_flask.context().ledger.append("view")
        return "written", 201

    assert app.test_client().post("/write").status_code == 201
    assert ledger.log == ["commit ['view', 'after_request']"]
    assert late == [
        "this request's polydatum context has ended: polydatum ends it before the response "
        "is sent, in the after_request function init_app registered (use the DAL in "
        "after_request functions registered after init_app, or open `with dm.context():`)"
    ]


def test_teardown_ends_a_context_that_after_request_did_not() -> None:
    """PROPAGATE_EXCEPTIONS skips after_request: teardown_request rolls back with the
    exception. A request context pushed by hand commits when it is popped; a failure
    there is logged, never raised from a teardown function."""
    app, ledger = ledger_app()
    app.testing = True

    @app.post("/crash")
    def crash() -> Any:
        pd_flask.context().ledger.append("lost")
        raise KeyError("crash")

    with pytest.raises(KeyError, match="crash"):
        app.test_client().post("/crash")
    with app.test_request_context("/"):
        pd_flask.context().ledger.append("by hand")
    with structlog.testing.capture_logs() as logs:
        ledger.refuse = True
        with app.test_request_context("/"):
            pd_flask.context().ledger.append("refused by hand")
        with pytest.raises(KeyError, match="crash"):  # a middleware replaces it: logged
            app.test_client().post("/crash", headers={"x-replace": "1"})
    assert ledger.log == [
        "rollback KeyError",
        "commit ['by hand']",
        "refused ['refused by hand']",
        "rollback RuntimeError",
    ]
    assert [
        (e["error_type"], e["log_level"])
        for e in logs
        if e["event"] == "polydatum.flask.teardown_failed"
    ] == [("CommitError", "warning"), ("RuntimeError", "warning")]


def test_a_streamed_body_uses_the_context_and_it_ends_after_the_body(
    polydatum_telemetry: Any,
) -> None:
    """A generator body runs with the context open (its service calls nest under the
    context span, a child of the request span) and the context ends when it is
    exhausted; a HEAD request sends no body, so its context ends in after_request."""
    cap = polydatum_telemetry
    app, shelf = build(cap)
    produced: list[int] = []

    @app.get("/plain")
    def plain() -> Any:
        return Response(iter_chunks(), mimetype="text/plain")  # no data: no context

    @app.get("/shelf")
    def whole_shelf() -> Any:
        books = pd_flask.dal().books  # opened in the view, used while streaming

        def body() -> Iterator[str]:
            for book_id in (1, 2):
                produced.append(book_id)
                yield books.get(book_id)["title"] + "\n"

        return Response(body(), mimetype="text/plain")

    with wsgi_server(app) as url:
        streamed = httpx.get(f"{url}/shelf")
        head = httpx.head(f"{url}/shelf")
        no_data = httpx.get(f"{url}/plain")
        wait_for(lambda: contexts_done(cap, 3), "three request spans")
    assert (streamed.status_code, streamed.text) == (200, "Dune\nEmma\n")
    assert (head.status_code, head.content, produced) == (200, b"", [1, 2])
    assert (no_data.status_code, no_data.text) == (200, "never sent")
    assert shelf.log == ["setup /shelf", "commit"]  # the HEAD request used no book
    contexts = [s for s in cap.spans() if s.name == "polydatum.context"]
    assert [s.status for s in contexts] == ["UNSET", "UNSET"]  # both committed
    assert cap.tree() == [
        (
            "GET /shelf",
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
        ),
        ("HEAD /shelf", [("polydatum.context", [])]),
        ("GET /plain", []),
    ]


def test_a_streamed_response_replaced_by_flask_rolls_back() -> None:
    """An after_request function that runs after polydatum's raises: Flask sends a 500
    instead of the streamed response, whose context then ends with that error."""
    dm = DataManager()
    ledger = Ledger()
    dm.register_resources(ledger=ledger)
    app = Flask(__name__)

    @app.after_request
    def breaks(response: Any) -> Any:
        raise LookupError("after_request failed")

    pd_flask.init_app(app, dm)

    @app.get("/stream")
    def stream() -> Any:
        pd_flask.context().ledger.append("streamed")
        return Response(iter_chunks(), mimetype="text/plain")

    response = app.test_client().get("/stream")
    assert (response.status_code, response.text) == (500, FLASK_500)
    assert ledger.log == ["rollback LookupError"]


def iter_chunks() -> Iterator[bytes]:
    yield b"never sent"


def test_a_stream_with_context_body_that_fails_rolls_back() -> None:
    """Flask tears the request down with the body's error (teardown_request), then the
    error breaks the transfer off."""
    app, ledger = ledger_app()

    @app.get("/failing")
    def failing() -> Any:
        def body() -> Iterator[bytes]:
            yield b"started\n"
            pd_flask.context().ledger.append("half")  # the body opens the context
            raise KeyError("body failed")

        return Response(stream_with_context(body()), mimetype="text/plain")

    with wsgi_server(app) as url:
        with pytest.raises(httpx.RemoteProtocolError) as raised:
            httpx.get(f"{url}/failing")
    assert str(raised.value) == INCOMPLETE
    assert ledger.log == ["rollback KeyError"]
