"""SQL through SQLAlchemy 2.x: a session per context, one engine per URL, one-line switching.

Needs the ``sql`` extra (SQLAlchemy, aiosqlite) and, for PostgreSQL, the ``postgres``
extra (psycopg, asyncpg). Statement spans come from ``opentelemetry-instrumentation-
sqlalchemy`` (the ``sql-tracing`` extra); they nest under the service call that ran
the statement, because the session executes in the caller's frame.

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
    (``dm.ping()`` calls it). ``telemetry_attributes`` holds ``db.system.name``,
    ``db.namespace`` and, for a server database, ``server.address`` and
    ``server.port`` (when the URL names it); polydatum adds them to the resource's
    setup/teardown spans. Passwords never appear in attributes or ``repr``.

    A failed *commit* in this form is a resource teardown error: polydatum rolls
    back, records it (teardown span ERROR, warning log, counter,
    ``ctx.get_resource_exit_errors()``) and, as for every resource, does not raise
    it from the ``with`` block unless the DataManager uses
    ``teardown_errors="raise"``. Applications whose callers must see a failed commit
    use :func:`transaction_middleware`.

``AsyncSQLResource(url=None, ...)``
    The same with :class:`sqlalchemy.ext.asyncio.AsyncSession`, as an async-generator
    resource: ``session = await ctx.aresource("db")`` inside ``async with
    dm.context()``. ``await resource.ping()``, ``await resource.dispose()``.

``transaction_middleware(resource_name="db")`` / ``async_transaction_middleware(...)``
    Context middleware that opens the session when the context starts and commits or
    rolls back when the middleware tears down -- *before* resources tear down, so a
    failed commit (or any error) propagates out of the ``with`` block like an error
    raised in it. The resource then only closes the session (it never commits twice).

``savepoint(session)`` / ``asavepoint(session)``
    A nested unit of work: ``with savepoint(ctx.db): ...`` releases the SAVEPOINT when
    the block succeeds and rolls back to it (re-raising) when it fails; the enclosing
    transaction carries on. Works on SQLite too (see below).

``configure_sql(dm, url=None, settings=None, ...) -> SQLBackend``
    The one line an application needs: registers ``db`` (a :class:`SQLResource`, or an
    :class:`AsyncSQLResource` with ``asyncio=True``) and ``safe`` (a
    :class:`polydatum.safe.SafeStore` on the same URL) on ``dm``.

The same URL works for both flavours: ``postgresql://`` means psycopg 3 (sync and
async), ``sqlite:///`` becomes ``sqlite+aiosqlite:///`` for the async resource and
``postgresql+asyncpg://`` becomes psycopg for the sync one.

SQLite
------
Every connection gets ``journal_mode=WAL`` (readers never block the writer),
``foreign_keys=ON`` and ``busy_timeout`` (30 s by default: a writer waits for the
lock instead of failing with ``database is locked``); ``sqlite_pragmas`` in
``engine_options`` overrides or adds pragmas. polydatum takes over ``BEGIN`` from
the sqlite3 driver (whose implicit transactions break SAVEPOINT and make reads run
outside transactions) and emits it itself; the safe uses ``BEGIN IMMEDIATE`` for its
writes so that a read-modify-write never fails on a lock upgrade.

Only parameterised SQL: nothing here formats a value into a statement.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

try:
    from sqlalchemy import Engine, create_engine, event, text
    from sqlalchemy.engine import URL, make_url
    from sqlalchemy.exc import ArgumentError
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
    from sqlalchemy.orm import Session, SessionTransaction
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "polydatum.sql needs SQLAlchemy 2.x: pip install 'polydatum[sql]' "
        "(and 'polydatum[postgres]' for PostgreSQL)"
    ) from error

if TYPE_CHECKING:
    from polydatum.context import DataAccessContext
    from polydatum.dal import DataManager
    from polydatum.safe import SafeStore

__all__ = [
    "DEFAULT_DATABASE_URL",
    "ENV_VAR",
    "AsyncSQLResource",
    "SQLBackend",
    "SQLResource",
    "asavepoint",
    "async_transaction_middleware",
    "configure_sql",
    "create_sql_engine",
    "database_url",
    "savepoint",
    "transaction_middleware",
]

#: The environment variable :func:`database_url` reads.
ENV_VAR = "POLYDATUM_DATABASE_URL"
#: The embedded default: a SQLite file in the working directory.
DEFAULT_DATABASE_URL = "sqlite:///polydatum.db"
#: The settings key :func:`database_url` reads.
SETTINGS_KEY = "DATABASE_URL"

#: Pragmas set on every SQLite connection (``sqlite_pragmas`` overrides them).
SQLITE_PRAGMAS: dict[str, str | int] = {
    "journal_mode": "WAL",
    "foreign_keys": "ON",
    "busy_timeout": 30_000,
}

#: ``session.info`` key set by the transaction middleware: the resource must not commit.
MANAGED = "polydatum.transaction_managed"
#: Execution option naming the BEGIN variant polydatum emits on SQLite.
SQLITE_BEGIN_OPTION = "polydatum_sqlite_begin"

_SYSTEM_NAMES = {
    "postgresql": "postgresql",
    "sqlite": "sqlite",
    "mysql": "mysql",
    "mariadb": "mariadb",
    "mssql": "microsoft.sql_server",
    "oracle": "oracle.db",
}


# ------------------------------------------------------------------------ URLs


def database_url(url: str | None = None, settings: Mapping[str, Any] | None = None) -> str:
    """Resolve the database URL: ``url``, ``settings["DATABASE_URL"]``, the
    ``POLYDATUM_DATABASE_URL`` environment variable, then ``sqlite:///polydatum.db``.

    Empty values are skipped, so an empty environment variable does not mean "no
    database". A value that is not a string raises :class:`TypeError`.
    """
    candidates: list[tuple[str, Any]] = [("url", url)]
    if settings is not None:
        if not isinstance(settings, Mapping):
            raise TypeError(
                f"settings must be a mapping (a dict of settings), not {type(settings).__name__}"
            )
        candidates.append((f"settings[{SETTINGS_KEY!r}]", settings.get(SETTINGS_KEY)))
    candidates.append((f"${ENV_VAR}", os.environ.get(ENV_VAR)))
    for source, value in candidates:
        if value is None or value == "":
            continue
        if isinstance(value, URL):
            return value.render_as_string(hide_password=False)
        if not isinstance(value, str):
            raise TypeError(
                f"the database URL from {source} must be a string such as "
                f"'sqlite:///app.db' or 'postgresql://user@host/db', not {type(value).__name__}"
            )
        return value
    return DEFAULT_DATABASE_URL


def _parse(url: str) -> URL:
    try:
        return make_url(url)
    except ArgumentError as error:
        raise ValueError(
            f"not a database URL: {url!r} ({error}); expected e.g. 'sqlite:///app.db' "
            f"or 'postgresql://user@host:5432/db'"
        ) from None


def _for_flavour(url: URL, *, asyncio: bool) -> URL:
    """The URL with a driver that fits the sync or async engine (same database)."""
    backend, driver = url.get_backend_name(), url.get_driver_name()
    explicit = "+" in url.drivername
    if backend == "sqlite":
        if asyncio and driver != "aiosqlite":
            return url.set(drivername="sqlite+aiosqlite")
        if not asyncio and driver == "aiosqlite":
            return url.set(drivername="sqlite")
    elif backend == "postgresql":
        wrong_driver = (asyncio and driver == "psycopg2") or (
            not asyncio and driver in ("asyncpg", "psycopg_async")
        )
        if not explicit or wrong_driver:
            return url.set(drivername="postgresql+psycopg")
    return url


def telemetry_attributes_for(url: URL) -> dict[str, str | int]:
    """``db.system.name``, ``db.namespace`` and, for servers, ``server.address``/``server.port``.

    Never the user name or password.
    """
    backend = url.get_backend_name()
    attrs: dict[str, str | int] = {"db.system.name": _SYSTEM_NAMES.get(backend, backend)}
    if url.database:
        attrs["db.namespace"] = url.database
    elif backend == "sqlite":
        attrs["db.namespace"] = ":memory:"
    if backend != "sqlite" and url.host:
        attrs["server.address"] = url.host
        if url.port is not None:
            attrs["server.port"] = url.port
    return attrs


# ---------------------------------------------------------------------- engines


def _sqlite_pragmas(options: dict[str, Any]) -> dict[str, str | int]:
    pragmas = dict(SQLITE_PRAGMAS)
    pragmas.update(options.pop("sqlite_pragmas", None) or {})
    for name in pragmas:
        if not name.replace("_", "").isalnum():
            raise ValueError(f"not a SQLite pragma name: {name!r}")
    return pragmas


def _install_sqlite_hooks(sync_engine: Engine, pragmas: Mapping[str, str | int]) -> None:
    statements = [f"PRAGMA {name} = {value}" for name, value in pragmas.items()]
    for value in pragmas.values():
        if not str(value).replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"not a SQLite pragma value: {value!r}")

    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, connection_record: Any) -> None:
        # Take BEGIN away from the driver (it would only begin before DML, which
        # breaks SAVEPOINT and isolation); polydatum emits it in _on_begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            for statement in statements:
                cursor.execute(statement)
        finally:
            cursor.close()

    @event.listens_for(sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get(SQLITE_BEGIN_OPTION, "DEFERRED")
        # Straight to the driver: BEGIN is transaction control, not a statement to
        # trace (COMMIT and ROLLBACK are not traced either).
        cursor = conn.connection.cursor()
        try:
            cursor.execute("BEGIN IMMEDIATE" if mode == "IMMEDIATE" else "BEGIN")
        finally:
            cursor.close()


def _engine_options(url: URL, engine_options: Mapping[str, Any] | None) -> dict[str, Any]:
    options = dict(engine_options or {})
    if url.get_backend_name() != "sqlite" or (url.database or ":memory:") != ":memory:":
        options.setdefault("pool_pre_ping", True)
    return options


def create_sql_engine(
    url: str | URL | None = None, *, engine_options: Mapping[str, Any] | None = None
) -> Engine:
    """A sync engine configured as polydatum expects (SQLite pragmas and BEGIN, pre-ping).

    ``engine_options`` go to :func:`sqlalchemy.create_engine`, except
    ``sqlite_pragmas`` (a mapping of extra/overriding SQLite pragmas).
    """
    parsed = _for_flavour(url if isinstance(url, URL) else _parse(database_url(url)), asyncio=False)
    options = _engine_options(parsed, engine_options)
    pragmas = _sqlite_pragmas(options) if parsed.get_backend_name() == "sqlite" else None
    engine = create_engine(parsed, **options)
    if pragmas is not None:
        _install_sqlite_hooks(engine, pragmas)
    return engine


def create_async_sql_engine(
    url: str | URL | None = None, *, engine_options: Mapping[str, Any] | None = None
) -> AsyncEngine:
    """The asyncio twin of :func:`create_sql_engine`."""
    parsed = _for_flavour(url if isinstance(url, URL) else _parse(database_url(url)), asyncio=True)
    options = _engine_options(parsed, engine_options)
    pragmas = _sqlite_pragmas(options) if parsed.get_backend_name() == "sqlite" else None
    engine = create_async_engine(parsed, **options)
    if pragmas is not None:
        _install_sqlite_hooks(engine.sync_engine, pragmas)
    return engine


# --------------------------------------------------------------------- resources


def _rollback_then_raise(session: Session, error: BaseException) -> None:
    try:
        session.rollback()
    except Exception as rollback_error:
        raise rollback_error from error


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
        self.url: URL = _for_flavour(_parse(database_url(url)), asyncio=False)
        self.engine: Engine = create_sql_engine(self.url, engine_options=engine_options)
        self.session_options: dict[str, Any] = {"expire_on_commit": False}
        self.session_options.update(session_options or {})
        self.telemetry_attributes: dict[str, str | int] = telemetry_attributes_for(self.url)

    def __call__(self, context: DataAccessContext) -> Generator[Session, None, None]:
        session = Session(self.engine, **self.session_options)
        try:
            yield session
        except BaseException as error:
            _rollback_then_raise(session, error)
            raise
        else:
            if not session.info.get(MANAGED):
                try:
                    session.commit()
                except BaseException as error:
                    _rollback_then_raise(session, error)
                    raise
        finally:
            session.close()

    def session(self) -> Session:
        """A new session on this resource's engine, outside any context (scripts, tests)."""
        return Session(self.engine, **self.session_options)

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
        self.url: URL = _for_flavour(_parse(database_url(url)), asyncio=True)
        self.engine: AsyncEngine = create_async_sql_engine(self.url, engine_options=engine_options)
        self.session_options: dict[str, Any] = {"expire_on_commit": False}
        self.session_options.update(session_options or {})
        self.telemetry_attributes: dict[str, str | int] = telemetry_attributes_for(self.url)

    async def __call__(self, context: DataAccessContext) -> AsyncIterator[AsyncSession]:
        session = AsyncSession(self.engine, **self.session_options)
        try:
            yield session
        except BaseException as error:
            try:
                await session.rollback()
            except Exception as rollback_error:
                raise rollback_error from error
            raise
        else:
            if not session.info.get(MANAGED):
                try:
                    await session.commit()
                except BaseException as error:
                    try:
                        await session.rollback()
                    except Exception as rollback_error:
                        raise rollback_error from error
                    raise
        finally:
            await session.close()

    def session(self) -> AsyncSession:
        """A new async session on this resource's engine, outside any context."""
        return AsyncSession(self.engine, **self.session_options)

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


def transaction_middleware(resource_name: str = "db") -> Callable[..., Generator[None, None, None]]:
    """Context middleware: one transaction for the whole context, committed at its end.

    ``dm.register_context_middleware(transaction_middleware())``. The session is
    opened when the context starts (no connection is taken until the first
    statement); when the middleware tears down it commits if no error reached it,
    rolls back otherwise, and a failed commit is rolled back and raised out of the
    ``with`` block. Register it *first* so that it is the outermost middleware and
    sees what every other middleware did to the error.
    """

    def sql_transaction(context: DataAccessContext) -> Generator[None, None, None]:
        session: Session = context.resource(resource_name)
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

    return sql_transaction


def async_transaction_middleware(
    resource_name: str = "db",
) -> Callable[..., AsyncIterator[None]]:
    """:func:`transaction_middleware` for :class:`AsyncSQLResource` (``async with`` contexts)."""

    async def sql_transaction(context: DataAccessContext) -> AsyncIterator[None]:
        session: AsyncSession = await context.aresource(resource_name)
        session.info[MANAGED] = True
        try:
            yield
        except BaseException as error:
            try:
                await session.rollback()
            except Exception as rollback_error:
                raise rollback_error from error
            raise
        try:
            await session.commit()
        except BaseException as error:
            try:
                await session.rollback()
            except Exception as rollback_error:
                raise rollback_error from error
            raise

    return sql_transaction


@contextmanager
def savepoint(session: Session) -> Iterator[SessionTransaction]:
    """A nested unit of work: SAVEPOINT on entry, RELEASE on success, ROLLBACK TO on error.

    The error is re-raised; the enclosing transaction is intact and may continue.
    """
    nested = session.begin_nested()
    try:
        yield nested
    except BaseException:
        if nested.is_active:
            nested.rollback()
        raise
    else:
        if nested.is_active:
            nested.commit()


@asynccontextmanager
async def asavepoint(session: AsyncSession) -> AsyncIterator[Any]:
    """:func:`savepoint` for an :class:`~sqlalchemy.ext.asyncio.AsyncSession`."""
    nested = session.begin_nested()
    await nested.start()
    try:
        yield nested
    except BaseException:
        if nested.is_active:
            await nested.rollback()
        raise
    else:
        if nested.is_active:
            await nested.commit()


# ------------------------------------------------------------------ configuration


@dataclass(frozen=True)
class SQLBackend:
    """What :func:`configure_sql` registered: the URL (password hidden), ``db`` and ``safe``."""

    url: str
    db: SQLResource | AsyncSQLResource
    safe: SafeStore | None

    def dispose(self) -> None:
        """Close the sync pools (the safe's and a sync ``db``'s); use ``adispose`` for async."""
        if isinstance(self.db, SQLResource):
            self.db.dispose()
        if self.safe is not None:
            self.safe.dispose()


def configure_sql(
    dm: DataManager,
    url: str | None = None,
    settings: Mapping[str, Any] | None = None,
    *,
    engine_options: Mapping[str, Any] | None = None,
    asyncio: bool = False,
    resource_name: str = "db",
    safe_name: str | None = "safe",
    serializer: str = "json",
    transaction: bool = False,
) -> SQLBackend:
    """Register the SQL resource and the safe on ``dm`` from one URL.

    The URL is resolved by :func:`database_url` (code, ``settings``, the environment,
    the SQLite default). ``asyncio=True`` registers an :class:`AsyncSQLResource`.
    ``safe_name=None`` registers no safe; ``serializer`` is the safe's value format
    (``"json"``, or ``"pickle"`` for trusted data only). ``transaction=True`` also
    registers :func:`transaction_middleware` (sync) or
    :func:`async_transaction_middleware` so that a failed commit raises.
    """
    from polydatum.safe import SafeStore

    resolved = database_url(url, settings)
    db: SQLResource | AsyncSQLResource
    safe: SafeStore | None = None
    if asyncio:
        db = AsyncSQLResource(resolved, engine_options=engine_options)
        if safe_name is not None:
            safe = SafeStore(resolved, serializer=serializer, engine_options=engine_options)
    else:
        db = SQLResource(resolved, engine_options=engine_options)
        if safe_name is not None:
            safe = SafeStore(db.engine, serializer=serializer)
    resources: dict[str, Any] = {resource_name: db}
    if safe is not None and safe_name is not None:
        resources[safe_name] = safe
    dm.register_resources(**resources)
    if transaction:
        dm.register_context_middleware(
            async_transaction_middleware(resource_name)
            if asyncio
            else transaction_middleware(resource_name)
        )
    return SQLBackend(db.url.render_as_string(hide_password=True), db, safe)
