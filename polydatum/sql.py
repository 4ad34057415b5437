"""SQL through SQLAlchemy 2.x: a session per context, one engine per URL, one-line switching.

Needs the ``sql`` extra (SQLAlchemy, aiosqlite) and, for PostgreSQL, the ``postgres``
extra (psycopg, asyncpg). Statement spans come from ``opentelemetry-instrumentation-
sqlalchemy`` (the ``sql-tracing`` extra); they nest under the service call that ran
the statement, because the session executes in the caller's frame.

Modules: this one holds the resources, the transaction middleware, savepoints and
:func:`configure_sql` (which composes the ``db`` resource and the safe). The URLs and
engines live below it in :mod:`polydatum.sql_engine` (``database_url``,
``create_sql_engine``, ``create_async_sql_engine``, ``telemetry_attributes_for``, the
SQLite pragmas, the statement-failure tracking) and are re-exported here; the safe is
:mod:`polydatum.safe`. Imports go one way: ``polydatum.sql`` → ``polydatum.safe`` →
``polydatum.sql_engine``.

The pieces
----------

``database_url(url=None, settings=None) -> str``
    Where the URL comes from, first match wins: ``url``; ``settings["DATABASE_URL"]``
    (any mapping: a Django/Flask settings dict, ``os.environ``...); the environment
    variable ``POLYDATUM_DATABASE_URL``; ``sqlite:///polydatum.db``.

``SQLResource(url=None, *, engine_options=None, session_options=None)``
    A resource callable: ``dm.register_resources(db=SQLResource(url))``. In a context,
    ``ctx.db`` is a :class:`sqlalchemy.orm.Session` created on first use. When the
    context ends the session commits if the context succeeded, rolls back if any error
    reached the resource (raised in the block, by middleware, or by the commit
    itself), and is always closed (its connection returns to the pool). One engine
    (``.engine``) per resource, created with the resource and kept for the life of the
    DataManager; ``.dispose()`` closes its pool. ``ping()`` runs ``SELECT 1``
    (``dm.ping()`` calls it). ``telemetry_attributes`` holds
    ``polydatum.db.system.name``, ``polydatum.db.namespace`` and, for a server
    database, ``polydatum.db.server.address`` and ``polydatum.db.server.port`` (when
    the URL names it); polydatum adds them to the resource's setup/teardown spans,
    which are INTERNAL (no round trip to the database): the semantic conventions'
    ``db.*`` names belong to the CLIENT spans of the statements (see "Statement
    spans"). Passwords never appear in attributes or ``repr``.

    A failed *commit* is never success: the resource rolls back and raises
    :class:`polydatum.errors.CommitError` (``__cause__``: the database's error),
    which polydatum does not suppress like other teardown errors -- it is raised
    out of the ``with`` block (context span and teardown span ERROR) and is not in
    ``ctx.get_resource_exit_errors()``. So a request that completes normally has
    its work committed. :func:`transaction_middleware` commits earlier, while
    middleware tear down, and raises the database's own error instead.

    Nor is committing a transaction in which a statement failed: see "Caught
    statement errors" below. The session belongs to its context: once the context
    has ended it refuses any further use (a statement, ``add``/``flush``,
    ``commit``, ``begin``) with :class:`polydatum.errors.ContextStateError`, before
    taking a connection (:data:`SESSION_ENDED_MESSAGE`). A nested context shares
    the session (see "Nested contexts").

``AsyncSQLResource(url=None, ...)``
    The same with :class:`sqlalchemy.ext.asyncio.AsyncSession`, as an async-generator
    resource: ``session = await ctx.aresource("db")`` inside ``async with
    dm.context()``. ``await resource.ping()``, ``await resource.dispose()``.

``transaction_middleware(resource_name="db")`` / ``async_transaction_middleware(...)``
    Context middleware that opens the session when the context starts and commits or
    rolls back when the middleware tears down -- *before* resources tear down, so a
    failed commit (or any error) propagates out of the ``with`` block like an error
    raised in it. The resource then only closes the session (it never commits twice).
    If a middleware outside it suppresses the error it rolled back for, the resource
    raises :class:`~polydatum.errors.CommitError`: the work is gone, so the context
    must not complete as if it were saved.

``savepoint(session)`` / ``asavepoint(session)``
    A nested unit of work: ``with savepoint(ctx.db): ...`` releases the SAVEPOINT when
    the block succeeds and rolls back to it (re-raising) when it fails; the enclosing
    transaction carries on. Works on SQLite too (see below). A block that completes
    although one of its statements failed (its error caught inside the block) is
    rolled back to the savepoint and raises :class:`TransactionAbortedError`.

``trace_sql_statements(engine, tracer_provider=None, meter_provider=None)``
    SQL statement spans for one engine, from ``opentelemetry-instrumentation-
    sqlalchemy``: see "Statement spans" below. Returns a :class:`StatementTracing`
    (on or off, why, the attribute names; ``describe()`` says it in one line).

``configure_sql(dm, url=None, settings=None, ...) -> SQLBackend``
    The one line an application needs: registers ``db`` (a :class:`SQLResource`, or an
    :class:`AsyncSQLResource` with ``asyncio=True``) and ``safe`` (a
    :class:`polydatum.safe.SafeStore`) on ``dm``. The safe always has its own engine
    and pool -- on ``safe_url``, else :func:`safe_database_url`: the same database on a
    server, a sibling file on SQLite (``app.db`` -> ``app.safe.db``) -- so that a safe
    operation never waits for the context's session (SQLite has one writer per file,
    and the session holds that lock until it commits) nor for a connection that
    sessions hold (as many concurrent contexts as the pool has connections would
    otherwise leave none for the safe).

Statement spans
---------------
``configure_sql(..., trace_statements=True)`` (or :func:`trace_sql_statements` on a
resource's ``engine``) adds contrib's engine tracer to the engines it made, for the
DataManager's own providers (else the global ones): one CLIENT span per statement,
under the service call that ran it, with the database's ``db.*`` names. Only those
engines are touched. Off (and ``SQLBackend.statement_tracing`` says why) without the
``sql-tracing`` extra, when ``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS`` names
``sqlalchemy``, or when the installed SQLAlchemy is outside both contrib's declared range
and :data:`polydatum.sql_engine.STATEMENT_TRACING_TESTED`. An engine contrib traces
already (``opentelemetry-instrument``, or ``SQLAlchemyInstrumentor().instrument()``
before the engine was made) is not traced twice. contrib names the attributes after
``OTEL_SEMCONV_STABILITY_OPT_IN``, read once per process: ``database,http`` gives the
stable names (``db.system.name``, ``db.namespace``, ``db.query.text``,
``server.address``, ``server.port``); unset, the old ones (``db.system``, ``db.name``,
``db.statement``, ``net.peer.name``...). contrib offers no per-engine choice, and
polydatum does not set the variable for the process behind the application's back.

Caught statement errors
-----------------------
On PostgreSQL a failed statement aborts the transaction: later statements are
refused and COMMIT silently becomes ROLLBACK. SQLite would commit the transaction's
other statements. polydatum makes every backend behave the same: engine events record
each statement that fails inside a transaction (``handle_error``; every driver,
asyncpg included) and forget the ones inside a savepoint that was rolled back; before
committing, the resource (or the transaction middleware) also asks psycopg whether
PostgreSQL considers the transaction aborted. If a statement failed and its error was
caught -- by the service, or suppressed by a middleware -- nothing is committed: the
transaction is rolled back and :class:`TransactionAbortedError` (a ``CommitError``;
``__cause__``: the caught error) is raised out of the ``with`` block. Run a statement
that may fail inside :func:`savepoint` instead. (Sessions from other resources, which
:func:`transaction_middleware` still commits, are not checked.)

Nested contexts
---------------
A context entered while an enclosing context (the nearest, then outwards:
``ctx.enclosing``) has the session of *the same resource object* open, in the same
thread and asyncio task, gets that session, inside a SAVEPOINT: success releases the
savepoint (its writes commit or roll back with the enclosing transaction), failure
rolls back to it and the error propagates as usual; the nested context never commits
or closes the enclosing session, and its transaction middleware only releases or
rolls back the savepoint. So nested contexts never wait on the enclosing one's locks.
Contexts in other threads or tasks, contexts entered before the enclosing one opened
its session, and other resource objects (even on the same database) have sessions of
their own: these can deadlock on rows the enclosing context locked (SQLite: once it
wrote anything) until ``lock_timeout`` / ``busy_timeout``.

Processes that fork
-------------------
A process that used its engines and then forks (gunicorn ``--preload``, a Celery
prefork master that checked the database at startup, ``multiprocessing``) does not
hand its pooled connections to the children: every engine polydatum makes (the
resources' and the safe's) starts each forked child with an empty pool of its own, and
the parent's connections are neither used nor closed there; a child forked while a
context is open is in no context (one it opens is its own). An engine created with
:func:`sqlalchemy.create_engine` by the application needs the same care
(``engine.dispose(close=False)`` in the child). A child must not *leave* a block the
parent opened (fork inside ``with dm.dal():``, then return or raise through it): the
block's exit would roll back or commit the parent's session over the parent's
connection. End such a child with ``os._exit()``, as ``multiprocessing`` does.

The same URL works for both flavours: ``postgresql://`` means psycopg 3 (sync and
async), ``sqlite:///`` becomes ``sqlite+aiosqlite:///`` for the async resource and
``postgresql+asyncpg://`` becomes psycopg for the sync one.

SQLite
------
Every connection gets ``journal_mode=WAL`` (readers never block the writer),
``foreign_keys=ON`` and ``busy_timeout`` (30 s by default: a writer waits for the
lock instead of failing with ``database is locked``); ``sqlite_pragmas`` in
``engine_options`` overrides or adds pragmas. The conversion to WAL is retried within
``busy_timeout`` (SQLite fails it at once when another process converts the same
file, as the children of a worker do on their first request). polydatum takes over ``BEGIN`` from
the sqlite3 driver (whose implicit transactions break SAVEPOINT and make reads run
outside transactions) and emits it itself; the safe uses ``BEGIN IMMEDIATE`` for its
writes so that a read-modify-write never fails on a lock upgrade.

Only parameterised SQL: nothing here formats a value into a statement.
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

try:
    from sqlalchemy import Connection, Engine, event, text
    from sqlalchemy.engine import URL
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
    from sqlalchemy.orm import Session, SessionTransaction, sessionmaker
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "polydatum.sql needs SQLAlchemy 2.x: pip install 'polydatum[sql]' "
        "(and 'polydatum[postgres]' for PostgreSQL)"
    ) from error

from polydatum.errors import CommitError, ContextStateError
from polydatum.safe import SafeStore
from polydatum.sql_engine import (
    DEFAULT_DATABASE_URL,
    ENV_VAR,
    StatementTracing,
    create_sql_engine,
    database_url,
    failures_of,
    parse_database_url,
    resource_attributes_for,
    trace_sql_statements,
    url_for_flavour,
)

# Every name of the engine layer that was public here before it moved to
# polydatum.sql_engine stays importable from polydatum.sql: those that __all__ lists
# (imported above), and these, re-exported explicitly.
from polydatum.sql_engine import SETTINGS_KEY as SETTINGS_KEY
from polydatum.sql_engine import SQLITE_BEGIN_OPTION as SQLITE_BEGIN_OPTION
from polydatum.sql_engine import SQLITE_PRAGMAS as SQLITE_PRAGMAS
from polydatum.sql_engine import create_async_sql_engine as create_async_sql_engine
from polydatum.sql_engine import telemetry_attributes_for as telemetry_attributes_for

if TYPE_CHECKING:
    from polydatum.context import DataAccessContext
    from polydatum.registry import DataManager

__all__ = [
    "DEFAULT_DATABASE_URL",
    "ENV_VAR",
    "AsyncSQLResource",
    "SQLBackend",
    "SQLResource",
    "StatementTracing",
    "TransactionAbortedError",
    "asavepoint",
    "async_transaction_middleware",
    "configure_sql",
    "create_sql_engine",
    "database_url",
    "safe_database_url",
    "savepoint",
    "trace_sql_statements",
    "transaction_middleware",
]

#: ``session.info`` key set by the transaction middleware: the resource must not commit.
MANAGED = "polydatum.transaction_managed"

# ------------------------------------------------------------ statement failures
#
# The engines record each statement that fails inside a transaction, per savepoint
# level (polydatum.sql_engine says why). Here the resource and the transaction
# middleware read those records for the connections of a session's transaction, and
# refuse to commit when a failure's error was caught.

_CONNECTIONS = "polydatum.connections"  # Session.info: (root transaction, its connections)
_ENDED = "polydatum.context_ended"  # Session.info: the context that owned it has ended
#: libpq's PQTRANS_INERROR, which psycopg 2 and 3 report as ``info.transaction_status``.
_PQTRANS_INERROR = 3


def _remember_connection(session: Session, transaction: Any, connection: Connection) -> None:
    """Session ``after_begin``: note the connections of the session's transaction, so
    that the checks before COMMIT read them without checking one out."""
    root = session.get_transaction()
    entry = session.info.get(_CONNECTIONS)
    if entry is None or entry[0] is not root:
        session.info[_CONNECTIONS] = (root, [connection])
    elif not any(known is connection for known in entry[1]):
        entry[1].append(connection)


#: What a session kept past its context says when it is used again.
SESSION_ENDED_MESSAGE = (
    "this SQL session belonged to a polydatum context that has ended: its work was "
    "committed or rolled back and its connection returned to the pool. Use ctx.db only "
    "inside `with dm.context() as ctx:` (or `async with`), and start a new context for "
    "more work"
)


def _refuse_after_context(session: Session, transaction: SessionTransaction) -> None:
    """Session ``after_transaction_create``: a session whose context has ended refuses
    every new transaction (so every statement, flush, commit and begin), before it
    could check out a connection."""
    if transaction.parent is None and session.info.get(_ENDED):
        transaction.close()  # leave the session as it was: no transaction, no connection
        raise ContextStateError(SESSION_ENDED_MESSAGE)


# The class of the sessions the resources create: a plain Session (same name, same
# behaviour) whose events are scoped to polydatum's sessions by a sessionmaker.
_session_maker: sessionmaker[Session] = sessionmaker()
event.listen(_session_maker, "after_begin", _remember_connection)
event.listen(_session_maker, "after_transaction_create", _refuse_after_context)
_ContextSession: type[Session] = _session_maker.class_


def _connections_of(session: Session) -> list[Connection]:
    root = session.get_transaction()
    entry = session.info.get(_CONNECTIONS)
    if root is None or entry is None or entry[0] is not root:
        return []
    return [c for c in entry[1] if not c.closed and not c.invalidated]


def _is_open(session: Session, transaction: SessionTransaction) -> bool:
    """Whether the savepoint ``transaction`` is still open in ``session``."""
    current = session.get_nested_transaction()
    while current is not None:
        if current is transaction:
            return True
        current = current.parent
    return False


def _next_level(session: Session) -> int:
    """The failure level the savepoint begun last will have once emitted."""
    for conn in _connections_of(session):
        failures = failures_of(conn)
        if failures is not None:
            return len(failures.levels)
    return 1  # not begun yet: BEGIN is level 0, the savepoint level 1


def _postgres_aborted(conn: Connection) -> bool:
    """psycopg (2 or 3) says the transaction is aborted (``INERROR``)."""
    if conn.dialect.name != "postgresql":
        return False
    try:
        status = conn.connection.driver_connection.info.transaction_status  # type: ignore[union-attr]
        return int(status) == _PQTRANS_INERROR
    except Exception:  # asyncpg and others report no status: the tracked failures cover them
        return False


def _failure_in(
    session: Session, savepoint: SessionTransaction | None, depth: int
) -> tuple[str, BaseException | None] | None:
    """Why committing the session's transaction (``savepoint=None``) or releasing
    ``savepoint`` would not keep all of its work: a statement failed at ``depth`` or
    deeper and its error was caught. ``(reason, error)``, or ``None`` when all is well."""
    root = session.get_transaction()
    if root is None:
        return None
    current: SessionTransaction | None = session.get_nested_transaction() or root
    while current is not None:  # a flush that failed deactivates its transaction
        if not current.is_active:
            return "a flush failed and SQLAlchemy rolled the transaction back", None
        if current is savepoint:
            break
        current = current.parent
    for conn in _connections_of(session):
        failures = failures_of(conn)
        if failures is not None:
            for error in failures.levels[depth:]:
                if error is not None:
                    return _reason(error), error
        if _postgres_aborted(conn):
            return "PostgreSQL reports the transaction as aborted", None
    return None


class TransactionAbortedError(CommitError):
    """A statement failed inside the transaction and its error was caught: nothing was committed.

    PostgreSQL aborts a transaction at its first failed statement and turns the COMMIT
    into a ROLLBACK; SQLite would commit the transaction's other statements. polydatum
    does the same on every backend: it rolls back and raises this instead of
    committing, so a context never looks successful with its work lost or half-done.
    Let the error propagate, or run the statement that may fail inside
    :func:`savepoint` (:func:`asavepoint`), which rolls back only that statement. The
    caught error, when known, is the ``__cause__``.
    """


# --------------------------------------------------------------------- resources

_SYNC_HELPER = "`with savepoint(ctx.db):`"
_ASYNC_HELPER = "`async with asavepoint(session):`"


def _rollback_then_raise(session: Session, error: BaseException) -> None:
    try:
        session.rollback()
    except Exception as rollback_error:
        raise rollback_error from error


def _reason(error: BaseException) -> str:
    """A short, safe description of why a database call failed, for error messages.

    The driver's own message (first line) rather than SQLAlchemy's, which appends the
    SQL and its bound parameters (data that must not end up in logs and spans). A
    ``__str__`` that raises is never a second failure.
    """
    cause = getattr(error, "orig", None) or error
    try:
        message = str(cause).strip()
    except Exception:
        message = "<unprintable message>"
    first = message.splitlines()[0] if message else ""
    if len(first) > 200:
        first = first[:197] + "..."
    name = type(cause).__name__
    return f"{name}: {first}" if first else name


def _owner() -> tuple[int, object]:
    """Who may share a session: this thread and, inside an event loop, this task."""
    try:
        task: object = asyncio.current_task()
    except RuntimeError:  # no running event loop
        task = None
    return threading.get_ident(), task


class _Unit:
    """One context's unit of work on a session: the session's whole transaction (the
    context that opened the session) or a SAVEPOINT in it (a context nested in that one).

    Synchronous code on the sync :class:`~sqlalchemy.orm.Session`; the asyncio resource
    runs each step through :meth:`AsyncSession.run_sync`. ``handle`` is what the
    resource yields (the Session, or the AsyncSession around it).
    """

    __slots__ = (
        "depth",
        "finished",
        "handle",
        "helper",
        "managed",
        "owner",
        "rolled_back_by",
        "savepoint",
        "session",
    )

    def __init__(
        self,
        handle: Any,
        session: Session,
        savepoint: SessionTransaction | None,
        depth: int,
        owner: tuple[int, object],
        helper: str,
    ) -> None:
        self.handle = handle
        self.session = session
        self.savepoint = savepoint
        self.depth = depth
        self.owner = owner
        self.helper = helper
        self.managed = False  # the transaction middleware commits or rolls back
        self.finished = False  # committed or rolled back
        self.rolled_back_by: BaseException | None = None  # by the middleware, because of

    @property
    def _whose(self) -> str:
        return "the context's" if self.savepoint is None else "the nested context's"

    def rollback(self, error: BaseException) -> None:
        """Undo the unit's work because of ``error`` (a failing rollback is raised from it)."""
        self.finished = True
        try:
            if self.savepoint is None:
                self.session.rollback()
            elif _is_open(self.session, self.savepoint):
                self.savepoint.rollback()
        except Exception as rollback_error:
            raise rollback_error from error

    def commit(self, *, raw: bool) -> None:
        """Make the unit's work durable: COMMIT, or RELEASE its savepoint.

        Refused (rolled back, :class:`TransactionAbortedError`) when a statement of the
        unit failed and its error was caught. A failing COMMIT/RELEASE is rolled back
        and raised: as the database's own error when ``raw`` (the transaction
        middleware), else as :class:`~polydatum.errors.CommitError`.
        """
        self.finished = True
        session, savepoint = self.session, self.savepoint
        if savepoint is not None and not _is_open(session, savepoint):
            return  # the context's own code committed or rolled it back
        failed = _failure_in(session, savepoint, self.depth)
        if failed is not None:
            reason, cause = failed
            where, undone = (
                ("its transaction", "nothing was committed")
                if savepoint is None
                else (
                    "its savepoint",
                    "it was rolled back to the savepoint (the enclosing context carries on)",
                )
            )
            aborted = TransactionAbortedError(
                f"{self._whose} work was not committed: a statement failed inside {where} "
                f"and its error was caught ({reason}), so {undone}. Let the error "
                f"propagate, or run the statement that may fail inside {self.helper}, "
                f"which rolls back only that statement"
            )
            self.rollback(aborted)
            raise aborted from cause
        try:
            if savepoint is None:
                session.commit()
            elif savepoint.is_active:
                savepoint.commit()
        except Exception as db_error:
            self.rollback(db_error)
            if raw:
                raise
            refused = (
                "the database refused the COMMIT"
                if savepoint is None
                else "the database refused to release its savepoint"
            )
            undone = "the transaction was" if savepoint is None else "it was"
            raise CommitError(
                f"{self._whose} work was not committed: {refused} ({_reason(db_error)}); "
                f"{undone} rolled back"
            ) from db_error
        except BaseException as interrupt:  # KeyboardInterrupt, cancellation: as they are
            self.rollback(interrupt)
            raise

    def finish(self) -> None:
        """The context succeeded: commit, unless the transaction middleware manages it."""
        legacy_managed = self.savepoint is None and self.session.info.get(MANAGED)
        if not (self.managed or legacy_managed):
            self.commit(raw=False)
        elif self.rolled_back_by is not None:
            raise CommitError(
                f"{self._whose} work was not committed: transaction_middleware rolled it "
                f"back because of an error ({_reason(self.rolled_back_by)}) that a "
                f"middleware registered before it then suppressed. Register "
                f"transaction_middleware first, so that it sees what every other "
                f"middleware did to the error"
            ) from self.rolled_back_by
        elif not self.finished and self.managed:
            self.commit(raw=False)

    def close(self) -> None:
        """The context has ended: close the session it opened (never an enclosing one's)."""
        if self.savepoint is None:
            try:
                self.session.close()
            finally:
                self.session.info.pop(_CONNECTIONS, None)
                self.session.info[_ENDED] = True


class _OpenUnits:
    """The units of the contexts that have one resource's session open, by context.

    Keyed by ``id(context)`` and checked against a weak reference, so that a context
    class need not be hashable and a context that is never exited is not kept alive.
    """

    __slots__ = ("_by_id",)

    def __init__(self) -> None:
        self._by_id: dict[int, tuple[weakref.ref[DataAccessContext], _Unit]] = {}

    def add(self, context: DataAccessContext, unit: _Unit) -> None:
        self._by_id[id(context)] = (weakref.ref(context), unit)

    def get(self, context: DataAccessContext) -> _Unit | None:
        entry = self._by_id.get(id(context))
        return entry[1] if entry is not None and entry[0]() is context else None

    def remove(self, context: DataAccessContext) -> None:
        if self.get(context) is not None:
            del self._by_id[id(context)]


def _enclosing_unit(
    units: _OpenUnits,
    context: DataAccessContext,
    owner: tuple[int, object],
) -> _Unit | None:
    """The open unit of this resource in the nearest enclosing context, if it may be
    shared: same thread and task (a session is not safe to use concurrently), and not
    yet committed or rolled back."""
    outer = context.enclosing
    while outer is not None:
        unit = units.get(outer)
        if unit is not None:
            return unit if unit.owner == owner and not unit.finished else None
        outer = outer.enclosing
    return None


def _in_greenlet(method: Callable[..., None]) -> Callable[..., None]:
    """``method`` as an :meth:`AsyncSession.run_sync` callable (which passes the session first)."""

    def run(session: Session, *args: Any, **kwargs: Any) -> None:
        method(*args, **kwargs)

    return run


def _begin_nested(session: Session) -> tuple[SessionTransaction, int]:
    savepoint = session.begin_nested()
    return savepoint, _next_level(session)


class SQLResource:
    """A SQLAlchemy :class:`~sqlalchemy.orm.Session` per context (see the module docs).

    ``url`` is resolved with :func:`database_url`; ``engine_options`` go to
    :func:`sqlalchemy.create_engine` (``pool_pre_ping`` is on unless you turn it off);
    ``session_options`` to the :class:`~sqlalchemy.orm.Session` (by default
    ``expire_on_commit=False``, so that objects a service returns stay readable after
    the context has committed and closed the session).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        engine_options: Mapping[str, Any] | None = None,
        session_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.url: URL = url_for_flavour(parse_database_url(database_url(url)), asyncio=False)
        self.engine: Engine = create_sql_engine(self.url, engine_options=engine_options)
        self.session_options: dict[str, Any] = {"expire_on_commit": False}
        self.session_options.update(session_options or {})
        self.telemetry_attributes: dict[str, str | int] = resource_attributes_for(self.url)
        self._units = _OpenUnits()  # of the contexts that have this resource's session open

    def __call__(self, context: DataAccessContext) -> Generator[Session, None, None]:
        owner = _owner()
        outer = _enclosing_unit(self._units, context, owner)
        if outer is None:
            session = _ContextSession(self.engine, **self.session_options)
            unit = _Unit(session, session, None, 0, owner, _SYNC_HELPER)
        else:  # nested in a context that has this resource's session open: share it
            savepoint, depth = _begin_nested(outer.session)
            unit = _Unit(outer.session, outer.session, savepoint, depth, owner, _SYNC_HELPER)
        self._units.add(context, unit)
        try:
            yield unit.session
        except BaseException as error:
            unit.rollback(error)
            raise
        else:
            unit.finish()
        finally:
            self._units.remove(context)
            unit.close()

    def session(self) -> Session:
        """A new session on this resource's engine, outside any context (scripts, tests)."""
        return _ContextSession(self.engine, **self.session_options)

    def ping(self) -> None:
        """Health check: ``SELECT 1`` on a pooled connection; raises when the database is down."""
        with self.engine.connect() as connection:
            connection.execute(text("SELECT 1")).scalar_one()

    def dispose(self) -> None:
        """Close every pooled connection (call at shutdown, or in a child after ``fork``)."""
        self.engine.dispose()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url.render_as_string(hide_password=True)!r})"


class AsyncSQLResource:
    """An :class:`~sqlalchemy.ext.asyncio.AsyncSession` per context; see :class:`SQLResource`."""

    def __init__(
        self,
        url: str | None = None,
        *,
        engine_options: Mapping[str, Any] | None = None,
        session_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.url: URL = url_for_flavour(parse_database_url(database_url(url)), asyncio=True)
        self.engine: AsyncEngine = create_async_sql_engine(self.url, engine_options=engine_options)
        self.session_options: dict[str, Any] = {"expire_on_commit": False}
        self.session_options.update(session_options or {})
        self.telemetry_attributes: dict[str, str | int] = resource_attributes_for(self.url)
        self._units = _OpenUnits()

    def _new_session(self) -> AsyncSession:
        options = {"sync_session_class": _ContextSession, **self.session_options}
        return AsyncSession(self.engine, **options)

    async def __call__(self, context: DataAccessContext) -> AsyncIterator[AsyncSession]:
        owner = _owner()
        outer = _enclosing_unit(self._units, context, owner)
        if outer is None:
            session = self._new_session()
            unit = _Unit(session, session.sync_session, None, 0, owner, _ASYNC_HELPER)
        else:  # nested in a context that has this resource's session open: share it
            session = outer.handle
            savepoint, depth = await session.run_sync(_begin_nested)
            unit = _Unit(session, session.sync_session, savepoint, depth, owner, _ASYNC_HELPER)
        self._units.add(context, unit)
        try:
            yield session
        except BaseException as error:
            await session.run_sync(_in_greenlet(unit.rollback), error)
            raise
        else:
            await session.run_sync(_in_greenlet(unit.finish))
        finally:
            self._units.remove(context)
            if unit.savepoint is None:
                try:
                    await session.close()
                finally:
                    session.sync_session.info.pop(_CONNECTIONS, None)
                    session.sync_session.info[_ENDED] = True

    def session(self) -> AsyncSession:
        """A new async session on this resource's engine, outside any context."""
        return self._new_session()

    async def ping(self) -> None:
        """Health check: ``SELECT 1`` (``await dm.aping()`` calls it)."""
        async with self.engine.connect() as connection:
            (await connection.execute(text("SELECT 1"))).scalar_one()

    async def dispose(self) -> None:
        """Close every pooled connection."""
        await self.engine.dispose()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url.render_as_string(hide_password=True)!r})"


# ------------------------------------------------------------------- middleware


def _unit_of(context: DataAccessContext, resource_name: str) -> _Unit | None:
    """The context's unit of the resource ``resource_name``, if polydatum's resource
    made the session (else ``None``: another resource's session, managed the old way)."""
    resource = context.data_manager.get_resource(resource_name)
    if isinstance(resource, SQLResource | AsyncSQLResource):
        return resource._units.get(context)
    return None


def transaction_middleware(resource_name: str = "db") -> Callable[..., Generator[None, None, None]]:
    """Context middleware: one transaction for the whole context, committed at its end.

    ``dm.register_context_middleware(transaction_middleware())``. The session is
    opened when the context starts (no connection is taken until the first
    statement); when the middleware tears down it commits if no error reached it,
    rolls back otherwise, and a failed commit is rolled back and raised out of the
    ``with`` block (the database's own error). Register it *first* so that it is the
    outermost middleware and sees what every other middleware did to the error: if
    a middleware outside it suppresses the error it rolled back for, the resource
    raises :class:`~polydatum.errors.CommitError` (the work is lost; the context must
    not look successful). In a nested context sharing the enclosing context's
    session, it releases or rolls back the nested context's savepoint only.
    """

    def sql_transaction(context: DataAccessContext) -> Generator[None, None, None]:
        session: Session = context.resource(resource_name)
        unit = _unit_of(context, resource_name)
        if unit is None:  # a session polydatum did not make: the session.info protocol
            yield from _session_transaction(session)
            return
        unit.managed = True
        try:
            yield
        except BaseException as error:
            unit.rollback(error)
            unit.rolled_back_by = error
            raise
        unit.commit(raw=True)

    return sql_transaction


def _session_transaction(session: Session) -> Generator[None, None, None]:
    session.info[MANAGED] = True
    try:
        yield
    except BaseException as error:
        _rollback_then_raise(session, error)
        raise
    try:
        session.commit()
    except BaseException as error:
        _rollback_then_raise(session, error)
        raise


def async_transaction_middleware(
    resource_name: str = "db",
) -> Callable[..., AsyncIterator[None]]:
    """:func:`transaction_middleware` for :class:`AsyncSQLResource` (``async with`` contexts)."""

    async def sql_transaction(context: DataAccessContext) -> AsyncIterator[None]:
        session: AsyncSession = await context.aresource(resource_name)
        unit = _unit_of(context, resource_name)
        if unit is None:  # a session polydatum did not make: the session.info protocol
            session.info[MANAGED] = True
        else:
            unit.managed = True
        try:
            yield
        except BaseException as error:
            if unit is None:
                await session.run_sync(_rollback_then_raise, error)
            else:
                await session.run_sync(_in_greenlet(unit.rollback), error)
                unit.rolled_back_by = error
            raise
        if unit is None:
            try:
                await session.commit()
            except BaseException as error:
                await session.run_sync(_rollback_then_raise, error)
                raise
        else:
            await session.run_sync(_in_greenlet(unit.commit), raw=True)

    return sql_transaction


# ------------------------------------------------------------------- savepoints


def _close_savepoint(session: Session, nested: SessionTransaction, error: BaseException) -> None:
    if _is_open(session, nested):
        try:
            nested.rollback()
        except Exception as rollback_error:
            raise rollback_error from error


def _release_savepoint(session: Session, nested: SessionTransaction, depth: int) -> None:
    if not _is_open(session, nested):
        return  # the block committed or rolled back itself
    failed = _failure_in(session, nested, depth)
    if failed is not None:
        reason, cause = failed
        aborted = TransactionAbortedError(
            f"the savepoint's work was rolled back: a statement failed inside it and its "
            f"error was caught ({reason}). Let the error propagate out of the savepoint "
            f"block, or run the statement that may fail inside a savepoint of its own"
        )
        _close_savepoint(session, nested, aborted)
        raise aborted from cause
    if nested.is_active:
        nested.commit()


@contextmanager
def savepoint(session: Session) -> Iterator[SessionTransaction]:
    """A nested unit of work: SAVEPOINT on entry, RELEASE on success, ROLLBACK TO on error.

    The error is re-raised; the enclosing transaction is intact and may continue. A
    block that completes although one of its statements failed (the error was caught
    inside it) is rolled back to the savepoint and raises
    :class:`TransactionAbortedError`: PostgreSQL could not release it, and SQLite
    would keep half of it.
    """
    nested, depth = _begin_nested(session)
    try:
        yield nested
    except BaseException as error:
        _close_savepoint(session, nested, error)
        raise
    else:
        _release_savepoint(session, nested, depth)


@asynccontextmanager
async def asavepoint(session: AsyncSession) -> AsyncIterator[Any]:
    """:func:`savepoint` for an :class:`~sqlalchemy.ext.asyncio.AsyncSession`."""
    nested = session.begin_nested()
    await nested.start()
    sync_nested = nested.sync_transaction
    assert sync_nested is not None  # started
    depth = _next_level(session.sync_session)
    try:
        yield nested
    except BaseException as error:
        await session.run_sync(_close_savepoint, sync_nested, error)
        raise
    else:
        await session.run_sync(_release_savepoint, sync_nested, depth)


# ------------------------------------------------------------------ configuration


def safe_database_url(url: str) -> str:
    """The database :func:`configure_sql` gives the safe for the application's ``url``.

    A server database (PostgreSQL...) is the same URL: the safe uses the same
    database through its own pool. A SQLite file gets a sibling file, ``.safe``
    inserted before the extension -- ``sqlite:///app.db`` → ``sqlite:///app.safe.db``,
    ``sqlite:///data/app`` → ``sqlite:///data/app.safe`` -- because SQLite has one
    writer per file, and the context's session holds that lock until it commits. An
    in-memory database (``sqlite://``) stays in memory: the safe's own.
    """
    parsed = parse_database_url(url)
    database = parsed.database or ""
    if parsed.get_backend_name() != "sqlite" or database in ("", ":memory:"):
        return url
    if database.startswith("file:") and "mode=memory" in database:
        return url
    root, extension = os.path.splitext(database)
    return parsed.set(database=f"{root}.safe{extension}").render_as_string(hide_password=False)


@dataclass(frozen=True)
class SQLBackend:
    """What :func:`configure_sql` registered: the URL (password hidden), ``db`` and ``safe``,
    and whether statements are traced."""

    url: str
    db: SQLResource | AsyncSQLResource
    safe: SafeStore | None
    #: Whether ``db``'s statements are traced, and why (not); ``None`` without
    #: ``configure_sql(..., trace_statements=True)``.
    statement_tracing: StatementTracing | None = None

    def dispose(self) -> None:
        """Close the sync pools (the safe's and a sync ``db``'s); use :meth:`adispose` for
        an asyncio ``db``."""
        if isinstance(self.db, SQLResource):
            self.db.dispose()
        if self.safe is not None:
            self.safe.dispose()

    async def adispose(self) -> None:
        """Close every pool, the asyncio ``db``'s included."""
        if isinstance(self.db, AsyncSQLResource):
            await self.db.dispose()
        self.dispose()


def configure_sql(
    dm: DataManager,
    url: str | None = None,
    settings: Mapping[str, Any] | None = None,
    *,
    engine_options: Mapping[str, Any] | None = None,
    asyncio: bool = False,
    resource_name: str = "db",
    safe_name: str | None = "safe",
    safe_url: str | None = None,
    serializer: str = "json",
    transaction: bool = False,
    trace_statements: bool = False,
) -> SQLBackend:
    """Register the SQL resource and the safe on ``dm`` from one URL.

    The URL is resolved by :func:`database_url` (code, ``settings``, the environment,
    the SQLite default). ``asyncio=True`` registers an :class:`AsyncSQLResource`.
    ``safe_name=None`` registers no safe; the safe has its own engine and pool, on
    ``safe_url`` or else :func:`safe_database_url` of the URL (the same server
    database; a sibling file on SQLite), so that it never waits for the context's
    session nor competes with it for connections. ``engine_options`` apply to both
    engines. ``serializer`` is the safe's value format (``"json"``, or ``"pickle"``
    for trusted data only). ``transaction=True`` also registers
    :func:`transaction_middleware` (sync) or :func:`async_transaction_middleware`.
    ``trace_statements=True`` traces the statements of both engines with
    ``opentelemetry-instrumentation-sqlalchemy`` (:func:`trace_sql_statements`); the
    statement spans go where ``dm``'s spans go at the time (its own provider, else the
    one given to ``PolydatumInstrumentor().instrument()``, else the global one; none
    after ``uninstrument()``), the connection metric to ``dm``'s meter provider, else
    the instrumentor's, else the global one;
    ``SQLBackend.statement_tracing`` says whether that happened for ``db``, and why
    not. Off by default: contrib's tracer does its work for every statement even when
    nothing records (and ``opentelemetry-instrument`` traces every engine anyway, with
    a SQLAlchemy in the range contrib declares).
    """
    resolved = database_url(url, settings)
    db: SQLResource | AsyncSQLResource
    if asyncio:
        db = AsyncSQLResource(resolved, engine_options=engine_options)
    else:
        db = SQLResource(resolved, engine_options=engine_options)
    safe: SafeStore | None = None
    resources: dict[str, Any] = {resource_name: db}
    if safe_name is not None:
        safe = SafeStore(
            safe_url or safe_database_url(resolved),
            serializer=serializer,
            engine_options=engine_options,
        )
        resources[safe_name] = safe
    dm.register_resources(**resources)
    if transaction:
        dm.register_context_middleware(
            async_transaction_middleware(resource_name)
            if asyncio
            else transaction_middleware(resource_name)
        )
    tracing: StatementTracing | None = None
    if trace_statements:
        providers = {
            "tracer_provider": dm.telemetry.following_tracer_provider(),
            "meter_provider": dm.telemetry.current_meter_provider(),
        }
        tracing = trace_sql_statements(db.engine, **providers)
        if safe is not None:
            trace_sql_statements(safe.engine, **providers)
    return SQLBackend(db.url.render_as_string(hide_password=True), db, safe, tracing)
