"""The ASGI request boundary, over real HTTP against real databases.

Every test runs a FastAPI or Starlette app under a real uvicorn server (``httpx`` as the
client) on SQLite and on the PostgreSQL server (the ``backend`` fixture), and reads what
the database holds with a fresh engine. ``flavour`` is how the app configures SQL:

* ``sync``: ``configure_sql(dm, url)``, a plain :class:`~polydatum.sql.SQLResource`,
  which commits while the context ends (a failed commit raises ``CommitError``);
* ``sync-transaction``: ``configure_sql(..., transaction=True)``: the transaction
  middleware commits and raises the database's own error;
* ``async`` / ``async-transaction``: the same with ``asyncio=True`` (an
  :class:`~polydatum.sql.AsyncSQLResource`, async services).

A write that fails at COMMIT: on PostgreSQL two rows with the same body under a
``DEFERRABLE INITIALLY DEFERRED`` unique constraint; on SQLite a row whose deferred
foreign key points at no row (polydatum turns ``foreign_keys`` on).

A context middleware, ``witness``, records what reached the context: the name of the
exception thrown into it, or ``"ok"``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import sql_backends
from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, StreamingResponse
from fastapi.testclient import TestClient
from pydantic import BaseModel
from sql_backends import Backend
from sqlalchemy import create_engine, text
from sqlalchemy.exc import IntegrityError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.routing import Mount, Route

from polydatum import DataManager, Service
from polydatum.context import DataAccessContext
from polydatum.errors import CommitError, NoActiveContextError, ValidationError
from polydatum.integrations.asgi import HandledAsSuccess, PolydatumMiddleware, get_dal
from polydatum.integrations.fastapi import DAL
from polydatum.sql import configure_sql
from tests._servers import uvicorn_server, wait_for

backend = sql_backends.backend  # the fixture: SQLite and PostgreSQL

FLAVOURS = ("sync", "sync-transaction", "async", "async-transaction")
SYNC_FLAVOURS = ("sync", "sync-transaction")
SERVER_ERROR = (500, "Internal Server Error")


# --------------------------------------------------------------------- the database


def schema(backend: Backend) -> list[str]:
    unique = (
        ", CONSTRAINT notes_body_unique UNIQUE (body) DEFERRABLE INITIALLY DEFERRED"
        if backend.name == "postgresql"
        else ""
    )
    return [
        "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL, parent_id INTEGER "
        f"REFERENCES notes (id) DEFERRABLE INITIALLY DEFERRED{unique})"
    ]


def create_schema(backend: Backend) -> None:
    engine = create_engine(backend.url)
    try:
        with engine.begin() as conn:
            for statement in schema(backend):
                conn.execute(text(statement))
    finally:
        engine.dispose()


def stored(backend: Backend) -> list[tuple[int, str]]:
    """The table's rows, read with a fresh engine (nothing cached, no shared pool)."""
    engine = create_engine(backend.url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT id, body FROM notes ORDER BY id"))
            return [(row[0], row[1]) for row in rows]
    finally:
        engine.dispose()


INSERT = text("INSERT INTO notes (id, body, parent_id) VALUES (:id, :body, :parent)")


def doomed_rows(backend_name: str, note_id: int) -> list[dict[str, Any]]:
    """Rows whose INSERTs succeed and whose COMMIT fails (see the module docs)."""
    if backend_name == "postgresql":
        return [
            {"id": note_id, "body": "twin", "parent": None},
            {"id": note_id + 1000, "body": "twin", "parent": None},
        ]
    return [{"id": note_id, "body": "orphan", "parent": -1}]


def commit_failure(backend_name: str) -> str:
    """The driver's message for the failed COMMIT of :func:`doomed_rows`."""
    if backend_name == "postgresql":
        return (
            'duplicate key value violates unique constraint "notes_body_unique"\n'
            "DETAIL:  Key (body)=(twin) already exists."
        )
    return "FOREIGN KEY constraint failed"


# ---------------------------------------------------------------------- services


class Notes(Service):
    """Writes and reads through the request's session (sync flavours)."""

    def __init__(self, backend_name: str) -> None:
        super().__init__()
        self.backend_name = backend_name

    def add(self, note_id: int, body: str) -> None:
        self._ctx.db.execute(INSERT, {"id": note_id, "body": body, "parent": None})

    def doomed(self, note_id: int) -> None:
        for row in doomed_rows(self.backend_name, note_id):
            self._ctx.db.execute(INSERT, row)

    def add_then_collide(self, note_id: int) -> None:
        """A write, then a failing statement whose error is caught here (PostgreSQL then
        aborts the transaction: its COMMIT can only roll back)."""
        self.add(note_id, "first")
        try:
            self.add(note_id, "again")
        except IntegrityError:
            pass

    def get(self, note_id: int) -> str | None:
        row = self._ctx.db.execute(text("SELECT body FROM notes WHERE id = :id"), {"id": note_id})
        return row.scalar_one_or_none()  # type: ignore[no-any-return]


class AsyncNotes(Service):
    """:class:`Notes` on the :class:`~polydatum.sql.AsyncSQLResource`."""

    def __init__(self, backend_name: str) -> None:
        super().__init__()
        self.backend_name = backend_name

    async def add(self, note_id: int, body: str) -> None:
        session = await self._ctx.aresource("db")
        await session.execute(INSERT, {"id": note_id, "body": body, "parent": None})

    async def doomed(self, note_id: int) -> None:
        session = await self._ctx.aresource("db")
        for row in doomed_rows(self.backend_name, note_id):
            await session.execute(INSERT, row)

    async def add_then_collide(self, note_id: int) -> None:
        await self.add(note_id, "first")
        try:
            await self.add(note_id, "again")
        except IntegrityError:
            pass

    async def get(self, note_id: int) -> str | None:
        session = await self._ctx.aresource("db")
        row = await session.execute(text("SELECT body FROM notes WHERE id = :id"), {"id": note_id})
        return row.scalar_one_or_none()  # type: ignore[no-any-return]


async def run(value: Any) -> Any:
    """A service call's result: awaited for the async flavours."""
    return await value if inspect.isawaitable(value) else value


# ------------------------------------------------------------------------ the site


class Conflict(Exception):
    """A domain error the apps' exception handlers turn into responses."""


class Soft(Exception):
    """A domain error an exception handler answers with 200 (it cannot: see the docs)."""


class Item(BaseModel):
    quantity: int


@dataclass
class Site:
    """One app under test: its DataManager and what its context middleware saw."""

    backend: Backend
    flavour: str
    dm: DataManager
    seen: list[str] = field(default_factory=list)
    background: list[Any] = field(default_factory=list)


def make_dm(backend: Backend, flavour: str, seen: list[str]) -> DataManager:
    dm = DataManager()
    asynchronous = flavour.startswith("async")
    sql = configure_sql(
        dm,
        backend.url,
        asyncio=asynchronous,
        safe_name=None,
        transaction=flavour.endswith("transaction"),
    )
    if not asynchronous:
        backend.track(sql.db)  # async engines are disposed by the lifespan shutdown

    def witness(ctx: DataAccessContext) -> Iterator[None]:
        try:
            yield
        except BaseException as error:
            seen.append(type(error).__name__)
            raise
        seen.append("ok")

    dm.register_context_middleware(witness)
    notes = AsyncNotes(backend.name) if asynchronous else Notes(backend.name)
    dm.register_services(notes=notes)
    return dm


def fastapi_site(backend: Backend, flavour: str, **options: Any) -> tuple[FastAPI, Site]:
    """The FastAPI app most tests use: one endpoint per way a request can end."""
    create_schema(backend)
    seen: list[str] = []
    site = Site(backend, flavour, make_dm(backend, flavour, seen), seen)
    app = FastAPI()
    app.add_middleware(PolydatumMiddleware, data_manager=site.dm, **options)

    @app.exception_handler(Conflict)
    async def conflict(request: Request, error: Conflict) -> JSONResponse:
        return JSONResponse({"error": str(error)}, status_code=422)

    def soft(request: Request, error: Soft) -> JSONResponse:  # sync: run in the threadpool
        return JSONResponse({"status": "fine, really"})

    app.add_exception_handler(Soft, soft)  # type: ignore[arg-type]

    @app.post("/notes/{note_id}")
    async def add(note_id: int, dal: DAL) -> dict[str, str]:
        await run(dal.notes.add(note_id, f"note {note_id}"))
        return {"status": "saved"}

    @app.get("/notes/{note_id}")
    async def read(note_id: int, dal: DAL) -> dict[str, str | None]:
        return {"body": await run(dal.notes.get(note_id))}

    @app.post("/doomed/{note_id}")
    async def doomed(note_id: int, dal: DAL) -> dict[str, str]:
        await run(dal.notes.doomed(note_id))
        return {"status": "saved"}

    @app.post("/collide/{note_id}")
    async def collide(note_id: int, dal: DAL) -> dict[str, str]:
        await run(dal.notes.add_then_collide(note_id))
        return {"status": "saved"}

    @app.post("/taken/{note_id}")
    async def taken(note_id: int, dal: DAL) -> None:
        await run(dal.notes.add(note_id, "taken"))
        raise HTTPException(409, "taken")

    @app.post("/conflict/{note_id}")
    async def conflicting(note_id: int, dal: DAL) -> None:
        await run(dal.notes.add(note_id, "conflict"))
        raise Conflict("refused")

    @app.post("/soft/{note_id}")
    async def soft_failure(note_id: int, dal: DAL) -> None:
        await run(dal.notes.add(note_id, "soft"))
        raise Soft("handled as a success")

    @app.post("/status/{status}/{note_id}")
    async def with_status(status: int, note_id: int, dal: DAL) -> Any:
        await run(dal.notes.add(note_id, f"status {status}"))
        if 300 <= status < 400:
            return RedirectResponse(f"/notes/{note_id}", status_code=status)
        return JSONResponse({"status": status}, status_code=status)

    async def audit(dal: DAL) -> None:  # a dependency that writes before validation fails
        await run(dal.notes.add(7, "audit"))

    @app.post("/items", dependencies=[Depends(audit)])
    async def items(item: Item) -> dict[str, int]:
        return {"quantity": item.quantity}

    if flavour in SYNC_FLAVOURS:  # sync endpoints (the threadpool) need sync services

        @app.post("/sync/notes/{note_id}")
        def sync_add(note_id: int, dal: DAL) -> dict[str, str]:
            dal.notes.add(note_id, f"note {note_id}")
            return {"status": "saved"}

        @app.post("/sync/doomed/{note_id}")
        def sync_doomed(note_id: int, dal: DAL) -> dict[str, str]:
            dal.notes.doomed(note_id)
            return {"status": "saved"}

        @app.post("/sync/taken/{note_id}")
        def sync_taken(note_id: int, dal: DAL) -> None:
            dal.notes.add(note_id, "taken")
            raise HTTPException(409, "taken")

        @app.post("/sync/conflict/{note_id}")
        def sync_conflicting(note_id: int, dal: DAL) -> None:
            dal.notes.add(note_id, "conflict")
            raise Conflict("refused")

    return app, site


def server_errors(caplog: pytest.LogCaptureFixture, count: int) -> list[BaseException]:
    """The exceptions uvicorn logged as raised out of the app (waits for ``count``)."""

    def found() -> list[BaseException]:
        return [
            r.exc_info[1]
            for r in caplog.records
            if r.name == "uvicorn.error" and r.exc_info and r.exc_info[1] is not None
        ]

    wait_for(lambda: len(found()) >= count, f"{count} error(s) logged by uvicorn")
    return found()


@pytest.fixture(params=FLAVOURS)
def flavour(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# ---------------------------------------------------------------- the commit path


def test_failed_commit_answers_500_and_stores_nothing(
    backend: Backend, flavour: str, caplog: pytest.LogCaptureFixture
) -> None:
    app, site = fastapi_site(backend, flavour)
    paths = ["/doomed/1", "/sync/doomed/2"] if flavour in SYNC_FLAVOURS else ["/doomed/1"]
    with caplog.at_level(logging.ERROR, logger="uvicorn.error"):
        with uvicorn_server(app) as server:  # one connection each: a 500 closes it
            answers = [httpx.post(server.url + path) for path in paths]
            errors = server_errors(caplog, len(paths))
    assert [(r.status_code, r.text) for r in answers] == [SERVER_ERROR] * len(paths)
    assert stored(backend) == []
    assert site.seen == ["ok"] * len(paths)  # the commit failed after the middleware ran
    if flavour.endswith("transaction"):  # the middleware raises the database's own error
        assert [type(e) for e in errors] == [IntegrityError] * len(paths)
        database_errors = errors
    else:
        assert [type(e) for e in errors] == [CommitError] * len(paths)
        assert [type(e.__cause__) for e in errors] == [IntegrityError] * len(paths)
        database_errors = [e.__cause__ for e in errors]  # type: ignore[misc]
    assert [str(e.orig) for e in database_errors] == [  # type: ignore[attr-defined]
        commit_failure(backend.name)
    ] * len(paths)


def test_transaction_spoiled_by_a_caught_statement_error_answers_500(
    backend: Backend, flavour: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A service catches a failed statement and carries on. PostgreSQL has aborted the
    transaction (its COMMIT would roll back); polydatum treats every backend alike: the
    request's work is not committed, so the client gets 500 and nothing is stored."""
    app, site = fastapi_site(backend, flavour)
    with caplog.at_level(logging.ERROR, logger="uvicorn.error"):
        with uvicorn_server(app) as server:
            response = httpx.post(f"{server.url}/collide/1")
            errors = server_errors(caplog, 1)
    assert (response.status_code, response.text) == SERVER_ERROR
    assert [isinstance(e, CommitError) for e in errors] == [True]
    assert [type(e.__cause__) for e in errors] == [IntegrityError]
    assert stored(backend) == []
    assert site.seen == ["ok"]


def test_http_exception_after_a_write_answers_409_and_stores_nothing(
    backend: Backend, flavour: str
) -> None:
    app, site = fastapi_site(backend, flavour)
    paths = ["/taken/1", "/sync/taken/2"] if flavour in SYNC_FLAVOURS else ["/taken/1"]
    with uvicorn_server(app) as server, httpx.Client(base_url=server.url) as client:
        answers = [client.post(path) for path in paths]
        saved = client.post("/notes/3")
    assert [(r.status_code, r.json()) for r in answers] == [(409, {"detail": "taken"})] * len(paths)
    assert (saved.status_code, saved.json()) == (200, {"status": "saved"})
    assert stored(backend) == [(3, "note 3")]
    assert site.seen == ["HTTPException"] * len(paths) + ["ok"]


def test_exception_handler_response_rolls_back(backend: Backend, flavour: str) -> None:
    """``@app.exception_handler`` (async) answers 422: the exception reached the context."""
    app, site = fastapi_site(backend, flavour)
    paths = ["/conflict/1", "/sync/conflict/2"] if flavour in SYNC_FLAVOURS else ["/conflict/1"]
    with uvicorn_server(app) as server, httpx.Client(base_url=server.url) as client:
        answers = [client.post(path) for path in paths]
    assert [(r.status_code, r.json()) for r in answers] == [(422, {"error": "refused"})] * len(
        paths
    )
    assert stored(backend) == []
    assert site.seen == ["Conflict"] * len(paths)


def test_request_validation_error_after_a_dependency_wrote_rolls_back(
    backend: Backend, flavour: str
) -> None:
    app, site = fastapi_site(backend, flavour)
    with uvicorn_server(app) as server, httpx.Client(base_url=server.url) as client:
        invalid = client.post("/items", json={"quantity": "many"})
        valid = client.post("/items", json={"quantity": 3})
    assert invalid.status_code == 422
    assert invalid.json() == {
        "detail": [
            {
                "type": "int_parsing",
                "loc": ["body", "quantity"],
                "msg": "Input should be a valid integer, unable to parse string as an integer",
                "input": "many",
            }
        ]
    }
    assert (valid.status_code, valid.json()) == (200, {"quantity": 3})
    assert stored(backend) == [(7, "audit")]  # the valid request's audit row only
    assert site.seen == ["RequestValidationError", "ok"]


def test_handler_answering_success_for_an_exception_answers_500(
    backend: Backend, flavour: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A (sync) handler answers 200 for ``Soft``: the context rolled back for it, so a
    200 would claim work that is not there. polydatum raises HandledAsSuccess instead of
    sending it: the client gets 500."""
    app, site = fastapi_site(backend, flavour)
    with caplog.at_level(logging.ERROR, logger="uvicorn.error"):
        with uvicorn_server(app) as server:
            response = httpx.post(f"{server.url}/soft/1")
            errors = server_errors(caplog, 1)
    assert (response.status_code, response.text) == SERVER_ERROR
    assert [(type(e), str(e), type(e.__cause__)) for e in errors] == [
        (
            HandledAsSuccess,
            "the application answered 200 for Soft, but the request's work was rolled back "
            "for that exception: the response is not sent",
            Soft,
        )
    ]
    assert stored(backend) == []
    assert site.seen == ["Soft"]


@pytest.mark.parametrize(
    ("error_status", "expected"),
    [
        (None, [(303, "status 303")]),  # the default: 4xx/5xx roll back, 3xx commits
        (lambda status: status >= 500, [(303, "status 303"), (409, "status 409")]),
        (lambda status: status >= 300, []),
    ],
    ids=["default", "only-5xx", "3xx-too"],
)
def test_error_status_without_an_exception(
    backend: Backend,
    flavour: str,
    error_status: Callable[[int], bool] | None,
    expected: list[tuple[int, str]],
) -> None:
    options = {} if error_status is None else {"error_status": error_status}
    app, site = fastapi_site(backend, flavour, **options)
    with uvicorn_server(app) as server, httpx.Client(base_url=server.url) as client:
        answers = [client.post(f"/status/{status}/{status}") for status in (303, 409, 503)]
    # The response stands as the app made it; only what is committed differs.
    assert [r.status_code for r in answers] == [303, 409, 503]
    assert [r.headers.get("location") for r in answers] == ["/notes/303", None, None]
    assert [r.json() for r in answers[1:]] == [{"status": 409}, {"status": 503}]
    assert stored(backend) == expected
    committed = {status for status, _ in expected}
    assert site.seen == [
        "ok" if status in committed else "ErrorResponse" for status in (303, 409, 503)
    ]


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_every_read_after_a_2xx_write_sees_the_write(backend: Backend, flavour: str) -> None:
    """50 writes, each followed by a read on the same keep-alive connection; with the
    sync flavour every other write goes through a sync endpoint (the threadpool)."""
    app, _ = fastapi_site(backend, flavour)
    reads = []
    with uvicorn_server(app) as server, httpx.Client(base_url=server.url) as client:
        for note_id in range(1, 51):
            sync = flavour == "sync" and note_id % 2 == 0
            written = client.post(f"{'/sync' if sync else ''}/notes/{note_id}")
            assert (written.status_code, written.json()) == (200, {"status": "saved"})
            reads.append(client.get(f"/notes/{note_id}").json())
    assert reads == [{"body": f"note {note_id}"} for note_id in range(1, 51)]
    assert stored(backend) == [(note_id, f"note {note_id}") for note_id in range(1, 51)]


# ------------------------------------------------------------------------ streaming


def streaming_site(backend: Backend, flavour: str, hold: Hold | None = None) -> tuple[Any, Site]:
    """An app whose ``/stream/{id}`` writes, then streams chunks that use the DAL."""
    app, site = fastapi_site(backend, flavour)
    if hold is not None:
        site.dm.register_context_middleware(hold)

    @app.get("/stream/{note_id}")
    async def stream(note_id: int, dal: DAL, doomed: bool = False, forever: bool = False) -> Any:
        await run(dal.notes.doomed(note_id) if doomed else dal.notes.add(note_id, "head"))

        async def body() -> AsyncIterator[bytes]:
            yield b"first\n"
            if forever:  # until the client walks away (Starlette then cancels the stream)
                await asyncio.sleep(30)
            await run(dal.notes.add(note_id + 1, "tail"))  # the stream uses the DAL
            yield b"second\n"

        return StreamingResponse(body(), media_type="text/plain")

    return (hold.wrap(app) if hold is not None else app), site


def test_streaming_response_commits_before_its_final_message(
    backend: Backend, flavour: str
) -> None:
    app, site = streaming_site(backend, flavour)
    with uvicorn_server(app) as server:
        response = httpx.get(f"{server.url}/stream/1")
        rows = stored(backend)  # as soon as the client has the whole response
    assert (response.status_code, response.text) == (200, "first\nsecond\n")
    assert rows == [(1, "head"), (2, "tail")]
    assert site.seen == ["ok"]


def test_streaming_response_whose_commit_fails_is_cut_off(
    backend: Backend, flavour: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The status and the first chunks went out; the final message is never sent: the
    server aborts the connection, the client gets an incomplete response, not a 200."""
    app, site = streaming_site(backend, flavour)
    received: list[bytes] = []
    with caplog.at_level(logging.ERROR, logger="uvicorn.error"):
        with uvicorn_server(app) as server:
            with pytest.raises(httpx.RemoteProtocolError) as failure:
                with httpx.stream("GET", f"{server.url}/stream/1?doomed=true") as response:
                    assert response.status_code == 200
                    received.extend(response.iter_raw())
            errors = server_errors(caplog, 1)
    assert str(failure.value) == (
        "peer closed connection without sending complete message body (incomplete chunked read)"
    )
    assert b"".join(received) == b"first\nsecond\n"  # the chunks, never the end
    expected = IntegrityError if flavour.endswith("transaction") else CommitError
    assert [type(e) for e in errors] == [expected]
    assert stored(backend) == []
    assert site.seen == ["ok"]


def test_client_disconnect_mid_stream_rolls_back(backend: Backend, flavour: str) -> None:
    app, site = streaming_site(backend, flavour)
    with uvicorn_server(app) as server:
        with httpx.Client() as client:
            with client.stream("GET", f"{server.url}/stream/1?forever=true") as response:
                first = next(response.iter_raw())
        # Leaving the block closed the connection: Starlette stops the stream.
        wait_for(lambda: site.seen != [], "the request's context to end")
    assert (response.status_code, first) == (200, b"first\n")
    assert site.seen == ["IncompleteResponse"]
    assert stored(backend) == []


class Hold:
    """A context middleware that holds the context's end until released, and an ASGI
    wrapper that tells when the app was told the client disconnected."""

    def __init__(self) -> None:
        self.ending = threading.Event()
        self.release = threading.Event()
        self.disconnected = threading.Event()

    async def __call__(self, ctx: DataAccessContext) -> AsyncIterator[None]:
        yield
        self.ending.set()
        await asyncio.to_thread(self.release.wait, 10)

    def wrap(self, app: Any) -> Callable[..., Awaitable[None]]:
        async def wrapped(scope: Any, receive: Any, send: Any) -> None:
            async def watched_receive() -> Any:
                message = await receive()
                if message["type"] == "http.disconnect":
                    self.disconnected.set()
                return message

            await app(scope, watched_receive, send)

        return wrapped


@pytest.mark.parametrize("flavour", ["sync", "async-transaction"])
def test_disconnect_while_the_context_ends_does_not_interrupt_the_commit(
    backend: Backend, flavour: str
) -> None:
    """The client walks away while the stream's context is ending (a slow commit):
    Starlette cancels the stream, but ending the context is shielded: it commits."""
    hold = Hold()
    app, site = streaming_site(backend, flavour, hold)
    with uvicorn_server(app) as server:
        try:
            with httpx.Client() as client:
                with client.stream("GET", f"{server.url}/stream/1") as response:
                    chunks = response.iter_raw()
                    assert next(chunks) == b"first\n"
                    assert hold.ending.wait(10), "the context never started to end"
            assert hold.disconnected.wait(10), "the app was never told of the disconnect"
        finally:
            hold.release.set()
        wait_for(lambda: site.seen != [], "the request's context to end")
    assert site.seen == ["ok"]
    assert stored(backend) == [(1, "head"), (2, "tail")]


# ------------------------------------------------------------------ background tasks


def background_site(backend: Backend, flavour: str) -> tuple[FastAPI, Site]:
    app, site = fastapi_site(backend, flavour)

    @app.post("/later/{note_id}")
    async def later(note_id: int, dal: DAL, tasks: BackgroundTasks, own: bool = False) -> Any:
        await run(dal.notes.add(note_id, "now"))
        tasks.add_task(with_own_context if own else with_request_dal, dal, note_id + 1)
        return {"status": "saved"}

    async def with_request_dal(dal: Any, note_id: int) -> None:
        try:
            await run(dal.notes.add(note_id, "later"))
        except Exception as error:
            site.background.append(error)
        else:
            site.background.append("written")

    async def with_own_context(dal: Any, note_id: int) -> None:
        async with site.dm.dal() as own:
            await run(own.notes.add(note_id, "later"))
        site.background.append("written")

    return app, site


def test_background_task_with_the_request_dal_gets_no_active_context(
    backend: Backend, flavour: str
) -> None:
    app, site = background_site(backend, flavour)
    with uvicorn_server(app) as server:
        response = httpx.post(f"{server.url}/later/1")
        wait_for(lambda: site.background != [], "the background task")
    assert (response.status_code, response.json()) == (200, {"status": "saved"})
    [error] = site.background
    assert (type(error), str(error)) == (
        NoActiveContextError,
        "A DataAccessContext must be started to access the DAL: "
        "use `with dm.dal() as dal:` or `with dm.context() as ctx:`.",
    )
    assert stored(backend) == [(1, "now")]


def test_background_task_opening_its_own_context_writes(backend: Backend, flavour: str) -> None:
    app, site = background_site(backend, flavour)
    with uvicorn_server(app) as server:
        response = httpx.post(f"{server.url}/later/1?own=true")
        wait_for(lambda: site.background != [], "the background task")
    assert (response.status_code, response.json()) == (200, {"status": "saved"})
    assert site.background == ["written"]
    assert stored(backend) == [(1, "now"), (2, "later")]
    assert site.seen == ["ok", "ok"]  # the request's context, then the task's own


# ------------------------------------------------- Starlette: where exceptions are handled


def starlette_site(backend: Backend, *, inner: bool = False) -> tuple[Starlette, Site]:
    """Starlette routes (route-level handling), a mounted raw ASGI app (the app's
    ExceptionMiddleware handles what it raises), sync and async handlers; with
    ``inner``, a BaseHTTPMiddleware between polydatum and the endpoints."""
    create_schema(backend)
    seen: list[str] = []
    site = Site(backend, "sync", make_dm(backend, "sync", seen), seen)

    async def taken(request: Request) -> JSONResponse:
        get_dal(request).notes.add(int(request.path_params["note_id"]), "taken")
        raise StarletteHTTPException(409, "taken")

    async def conflicting(request: Request) -> JSONResponse:
        get_dal(request).notes.add(int(request.path_params["note_id"]), "conflict")
        raise Conflict("refused")

    async def soft(request: Request) -> JSONResponse:
        get_dal(request).notes.add(int(request.path_params["note_id"]), "soft")
        raise Soft("handled as a success")

    async def raw(scope: Any, receive: Any, send: Any) -> None:  # no route-level handling
        scope["polydatum.context"].dal.notes.add(9, "raw")
        raise StarletteHTTPException(409, "raw conflict")

    def on_conflict(request: Request, error: Exception) -> JSONResponse:  # sync handler
        return JSONResponse({"error": str(error)}, status_code=422)

    async def on_soft(request: Request, error: Exception) -> JSONResponse:
        return JSONResponse({"status": "fine, really"})

    class Passthrough(BaseHTTPMiddleware):
        async def dispatch(self, request: Request, call_next: Any) -> Any:
            return await call_next(request)

    app = Starlette(
        routes=[
            Route("/taken/{note_id:int}", taken, methods=["POST"]),
            Route("/conflict/{note_id:int}", conflicting, methods=["POST"]),
            Route("/soft/{note_id:int}", soft, methods=["POST"]),
            Mount("/raw", app=raw),
        ],
        exception_handlers={Conflict: on_conflict, Soft: on_soft},
    )
    if inner:
        app.add_middleware(Passthrough)  # added first: inside polydatum's middleware
    app.add_middleware(PolydatumMiddleware, data_manager=site.dm)
    return app, site


def test_starlette_handled_exceptions_reach_the_context(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    app, site = starlette_site(backend)
    with caplog.at_level(logging.ERROR, logger="uvicorn.error"):
        with uvicorn_server(app) as server:  # one connection each: a 500 closes it
            paths = ("/taken/1", "/conflict/2", "/raw/x", "/soft/3")
            answers = [httpx.post(server.url + path) for path in paths]
            errors = server_errors(caplog, 1)
    assert [(r.status_code, r.text) for r in answers] == [
        (409, "taken"),  # HTTPException, handled at the route level
        (422, '{"error":"refused"}'),  # a sync exception handler
        (409, "raw conflict"),  # handled by the app's ExceptionMiddleware
        SERVER_ERROR,  # an async handler answered 200 for an exception
    ]
    assert [(type(e), type(e.__cause__)) for e in errors] == [(HandledAsSuccess, Soft)]
    assert stored(backend) == []
    assert site.seen == ["HTTPException", "Conflict", "HTTPException", "Soft"]


def test_base_http_middleware_inside_hides_the_exception_the_status_rule_applies(
    backend: Backend,
) -> None:
    """The documented limit: a BaseHTTPMiddleware between polydatum and the endpoint
    relays the handler's response from its own task, without the exception. An error
    status still rolls back (ErrorResponse); a 200 for an exception commits."""
    app, site = starlette_site(backend, inner=True)
    with uvicorn_server(app) as server, httpx.Client(base_url=server.url) as client:
        answers = [client.post(p) for p in ("/taken/1", "/conflict/2", "/soft/3")]
    assert [(r.status_code, r.text) for r in answers] == [
        (409, "taken"),
        (422, '{"error":"refused"}'),
        (200, '{"status":"fine, really"}'),
    ]
    assert stored(backend) == [(3, "soft")]
    assert site.seen == ["ErrorResponse", "ErrorResponse", "ok"]


# ------------------------------------------------------------------------- startup


def invalid_dm() -> DataManager:
    def meta(ctx: DataAccessContext) -> Iterator[str]:
        yield "collides with ctx.meta"

    def dal(ctx: DataAccessContext) -> Iterator[str]:
        yield "collides with ctx.dal"

    dm = DataManager()
    dm.register_resources(meta=meta, dal=dal)
    return dm


PROBLEMS = (
    "2 problem(s) in the DataManager registration:\n"
    "  - resource 'meta' collides with DataAccessContext.meta: ctx.meta returns the "
    "attribute, not the resource; rename it\n"
    "  - resource 'dal' collides with DataAccessContext.dal: ctx.dal returns the "
    "attribute, not the resource; rename it"
)


def apps_with_lifespan(dm: DataManager, log: list[str]) -> dict[str, Any]:
    """A Starlette and a FastAPI app, each with startup and shutdown handlers."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        log.append("app startup")
        yield
        log.append("app shutdown")

    async def home(request: Request) -> PlainTextResponse:
        return PlainTextResponse("home")

    starlette = Starlette(routes=[Route("/", home)], lifespan=lifespan)
    starlette.add_middleware(PolydatumMiddleware, data_manager=dm)
    fastapi = FastAPI(lifespan=lifespan)
    fastapi.add_api_route("/", home)
    fastapi.add_middleware(PolydatumMiddleware, data_manager=dm)
    return {"starlette": starlette, "fastapi": fastapi}


def enter_test_client(app: Any) -> BaseException | str:
    """``with TestClient(app): ...`` in a thread, bounded: what it raised, or the body
    of ``GET /`` if it started. A hang fails the test instead of blocking the suite."""
    outcome: list[BaseException | str] = []

    def use() -> None:
        try:
            with TestClient(app) as client:
                outcome.append(client.get("/").text)
        except BaseException as error:
            outcome.append(error)

    thread = threading.Thread(target=use, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "TestClient hung (entering or leaving the lifespan)"
    [result] = outcome
    return result


@pytest.mark.parametrize("framework", ["starlette", "fastapi"])
def test_test_client_refuses_to_start_an_invalid_data_manager(framework: str) -> None:
    log: list[str] = []
    error = enter_test_client(apps_with_lifespan(invalid_dm(), log)[framework])
    assert isinstance(error, ValidationError)
    assert str(error) == PROBLEMS
    assert log == ["app startup", "app shutdown"]  # the app undid its own startup
    # The same app with a valid registration starts, serves and stops.
    log.clear()
    assert enter_test_client(apps_with_lifespan(DataManager(), log)[framework]) == "home"
    assert log == ["app startup", "app shutdown"]


@pytest.mark.parametrize("framework", ["starlette", "fastapi"])
def test_uvicorn_refuses_to_start_an_invalid_data_manager(
    framework: str, caplog: pytest.LogCaptureFixture
) -> None:
    log: list[str] = []
    app = apps_with_lifespan(invalid_dm(), log)[framework]
    with caplog.at_level(logging.ERROR, logger="uvicorn.error"):
        with uvicorn_server(app, expect_start=False) as server:
            wait_for(lambda: server.exit_code is not None, "uvicorn to give up")
            assert (server.started, server.exit_code) == (False, 3)
    assert [r.getMessage() for r in caplog.records if r.name == "uvicorn.error"] == [
        PROBLEMS,
        "Application startup failed. Exiting.",
    ]
    assert log == ["app startup", "app shutdown"]
