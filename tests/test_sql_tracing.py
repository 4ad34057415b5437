"""SQL statement spans: which span kind carries which attributes, and statement tracing
with the SQLAlchemy this environment installed.

polydatum's own spans are INTERNAL and name the database under ``polydatum.db.*``; the
statement spans of ``opentelemetry-instrumentation-sqlalchemy`` are CLIENT and carry the
semantic conventions' ``db.*`` names, stable ones under
``OTEL_SEMCONV_STABILITY_OPT_IN=database,http``. contrib reads that variable once per
process, so the exact traces run in a fresh interpreter each.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import sql_backends
import sqlalchemy
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from sql_backends import Backend, worker_env
from sql_tracing_lines import (
    CONTRIB,
    DECLARED,
    INSTALLED,
    NOT_INSTALLED,
    OUTSIDE_CONTRIB,
    conflict_line,
    on_line,
    on_reason,
)
from sqlalchemy import text

from polydatum import Service
from polydatum.sql import (
    SQLResource,
    StatementTracing,
    configure_sql,
    trace_sql_statements,
)
from polydatum.testing import TelemetryCapture

backend = sql_backends.backend  # the fixture: SQLite and PostgreSQL

# ------------------------------------------------------ one trace, span kinds and names

TRACE_SCRIPT = """
import json, sys
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import text
from polydatum import DataManager, Service
from polydatum.sql import configure_sql

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))


class Items(Service):
    def name(self, item_id):
        query = text("SELECT name FROM pd_trace_items WHERE id = :id")
        return self._ctx.db.execute(query, {"id": item_id}).scalar_one()


dm = DataManager(tracer_provider=provider)
backend = configure_sql(dm, sys.argv[1], safe_name=None, trace_statements=True)
with backend.db.engine.begin() as connection:  # outside the context: another trace
    connection.execute(text("CREATE TABLE pd_trace_items (id INTEGER PRIMARY KEY, name TEXT)"))
    connection.execute(text("INSERT INTO pd_trace_items VALUES (7, 'seven')"))
dm.register_services(items=Items())
exporter.clear()
with dm.dal() as dal:
    assert dal.items.name(7) == "seven"
spans = exporter.get_finished_spans()
(context,) = [s for s in spans if s.name == "polydatum.context"]
names = {s.context.span_id: s.name for s in spans}


def attributes(span):
    found = dict(span.attributes)
    if "polydatum.context.id" in found:  # random: its length says it is one
        found["polydatum.context.id"] = len(found["polydatum.context.id"])
    return found


print(json.dumps({
    "tracing": backend.statement_tracing.describe(),
    "spans": sorted(
        [s.name, s.kind.name, names.get(s.parent.span_id) if s.parent else None,
         attributes(s)]
        for s in spans if s.context.trace_id == context.context.trace_id
    ),
}))
backend.dispose()
"""


def run_trace(url: str, opt_in: str | None) -> dict[str, Any]:
    env = worker_env()
    env.pop("OTEL_SEMCONV_STABILITY_OPT_IN", None)
    env.pop("OTEL_PYTHON_DISABLED_INSTRUMENTATIONS", None)
    if opt_in is not None:
        env["OTEL_SEMCONV_STABILITY_OPT_IN"] = opt_in
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(TRACE_SCRIPT), url],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def database(b: Backend) -> dict[str, Any]:
    """The database as the URL names it: system, namespace, server (never the user)."""
    if b.name == "sqlite":
        return {"system": "sqlite", "namespace": b.url.removeprefix("sqlite:///")}
    return {"system": "postgresql", "namespace": "test", "address": "127.0.0.1", "port": 5432}


QUERY = {
    "sqlite": "SELECT name FROM pd_trace_items WHERE id = ?",
    "postgresql": "SELECT name FROM pd_trace_items WHERE id = %(id)s",
}


@pytest.mark.parametrize("opt_in", ["database,http", None], ids=["stable", "unset"])
def test_one_trace_puts_db_attributes_on_client_spans_only(
    backend: Backend, opt_in: str | None
) -> None:
    """In the trace of one context: polydatum's spans are INTERNAL and name the database
    under ``polydatum.db.*``; the statement span is CLIENT, under the service call, with
    the database's ``db.*`` (and ``server.*``) names -- the stable ones when the opt-in
    says so, contrib's old ones (with ``db.user``) when it is unset -- for the same
    database. ``statement_tracing.describe()`` names the attributes the spans carry."""
    db = database(backend)
    polydatum_db = {
        "polydatum.db.system.name": db["system"],
        "polydatum.db.namespace": db["namespace"],
    }
    if "address" in db:
        polydatum_db["polydatum.db.server.address"] = db["address"]
        polydatum_db["polydatum.db.server.port"] = db["port"]
    operation = f"SELECT {db['namespace']}"
    statement: dict[str, Any]
    if opt_in == "database,http":
        statement = {
            "db.system.name": db["system"],
            "db.namespace": db["namespace"],
            "db.query.text": QUERY[backend.name],
            "db.operation.name": operation,
        }
        if "address" in db:
            statement |= {"server.address": db["address"], "server.port": db["port"]}
    else:
        statement = {
            "db.system": db["system"],
            "db.name": db["namespace"],
            "db.statement": QUERY[backend.name],
            "db.operation": operation,
        }
        if "address" in db:
            statement |= {
                "net.peer.name": db["address"],
                "net.peer.port": db["port"],
                "db.user": "postgres",
            }
    result = run_trace(backend.url, opt_in)
    assert result["tracing"] == on_line(stable=opt_in is not None)
    assert result["spans"] == sorted(
        [
            ["polydatum.context", "INTERNAL", None, {"polydatum.context.id": 16}],
            [
                "items.name",
                "INTERNAL",
                "polydatum.context",
                {
                    "polydatum.service.path": "items.name",
                    "code.function.name": "__main__.Items.name",
                },
            ],
            [
                "polydatum.resource.setup db",
                "INTERNAL",
                "items.name",
                {"polydatum.resource.name": "db", **polydatum_db},
            ],
            [operation, "CLIENT", "items.name", statement],
            [
                "polydatum.resource.teardown db",
                "INTERNAL",
                "polydatum.context",
                {"polydatum.resource.name": "db", **polydatum_db, "polydatum.outcome": "ok"},
            ],
        ]
    )
    for _, kind, _, attributes in result["spans"]:
        semconv = sorted(a for a in attributes if a.startswith(("db.", "server.", "net.")))
        assert (kind == "CLIENT") == bool(semconv), (kind, semconv)


# ------------------------------------------ statement spans with this SQLAlchemy


class Items(Service):
    def create(self) -> None:
        self._ctx.db.execute(text("CREATE TABLE pd_items (id INTEGER PRIMARY KEY, name TEXT)"))

    def add_many(self, rows: list[dict[str, Any]]) -> None:
        self._ctx.db.execute(text("INSERT INTO pd_items (id, name) VALUES (:id, :name)"), rows)

    def bad(self) -> None:
        self._ctx.db.execute(text("SELECT no_such_column FROM pd_items"))


class AsyncItems(Service):
    async def count(self) -> int:
        session = await self._ctx.aresource("db")
        result = await session.execute(text("SELECT count(*) FROM pd_items"))
        return int(result.scalar_one())


def statement_name(b: Backend, verb: str) -> str:
    return f"{verb} {database(b)['namespace']}"


def test_statement_spans_appear_with_the_installed_sqlalchemy(backend: Backend) -> None:
    """With the SQLAlchemy the ``test`` extra installs (2.1, beyond the range contrib
    declares), ``configure_sql(trace_statements=True)`` traces every statement: one
    CLIENT span each, under the service call; a statement the database refuses is an
    ERROR span; the pool's connections feed contrib's metric."""
    with TelemetryCapture() as cap:
        dm = cap.data_manager()
        sql = backend.track(configure_sql(dm, backend.url, safe_name=None, trace_statements=True))
        tracing = sql.statement_tracing
        assert isinstance(tracing, StatementTracing)
        assert (tracing.enabled, tracing.traced_here, tracing.reason) == (True, True, on_reason())
        with sql.db.engine.connect():
            pass  # the dialect's first-connect queries, before the spans looked at
        cap.clear()
        dm.register_services(items=Items())
        with dm.dal() as dal:
            dal.items.create()
            dal.items.add_many([{"id": 1, "name": "one"}, {"id": 2, "name": "two"}])
        with pytest.raises(sqlalchemy.exc.DBAPIError):
            with dm.dal() as dal:
                dal.items.bad()
        statements = [s for s in cap.finished_spans() if s.kind.name == "CLIENT"]
        assert [(s.name, s.status.status_code.name) for s in statements] == [
            (statement_name(backend, "CREATE"), "UNSET"),
            (statement_name(backend, "INSERT"), "UNSET"),
            (statement_name(backend, "SELECT"), "ERROR"),
        ]
        calls = {s.context.span_id: s.name for s in cap.finished_spans()}
        assert [calls[s.parent.span_id] for s in statements if s.parent] == [
            "items.create",
            "items.add_many",
            "items.bad",
        ]
        assert {s.instrumentation_scope.name for s in statements} == {
            "opentelemetry.instrumentation.sqlalchemy"
        }
        usage = cap.metrics("db.client.connections.usage")
        assert sorted(p.attributes["state"] for p in usage) == ["idle", "used"]
        assert sum(p.value for p in usage if p.attributes["state"] == "used") == 0  # returned


def test_statement_spans_follow_the_providers_polydatum_records_to(backend: Backend) -> None:
    """A DataManager without providers of its own records to those given to
    ``PolydatumInstrumentor().instrument(tracer_provider=...)`` (``telemetry.enable``),
    also when that runs after ``configure_sql``: the statement spans go there too, under
    the service call, and stop with polydatum's after ``uninstrument()``."""
    from polydatum import DataManager
    from polydatum import telemetry as polydatum_telemetry

    with TelemetryCapture() as cap:
        dm = DataManager()  # no providers of its own; no global provider in the tests
        sql = backend.track(configure_sql(dm, backend.url, safe_name=None, trace_statements=True))
        dm.register_services(items=Items())
        with sql.db.engine.connect():
            pass  # the dialect's first-connect queries
        try:
            with dm.dal() as dal:
                dal.items.create()  # before instrument(): polydatum records nothing
            assert cap.finished_spans() == []
            polydatum_telemetry.enable(cap.tracer_provider, cap.meter_provider)
            with dm.dal() as dal:
                dal.items.add_many([{"id": 1, "name": "one"}])
            spans = cap.finished_spans()
            calls = {s.context.span_id: s.name for s in spans}
            statements = [s for s in spans if s.kind.name == "CLIENT"]
            assert [(s.name, calls[s.parent.span_id]) for s in statements if s.parent] == [
                (statement_name(backend, "INSERT"), "items.add_many")
            ]
            assert statements[0].instrumentation_scope.name == (
                "opentelemetry.instrumentation.sqlalchemy"
            )
            cap.clear()
            polydatum_telemetry.disable()
            with dm.dal() as dal:
                dal.items.add_many([{"id": 2, "name": "two"}])
            assert cap.finished_spans() == []
        finally:
            polydatum_telemetry.enable()


def test_a_ping_statement_nests_under_the_ping_span(backend: Backend) -> None:
    """``dm.ping()``'s ``SELECT 1`` is a CLIENT span under its INTERNAL ping span (the
    ping span is current while the ping runs), not a trace of its own."""
    with TelemetryCapture() as cap:
        dm = cap.data_manager()
        sql = backend.track(configure_sql(dm, backend.url, safe_name=None, trace_statements=True))
        with sql.db.engine.connect():
            pass  # the dialect's first-connect queries, before the spans looked at
        cap.clear()
        (result,) = dm.ping().values()
        assert result.ok
        spans = {s.context.span_id: s for s in cap.finished_spans()}
        rows = sorted(
            (
                s.name,
                s.kind.name,
                spans[s.parent.span_id].name if s.parent and s.parent.span_id in spans else None,
            )
            for s in spans.values()
        )
        assert rows == [
            (statement_name(backend, "SELECT"), "CLIENT", "polydatum.resource.ping db"),
            ("polydatum.resource.ping db", "INTERNAL", None),
        ]


async def test_async_statement_spans_appear_with_the_installed_sqlalchemy(
    backend: Backend,
) -> None:
    """The asyncio engine (aiosqlite, psycopg's async driver) is traced the same way."""
    with TelemetryCapture() as cap:
        dm = cap.data_manager()
        sql = configure_sql(dm, backend.url, asyncio=True, safe_name=None, trace_statements=True)
        try:
            assert sql.statement_tracing is not None and sql.statement_tracing.traced_here
            async with sql.db.engine.begin() as connection:  # outside the context
                await connection.execute(text("CREATE TABLE pd_items (id INTEGER PRIMARY KEY)"))
            dm.register_services(items=AsyncItems())
            cap.clear()
            async with dm.dal() as dal:
                assert await dal.items.count() == 0
        finally:
            await sql.adispose()
        assert cap.tree() == [
            (
                "polydatum.context",
                [
                    (
                        "items.count",
                        [
                            ("polydatum.resource.setup db", []),
                            # psycopg's async cursor shows contrib no database name
                            (
                                "SELECT"
                                if backend.name == "postgresql"
                                else statement_name(backend, "SELECT"),
                                [],
                            ),
                        ],
                    ),
                    ("polydatum.resource.teardown db", []),
                ],
            )
        ]


# ------------------------------------------------------------- when it is off, and why


def test_statement_tracing_off_without_the_instrumentation(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.instrumentation.sqlalchemy", None)
    resource = SQLResource(f"sqlite:///{tmp_path / 'a.db'}")
    try:
        tracing = trace_sql_statements(resource.engine)
    finally:
        resource.dispose()
    assert tracing.describe() == NOT_INSTALLED
    assert (tracing.enabled, tracing.traced_here) == (False, False)


@pytest.mark.parametrize("value", ["sqlalchemy", "flask, *"])
def test_statement_tracing_off_when_the_environment_disables_sqlalchemy(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("OTEL_PYTHON_DISABLED_INSTRUMENTATIONS", value)
    with TelemetryCapture() as cap:
        dm = cap.data_manager()
        sql = configure_sql(dm, f"sqlite:///{tmp_path / 'b.db'}", trace_statements=True)
        try:
            assert sql.statement_tracing is not None
            assert sql.statement_tracing.describe() == (
                "SQL statement spans: off (OTEL_PYTHON_DISABLED_INSTRUMENTATIONS turns the "
                "sqlalchemy one off)"
            )
            with sql.db.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        finally:
            sql.dispose()
        assert cap.names() == []


def test_statement_tracing_off_outside_every_tested_range(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SQLAlchemy outside the range contrib declares *and* the range polydatum tests is
    a version conflict: nothing is traced, and the reason says which versions."""
    if not OUTSIDE_CONTRIB:
        pytest.skip(f"{INSTALLED} is within the {DECLARED!r} contrib declares")
    from polydatum import sql_engine

    narrower = f"<{sqlalchemy.__version__}"
    monkeypatch.setattr(sql_engine, "STATEMENT_TRACING_TESTED", narrower)
    with TelemetryCapture() as cap:
        resource = SQLResource(f"sqlite:///{tmp_path / 'c.db'}")
        try:
            tracing = trace_sql_statements(resource.engine, tracer_provider=cap.tracer_provider)
            with resource.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        finally:
            resource.dispose()
        assert cap.names() == []
    assert tracing.describe() == conflict_line(narrower)


def test_an_engine_contrib_already_traces_is_not_traced_twice(tmp_path: Any) -> None:
    """After ``SQLAlchemyInstrumentor().instrument()`` (what ``opentelemetry-instrument``
    does), polydatum's engines are traced by contrib's ``create_engine`` wrapper, to
    contrib's provider, whenever ``polydatum.sql`` was imported; ``trace_statements``
    then adds no second tracer (each statement is one span) and says where they go."""
    with TelemetryCapture() as cap, TelemetryCapture() as contrib:
        instrumentor = SQLAlchemyInstrumentor()
        instrumentor.instrument(tracer_provider=contrib.tracer_provider, skip_dep_check=True)
        try:
            dm = cap.data_manager()
            sql = configure_sql(
                dm, f"sqlite:///{tmp_path / 'd.db'}", safe_name=None, trace_statements=True
            )
            try:
                with sql.db.engine.connect() as connection:
                    connection.execute(text("SELECT 1"))
            finally:
                sql.dispose()
        finally:
            instrumentor.uninstrument()
        assert sql.statement_tracing is not None
        assert sql.statement_tracing.describe().startswith(
            f"SQL statement spans: on ({CONTRIB} already traces this engine, to the tracer "
            f"provider it was given (SQLAlchemyInstrumentor().instrument(), as "
            f"opentelemetry-instrument calls it)); their attributes: "
        )
        assert not sql.statement_tracing.traced_here
        select = f"SELECT {tmp_path / 'd.db'}"
        assert contrib.names() == ["connect", select]
        assert cap.names() == []


def test_tracing_an_engine_again_changes_nothing(tmp_path: Any) -> None:
    with TelemetryCapture() as cap:
        resource = SQLResource(f"sqlite:///{tmp_path / 'e.db'}")
        try:
            first = trace_sql_statements(resource.engine, tracer_provider=cap.tracer_provider)
            assert trace_sql_statements(resource.engine) is first
            with resource.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        finally:
            resource.dispose()
        assert cap.names() == [f"SELECT {tmp_path / 'e.db'}"]
