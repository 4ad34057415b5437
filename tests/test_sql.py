"""polydatum.sql on real databases: every test runs on SQLite (a file) and PostgreSQL."""

from __future__ import annotations

import asyncio
import multiprocessing
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sql_backends
from sql_backends import Backend, checked_out, in_forked_children, postgres_schema_url
from sqlalchemy import ForeignKey, String, create_engine, event, insert, select, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from polydatum import DataManager, Service
from polydatum.context import DataAccessContext
from polydatum.errors import CommitError, ContextStateError
from polydatum.sql import (
    DEFAULT_DATABASE_URL,
    SESSION_ENDED_MESSAGE,
    AsyncSQLResource,
    SQLBackend,
    SQLResource,
    TransactionAbortedError,
    asavepoint,
    async_transaction_middleware,
    configure_sql,
    create_sql_engine,
    database_url,
    savepoint,
    transaction_middleware,
)
from polydatum.sql_engine import parse_database_url, telemetry_attributes_for
from polydatum.testing import TelemetryCapture

backend = sql_backends.backend  # the fixture: SQLite and PostgreSQL


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(500))


class Tag(Base):
    __tablename__ = "tags"
    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"))


class Boom(Exception):
    pass


#: The driver's message for a duplicate ``items`` primary key, per backend.
DUPLICATE_KEY = {
    "sqlite": "IntegrityError: UNIQUE constraint failed: items.id",
    "postgresql": ('UniqueViolation: duplicate key value violates unique constraint "items_pkey"'),
}


class Items(Service):
    """The application under test: every statement parameterised."""

    def add(self, item_id: int, name: str) -> None:
        self._ctx.db.execute(insert(Item).values(id=item_id, name=name))

    def add_later(self, item_id: int, name: str) -> None:
        self._ctx.db.add(Item(id=item_id, name=name))  # flushed by the commit

    def name(self, item_id: int) -> str | None:
        stmt = select(Item.name).where(Item.id == item_id)
        result: str | None = self._ctx.db.execute(stmt).scalar_one_or_none()
        return result

    def find(self, name: str) -> list[int]:
        return list(self._ctx.db.execute(select(Item.id).where(Item.name == name)).scalars())

    def ids(self) -> list[int]:
        return list(self._ctx.db.execute(select(Item.id).order_by(Item.id)).scalars())

    def add_then_fail(self, item_id: int) -> None:
        self.add(item_id, "doomed")
        raise Boom("failed after the insert")

    def add_and_catch(self, item_id: int) -> None:
        """Insert, and swallow the database's refusal (the mistake the rule is about)."""
        try:
            self.add(item_id, "refused")
        except IntegrityError:
            pass

    def flush_and_catch(self, item_id: int) -> None:
        """The same mistake through the ORM: a flush that fails, caught."""
        self._ctx.db.add(Item(id=item_id, name="refused"))
        try:
            self._ctx.db.flush()
        except IntegrityError:
            pass

    def backend_pid(self) -> int:
        return int(self._ctx.db.execute(text("SELECT pg_backend_pid()")).scalar_one())


def make_app(
    b: Backend, cap: TelemetryCapture | None = None, **options: Any
) -> tuple[DataManager, SQLResource]:
    dm = cap.data_manager() if cap is not None else DataManager()
    options.setdefault("engine_options", b.bounded_options())  # a lock wait fails in 2 s
    sql = configure_sql(dm, b.url, **options)
    b.track(sql)
    assert isinstance(sql.db, SQLResource)
    Base.metadata.create_all(sql.db.engine)
    dm.register_services(items=Items())
    return dm, sql.db


def aborted_message(b: Backend, *, flush: bool = False, asyncio: bool = False) -> str:
    """The exact TransactionAbortedError message for a caught duplicate key (or flush)."""
    reason = (
        "a flush failed and SQLAlchemy rolled the transaction back"
        if flush
        else DUPLICATE_KEY[b.name]
    )
    helper = "`async with asavepoint(session):`" if asyncio else "`with savepoint(ctx.db):`"
    return (
        f"the context's work was not committed: a statement failed inside its transaction "
        f"and its error was caught ({reason}), so nothing was committed. Let the error "
        f"propagate, or run the statement that may fail inside {helper}, which rolls back "
        f"only that statement"
    )


def nested_aborted_message(b: Backend) -> str:
    return (
        f"the nested context's work was not committed: a statement failed inside its "
        f"savepoint and its error was caught ({DUPLICATE_KEY[b.name]}), so it was rolled "
        f"back to the savepoint (the enclosing context carries on). Let the error "
        f"propagate, or run the statement that may fail inside `with savepoint(ctx.db):`, "
        f"which rolls back only that statement"
    )


def suppress_integrity_errors(ctx: DataAccessContext) -> Iterator[None]:
    """A middleware that swallows the database's refusals (the other way to lose them)."""
    try:
        yield
    except IntegrityError:
        pass


def names(b: Backend) -> dict[int, str]:
    """What is committed, read with a fresh engine (not the application's)."""
    engine = create_engine(b.url.replace("+aiosqlite", ""))
    try:
        with engine.connect() as conn:
            return {i: n for i, n in conn.execute(select(Item.id, Item.name).order_by(Item.id))}
    finally:
        engine.dispose()


# ------------------------------------------------------------------ configuration


def test_database_url_resolution_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POLYDATUM_DATABASE_URL", raising=False)
    assert database_url() == DEFAULT_DATABASE_URL == "sqlite:///polydatum.db"
    monkeypatch.setenv("POLYDATUM_DATABASE_URL", "postgresql://env/db")
    assert database_url() == "postgresql://env/db"
    assert database_url(settings={"DATABASE_URL": "sqlite:///settings.db"}) == (
        "sqlite:///settings.db"
    )
    assert database_url(settings={}) == "postgresql://env/db"
    assert database_url(settings={"DATABASE_URL": ""}) == "postgresql://env/db"
    assert (
        database_url("sqlite:///code.db", {"DATABASE_URL": "sqlite:///settings.db"})
        == "sqlite:///code.db"
    )
    monkeypatch.setenv("POLYDATUM_DATABASE_URL", "")
    assert database_url() == "sqlite:///polydatum.db"


def test_the_default_sqlite_file_lives_in_polydatum_data_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("POLYDATUM_DATABASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "volume" / "app"
    monkeypatch.setenv("POLYDATUM_DATA_DIR", str(data))
    assert database_url() == f"sqlite:///{data / 'polydatum.db'}"
    assert data.is_dir()  # created on first use
    dm = DataManager()
    backend = configure_sql(dm)
    try:
        with dm.context() as ctx:
            ctx.db.execute(text("CREATE TABLE t (x INTEGER)"))
    finally:
        backend.dispose()
    assert sorted(p.name for p in data.iterdir())[:1] == ["polydatum.db"]
    assert not (tmp_path / "polydatum.db").exists()
    monkeypatch.setenv("POLYDATUM_DATA_DIR", "")
    assert database_url() == "sqlite:///polydatum.db"  # empty: the working directory
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("POLYDATUM_DATA_DIR", str(blocker))
    with pytest.raises(ValueError) as info:
        database_url()
    assert str(info.value) == (
        f"$POLYDATUM_DATA_DIR is {str(blocker)!r}, which cannot be used as the directory of "
        "the default SQLite database (File exists); set it to a writable directory, or set "
        "$POLYDATUM_DATABASE_URL to a database URL"
    )


@pytest.mark.parametrize(
    ("given", "parsed"),
    [
        ("postgres://app:pw@db:5432/app", "postgresql://app:pw@db:5432/app"),
        ("postgres+asyncpg://db/app", "postgresql+asyncpg://db/app"),
        ("postgresql://db/app", "postgresql://db/app"),
    ],
)
def test_postgres_scheme_urls_are_accepted(given: str, parsed: str) -> None:
    assert parse_database_url(given).render_as_string(hide_password=False) == parsed


@pytest.mark.postgres
def test_a_postgres_scheme_url_connects(postgres_url: str) -> None:
    url = postgres_url.replace("postgresql+psycopg://", "postgres://").replace(
        "postgresql://", "postgres://"
    )
    assert url.startswith("postgres://")
    dm = DataManager()
    backend = configure_sql(dm, url)
    try:
        with dm.context() as ctx:
            assert ctx.db.execute(text("SELECT 1")).scalar_one() == 1
    finally:
        backend.dispose()


def test_database_url_rejects_bad_values() -> None:
    with pytest.raises(TypeError) as info:
        database_url(settings={"DATABASE_URL": 5432})
    assert str(info.value) == (
        "the database URL from settings['DATABASE_URL'] must be a string such as "
        "'sqlite:///app.db' or 'postgresql://user@host/db', not int"
    )
    with pytest.raises(TypeError, match="^settings must be a mapping"):
        database_url(settings=["DATABASE_URL"])  # type: ignore[arg-type]
    with pytest.raises(ValueError) as bad:
        SQLResource("not a url")
    assert str(bad.value).startswith("not a database URL: 'not a url' (")


def test_configure_sql_from_environment(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLYDATUM_DATABASE_URL", backend.url)
    dm = DataManager()
    sql: SQLBackend = backend.track(configure_sql(dm))
    assert sql.db.engine.dialect.name == backend.name
    # The safe has its own engine and pool: on SQLite a sibling file, on PostgreSQL
    # the same database.
    assert sql.safe is not None and sql.safe.engine is not sql.db.engine
    safe_url = sql.safe.engine.url.render_as_string(hide_password=False)
    if backend.name == "sqlite":
        assert safe_url == backend.url.removesuffix("app.db") + "app.safe.db"
    else:
        assert safe_url == sql.db.engine.url.render_as_string(hide_password=False)
    assert dm.get_resource("db") is sql.db
    assert dm.get_resource("safe") is sql.safe


def test_same_app_on_both_backends(backend: Backend) -> None:
    dm, _ = make_app(backend)
    with dm.dal() as dal:
        dal.items.add(1, "first")
        dal.items.add_later(2, "second")
    with dm.dal() as dal:
        assert dal.items.name(1) == "first"
        assert dal.items.ids() == [1, 2]
    assert names(backend) == {1: "first", 2: "second"}


def test_postgres_driverless_url_means_psycopg(postgres_url: str) -> None:
    plain = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    resource = SQLResource(plain)
    try:
        assert resource.engine.dialect.driver == "psycopg"
        resource.ping()
    finally:
        resource.dispose()
    async_resource = AsyncSQLResource(plain)
    assert async_resource.engine.dialect.driver == "psycopg"
    asyncio.run(async_resource.dispose())


def test_sqlite_connection_settings(tmp_path: Any) -> None:
    resource = SQLResource(f"sqlite:///{tmp_path / 'p.db'}")
    try:
        with resource.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
        custom = SQLResource(
            f"sqlite:///{tmp_path / 'q.db'}",
            engine_options={"sqlite_pragmas": {"busy_timeout": 1234}},
        )
        with custom.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 1234
        custom.dispose()
    finally:
        resource.dispose()


def _first_write_of_a_process(directory: str, rounds: int, barrier: Any, worker: int) -> str:
    """One of several processes: per round, at the same instant as the others, open a
    fresh database file with polydatum's engine and write. What failed, or ''."""
    failures = []
    for round_ in range(rounds):
        engine = create_sql_engine(f"sqlite:///{directory}/r{round_}.db")
        barrier.wait(timeout=60)
        try:
            with engine.begin() as conn:
                conn.execute(text("INSERT INTO notes (key) VALUES (:key)"), {"key": worker})
        except Exception as error:
            failures.append(f"round {round_}: {type(error).__name__}: {error}".splitlines()[0])
        finally:
            engine.dispose()
    return "\n".join(failures)


def test_processes_opening_a_fresh_database_at_once_all_write(tmp_path: Path) -> None:
    """``PRAGMA journal_mode = WAL`` fails at once (no busy handler) while another
    connection converts the file: the first request of every Celery/gunicorn child
    but one would fail with "database is locked". polydatum retries it within
    ``busy_timeout``."""
    rounds, processes = 15, 4
    for round_ in range(rounds):  # fresh files in the rollback-journal mode, as sqlite3 makes them
        engine = create_engine(f"sqlite:///{tmp_path}/r{round_}.db")
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE notes (key INTEGER PRIMARY KEY)"))
        engine.dispose()
    spawn = multiprocessing.get_context("spawn")
    barrier = spawn.Manager().Barrier(processes)
    with spawn.Pool(processes) as pool:
        failures = pool.starmap(
            _first_write_of_a_process,
            [(str(tmp_path), rounds, barrier, worker) for worker in range(processes)],
        )
    assert failures == [""] * processes
    for round_ in range(rounds):
        engine = create_engine(f"sqlite:///{tmp_path}/r{round_}.db")
        with engine.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert conn.execute(text("SELECT key FROM notes ORDER BY key")).scalars().all() == [
                0,
                1,
                2,
                3,
            ]
        engine.dispose()


ROWS_PER_CHILD = 40


def test_forked_children_get_pools_of_their_own(backend: Backend) -> None:
    """A process that used its pool and then forks (gunicorn --preload, a Celery prefork
    master that checked the database at startup) must not hand its connections to the
    children: on PostgreSQL two processes on one socket fail with protocol errors or
    read each other's results. Each child writes and reads back its own rows; then the
    parent, on its own pool, finds exactly every child's rows."""
    dm, _ = make_app(backend)
    with dm.dal() as dal:  # the parent's pool now holds a connection
        dal.items.add(0, "parent")

    def work(child: int) -> None:
        for i in range(1, ROWS_PER_CHILD + 1):
            item = child * 1000 + i
            with dm.dal() as dal:
                dal.items.add(item, f"child {child}")
                found = dal.items.name(item)
            if found != f"child {child}":
                raise AssertionError(f"item {item}: read {found!r}")

    assert in_forked_children(3, work) == ["", "", ""]
    with dm.dal() as dal:
        assert dal.items.name(0) == "parent"  # the parent's pooled connection still works
    expected = {0: "parent"}
    expected.update(
        {c * 1000 + i: f"child {c}" for c in range(3) for i in range(1, ROWS_PER_CHILD + 1)}
    )
    assert names(backend) == expected


def test_a_child_forked_inside_a_context_is_in_no_context(backend: Backend) -> None:
    """A process forked while a context is open (``multiprocessing`` started from a
    request) must not find that context active: a context it opens would otherwise
    nest in the parent's session, on the parent's connection. The child's contexts
    are their own, committed by them: the parent's context then fails and rolls back,
    and the children's rows stay. (The parent only reads: on SQLite a parent holding
    the write lock would make its children wait.)"""
    dm, _ = make_app(backend)
    with dm.dal() as dal:
        dal.items.add(1, "parent")
    with pytest.raises(Boom, match="^the parent's request fails$"), dm.dal() as dal:
        assert dal.items.name(1) == "parent"  # the parent's session and connection are open

        def work(child: int) -> None:
            if dm.get_active_context() is not None:
                raise AssertionError("the parent's context is active in the child")
            with dm.dal() as inner:
                inner.items.add(100 + child, f"child {child}")

        assert in_forked_children(2, work, timeout=30) == ["", ""]
        assert dal.items.name(1) == "parent"
        raise Boom("the parent's request fails")
    assert names(backend) == {1: "parent", 100: "child 0", 101: "child 1"}


def test_forked_children_get_async_pools_of_their_own(backend: Backend) -> None:
    """The same with the async engine: the parent used it (in ``asyncio.run``), then
    forks; each child runs its own event loop on a pool of its own."""

    async def setup() -> DataManager:
        dm, _ = await make_async_app(backend)
        async with dm.dal() as dal:
            await dal.items.add(0, "parent")
        return dm

    dm = asyncio.run(setup())

    async def awork(child: int) -> None:
        for i in range(1, ROWS_PER_CHILD + 1):
            async with dm.dal() as dal:
                await dal.items.add(child * 1000 + i, f"child {child}")
        async with dm.dal() as dal:
            ids = await dal.items.ids()
        mine = [n for n in ids if n // 1000 == child and n]
        if mine != [child * 1000 + i for i in range(1, ROWS_PER_CHILD + 1)]:
            raise AssertionError(f"child {child} reads {mine}")

    assert in_forked_children(3, lambda child: asyncio.run(awork(child))) == ["", "", ""]
    expected = {0: "parent"}
    expected.update(
        {c * 1000 + i: f"child {c}" for c in range(3) for i in range(1, ROWS_PER_CHILD + 1)}
    )
    assert names(backend) == expected


def test_a_busy_timeout_pragma_is_milliseconds() -> None:
    message = "^the busy_timeout pragma is in milliseconds, not 'soon'$"
    with pytest.raises(ValueError, match=message):
        create_sql_engine(
            "sqlite:///:memory:", engine_options={"sqlite_pragmas": {"busy_timeout": "soon"}}
        )


def test_foreign_keys_enforced(backend: Backend) -> None:
    dm, _ = make_app(backend)
    with pytest.raises(IntegrityError), dm.context() as ctx:
        ctx.db.execute(insert(Tag).values(id=1, item_id=999))
    with dm.context() as ctx:
        assert ctx.db.execute(select(Tag.id)).all() == []


# ------------------------------------------------------------------ transactions


def test_rollback_on_error_leaves_no_row(backend: Backend) -> None:
    dm, resource = make_app(backend)
    with pytest.raises(Boom, match="^failed after the insert$"), dm.dal() as dal:
        dal.items.add(1, "kept?")
        dal.items.add_then_fail(2)
    assert names(backend) == {}
    assert checked_out(resource.engine) == 0


def test_rollback_when_middleware_raises_on_teardown(backend: Backend) -> None:
    dm, _ = make_app(backend)

    def audit(ctx: DataAccessContext) -> Iterator[None]:
        yield
        raise Boom("audit refused")

    dm.register_context_middleware(audit)
    with pytest.raises(Boom, match="^audit refused$"), dm.dal() as dal:
        dal.items.add(1, "audited")
    assert names(backend) == {}


def test_failed_commit_rolls_back_and_raises_commit_error(backend: Backend) -> None:
    with TelemetryCapture() as cap:
        dm, resource = make_app(backend, cap)
        with dm.dal() as dal:
            dal.items.add(1, "original")
        cap.clear()
        with pytest.raises(CommitError) as info, dm.context() as ctx:
            ctx.dal.items.add(2, "new")
            ctx.dal.items.add_later(1, "duplicate")  # fails at commit: primary key
        assert str(info.value) == (
            "the context's work was not committed: the database refused the COMMIT "
            f"({DUPLICATE_KEY[backend.name]}); the transaction was rolled back"
        )
        assert type(info.value.__cause__) is IntegrityError
        assert ctx.get_resource_exit_errors() == []
        teardown = cap.span("polydatum.resource.teardown db")
        assert teardown.status == "ERROR"
        assert teardown.attributes["error.type"] == "polydatum.errors.CommitError"
        context = cap.span("polydatum.context")
        assert context.status == "ERROR"
        assert context.attributes["error.type"] == "polydatum.errors.CommitError"
    assert names(backend) == {1: "original"}
    assert checked_out(resource.engine) == 0


def test_transaction_middleware_raises_a_failed_commit(backend: Backend) -> None:
    with TelemetryCapture() as cap:
        dm, resource = make_app(backend, cap, transaction=True)
        with dm.dal() as dal:
            dal.items.add(1, "original")
        assert names(backend) == {1: "original"}
        cap.clear()
        with pytest.raises(IntegrityError), dm.context() as ctx:
            ctx.dal.items.add(2, "new")
            ctx.dal.items.add_later(1, "duplicate")
        assert ctx.get_resource_exit_errors() == []
        assert cap.tree() == [
            (
                "polydatum.context",
                [
                    (
                        "polydatum.middleware.setup sql_transaction",
                        [("polydatum.resource.setup db", [])],
                    ),
                    ("items.add", []),
                    ("items.add_later", []),
                    ("polydatum.middleware.teardown sql_transaction", []),
                    ("polydatum.resource.teardown db", []),
                ],
            )
        ]
        assert cap.span("polydatum.middleware.teardown sql_transaction").attributes[
            "error.type"
        ] == ("sqlalchemy.exc.IntegrityError")
        assert cap.span("polydatum.context").status == "ERROR"
    assert names(backend) == {1: "original"}
    assert checked_out(resource.engine) == 0


def test_transaction_middleware_commits_once_and_rolls_back(backend: Backend) -> None:
    dm, _ = make_app(backend, transaction=True)
    commits: list[Session] = []

    def committed(session: Session) -> None:
        commits.append(session)

    event.listen(Session, "after_commit", committed)
    try:
        with dm.dal() as dal:
            dal.items.add(1, "one")
        assert len(commits) == 1
        with pytest.raises(Boom), dm.dal() as dal:
            dal.items.add_then_fail(2)
        assert len(commits) == 1
    finally:
        event.remove(Session, "after_commit", committed)
    assert names(backend) == {1: "one"}


@pytest.mark.parametrize("transaction", [False, True], ids=["resource", "middleware"])
def test_savepoint_rolls_back_only_the_nested_unit(backend: Backend, transaction: bool) -> None:
    dm, _ = make_app(backend, transaction=transaction)
    with dm.context() as ctx:
        ctx.dal.items.add(1, "outer")
        with pytest.raises(Boom), savepoint(ctx.db):
            ctx.dal.items.add(2, "nested, rolled back")
            raise Boom("nested failure")
        with savepoint(ctx.db):
            ctx.dal.items.add(3, "nested, kept")
        with pytest.raises(IntegrityError), savepoint(ctx.db):
            ctx.dal.items.add(1, "duplicate key")  # the database refuses it
        ctx.dal.items.add(4, "after")
        assert ctx.dal.items.ids() == [1, 3, 4]
    # The refused statement was inside a savepoint that was rolled back: it no longer
    # counts, and the rest commits.
    assert names(backend) == {1: "outer", 3: "nested, kept", 4: "after"}


def test_savepoint_recovers_from_a_failed_flush(backend: Backend) -> None:
    dm, resource = make_app(backend)
    with dm.context() as ctx:
        ctx.dal.items.add(1, "outer")
        with pytest.raises(IntegrityError), savepoint(ctx.db):
            ctx.db.add(Item(id=1, name="duplicate"))
            ctx.db.flush()
        ctx.dal.items.add_later(2, "flushed by the commit")
    assert names(backend) == {1: "outer", 2: "flushed by the commit"}
    assert checked_out(resource.engine) == 0


def test_an_error_caught_inside_a_savepoint_rolls_back_only_that_savepoint(
    backend: Backend,
) -> None:
    dm, _ = make_app(backend)
    with dm.context() as ctx:
        ctx.dal.items.add(1, "outer")
        with pytest.raises(TransactionAbortedError) as info, savepoint(ctx.db):
            ctx.dal.items.add(2, "in the savepoint")
            ctx.dal.items.add_and_catch(1)  # caught inside the block
        ctx.dal.items.add(3, "after")
    assert str(info.value) == (
        f"the savepoint's work was rolled back: a statement failed inside it and its error "
        f"was caught ({DUPLICATE_KEY[backend.name]}). Let the error propagate out of the "
        f"savepoint block, or run the statement that may fail inside a savepoint of its own"
    )
    assert type(info.value.__cause__) is IntegrityError
    assert names(backend) == {1: "outer", 3: "after"}


# ------------------------------------------------ a caught statement error (issue 13)


@pytest.mark.parametrize("transaction", [False, True], ids=["resource", "middleware"])
@pytest.mark.parametrize("how", ["caught_by_service", "flush_caught", "suppressed_by_middleware"])
def test_a_caught_statement_error_is_never_committed(
    backend: Backend, how: str, transaction: bool
) -> None:
    with TelemetryCapture() as cap:
        dm, resource = make_app(backend, cap, transaction=transaction)
        if how == "suppressed_by_middleware":  # inside the transaction middleware
            dm.register_context_middleware(suppress_integrity_errors)
        with dm.dal() as dal:
            dal.items.add(1, "original")
        cap.clear()
        with pytest.raises(TransactionAbortedError) as info, dm.context() as ctx:
            ctx.dal.items.add(2, "new")
            if how == "caught_by_service":
                ctx.dal.items.add_and_catch(1)
            elif how == "flush_caught":
                ctx.dal.items.flush_and_catch(1)
            else:
                ctx.dal.items.add(1, "duplicate")  # raises; the middleware swallows it
            if how == "caught_by_service" and backend.name == "sqlite":
                # SQLite runs more statements after a failed one (PostgreSQL refuses
                # them): they are not committed either.
                ctx.dal.items.add(3, "after the caught error")
        error = info.value
        assert isinstance(error, CommitError)
        assert str(error) == aborted_message(backend, flush=how == "flush_caught")
        if how == "flush_caught":
            assert error.__cause__ is None  # SQLAlchemy already rolled back and cleared it
        else:
            assert type(error.__cause__) is IntegrityError
        assert ctx.get_resource_exit_errors() == []
        step = (
            "polydatum.middleware.teardown sql_transaction"
            if transaction
            else "polydatum.resource.teardown db"
        )
        assert cap.span(step).status == "ERROR"
        assert cap.span(step).attributes["error.type"] == "polydatum.sql.TransactionAbortedError"
        context = cap.span("polydatum.context")
        assert context.status == "ERROR"
        assert context.attributes["error.type"] == "polydatum.sql.TransactionAbortedError"
    assert names(backend) == {1: "original"}  # not 2, not 3: nothing of the context
    assert checked_out(resource.engine) == 0


def test_postgres_aborted_status_refuses_the_commit_for_errors_sqlalchemy_never_saw(
    postgres_url: str,
) -> None:
    import psycopg

    schema = f"pd_{secrets.token_hex(6)}"
    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    backend_ = Backend("postgresql", postgres_schema_url(postgres_url, schema), schema)
    try:
        dm, resource = make_app(backend_)
        with pytest.raises(TransactionAbortedError) as info, dm.context() as ctx:
            ctx.dal.items.add(1, "lost")
            driver = ctx.db.connection().connection.driver_connection
            assert isinstance(driver, psycopg.Connection)
            try:  # straight to the driver: no SQLAlchemy event sees this error
                driver.execute("INSERT INTO items (id, name) VALUES (1, 'duplicate')")
            except psycopg.errors.UniqueViolation:
                pass
        assert str(info.value) == (
            "the context's work was not committed: a statement failed inside its transaction "
            "and its error was caught (PostgreSQL reports the transaction as aborted), so "
            "nothing was committed. Let the error propagate, or run the statement that may "
            "fail inside `with savepoint(ctx.db):`, which rolls back only that statement"
        )
        assert info.value.__cause__ is None
        assert names(backend_) == {}
        assert checked_out(resource.engine) == 0
    finally:
        backend_.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def test_an_error_rolled_back_by_the_transaction_middleware_cannot_be_suppressed_outside_it(
    backend: Backend,
) -> None:
    dm = DataManager()

    def suppress_boom(ctx: DataAccessContext) -> Iterator[None]:
        try:
            yield
        except Boom:
            pass

    dm.register_context_middleware(suppress_boom)  # registered before: outside it
    sql = backend.track(
        configure_sql(dm, backend.url, transaction=True, engine_options=backend.bounded_options())
    )
    Base.metadata.create_all(sql.db.engine)
    dm.register_services(items=Items())
    with pytest.raises(CommitError) as info, dm.dal() as dal:
        dal.items.add_then_fail(1)
    assert type(info.value) is CommitError
    assert str(info.value) == (
        "the context's work was not committed: transaction_middleware rolled it back "
        "because of an error (Boom: failed after the insert) that a middleware registered "
        "before it then suppressed. Register transaction_middleware first, so that it sees "
        "what every other middleware did to the error"
    )
    assert type(info.value.__cause__) is Boom
    assert names(backend) == {}


def test_transaction_middleware_manages_a_session_another_resource_made(
    backend: Backend,
) -> None:
    engine = backend.track(create_engine(backend.url))
    Base.metadata.create_all(engine)
    closed: list[Session] = []

    def own_sessions(ctx: DataAccessContext) -> Iterator[Session]:
        session = Session(engine)
        try:
            yield session  # the middleware commits or rolls back (session.info protocol)
        finally:
            session.close()
            closed.append(session)

    dm = DataManager()
    dm.register_resources(db=own_sessions)
    dm.register_context_middleware(transaction_middleware())
    dm.register_services(items=Items())
    with dm.dal() as dal:
        dal.items.add(1, "committed by the middleware")
    with pytest.raises(Boom), dm.dal() as dal:
        dal.items.add_then_fail(2)
    with pytest.raises(IntegrityError), dm.dal() as dal:
        dal.items.add_later(1, "duplicate: the commit fails")
    assert len(closed) == 3
    assert names(backend) == {1: "committed by the middleware"}
    assert checked_out(engine) == 0


# ------------------------------------------------ a session kept past its context


def _add_and_flush(session: Session) -> None:
    session.add(Item(id=9, name="late"))
    session.flush()


SYNC_MISUSES: dict[str, Callable[[Session], Any]] = {
    "execute": lambda s: s.execute(select(Item.id)),
    "add_and_flush": _add_and_flush,
    "commit": lambda s: s.commit(),
    "begin": lambda s: s.begin(),
    "begin_nested": lambda s: s.begin_nested(),
}


@pytest.mark.parametrize("misuse", SYNC_MISUSES)
def test_a_session_kept_past_its_context_refuses_work_and_holds_no_connection(
    backend: Backend, misuse: str
) -> None:
    dm, resource = make_app(backend)
    with dm.context() as ctx:
        kept: Session = ctx.db
        ctx.dal.items.add(1, "in the context")
    for _ in range(2):  # and it stays refused
        with pytest.raises(ContextStateError, match=f"^{re.escape(SESSION_ENDED_MESSAGE)}$"):
            SYNC_MISUSES[misuse](kept)
        assert checked_out(resource.engine) == 0
    assert not kept.in_transaction()
    assert names(backend) == {1: "in the context"}
    with pytest.raises(Boom), dm.context() as failed:
        kept_after_failure: Session = failed.db
        raise Boom("failed")
    with pytest.raises(ContextStateError, match=f"^{re.escape(SESSION_ENDED_MESSAGE)}$"):
        SYNC_MISUSES[misuse](kept_after_failure)
    assert checked_out(resource.engine) == 0
    with resource.session() as fresh:  # sessions outside contexts are not refused
        assert fresh.execute(select(Item.id)).scalars().all() == [1]


# ------------------------------------------------------------- nested contexts


@pytest.mark.parametrize("transaction", [False, True], ids=["resource", "middleware"])
def test_a_nested_context_shares_the_outer_session_in_a_savepoint(
    backend: Backend, transaction: bool
) -> None:
    # bounded_options: were the inner context to open a second session, it would wait
    # on the outer one's locks and fail within 2 s instead of hanging.
    dm, resource = make_app(backend, transaction=transaction)
    with dm.context() as outer:
        outer.dal.items.add(1, "outer")
        with dm.context() as inner:  # a nested write ...
            assert inner.enclosing is outer
            assert inner.db is outer.db
            inner.dal.items.add(2, "inner")
            assert checked_out(resource.engine) == 1
        outer.dal.items.add(3, "outer, after")  # ... then an outer write
        with pytest.raises(Boom), dm.context() as inner:  # an inner failure ...
            inner.dal.items.add_then_fail(4)
        with pytest.raises(IntegrityError), dm.context() as inner:
            inner.dal.items.add(5, "inner")
            inner.dal.items.add(1, "duplicate")  # the database refuses it
        assert outer.dal.items.ids() == [1, 2, 3]  # ... keeps the outer writes
        assert names(backend) == {}  # nothing is committed before the outer context ends
        outer.dal.items.add(6, "outer, last")
    assert names(backend) == {1: "outer", 2: "inner", 3: "outer, after", 6: "outer, last"}
    assert checked_out(resource.engine) == 0


@pytest.mark.parametrize("transaction", [False, True], ids=["resource", "middleware"])
def test_an_outer_failure_discards_the_nested_contexts_writes(
    backend: Backend, transaction: bool
) -> None:
    dm, resource = make_app(backend, transaction=transaction)
    with pytest.raises(Boom, match="^outer failed$"), dm.context() as outer:
        outer.dal.items.add(1, "outer")
        with dm.context() as inner:
            inner.dal.items.add(2, "inner, released into the outer transaction")
            with dm.context() as innermost:  # nested twice: a savepoint in the savepoint
                assert innermost.db is outer.db
                innermost.dal.items.add(3, "innermost")
        raise Boom("outer failed")
    assert names(backend) == {}
    assert checked_out(resource.engine) == 0


@pytest.mark.parametrize("transaction", [False, True], ids=["resource", "middleware"])
def test_a_nested_context_that_caught_a_statement_error_is_rolled_back_alone(
    backend: Backend, transaction: bool
) -> None:
    dm, _ = make_app(backend, transaction=transaction)
    with dm.context() as outer:
        outer.dal.items.add(1, "outer")
        with pytest.raises(TransactionAbortedError) as info, dm.context() as inner:
            inner.dal.items.add(2, "inner")
            inner.dal.items.add_and_catch(1)
        assert str(info.value) == nested_aborted_message(backend)
        assert type(info.value.__cause__) is IntegrityError
        outer.dal.items.add(3, "outer, after")
    assert names(backend) == {1: "outer", 3: "outer, after"}


def test_a_nested_context_before_the_outer_opened_its_session_has_its_own(
    backend: Backend,
) -> None:
    dm, resource = make_app(backend)
    with dm.context() as outer:
        with dm.context() as inner:  # the outer has no session yet: nothing to share
            inner.dal.items.add(1, "inner, committed on its own")
        assert names(backend) == {1: "inner, committed on its own"}
        outer.dal.items.add(2, "outer")
    assert names(backend) == {1: "inner, committed on its own", 2: "outer"}
    assert checked_out(resource.engine) == 0


def test_another_resource_on_the_same_database_is_an_independent_session(
    backend: Backend,
) -> None:
    dm, resource = make_app(backend)
    other = backend.track(SQLResource(backend.url, engine_options=backend.bounded_options()))
    other_dm = DataManager()
    other_dm.register_resources(db=other)
    other_dm.register_services(items=Items())
    with dm.context() as outer:
        assert outer.dal.items.ids() == []  # a read holds no lock another writer waits for
        with other_dm.context() as inner:
            assert inner.enclosing is outer
            assert inner.db is not outer.db
            inner.dal.items.add(1, "other resource")
        assert names(backend) == {1: "other resource"}  # committed by its own context
    assert checked_out(resource.engine) == 0
    assert checked_out(other.engine) == 0


# ---------------------------------------------------------------- hostile input


HOSTILE = [
    "'; DROP TABLE items; --",
    'Robert"); DROP TABLE items;--',
    "1 OR 1=1",
    "%s %(name)s :name ? $1",
    "\\'; SELECT pg_sleep(10); --",
    "ünïcødé ✓ 🐘 \u202e",
    "line\nbreak\ttab\r",
    "/* comment */ --",
]


def test_hostile_strings_stored_verbatim(backend: Backend) -> None:
    dm, _ = make_app(backend)
    with dm.dal() as dal:
        for i, value in enumerate(HOSTILE):
            dal.items.add(i, value)
    with dm.dal() as dal:
        for i, value in enumerate(HOSTILE):
            assert dal.items.name(i) == value
            assert dal.items.find(value) == [i]
        assert dal.items.ids() == list(range(len(HOSTILE)))  # the table is still there
    assert names(backend) == dict(enumerate(HOSTILE))


# ------------------------------------------------------------------- telemetry


def expected_db_attributes(b: Backend) -> dict[str, Any]:
    if b.name == "sqlite":
        return {"db.system.name": "sqlite", "db.namespace": b.url.removeprefix("sqlite:///")}
    return {
        "db.system.name": "postgresql",
        "db.namespace": "test",
        "server.address": "127.0.0.1",
        "server.port": 5432,
    }


def expected_resource_attributes(b: Backend) -> dict[str, Any]:
    """What the resource's INTERNAL spans carry: the database, under polydatum's names."""
    if b.name == "sqlite":
        return {
            "polydatum.db.system.name": "sqlite",
            "polydatum.db.namespace": b.url.removeprefix("sqlite:///"),
        }
    return {
        "polydatum.db.system.name": "postgresql",
        "polydatum.db.namespace": "test",
        "polydatum.db.server.address": "127.0.0.1",
        "polydatum.db.server.port": 5432,
    }


def test_resource_spans_carry_db_attributes(backend: Backend) -> None:
    url = backend.url.replace("postgres@", "postgres:hunter2@")
    resource = backend.track(SQLResource(url))
    assert "hunter2" not in repr(resource)
    assert resource.telemetry_attributes == expected_resource_attributes(backend)
    assert telemetry_attributes_for(resource.url) == expected_db_attributes(backend)
    with TelemetryCapture() as cap:
        dm = cap.data_manager()
        dm.register_resources(db=resource)
        Base.metadata.create_all(resource.engine)
        dm.register_services(items=Items())
        with dm.dal() as dal:
            dal.items.ids()
        assert cap.tree() == [
            (
                "polydatum.context",
                [
                    ("items.ids", [("polydatum.resource.setup db", [])]),
                    ("polydatum.resource.teardown db", []),
                ],
            )
        ]
        setup = cap.span("polydatum.resource.setup db")
        teardown = cap.span("polydatum.resource.teardown db")
        assert dict(setup.attributes) == {
            "polydatum.resource.name": "db",
            **expected_resource_attributes(backend),
        }
        assert dict(teardown.attributes) == {
            "polydatum.resource.name": "db",
            **expected_resource_attributes(backend),
            "polydatum.outcome": "ok",
        }
        for span in cap.spans():
            assert "hunter2" not in str(span.attributes)
        results = dm.ping()
        assert results["db"].ok is True and results["db"].error is None
        assert cap.span("polydatum.resource.ping db").status == "UNSET"


def test_statement_spans_nest_under_the_service_call(backend: Backend) -> None:
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

    with TelemetryCapture() as cap:
        dm, resource = make_app(backend, cap)
        instrumentor = SQLAlchemyInstrumentor()
        instrumentor.instrument(
            engine=resource.engine, tracer_provider=cap.tracer_provider, skip_dep_check=True
        )
        try:
            resource.engine.dispose()  # so that the connect below is traced
            with dm.dal() as dal:
                dal.items.name(7)
        finally:
            instrumentor.uninstrument()
        database = expected_db_attributes(backend)["db.namespace"]
        select_span = f"SELECT {database}"
        assert cap.tree() == [
            (
                "polydatum.context",
                [
                    (
                        "items.name",
                        [
                            ("polydatum.resource.setup db", []),
                            ("connect", []),
                            (select_span, []),
                        ],
                    ),
                    ("polydatum.resource.teardown db", []),
                ],
            )
        ]
        statement = cap.span(select_span)
        assert statement.attributes["db.statement"].startswith("SELECT items.name \nFROM items")
        assert str(7) not in statement.attributes["db.statement"]  # a bound parameter


# --------------------------------------------------------- server-side disconnect


def test_terminated_connection_rolls_back_and_the_pool_recovers(postgres_url: str) -> None:
    schema = f"pd_{secrets.token_hex(6)}"
    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    backend_ = Backend("postgresql", postgres_schema_url(postgres_url, schema), schema)
    try:
        with TelemetryCapture() as cap:
            dm, resource = make_app(backend_, cap)
            cap.clear()
            with pytest.raises(OperationalError) as info, dm.dal() as dal:
                dal.items.add(1, "lost with the connection")
                pid = dal.items.backend_pid()
                with admin.connect() as conn:
                    assert conn.execute(
                        text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}
                    ).scalar_one()
                dal.items.ids()
            assert info.value.connection_invalidated is True
            assert "terminating connection due to administrator command" in str(info.value)
            failed = cap.span("items.ids")
            assert failed.status == "ERROR"
            assert failed.attributes["error.type"] == "sqlalchemy.exc.OperationalError"
            assert failed.events == ("exception",)
            context = cap.span("polydatum.context")
            assert context.status == "ERROR"
            assert context.attributes["error.type"] == "sqlalchemy.exc.OperationalError"
            teardown = cap.span("polydatum.resource.teardown db")
            assert teardown.attributes["polydatum.outcome"] == "propagated"
            assert teardown.attributes["polydatum.exception.seen"] == (
                "sqlalchemy.exc.OperationalError"
            )
            assert teardown.status == "UNSET"
            # The next context works: the dead connection was discarded.
            with dm.dal() as dal:
                dal.items.add(2, "after recovery")
                assert dal.items.backend_pid() != pid
            assert names(backend_) == {2: "after recovery"}
            assert checked_out(resource.engine) == 0
    finally:
        backend_.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


# ------------------------------------------------------------------------ asyncio


class AsyncItems(Service):
    async def add(self, item_id: int, name: str) -> None:
        session: AsyncSession = await self._ctx.aresource("db")
        await session.execute(insert(Item).values(id=item_id, name=name))

    async def ids(self) -> list[int]:
        session: AsyncSession = await self._ctx.aresource("db")
        return list((await session.execute(select(Item.id).order_by(Item.id))).scalars())

    async def add_then_fail(self, item_id: int) -> None:
        await self.add(item_id, "doomed")
        raise Boom("async failure")

    async def add_and_catch(self, item_id: int) -> None:
        try:
            await self.add(item_id, "refused")
        except IntegrityError:
            pass


async def asuppress_integrity_errors(ctx: DataAccessContext) -> Any:
    try:
        yield
    except IntegrityError:
        pass


async def make_async_app(
    b: Backend, cap: TelemetryCapture | None = None, **options: Any
) -> tuple[DataManager, AsyncSQLResource]:
    dm = cap.data_manager() if cap is not None else DataManager()
    options.setdefault("engine_options", b.bounded_options())  # a lock wait fails in 2 s
    sql = configure_sql(dm, b.url, asyncio=True, safe_name=None, **options)
    assert isinstance(sql.db, AsyncSQLResource)
    async with sql.db.engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    dm.register_services(items=AsyncItems())
    return dm, sql.db


async def test_async_commit_rollback_and_savepoint(backend: Backend) -> None:
    dm, resource = await make_async_app(backend)
    try:
        assert type(resource.engine.sync_engine.dialect).__module__.split(".")[-1] in (
            "aiosqlite",
            "psycopg",
        )
        async with dm.dal() as dal:
            await dal.items.add(1, "one")
        with pytest.raises(Boom, match="^async failure$"):
            async with dm.dal() as dal:
                await dal.items.add_then_fail(2)
        async with dm.context() as ctx:
            session: AsyncSession = await ctx.aresource("db")
            with pytest.raises(Boom):
                async with asavepoint(session):
                    await ctx.dal.items.add(3, "rolled back to the savepoint")
                    raise Boom("nested")
            async with asavepoint(session):
                await ctx.dal.items.add(4, "kept")
        async with dm.dal() as dal:
            assert await dal.items.ids() == [1, 4]
        pings = await dm.aping()
        assert pings["db"].ok is True
        assert checked_out(resource.engine) == 0
    finally:
        await resource.dispose()
    assert names(backend) == {1: "one", 4: "kept"}


async def test_async_transaction_middleware(backend: Backend) -> None:
    dm, resource = await make_async_app(backend, transaction=True)
    try:
        async with dm.dal() as dal:
            await dal.items.add(1, "one")
        with pytest.raises(IntegrityError):
            async with dm.context() as ctx:
                await ctx.dal.items.add(2, "two")
                session: AsyncSession = await ctx.aresource("db")
                session.add(Item(id=1, name="duplicate"))  # flushed by the failing commit
    finally:
        await resource.dispose()
    assert names(backend) == {1: "one"}


async def test_async_failed_commit_rolls_back_and_raises_commit_error(backend: Backend) -> None:
    with TelemetryCapture() as cap:
        dm, resource = await make_async_app(backend, cap)
        try:
            async with dm.dal() as dal:
                await dal.items.add(1, "original")
            cap.clear()
            with pytest.raises(CommitError) as info:
                async with dm.context() as ctx:
                    await ctx.dal.items.add(2, "new")
                    session: AsyncSession = await ctx.aresource("db")
                    session.add(Item(id=1, name="duplicate"))  # fails at commit
            assert type(info.value) is CommitError
            assert str(info.value) == (
                "the context's work was not committed: the database refused the COMMIT "
                f"({DUPLICATE_KEY[backend.name]}); the transaction was rolled back"
            )
            assert type(info.value.__cause__) is IntegrityError
            assert ctx.get_resource_exit_errors() == []
            teardown = cap.span("polydatum.resource.teardown db")
            assert teardown.attributes["error.type"] == "polydatum.errors.CommitError"
            assert cap.span("polydatum.context").status == "ERROR"
            assert checked_out(resource.engine) == 0
        finally:
            await resource.dispose()
    assert names(backend) == {1: "original"}


@pytest.mark.parametrize("transaction", [False, True], ids=["resource", "middleware"])
@pytest.mark.parametrize("how", ["caught_by_service", "suppressed_by_middleware"])
async def test_async_a_caught_statement_error_is_never_committed(
    backend: Backend, how: str, transaction: bool
) -> None:
    with TelemetryCapture() as cap:
        dm, resource = await make_async_app(backend, cap, transaction=transaction)
        if how == "suppressed_by_middleware":
            dm.register_context_middleware(asuppress_integrity_errors)
        try:
            async with dm.dal() as dal:
                await dal.items.add(1, "original")
            cap.clear()
            with pytest.raises(TransactionAbortedError) as info:
                async with dm.dal() as dal:
                    await dal.items.add(2, "new")
                    if how == "caught_by_service":
                        await dal.items.add_and_catch(1)
                    else:
                        await dal.items.add(1, "duplicate")
            assert str(info.value) == aborted_message(backend, asyncio=True)
            assert type(info.value.__cause__) is IntegrityError
            step = (
                "polydatum.middleware.teardown sql_transaction"
                if transaction
                else "polydatum.resource.teardown db"
            )
            assert cap.span(step).attributes["error.type"] == (
                "polydatum.sql.TransactionAbortedError"
            )
            assert cap.span("polydatum.context").status == "ERROR"
            assert checked_out(resource.engine) == 0
        finally:
            await resource.dispose()
    assert names(backend) == {1: "original"}


async def test_async_an_error_caught_inside_a_savepoint_rolls_back_only_that_savepoint(
    backend: Backend,
) -> None:
    dm, resource = await make_async_app(backend)
    try:
        async with dm.context() as ctx:
            session: AsyncSession = await ctx.aresource("db")
            await ctx.dal.items.add(1, "outer")
            with pytest.raises(TransactionAbortedError) as info:
                async with asavepoint(session):
                    await ctx.dal.items.add(2, "in the savepoint")
                    await ctx.dal.items.add_and_catch(1)
            with pytest.raises(IntegrityError):
                async with asavepoint(session):
                    await ctx.dal.items.add(1, "refused, and rolled back to the savepoint")
            await ctx.dal.items.add(3, "after")
    finally:
        await resource.dispose()
    assert str(info.value).startswith("the savepoint's work was rolled back: a statement")
    assert type(info.value.__cause__) is IntegrityError
    assert names(backend) == {1: "outer", 3: "after"}


async def _aexecute(session: AsyncSession) -> None:
    await session.execute(select(Item.id))


async def _aadd_and_flush(session: AsyncSession) -> None:
    session.add(Item(id=9, name="late"))
    await session.flush()


async def _acommit(session: AsyncSession) -> None:
    await session.commit()


async def _abegin(session: AsyncSession) -> None:
    await session.begin()


ASYNC_MISUSES: dict[str, Callable[[AsyncSession], Awaitable[None]]] = {
    "execute": _aexecute,
    "add_and_flush": _aadd_and_flush,
    "commit": _acommit,
    "begin": _abegin,
}


@pytest.mark.parametrize("misuse", ASYNC_MISUSES)
async def test_async_a_session_kept_past_its_context_refuses_work_and_holds_no_connection(
    backend: Backend, misuse: str
) -> None:
    dm, resource = await make_async_app(backend)
    try:
        async with dm.context() as ctx:
            kept: AsyncSession = await ctx.aresource("db")
            await ctx.dal.items.add(1, "in the context")
        for _ in range(2):
            with pytest.raises(ContextStateError, match=f"^{re.escape(SESSION_ENDED_MESSAGE)}$"):
                await ASYNC_MISUSES[misuse](kept)
            assert checked_out(resource.engine) == 0
    finally:
        await resource.dispose()
    assert names(backend) == {1: "in the context"}


@pytest.mark.parametrize("transaction", [False, True], ids=["resource", "middleware"])
async def test_async_a_nested_context_shares_the_outer_session_in_a_savepoint(
    backend: Backend, transaction: bool
) -> None:
    dm, resource = await make_async_app(backend, transaction=transaction)
    try:
        async with dm.context() as outer:
            outer_session = await outer.aresource("db")
            await outer.dal.items.add(1, "outer")
            async with dm.context() as inner:  # a nested write, then an outer write
                assert inner.enclosing is outer
                assert await inner.aresource("db") is outer_session
                await inner.dal.items.add(2, "inner")
                assert checked_out(resource.engine) == 1
            await outer.dal.items.add(3, "outer, after")
            with pytest.raises(Boom):  # an inner failure keeps the outer writes
                async with dm.context() as inner:
                    await inner.dal.items.add_then_fail(4)
            with pytest.raises(TransactionAbortedError):
                async with dm.context() as inner:
                    await inner.dal.items.add(5, "inner")
                    await inner.dal.items.add_and_catch(1)
            assert await outer.dal.items.ids() == [1, 2, 3]
        assert names(backend) == {1: "outer", 2: "inner", 3: "outer, after"}
        with pytest.raises(Boom, match="^outer failed$"):  # an outer failure discards it all
            async with dm.context() as outer:
                await outer.dal.items.add(10, "outer")
                async with dm.context() as inner:
                    await inner.dal.items.add(11, "inner")
                raise Boom("outer failed")
        assert checked_out(resource.engine) == 0
    finally:
        await resource.dispose()
    assert names(backend) == {1: "outer", 2: "inner", 3: "outer, after"}


async def test_async_tasks_started_inside_a_context_get_their_own_sessions(
    backend: Backend,
) -> None:
    # A session is not safe for concurrent use: contexts entered in other tasks never
    # share the enclosing context's, even though it is their enclosing context.
    dm, resource = await make_async_app(backend)
    try:
        async with dm.context() as outer:
            outer_session: AsyncSession = await outer.aresource("db")
            assert await outer.dal.items.ids() == []

            async def task(item_id: int) -> AsyncSession:
                async with dm.context() as inner:
                    assert inner.enclosing is outer
                    await inner.dal.items.add(item_id, f"task {item_id}")
                    session: AsyncSession = await inner.aresource("db")
                return session

            sessions = await asyncio.gather(task(1), task(2))
            assert len({id(s) for s in [outer_session, *sessions]}) == 3
        assert checked_out(resource.engine) == 0
    finally:
        await resource.dispose()
    assert names(backend) == {1: "task 1", 2: "task 2"}


async def test_async_transaction_middleware_manages_a_session_another_resource_made(
    backend: Backend,
) -> None:
    resource = AsyncSQLResource(backend.url)  # only for its engine
    async with resource.engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)

    async def own_sessions(ctx: DataAccessContext) -> AsyncIterator[AsyncSession]:
        async with AsyncSession(resource.engine) as session:
            yield session

    dm = DataManager()
    dm.register_resources(db=own_sessions)
    dm.register_context_middleware(async_transaction_middleware())
    dm.register_services(items=AsyncItems())
    try:
        async with dm.dal() as dal:
            await dal.items.add(1, "committed by the middleware")
        with pytest.raises(Boom):
            async with dm.dal() as dal:
                await dal.items.add_then_fail(2)
        with pytest.raises(IntegrityError):
            async with dm.dal() as dal:
                await dal.items.add(1, "duplicate")
        assert checked_out(resource.engine) == 0
    finally:
        await resource.dispose()
    assert names(backend) == {1: "committed by the middleware"}
