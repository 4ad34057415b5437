"""Flask integration through a real (werkzeug) server, traced by
``opentelemetry-instrumentation-flask`` with the test's tracer provider."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from flask import Flask
from opentelemetry.instrumentation.flask import FlaskInstrumentor

from polydatum import DataManager, Service
from polydatum.context import DataAccessContext
from polydatum.errors import ValidationError
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
