"""The SQL engine layer: database URLs and SQLAlchemy engines configured as polydatum expects.

The lowest of polydatum's SQL modules. :mod:`polydatum.safe` builds its store's engine
here and :mod:`polydatum.sql` its resources' engines; this module imports neither
(``polydatum.sql`` → ``polydatum.safe`` → ``polydatum.sql_engine``). Applications use
these names through :mod:`polydatum.sql`, which re-exports the public ones
(``polydatum.sql.database_url``, ``polydatum.sql.create_sql_engine``...).

What it holds:

* URLs: :func:`database_url` (where the URL comes from: the argument,
  ``settings["DATABASE_URL"]``, ``$POLYDATUM_DATABASE_URL``, ``sqlite:///polydatum.db``),
  :func:`parse_database_url`, :func:`url_for_flavour` (the driver for the sync or the
  async engine) and :func:`telemetry_attributes_for` (``db.system.name``,
  ``db.namespace``, ``server.address``/``server.port``; never credentials).
* Engines: :func:`create_sql_engine` and :func:`create_async_sql_engine`, with SQLite's
  pragmas (:data:`SQLITE_PRAGMAS`) and BEGIN (:data:`SQLITE_BEGIN_OPTION`) and
  ``pool_pre_ping``.
* Statement failures: the engine events those engines carry, which record each
  statement that fails inside a transaction, per savepoint level
  (:class:`StatementFailures`, read with :func:`failures_of`); :mod:`polydatum.sql`
  checks them before committing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

try:
    from sqlalchemy import Connection, Engine, create_engine, event
    from sqlalchemy.engine import URL, ExceptionContext, make_url
    from sqlalchemy.exc import ArgumentError, DBAPIError
    from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "polydatum.sql_engine needs SQLAlchemy 2.x: pip install 'polydatum[sql]' "
        "(and 'polydatum[postgres]' for PostgreSQL)"
    ) from error

__all__ = [
    "DATA_DIR_ENV_VAR",
    "DEFAULT_DATABASE_FILE",
    "DEFAULT_DATABASE_URL",
    "ENV_VAR",
    "SETTINGS_KEY",
    "SQLITE_BEGIN_OPTION",
    "SQLITE_PRAGMAS",
    "StatementFailures",
    "create_async_sql_engine",
    "create_sql_engine",
    "database_url",
    "default_database_url",
    "failures_of",
    "parse_database_url",
    "telemetry_attributes_for",
    "url_for_flavour",
]

#: The environment variable :func:`database_url` reads.
ENV_VAR = "POLYDATUM_DATABASE_URL"
#: The embedded default: a SQLite file in the working directory (or in
#: ``$POLYDATUM_DATA_DIR``, see :func:`default_database_url`).
DEFAULT_DATABASE_URL = "sqlite:///polydatum.db"
#: The environment variable naming the directory of the default SQLite file.
DATA_DIR_ENV_VAR = "POLYDATUM_DATA_DIR"
#: The default SQLite file's name.
DEFAULT_DATABASE_FILE = "polydatum.db"
#: The settings key :func:`database_url` reads.
SETTINGS_KEY = "DATABASE_URL"

#: Pragmas set on every SQLite connection (``sqlite_pragmas`` overrides them).
SQLITE_PRAGMAS: dict[str, str | int] = {
    "journal_mode": "WAL",
    "foreign_keys": "ON",
    "busy_timeout": 30_000,
}

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
    ``POLYDATUM_DATABASE_URL`` environment variable, then :func:`default_database_url`
    (``sqlite:///polydatum.db``, in ``$POLYDATUM_DATA_DIR`` when that is set).

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
    return default_database_url()


def default_database_url() -> str:
    """The embedded default: ``polydatum.db`` in ``$POLYDATUM_DATA_DIR`` when that is set
    (a volume, ``/var/lib/app``; created if missing), else in the working directory."""
    directory = os.environ.get(DATA_DIR_ENV_VAR)
    if not directory:
        return DEFAULT_DATABASE_URL
    path = os.path.abspath(os.path.expanduser(directory))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise ValueError(
            f"${DATA_DIR_ENV_VAR} is {directory!r}, which cannot be used as the directory "
            f"of the default SQLite database ({error.strerror}); set it to a writable "
            f"directory, or set ${ENV_VAR} to a database URL"
        ) from None
    return f"sqlite:///{os.path.join(path, DEFAULT_DATABASE_FILE)}"


def parse_database_url(url: str) -> URL:
    """``url`` as a SQLAlchemy :class:`~sqlalchemy.engine.URL`.

    A string that is not a database URL raises :class:`ValueError` naming it and
    showing what one looks like.
    """
    try:
        parsed = make_url(url)
    except ArgumentError as error:
        raise ValueError(
            f"not a database URL: {url!r} ({error}); expected e.g. 'sqlite:///app.db' "
            f"or 'postgresql://user@host:5432/db'"
        ) from None
    # Heroku-style ``DATABASE_URL``s say ``postgres://``, a name SQLAlchemy dropped.
    backend, plus, driver = parsed.drivername.partition("+")
    if backend == "postgres":
        return parsed.set(drivername=f"postgresql{plus}{driver}")
    return parsed


def url_for_flavour(url: URL, *, asyncio: bool) -> URL:
    """The URL with a driver that fits the sync or async engine (same database).

    SQLite: ``sqlite+aiosqlite`` for asyncio, plain ``sqlite`` otherwise. PostgreSQL
    without a driver, or with one that does not fit (psycopg2 for asyncio; asyncpg or
    psycopg_async for sync): psycopg 3 (``postgresql+psycopg``, which does both); a
    driver that fits is kept. Other databases: unchanged.
    """
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
    parsed = url_for_flavour(
        url if isinstance(url, URL) else parse_database_url(database_url(url)), asyncio=False
    )
    options = _engine_options(parsed, engine_options)
    pragmas = _sqlite_pragmas(options) if parsed.get_backend_name() == "sqlite" else None
    engine = create_engine(parsed, **options)
    if pragmas is not None:
        _install_sqlite_hooks(engine, pragmas)
    _install_failure_tracking(engine)
    return engine


def create_async_sql_engine(
    url: str | URL | None = None, *, engine_options: Mapping[str, Any] | None = None
) -> AsyncEngine:
    """The asyncio twin of :func:`create_sql_engine`."""
    parsed = url_for_flavour(
        url if isinstance(url, URL) else parse_database_url(database_url(url)), asyncio=True
    )
    options = _engine_options(parsed, engine_options)
    pragmas = _sqlite_pragmas(options) if parsed.get_backend_name() == "sqlite" else None
    engine = create_async_engine(parsed, **options)
    if pragmas is not None:
        _install_sqlite_hooks(engine.sync_engine, pragmas)
    _install_failure_tracking(engine.sync_engine)
    return engine


# ------------------------------------------------------------ statement failures
#
# Why this exists: on PostgreSQL a failed statement aborts the whole transaction and a
# later COMMIT silently becomes ROLLBACK; on SQLite the transaction's other statements
# commit. Either way, a context whose error was caught (by the service, or suppressed
# by a middleware) would look successful with its work lost or half-done. So each
# transaction records its failed statements through engine events (every driver goes
# through them, asyncpg included), a savepoint that is rolled back forgives what
# failed inside it, and polydatum.sql refuses to commit the rest.

_FAILURES = "polydatum.failures"  # Connection.info: the StatementFailures of its transaction


class StatementFailures:
    """The failed statements of one database transaction, per savepoint level.

    ``levels[0]`` is the transaction, ``levels[i]`` its i-th open savepoint; each
    holds the first error a statement raised at that level, or ``None``. Lives in
    ``Connection.info`` from BEGIN to COMMIT/ROLLBACK (removed then, so that no error,
    with its traceback, stays on a pooled connection).
    """

    __slots__ = ("levels",)

    def __init__(self) -> None:
        self.levels: list[BaseException | None] = [None]


def failures_of(conn: Connection) -> StatementFailures | None:
    """The :class:`StatementFailures` of the transaction open on ``conn``.

    ``None`` when no transaction is open, when the connection's engine was not made by
    :func:`create_sql_engine` / :func:`create_async_sql_engine` (nothing is tracked),
    and when the connection is closed or invalidated.
    """
    # An invalidated connection (the server went away) has no DBAPI connection to
    # hold them, and its transaction can only be rolled back.
    if conn.closed or conn.invalidated:
        return None
    failures: StatementFailures | None = conn.info.get(_FAILURES)
    return failures


def _track_begin(conn: Connection) -> None:
    if not conn.invalidated:
        conn.info[_FAILURES] = StatementFailures()


def _track_end(conn: Connection) -> None:
    if not conn.closed and not conn.invalidated:
        conn.info.pop(_FAILURES, None)


def _track_savepoint(conn: Connection, name: str | None) -> None:
    failures = failures_of(conn)
    if failures is not None:
        failures.levels.append(None)


def _track_rollback_savepoint(conn: Connection, name: str | None, context: Any) -> None:
    # Rolled back: what failed inside is undone with it and no longer counts.
    # (SQLAlchemy closes savepoints innermost first, so the top level is this one.)
    failures = failures_of(conn)
    if failures is not None and len(failures.levels) > 1:
        failures.levels.pop()


def _track_release_savepoint(conn: Connection, name: str | None, context: Any) -> None:
    # Released: its statements join the enclosing level, and so do its failures.
    failures = failures_of(conn)
    if failures is not None and len(failures.levels) > 1:
        failed = failures.levels.pop()
        if failures.levels[-1] is None:
            failures.levels[-1] = failed


def _track_error(context: ExceptionContext) -> None:
    # Only errors the database raised (DBAPIError): a TypeError while binding a
    # parameter never reached the database and aborts nothing.
    conn = context.connection
    error = context.sqlalchemy_exception
    if conn is None or not isinstance(error, DBAPIError):
        return
    failures = failures_of(conn)
    if failures is not None and failures.levels[-1] is None:
        failures.levels[-1] = error


def _install_failure_tracking(engine: Engine) -> None:
    event.listen(engine, "begin", _track_begin)
    event.listen(engine, "commit", _track_end)
    event.listen(engine, "rollback", _track_end)
    event.listen(engine, "savepoint", _track_savepoint)
    event.listen(engine, "rollback_savepoint", _track_rollback_savepoint)
    event.listen(engine, "release_savepoint", _track_release_savepoint)
    event.listen(engine, "handle_error", _track_error)
