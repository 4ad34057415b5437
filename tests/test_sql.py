"""polydatum.sql on real databases: every test runs on SQLite (a file) and PostgreSQL."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
import sql_backends
from sql_backends import Backend, postgres_schema_url
from sqlalchemy import ForeignKey, String, create_engine, event, insert, select, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from polydatum import DataManager, Service
from polydatum.context import DataAccessContext
from polydatum.sql import (
    DEFAULT_DATABASE_URL,
    AsyncSQLResource,
    SQLResource,
    asavepoint,
    configure_sql,
    database_url,
    savepoint,
)
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

    def backend_pid(self) -> int:
        return int(self._ctx.db.execute(text("SELECT pg_backend_pid()")).scalar_one())


def make_app(
    b: Backend, cap: TelemetryCapture | None = None, **options: Any
) -> tuple[DataManager, SQLResource]:
    dm = cap.data_manager() if cap is not None else DataManager()
    sql = configure_sql(dm, b.url, **options)
    b.track(sql)
    assert isinstance(sql.db, SQLResource)
    Base.metadata.create_all(sql.db.engine)
    dm.register_services(items=Items())
    return dm, sql.db


def names(b: Backend) -> dict[int, str]:
    """What is committed, read with a fresh engine (not the application's)."""
    engine = create_engine(b.url.replace("+aiosqlite", ""))
    try:
        with engine.connect() as conn:
            return dict(conn.execute(select(Item.id, Item.name).order_by(Item.id)).all())  # type: ignore[arg-type]
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
    sql = backend.track(configure_sql(dm))
    assert dm.get_resource("db") is sql.db
    assert dm.get_resource("safe") is sql.safe
    assert sql.safe is not None and sql.safe.engine is sql.db.engine  # one pool per URL
    assert sql.db.engine.dialect.name == backend.name


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
    assert resource.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_rollback_when_middleware_raises_on_teardown(backend: Backend) -> None:
    dm, _ = make_app(backend)

    def audit(ctx: DataAccessContext) -> Iterator[None]:
        yield
        raise Boom("audit refused")

    dm.register_context_middleware(audit)
    with pytest.raises(Boom, match="^audit refused$"), dm.dal() as dal:
        dal.items.add(1, "audited")
    assert names(backend) == {}


def test_failed_commit_rolls_back_and_is_recorded(backend: Backend) -> None:
    with TelemetryCapture() as cap:
        dm, resource = make_app(backend, cap)
        with dm.dal() as dal:
            dal.items.add(1, "original")
        cap.clear()
        with dm.context() as ctx:
            ctx.dal.items.add(2, "new")
            ctx.dal.items.add_later(1, "duplicate")  # fails at commit: primary key
        errors = ctx.get_resource_exit_errors()
        assert [type(e) for _, e, _ in errors] == [IntegrityError]
        teardown = cap.span("polydatum.resource.teardown db")
        assert teardown.status == "ERROR"
        assert teardown.attributes["error.type"] == "sqlalchemy.exc.IntegrityError"
        assert cap.span("polydatum.context").attributes["polydatum.teardown_errors"] == 1
    assert names(backend) == {1: "original"}
    assert resource.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


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
    assert resource.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


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


def test_savepoint_rolls_back_only_the_nested_unit(backend: Backend) -> None:
    dm, _ = make_app(backend)
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
    assert names(backend) == {1: "outer", 3: "nested, kept", 4: "after"}


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


def test_resource_spans_carry_db_attributes(backend: Backend) -> None:
    url = backend.url.replace("postgres@", "postgres:hunter2@")
    resource = backend.track(SQLResource(url))
    assert "hunter2" not in repr(resource)
    assert resource.telemetry_attributes == expected_db_attributes(backend)
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
            **expected_db_attributes(backend),
        }
        assert dict(teardown.attributes) == {
            "polydatum.resource.name": "db",
            **expected_db_attributes(backend),
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
            assert resource.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
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


async def make_async_app(b: Backend, **options: Any) -> tuple[DataManager, AsyncSQLResource]:
    dm = DataManager()
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
        assert resource.engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
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
