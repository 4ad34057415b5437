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
  pragmas (:data:`SQLITE_PRAGMAS`) and BEGIN (:data:`SQLITE_BEGIN_OPTION`),
  ``pool_pre_ping``, and an empty pool of their own in a forked child.
* Statement failures: the engine events those engines carry, which record each
  statement that fails inside a transaction, per savepoint level
  (:class:`StatementFailures`, read with :func:`failures_of`); :mod:`polydatum.sql`
  checks them before committing.
"""

from __future__ import annotations

import os
import sys
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

try:
    import sqlalchemy
    import sqlalchemy.ext.asyncio as sqlalchemy_asyncio
    from sqlalchemy import Connection, Engine, event
    from sqlalchemy.engine import URL, ExceptionContext, make_url
    from sqlalchemy.exc import ArgumentError, DBAPIError
    from sqlalchemy.ext.asyncio import AsyncEngine
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
    "SEMCONV_OPT_IN_VAR",
    "SETTINGS_KEY",
    "SQLITE_BEGIN_OPTION",
    "SQLITE_PRAGMAS",
    "STABLE_OPT_IN",
    "STATEMENT_TRACING_TESTED",
    "StatementFailures",
    "StatementTracing",
    "create_async_sql_engine",
    "create_sql_engine",
    "database_url",
    "default_database_url",
    "failures_of",
    "parse_database_url",
    "resource_attributes_for",
    "semconv_opt_in_modes",
    "telemetry_attributes_for",
    "trace_sql_statements",
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

    The stable semantic-conventions names of a database client call to ``url``; never
    the user name or password. They describe a CLIENT span (a round trip to the
    database); polydatum's own INTERNAL spans carry :func:`resource_attributes_for`.
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


#: :func:`resource_attributes_for`'s name for each of :func:`telemetry_attributes_for`'s.
RESOURCE_ATTRIBUTE_NAMES = {
    "db.system.name": "polydatum.db.system.name",
    "db.namespace": "polydatum.db.namespace",
    "server.address": "polydatum.db.server.address",
    "server.port": "polydatum.db.server.port",
}


def resource_attributes_for(url: URL) -> dict[str, str | int]:
    """The database a resource on ``url`` opens, under polydatum's own names:
    ``polydatum.db.system.name``, ``polydatum.db.namespace`` and, for servers,
    ``polydatum.db.server.address`` / ``polydatum.db.server.port``.

    What the SQL resources' setup and teardown spans carry. Those spans are INTERNAL:
    creating or closing a session is no round trip to the database, and the semantic
    conventions' ``db.*`` names describe a database client call (a CLIENT span, which
    backends draw as a call to the database), as the statement spans of
    ``opentelemetry-instrumentation-sqlalchemy`` are. The values are
    :func:`telemetry_attributes_for`'s; never the user name or password.
    """
    return {RESOURCE_ATTRIBUTE_NAMES[k]: v for k, v in telemetry_attributes_for(url).items()}


# ---------------------------------------------------------------------- engines


def _sqlite_pragmas(options: dict[str, Any]) -> dict[str, str | int]:
    pragmas = dict(SQLITE_PRAGMAS)
    pragmas.update(options.pop("sqlite_pragmas", None) or {})
    for name in pragmas:
        if not name.replace("_", "").isalnum():
            raise ValueError(f"not a SQLite pragma name: {name!r}")
    return pragmas


#: SQLite's result code for "database is locked" (the C API's SQLITE_BUSY); extended
#: codes (SQLITE_BUSY_RECOVERY...) carry it in their low byte.
_SQLITE_BUSY = 5
#: How long a pragma waits for a lock when ``busy_timeout`` is not among the pragmas:
#: the driver's own default (``sqlite3.connect(timeout=5.0)``).
_DRIVER_BUSY_TIMEOUT_MS = 5_000


def _is_busy(error: BaseException) -> bool:
    """Whether a driver error is SQLITE_BUSY ("database is locked")."""
    code = getattr(error, "sqlite_errorcode", None)
    if code is not None:
        return bool(code & 0xFF == _SQLITE_BUSY)
    return "database is locked" in str(error)


def _execute_pragma(cursor: Any, statement: str, deadline: float) -> None:
    """Run a pragma, retrying while the database is locked, until ``deadline``.

    ``PRAGMA journal_mode = WAL`` needs an exclusive lock for the conversion and, unlike
    statements, fails at once with "database is locked" instead of calling the busy
    handler: two processes opening a fresh database file at the same moment (two
    Celery or gunicorn children) would fail their first request. It is retried for as
    long as ``busy_timeout`` would have waited. Only a file not yet in WAL mode is
    converted (the mode is kept in the file), so the pauses happen during that first
    conversion only; on an async engine they pause the event loop (aiosqlite waits for
    locks in its own thread), while another process converts the file.
    """
    pause = 0.001
    while True:
        try:
            cursor.execute(statement)
            return
        except Exception as error:
            if not _is_busy(error) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


def _install_sqlite_hooks(sync_engine: Engine, pragmas: Mapping[str, str | int]) -> None:
    for value in pragmas.values():
        if not str(value).replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"not a SQLite pragma value: {value!r}")
    # busy_timeout first: the pragmas after it (and every statement) wait for locks.
    ordered = sorted(pragmas.items(), key=lambda item: item[0] != "busy_timeout")
    statements = [f"PRAGMA {name} = {value}" for name, value in ordered]
    busy_timeout = str(pragmas.get("busy_timeout", _DRIVER_BUSY_TIMEOUT_MS))
    if not busy_timeout.isdigit():
        raise ValueError(f"the busy_timeout pragma is in milliseconds, not {busy_timeout!r}")
    wait = int(busy_timeout) / 1000

    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, connection_record: Any) -> None:
        # Take BEGIN away from the driver (it would only begin before DML, which
        # breaks SAVEPOINT and isolation); polydatum emits it in _on_begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            deadline = time.monotonic() + wait
            for statement in statements:
                _execute_pragma(cursor, statement, deadline)
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


# ------------------------------------------------------------ fork
#
# A process that forks after using an engine (gunicorn --preload, a Celery prefork
# master that checked the database at startup, multiprocessing) hands its pooled
# connections to every child: the parent and the children then talk over the same
# sockets, and on PostgreSQL a child fails with a protocol error or reads another
# process's results. Each engine polydatum makes is given a fresh, empty pool in a
# forked child, the parent's connections never used there (SQLAlchemy's
# ``dispose(close=False)``): when the child drops them, psycopg leaves a connection it
# did not open in this process alone (it checks the pid), and a SQLite file closed in
# the child stays open in the parent.

_ENGINES_TO_RESET_AFTER_FORK: weakref.WeakSet[Engine] = weakref.WeakSet()


def _reset_pools_after_fork() -> None:
    for engine in list(_ENGINES_TO_RESET_AFTER_FORK):
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_reset_pools_after_fork)


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
    # Looked up at each call: when SQLAlchemyInstrumentor().instrument() has wrapped
    # create_engine (opentelemetry-instrument does), polydatum's engines are traced like
    # the application's own, whenever polydatum.sql_engine was imported.
    engine = sqlalchemy.create_engine(parsed, **options)
    if pragmas is not None:
        _install_sqlite_hooks(engine, pragmas)
    _install_failure_tracking(engine)
    _note_contrib_tracing(engine)
    _ENGINES_TO_RESET_AFTER_FORK.add(engine)
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
    engine = sqlalchemy_asyncio.create_async_engine(parsed, **options)
    if pragmas is not None:
        _install_sqlite_hooks(engine.sync_engine, pragmas)
    _install_failure_tracking(engine.sync_engine)
    _note_contrib_tracing(engine.sync_engine)
    _ENGINES_TO_RESET_AFTER_FORK.add(engine.sync_engine)
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


# ------------------------------------------------------------ statement spans
#
# SQL statement spans (CLIENT, one per statement, nested under the service call that ran
# it) come from opentelemetry-instrumentation-sqlalchemy (the ``sql-tracing`` extra).
# trace_sql_statements() puts contrib's engine tracer on one engine, for the providers it
# is given, and says whether statements are traced and which attribute names the spans
# carry: contrib follows OTEL_SEMCONV_STABILITY_OPT_IN, read once per process.

#: The SQLAlchemy versions with which polydatum's tests run contrib's statement spans
#: (tests/test_sql_tracing.py: spans, errors, sync and asyncio, SQLite and PostgreSQL).
#: Within them statements are traced also where contrib declares a narrower range
#: (0.66b1: ``sqlalchemy < 2.1.0``) and its instrumentor would refuse to start.
STATEMENT_TRACING_TESTED = ">=2.0,<2.2"

#: The variable from which contrib's instrumentations read which semantic conventions
#: to follow (once per process, when the first of them starts).
SEMCONV_OPT_IN_VAR = "OTEL_SEMCONV_STABILITY_OPT_IN"
#: The value of ``OTEL_SEMCONV_STABILITY_OPT_IN`` under which contrib's statement spans
#: carry the stable names polydatum's schema URL stands for (``database``: ``db.*``;
#: ``http``: ``server.address`` / ``server.port``, which contrib ties to the HTTP opt-in).
STABLE_OPT_IN = "database,http"

_DB_NAMES = {
    "default": ("db.system", "db.name", "db.statement"),
    "database": ("db.system.name", "db.namespace", "db.query.text"),
}
_SERVER_NAMES = {
    "default": ("net.peer.name", "net.peer.port"),
    "http": ("server.address", "server.port"),
}


def semconv_opt_in_modes(value: str | None = None) -> tuple[str, str]:
    """The database and HTTP modes ``OTEL_SEMCONV_STABILITY_OPT_IN`` selects (``value``,
    else the environment's), as contrib's instrumentations read it: ``"default"`` (the
    old names), ``"database"`` / ``"http"`` (the stable ones) or ``"database/dup"`` /
    ``"http/dup"`` (both; ``/dup`` wins).

    contrib reads the variable once per process, when its first instrumentation starts;
    this reads it now. They agree unless the variable changes in between (it is a
    deployment setting; polydatum reads no private state of contrib to know better).
    """
    if value is None:
        value = os.environ.get(SEMCONV_OPT_IN_VAR)
    names = {part.strip() for part in (value or "").split(",")}
    modes = []
    for signal in ("database", "http"):
        if f"{signal}/dup" in names:
            modes.append(f"{signal}/dup")
        elif signal in names:
            modes.append(signal)
        else:
            modes.append("default")
    return modes[0], modes[1]


def _names(mode: str, names: Mapping[str, tuple[str, ...]], stable: str) -> tuple[str, ...]:
    if mode.endswith("/dup"):
        return names[stable] + names["default"]
    return names[stable] if mode == stable else names["default"]


@dataclass(frozen=True)
class StatementTracing:
    """Whether an engine's SQL statements become spans, and why (not).

    ``enabled``: statements are traced. ``traced_here``: by the engine tracer that
    :func:`trace_sql_statements` added, to the providers it was given (``False`` when
    contrib already traced the engine, to the providers contrib was given). ``reason``:
    why, in words. ``semconv``: the database and HTTP modes of
    ``OTEL_SEMCONV_STABILITY_OPT_IN`` contrib's spans follow (``"default"``: the old
    names).
    """

    enabled: bool
    traced_here: bool
    reason: str
    semconv: tuple[str, str] = ("default", "default")

    @property
    def stable_names(self) -> bool:
        """Whether the spans carry the stable ``db.*`` and ``server.*`` names."""
        return self.semconv[0] != "default" and self.semconv[1] != "default"

    @property
    def attribute_names(self) -> tuple[str, ...]:
        """The names of the database's system, namespace, statement and server on the
        statement spans (a SQLite database has no server attributes)."""
        database, http = self.semconv
        return _names(database, _DB_NAMES, "database") + _names(http, _SERVER_NAMES, "http")

    def describe(self) -> str:
        """One line: on or off, why, and (on) the attribute names."""
        if not self.enabled:
            return f"SQL statement spans: off ({self.reason})"
        line = (
            f"SQL statement spans: on ({self.reason}); their attributes: "
            f"{', '.join(self.attribute_names)}"
        )
        if not self.stable_names:
            line += (
                f"; for the stable names polydatum's spans follow, set "
                f"{SEMCONV_OPT_IN_VAR}={STABLE_OPT_IN} before the first "
                f"instrumentation runs"
            )
        return line


#: What :func:`trace_sql_statements` said of each engine it traced.
_traced: weakref.WeakKeyDictionary[Engine, StatementTracing] = weakref.WeakKeyDictionary()
#: Engines made while ``SQLAlchemyInstrumentor().instrument()`` was in effect: contrib's
#: ``create_engine`` wrapper traced them as it made them.
_traced_by_contrib: weakref.WeakSet[Engine] = weakref.WeakSet()
#: The scope (and tracer name) of contrib's SQLAlchemy spans.
_CONTRIB_SCOPE = "opentelemetry.instrumentation.sqlalchemy"
#: The metric contrib's engine tracer keeps, named and united as contrib's instrumentor
#: creates it: engines traced here and by contrib then feed the one instrument.
_CONNECTIONS_METRIC = ("db.client.connections.usage", "connections")


def _contrib_instrumented() -> bool:
    """Whether ``SQLAlchemyInstrumentor().instrument()`` is in effect (never imports
    contrib: not imported, it cannot have been called)."""
    if _CONTRIB_SCOPE not in sys.modules:
        return False
    try:
        from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
    except ImportError:  # pragma: no cover - a broken install
        return False
    return bool(SQLAlchemyInstrumentor().is_instrumented_by_opentelemetry)


def _note_contrib_tracing(engine: Engine) -> None:
    """Remember an engine contrib's ``create_engine`` wrapper traced as it was made."""
    if _contrib_instrumented():
        _traced_by_contrib.add(engine)


def _new_engine_tracer(engine: Engine, tracer_provider: Any, meter_provider: Any) -> None:
    """contrib's engine tracer on ``engine``, as ``instrument(engine=...)`` makes it: the
    tracer named after contrib (its version; no schema URL, which contrib derives from
    state of its own), the connection metric on ``meter_provider``. ``EngineTracer`` is
    public but undocumented: a version that takes other arguments raises TypeError."""
    from opentelemetry import metrics, trace
    from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer
    from opentelemetry.instrumentation.sqlalchemy.version import __version__

    tracer = trace.get_tracer(_CONTRIB_SCOPE, __version__, tracer_provider)
    meter = metrics.get_meter(_CONTRIB_SCOPE, __version__, meter_provider)
    name, unit = _CONNECTIONS_METRIC
    # The SDK hands out one instrument per meter, name, kind, unit and description.
    connections = meter.create_up_down_counter(
        name, unit=unit, description="Connections of the engine's pool, by state (idle, used)."
    )
    engine_tracer: Any = EngineTracer  # untyped
    engine_tracer(tracer, engine, connections)


def _contrib_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("opentelemetry-instrumentation-sqlalchemy")
    except metadata.PackageNotFoundError:  # pragma: no cover - installed without metadata
        from opentelemetry.instrumentation.sqlalchemy.version import __version__

        return str(__version__)


def trace_sql_statements(
    engine: Engine | AsyncEngine, *, tracer_provider: Any = None, meter_provider: Any = None
) -> StatementTracing:
    """Trace ``engine``'s SQL statements with ``opentelemetry-instrumentation-sqlalchemy``.

    Each statement becomes a CLIENT span of contrib's, a child of the span current when
    it runs (the service call), recorded by ``tracer_provider`` (``None``: the global
    one); the pool's connections feed contrib's ``db.client.connections.usage`` on
    ``meter_provider``. Only this engine is touched: nothing is wrapped globally, and
    ``SQLAlchemyInstrumentor().uninstrument()`` removes this tracer too.

    Returns a :class:`StatementTracing` (``describe()`` is one line for a log or a
    CLI); never raises. Off when contrib is not installed (the ``sql-tracing`` extra),
    when ``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS`` names ``sqlalchemy`` (or ``*``), and
    when the installed SQLAlchemy is outside both the range contrib declares and
    :data:`STATEMENT_TRACING_TESTED`. An engine contrib already traces
    (``SQLAlchemyInstrumentor().instrument()`` had wrapped ``create_engine`` when
    :func:`create_sql_engine` made it, as under ``opentelemetry-instrument``) gets no
    second tracer: its statements go to contrib's providers. (An engine given to
    ``instrument(engine=...)`` by hand is not recognised: do not ask for both.) Calling
    it again for an engine returns the first answer.
    """
    sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
    known = _traced.get(sync_engine)
    if known is not None:
        return known
    try:
        from opentelemetry.instrumentation.dependencies import get_dependency_conflicts
        from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
    except ImportError:
        return StatementTracing(
            False,
            False,
            "opentelemetry-instrumentation-sqlalchemy is not installed: "
            "pip install 'polydatum[sql-tracing]'",
        )
    disabled = os.environ.get("OTEL_PYTHON_DISABLED_INSTRUMENTATIONS", "")
    if {name.strip() for name in disabled.split(",")} & {"sqlalchemy", "*"}:
        return StatementTracing(
            False, False, "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS turns the sqlalchemy one off"
        )
    contrib = f"opentelemetry-instrumentation-sqlalchemy {_contrib_version()}"
    installed = f"SQLAlchemy {sqlalchemy.__version__}"
    reason = f"{contrib}, {installed}"
    dependencies = list(SQLAlchemyInstrumentor().instrumentation_dependencies())
    declared = " and ".join(dependencies)
    if get_dependency_conflicts(dependencies) is not None:
        from packaging.specifiers import SpecifierSet

        if sqlalchemy.__version__ not in SpecifierSet(STATEMENT_TRACING_TESTED):
            return StatementTracing(
                False,
                False,
                f"version conflict: {contrib} instruments {declared!r} and polydatum has "
                f"tested it with sqlalchemy{STATEMENT_TRACING_TESTED} only; {installed} is "
                f"installed",
            )
        reason = (
            f"{reason}, which is outside the {declared!r} contrib declares but within the "
            f"sqlalchemy{STATEMENT_TRACING_TESTED} polydatum tests it with"
        )
    if sync_engine in _traced_by_contrib:
        result = StatementTracing(
            True,
            False,
            f"{contrib} already traces this engine, to the tracer provider it was given "
            f"(SQLAlchemyInstrumentor().instrument(), as opentelemetry-instrument calls it)",
            semconv_opt_in_modes(),
        )
    else:
        try:
            _new_engine_tracer(sync_engine, tracer_provider, meter_provider)
        except (ImportError, TypeError, AttributeError) as error:
            return StatementTracing(
                False, False, f"{contrib} has no engine tracer polydatum can use ({error})"
            )
        result = StatementTracing(True, True, reason, semconv_opt_in_modes())
    _traced[sync_engine] = result
    return result
