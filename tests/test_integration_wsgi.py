"""Plain WSGI middleware through a real (werkzeug) server, inside
``opentelemetry-instrumentation-wsgi``'s OpenTelemetryMiddleware."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterable, Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware

from polydatum import DataManager, Service
from polydatum.context import DataAccessContext
from polydatum.integrations import dispose_resources
from polydatum.integrations.wsgi import PolydatumWSGIMiddleware, get_context
from polydatum.testing import TelemetryCapture
from tests._servers import wait_for, wsgi_server


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


def build(cap: TelemetryCapture) -> tuple[Any, DataManager, Shelf]:
    dm = cap.data_manager(meta_attributes=("request_id", "method"))
    dm.register_services(books=Books())
    shelf = Shelf()
    dm.register_resources(shelf=shelf)

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        ctx = get_context(environ)
        assert dm.get_active_context() is ctx
        start_response("200 OK", [("Content-Type", "text/plain")])

        def body() -> Iterator[bytes]:
            # Runs while the server writes the response: the context is still open.
            for book_id in (1, 2):
                if environ["PATH_INFO"] == "/broken" and book_id == 2:
                    raise LookupError("book 2 vanished mid-stream")
                yield (ctx.dal.books.title(book_id) + "\n").encode()

        return body()

    wrapped = OpenTelemetryMiddleware(
        PolydatumWSGIMiddleware(app, dm), tracer_provider=cap.tracer_provider
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


def test_error_while_streaming_reaches_the_context(polydatum_telemetry: Any) -> None:
    cap = polydatum_telemetry
    app, _dm, shelf = build(cap)
    with wsgi_server(app) as url:
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{url}/broken")  # headers sent, then the body breaks off
        wait_for(lambda: any(s.name.startswith("GET /") for s in cap.spans()), "the request span")
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
