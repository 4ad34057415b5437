"""The Celery app of the async-DataManager tests: an :class:`AsyncSQLResource` (through
``configure_sql(asyncio=True)``), an async-generator context middleware and ``async def``
service methods, imported by the test process (the producer) and by a real worker
(``celery -A tests._celery_async_app worker``).

The worker is configured by environment variables (see :func:`from_env`); it writes
its spans to ``spans.jsonl`` in ``POLYDATUM_CELERY_DIR`` (see
:class:`tests._celery_app.JsonLinesExporter`) and, when it disposes its resources at
shutdown, one ``disposed-<pid>`` file per process naming the event loop that ran the
async ``dispose()``.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from celery import Celery, signals
from kombu import Queue
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from sqlalchemy import text

from polydatum import DataManager, Service
from polydatum.context import DataAccessContext
from polydatum.integrations.celery import PolydatumTask, init_celery
from polydatum.sql import configure_sql
from tests._celery_app import BACKEND_URL, BROKER_URL, JsonLinesExporter

META = ("task", "task_id", "retries", "request_id")
#: The tables every test database starts with (``parents`` holds the one valid parent).
SCHEMA = (
    "CREATE TABLE parents (id INTEGER PRIMARY KEY)",
    "CREATE TABLE notes (key TEXT PRIMARY KEY, attempt INTEGER NOT NULL, parent_id INTEGER "
    "NOT NULL REFERENCES parents (id) DEFERRABLE INITIALLY DEFERRED)",
    "INSERT INTO parents (id) VALUES (1)",
)


class Notes(Service):
    """Async data access on the context's ``AsyncSession`` (``db``)."""

    async def add(self, key: str, attempt: int = 0, parent_id: int = 1) -> None:
        session = await self._ctx.aresource("db")
        await session.execute(
            text("INSERT INTO notes (key, attempt, parent_id) VALUES (:key, :attempt, :parent)"),
            {"key": key, "attempt": attempt, "parent": parent_id},
        )

    async def identity(self) -> dict[str, Any]:
        """Which process, event loop and pooled database connection ran this call."""
        session = await self._ctx.aresource("db")
        connection = await session.connection()
        raw = await connection.get_raw_connection()
        backend_pid = None
        if connection.dialect.name == "postgresql":
            backend_pid = (await session.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        else:
            (await session.execute(text("SELECT 1"))).scalar_one()
        return {
            "pid": os.getpid(),
            "loop": id(asyncio.get_running_loop()),
            "connection": id(raw.driver_connection),
            "backend_pid": backend_pid,
        }

    def label(self) -> str:
        """A sync method: what a sync task body in the async DataManager can call."""
        return "notes"


async def tenant_guard(ctx: DataAccessContext) -> AsyncIterator[None]:
    """An async-generator context middleware (it makes the DataManager async)."""
    yield


class DisposeProbe:
    """An async resource whose async ``dispose()`` records the loop it ran on."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory

    async def __call__(self, ctx: DataAccessContext) -> AsyncIterator[None]:
        yield None

    async def dispose(self) -> None:
        if self.directory is not None:
            record = {"pid": os.getpid(), "loop": id(asyncio.get_running_loop())}
            (self.directory / f"disposed-{os.getpid()}").write_text(json.dumps(record))


def build(
    queue: str,
    tracer_provider: Any,
    db_url: str,
    directory: Path | None = None,
    broken: bool = False,
) -> tuple[Celery, DataManager, dict[str, Any]]:
    """The app, its (async) DataManager and its tasks (by short name), routed to ``queue``."""
    dm = DataManager(tracer_provider=tracer_provider, meta_attributes=META)
    configure_sql(dm, db_url, asyncio=True, safe_name=None)
    dm.register_resources(probe=DisposeProbe(directory))
    dm.register_context_middleware(tenant_guard)
    dm.register_services(notes=Notes())
    if broken:

        def meta(ctx: DataAccessContext) -> Iterator[None]:
            yield

        dm.register_resources(meta=meta)
    app = Celery("polydatum_async", broker=BROKER_URL, backend=BACKEND_URL, task_cls=PolydatumTask)
    app.conf.update(
        task_queues=[Queue(queue, auto_delete=True, durable=False)],
        task_default_queue=queue,
        result_expires=300,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_prefetch_multiplier=1,
        broker_heartbeat=2,  # the worker notices SIGTERM within a second or two
    )
    init_celery(app, dm)

    @app.task(bind=True, shared=False, name="polydatum_async.add")
    async def add(self: Any, key: str) -> dict[str, Any]:
        await self.dal.notes.add(key, attempt=self.request.retries)
        return dict(self.context.meta.items())

    @app.task(bind=True, shared=False, name="polydatum_async.add_then_fail")
    async def add_then_fail(self: Any, key: str) -> None:
        await self.dal.notes.add(key)
        raise ValueError(f"note {key} was rejected")

    @app.task(bind=True, shared=False, name="polydatum_async.add_orphan")
    async def add_orphan(self: Any, key: str) -> None:
        await self.dal.notes.add(key, parent_id=999)  # the deferred foreign key fails at COMMIT

    @app.task(bind=True, shared=False, name="polydatum_async.add_retried", max_retries=2)
    async def add_retried(self: Any, key: str) -> int:
        await self.dal.notes.add(key, attempt=self.request.retries)
        if self.request.retries == 0:
            raise self.retry(countdown=0)
        return int(self.request.retries)

    @app.task(bind=True, shared=False, name="polydatum_async.identity")
    async def identity(self: Any) -> dict[str, Any]:
        found: dict[str, Any] = await self.dal.notes.identity()
        return found

    @app.task(bind=True, shared=False, name="polydatum_async.sync_body")
    def sync_body(self: Any) -> dict[str, Any]:
        return {
            "label": self.dal.notes.label(),
            "loop": id(asyncio.get_running_loop()),
            "pid": os.getpid(),
            "meta": dict(self.context.meta.items()),
        }

    tasks = {
        "add": add,
        "add_then_fail": add_then_fail,
        "add_orphan": add_orphan,
        "add_retried": add_retried,
        "identity": identity,
        "sync_body": sync_body,
    }
    return app, dm, tasks


def from_env() -> Celery:
    """The worker's app (when ``POLYDATUM_CELERY_APP`` names this module):
    ``POLYDATUM_CELERY_DIR`` (spans.jsonl, ready, disposed-<pid>),
    ``POLYDATUM_CELERY_QUEUE``, ``POLYDATUM_CELERY_DB_URL``, ``POLYDATUM_CELERY_INSTRUMENT``
    (``1``: also run opentelemetry-instrumentation-celery), ``POLYDATUM_CELERY_BROKEN``
    (``1``: an invalid registration as well)."""
    directory = Path(os.environ["POLYDATUM_CELERY_DIR"])
    provider = TracerProvider(resource=Resource.create({"service.name": "worker"}))
    provider.add_span_processor(
        SimpleSpanProcessor(JsonLinesExporter(directory / "spans.jsonl", "worker"))
    )
    if os.environ.get("POLYDATUM_CELERY_INSTRUMENT") == "1":
        from opentelemetry.instrumentation.celery import CeleryInstrumentor

        CeleryInstrumentor().instrument(tracer_provider=provider)
    worker_app, _, _ = build(
        os.environ["POLYDATUM_CELERY_QUEUE"],
        provider,
        os.environ["POLYDATUM_CELERY_DB_URL"],
        directory=directory,
        broken=os.environ.get("POLYDATUM_CELERY_BROKEN") == "1",
    )

    @signals.worker_ready.connect(weak=False)
    def ready(**_: Any) -> None:
        (directory / "ready").write_text("ready\n")

    return worker_app


if os.environ.get("POLYDATUM_CELERY_APP") == __name__:  # the worker's -A module
    app = from_env()
