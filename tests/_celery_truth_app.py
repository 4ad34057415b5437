"""The Celery app of the truth test (``tests/test_celery_truth.py``): one task,
``truth.run(key, fault)``, on a SQL DataManager made by ``configure_sql`` -- sync
(``SQLResource``, a sync body) or async (``AsyncSQLResource``, an ``async def`` body
and an async-generator middleware) -- that writes the note ``key`` and then does what
``fault`` says (see :data:`FAULTS`).

Imported by the test process (the producer) and by a real worker
(``celery -A tests._celery_truth_app worker``), which reads ``POLYDATUM_CELERY_QUEUE``,
``POLYDATUM_CELERY_DB_URL`` and ``POLYDATUM_CELERY_FLAVOUR`` (``sync`` or ``async``).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from celery import Celery, signals
from kombu import Queue
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from polydatum import DataManager, Service
from polydatum.context import DataAccessContext
from polydatum.integrations.celery import PolydatumTask, init_celery
from polydatum.sql import configure_sql
from tests._celery_app import BACKEND_URL, BROKER_URL

#: What a task does after writing its note (``commit`` writes a note that fails at COMMIT):
#:
#: * ``ok``: nothing;
#: * ``commit``: the note names a parent that does not exist (a deferred foreign key),
#:   so the COMMIT fails;
#: * ``raise``: the body raises;
#: * ``suppressed``: the body raises an error that a context middleware suppresses;
#: * ``aborted``: a statement fails (a duplicate key) and its error, re-raised as one the
#:   middleware suppresses, never leaves the context -- the transaction is aborted
#:   (PostgreSQL turns its COMMIT into a ROLLBACK), and must not pass for a success;
#: * ``teardown``: a second resource fails to tear down (suppressed, recorded);
#: * ``retry``: the first attempt retries (rolled back), the second succeeds;
#: * ``retry_exhausted``: every attempt retries, until ``max_retries`` is exceeded.
FAULTS = ("ok", "commit", "raise", "suppressed", "aborted", "teardown", "retry", "retry_exhausted")
SCHEMA = (
    "CREATE TABLE parents (id INTEGER PRIMARY KEY)",
    "CREATE TABLE notes (key TEXT PRIMARY KEY, attempt INTEGER NOT NULL, parent_id INTEGER "
    "NOT NULL REFERENCES parents (id) DEFERRABLE INITIALLY DEFERRED)",
    "INSERT INTO parents (id) VALUES (1)",
)
WRITE = text("INSERT INTO notes (key, attempt, parent_id) VALUES (:key, :attempt, :parent)")
COLLIDE = text("INSERT INTO parents (id) VALUES (1)")  # the primary key exists: fails now


class Swallowed(Exception):
    """An error the ``swallow`` middleware suppresses: the context ends normally."""


class SyncNotes(Service):
    def write(self, key: str, attempt: int, parent_id: int = 1) -> None:
        self._ctx.db.execute(WRITE, {"key": key, "attempt": attempt, "parent": parent_id})

    def collide(self) -> None:
        self._ctx.db.execute(COLLIDE)


class AsyncNotes(Service):
    async def write(self, key: str, attempt: int, parent_id: int = 1) -> None:
        session = await self._ctx.aresource("db")
        await session.execute(WRITE, {"key": key, "attempt": attempt, "parent": parent_id})

    async def collide(self) -> None:
        session = await self._ctx.aresource("db")
        await session.execute(COLLIDE)


def swallow(ctx: DataAccessContext) -> Iterator[None]:
    try:
        yield
    except Swallowed:
        pass  # suppressed: the context (and the task) completes normally


async def aswallow(ctx: DataAccessContext) -> AsyncIterator[None]:
    try:
        yield
    except Swallowed:
        pass


def closer(ctx: DataAccessContext) -> Iterator[None]:
    """A resource whose teardown fails (a connection lost while closing)."""
    yield None
    raise OSError("connection reset while closing")


def build(queue: str, db_url: str, flavour: str) -> tuple[Celery, DataManager, Any]:
    """The app, its DataManager and its ``truth.run`` task, routed to ``queue``."""
    dm = DataManager()
    configure_sql(dm, db_url, asyncio=flavour == "async")
    dm.register_resources(closer=closer)
    dm.register_context_middleware(aswallow if flavour == "async" else swallow)
    dm.register_services(notes=AsyncNotes() if flavour == "async" else SyncNotes())
    app = Celery("polydatum_truth", broker=BROKER_URL, backend=BACKEND_URL, task_cls=PolydatumTask)
    app.conf.update(
        task_queues=[Queue(queue, auto_delete=True, durable=False)],
        task_default_queue=queue,
        result_expires=600,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_prefetch_multiplier=1,
        broker_heartbeat=2,
    )
    init_celery(app, dm)
    options = {"bind": True, "shared": False, "name": "truth.run", "max_retries": 1}

    def after_write(task: Any, key: str, fault: str, attempt: int) -> None:
        if fault == "raise":
            raise ValueError(f"task {key} failed after writing")
        if fault == "suppressed":
            raise Swallowed(f"task {key}: suppressed by the middleware")
        if fault == "teardown":
            task.context.resource("closer")
        if fault == "retry" and attempt == 0:
            raise task.retry(countdown=0)
        if fault == "retry_exhausted":
            raise task.retry(countdown=0, exc=ValueError(f"task {key} gave up"))

    if flavour == "async":

        @app.task(**options)
        async def run_async(self: Any, key: str, fault: str) -> int:
            attempt = int(self.request.retries)
            await self.dal.notes.write(key, attempt, 999 if fault == "commit" else 1)
            if fault == "aborted":
                try:
                    await self.dal.notes.collide()
                except IntegrityError as error:
                    raise Swallowed(f"task {key}: a failed statement, suppressed") from error
            after_write(self, key, fault, attempt)
            return attempt

        return app, dm, run_async

    @app.task(**options)
    def run(self: Any, key: str, fault: str) -> int:
        attempt = int(self.request.retries)
        self.dal.notes.write(key, attempt, 999 if fault == "commit" else 1)
        if fault == "aborted":
            try:
                self.dal.notes.collide()
            except IntegrityError as error:
                raise Swallowed(f"task {key}: a failed statement, suppressed") from error
        after_write(self, key, fault, attempt)
        return attempt

    return app, dm, run


def from_env() -> Celery:
    """The worker's app (when ``POLYDATUM_CELERY_APP`` names this module); writes
    ``ready`` in ``POLYDATUM_CELERY_DIR`` once it consumes."""
    directory = Path(os.environ["POLYDATUM_CELERY_DIR"])
    flavour = os.environ["POLYDATUM_CELERY_FLAVOUR"]
    worker_app, dm, _ = build(
        os.environ["POLYDATUM_CELERY_QUEUE"], os.environ["POLYDATUM_CELERY_DB_URL"], flavour
    )
    # A startup check in the master, before it forks its children, as applications do:
    # the children must not inherit the connection it leaves in the pool.
    pings = asyncio.run(dm.aping()) if flavour == "async" else dm.ping()
    failed = {name: result for name, result in pings.items() if not result.ok}
    if failed:
        raise SystemExit(f"the database check failed: {failed}")

    @signals.worker_ready.connect(weak=False)
    def ready(**_: Any) -> None:
        (directory / "ready").write_text("ready\n")

    return worker_app


if os.environ.get("POLYDATUM_CELERY_APP") == __name__:  # the worker's -A module
    app = from_env()
