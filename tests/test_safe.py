"""The safe on real databases: every test runs on SQLite (a file) and PostgreSQL."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sql_backends
from span_faults import RaisingProcessor
from sql_backends import (
    REPO_ROOT,
    Backend,
    checked_out,
    held_by_another_thread,
    in_forked_children,
    worker_env,
)
from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    insert,
    inspect,
    select,
    text,
)

from polydatum import DataManager, Service
from polydatum.safe import (
    MISSING,
    PickleRefused,
    SafeError,
    SafeStore,
    ServiceSafe,
)
from polydatum.sql import SQLBackend, configure_sql, safe_database_url
from polydatum.testing import TelemetryCapture

backend = sql_backends.backend  # the fixture: SQLite and PostgreSQL

WORKER = os.path.join(REPO_ROOT, "tests", "safe_worker.py")


@pytest.fixture
def store(backend: Backend) -> SafeStore:
    return backend.track(SafeStore(backend.url))  # type: ignore[no-any-return]


@dataclasses.dataclass
class Point:
    x: int
    y: int


class Boom(Exception):
    pass


# --------------------------------------------------------------------- dict API


def test_dict_api(store: SafeStore) -> None:
    safe = store.safe("app")
    assert len(safe) == 0 and list(safe) == [] and "a" not in safe
    assert safe.get("a") is None and safe.get("a", 5) == 5
    with pytest.raises(KeyError) as missing:
        safe["a"]
    assert missing.value.args == ("a",)
    safe["b"] = {"nested": [1, 2.5, None, True, "x"], "n": 10**30}
    safe["a"] = (1, 2)  # tuples come back as lists (JSON arrays)
    safe.set("c", None)
    assert safe["a"] == [1, 2]
    assert safe["b"] == {"nested": [1, 2.5, None, True, "x"], "n": 10**30}
    assert safe["c"] is None and "c" in safe and safe.get("c", "default") is None
    assert len(safe) == 3
    assert list(safe) == safe.keys() == ["a", "b", "c"]
    assert safe.items() == [("a", [1, 2]), ("b", safe["b"]), ("c", None)]
    assert safe.values() == [[1, 2], safe["b"], None]
    safe["a"] = "replaced"
    assert safe["a"] == "replaced" and len(safe) == 3
    del safe["a"]
    assert "a" not in safe
    with pytest.raises(KeyError):
        del safe["a"]
    assert safe.pop("c") is None
    assert safe.pop("c", "gone") == "gone"
    with pytest.raises(KeyError):
        safe.pop("c")
    assert safe.setdefault("d", [1]) == [1]
    assert safe.setdefault("d", [2]) == [1]
    safe.clear()
    assert len(safe) == 0


def test_a_forked_child_writes_although_a_parent_thread_held_the_write_lock(
    tmp_path: Any,
) -> None:
    """A thread of the parent is in the middle of a write (SQLite: it holds the store's
    write lock) when another thread forks: the child, which has no such thread, must
    still write (a lock inherited held would never be released there)."""
    store = SafeStore(f"sqlite:///{tmp_path / 'safe.db'}")
    try:
        store.safe("app")["parent"] = 1

        def work(child: int) -> None:
            store.safe("app")[f"child {child}"] = child

        with held_by_another_thread(store._write_lock):  # a writer mid-write
            assert in_forked_children(2, work, timeout=20) == ["", ""]
        assert store.safe("app").items() == [("child 0", 0), ("child 1", 1), ("parent", 1)]
    finally:
        store.dispose()


def test_namespaces_never_see_each_other(store: SafeStore) -> None:
    a, b = store.safe("a"), store.safe("b")
    a["k"] = 1
    b["k"] = 2
    b["only-b"] = 3
    assert (a["k"], b["k"]) == (1, 2)
    assert "only-b" not in a and a.get("only-b") is None
    assert (len(a), len(b)) == (1, 2)
    assert (a.keys(), b.keys()) == (["k"], ["k", "only-b"])
    a.clear()
    assert b.items() == [("k", 2), ("only-b", 3)]


def test_update_and_compare_and_set(store: SafeStore) -> None:
    safe = store.safe("counters")
    assert safe.update("n", lambda v: v + 1, default=0) == 1
    assert safe.update("n", lambda v: v * 10) == 10
    assert safe.update("list", lambda v: [*v, "x"], default=[]) == ["x"]

    def fail(value: Any) -> Any:
        raise Boom("refused")

    with pytest.raises(Boom, match="^refused$"):
        safe.update("n", fail)
    with pytest.raises(Boom):
        safe.update("new", fail)
    assert safe["n"] == 10 and "new" not in safe
    with pytest.raises(TypeError):
        safe.update("n", lambda v: {v})
    assert safe["n"] == 10

    assert safe.compare_and_set("n", 10, 11) is True
    assert safe.compare_and_set("n", 10, 12) is False
    assert safe["n"] == 11
    assert safe.compare_and_set("fresh", MISSING, "created") is True
    assert safe.compare_and_set("fresh", MISSING, "again") is False
    assert safe.compare_and_set("absent", "anything", 1) is False
    assert safe["fresh"] == "created" and "absent" not in safe


def test_non_serialisable_value_raises_type_error_and_writes_nothing(
    store: SafeStore,
) -> None:
    safe = store.safe("values")
    safe["kept"] = "original"
    cyclic: list[Any] = [1]
    cyclic.append(cyclic)
    cases = {
        "a set": ({1, 2}, "safe value is a set, which JSON cannot represent; store JSON types"),
        "an object": (
            {"when": [Point(1, 2)]},
            "safe value['when'][0] is a test_safe.Point, which JSON cannot represent;",
        ),
        "NaN": (float("nan"), "safe value is nan, which JSON cannot represent;"),
        "int keys": (
            {1: "a"},
            "safe value has a int dict key 1; JSON object keys must be strings",
        ),
        "a cycle": (cyclic, "safe value[1] contains itself (a cycle); JSON cannot hold it"),
        "bytes": (b"raw", "safe value is a bytes, which JSON cannot represent;"),
    }
    for label, (value, message) in cases.items():
        for key in ("kept", f"new {label}"):
            with pytest.raises(TypeError) as info:
                safe[key] = value
            assert str(info.value).startswith(message), label
            with pytest.raises(TypeError):
                safe.setdefault(f"other {label}", value)
            with pytest.raises(TypeError):
                safe.compare_and_set("kept", "original", value)
    assert safe.items() == [("kept", "original")]


def test_pickle_refused_unless_enabled(backend: Backend, store: SafeStore) -> None:
    with pytest.raises(TypeError, match="serializer='pickle'"):
        store.safe("objects")["p"] = Point(1, 2)
    trusted = backend.track(SafeStore(store.engine, serializer="pickle"))
    trusted.safe("objects")["p"] = Point(1, 2)
    trusted.safe("objects")["plain"] = [1]
    assert trusted.safe("objects")["p"] == Point(1, 2)
    with pytest.raises(PickleRefused) as refused:
        store.safe("objects")["p"]
    assert str(refused.value) == (
        "key 'p' in safe namespace 'objects' holds a pickled value and pickle is not "
        "enabled (unpickling runs code). Open the store with serializer='pickle' only if "
        "every writer of this database is trusted."
    )
    reads: list[Callable[[Any], Any]] = [
        lambda s: s.items(),
        lambda s: s.get("p"),
        lambda s: s.pop("p"),
    ]
    for read in reads:
        with pytest.raises(PickleRefused):
            read(store.safe("objects"))
    assert store.safe("objects").keys() == ["p", "plain"]  # keys need no unpickling
    with pytest.raises(TypeError, match="^safe value cannot be pickled: "):
        trusted.safe("objects")["f"] = threading.Lock()
    with pytest.raises(ValueError, match="^serializer must be 'json' or 'pickle', not 'yaml'$"):
        SafeStore(store.engine, serializer="yaml")


HOSTILE = [
    "'; DROP TABLE polydatum_safe; --",
    'x") OR 1=1; --',
    "%s %(key)s :key ? $1",
    "\\",
    "ünïcødé ✓ 🐘 \u202e",
    "line\nbreak\ttab\r",
    "x" * 512,
]


def test_hostile_keys_and_values_stored_verbatim(store: SafeStore) -> None:
    safe = store.safe("'; DROP TABLE polydatum_safe; --")
    for i, key in enumerate(HOSTILE):
        safe[key] = {"value": HOSTILE[-i - 1], "nul": "\x00", "i": i}
    safe["surrogate"] = "\udcff lone surrogate"  # values are JSON-escaped
    assert safe.pop("surrogate") == "\udcff lone surrogate"
    assert safe.keys() == sorted(HOSTILE)
    for i, key in enumerate(HOSTILE):
        assert safe[key] == {"value": HOSTILE[-i - 1], "nul": "\x00", "i": i}
        assert safe.update(key, lambda v: v["value"]) == HOSTILE[-i - 1]
    assert store.safe("other").keys() == []  # the table is intact
    with store.engine.connect() as conn:
        rows = conn.execute(select(store.table.c.namespace, store.table.c.key)).all()
    assert sorted(rows) == sorted(("'; DROP TABLE polydatum_safe; --", k) for k in HOSTILE)


def test_bad_keys_and_namespaces(store: SafeStore) -> None:
    safe = store.safe("keys")
    with pytest.raises(TypeError) as info:
        safe[3] = 1  # type: ignore[index]
    assert str(info.value) == "safe keys are strings, not int: 3"
    with pytest.raises(ValueError, match="^a safe key cannot be empty$"):
        safe[""] = 1
    with pytest.raises(ValueError) as long:
        safe["x" * 513] = 1
    assert str(long.value) == (
        "safe key is 513 characters long; the limit is 512 (hash long keys, e.g. with "
        "hashlib.sha256)"
    )
    with pytest.raises(ValueError, match="contains a NUL character"):
        safe["a\x00b"] = 1
    with pytest.raises(ValueError) as surrogate:
        safe["\udcff"] = 1
    assert str(surrogate.value) == (
        "safe key '\\udcff' is not valid Unicode text (it has a lone surrogate) and cannot "
        "be stored as UTF-8"
    )
    with pytest.raises(ValueError, match="^a safe namespace cannot be empty$"):
        store.safe("")
    assert len(safe) == 0


# -------------------------------------------------------------------- services


class Counters(Service):
    safe = ServiceSafe("counters")

    def hit(self, page: str) -> int:
        return int(self.safe.update(page, lambda n: n + 1, default=0))

    def peek(self, page: str) -> Any:
        return self.safe.get(page)


class Reports(Service):
    safe = ServiceSafe()

    def peek(self, page: str) -> Any:
        return self.safe.get(page)

    def store_of_context(self) -> Any:
        return self._ctx.safe


def test_services_have_their_own_namespace(backend: Backend) -> None:
    dm = DataManager()
    sql = backend.track(configure_sql(dm, backend.url))
    dm.register_services(counters=Counters(), reports=Reports())
    assert Reports.safe.namespace == "test_safe.Reports"
    with dm.dal() as dal:
        assert [dal.counters.hit("/"), dal.counters.hit("/")] == [1, 2]
        assert dal.counters.peek("/") == 2
        assert dal.reports.peek("/") is None
        assert dal.reports.store_of_context() is sql.safe
    assert sql.safe.safe("counters").items() == [("/", 2)]

    dm.replace_resource("safe", sql.db)
    with pytest.raises(SafeError) as info, dm.dal() as dal:
        dal.counters.peek("/")
    assert str(info.value) == (
        "resource 'safe' is a Session, not a SafeStore; register one with "
        "configure_sql(dm, ...) or dm.register_resources(safe=SafeStore(url))"
    )


def test_each_operation_is_a_span_without_the_value(backend: Backend) -> None:
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

    with TelemetryCapture() as cap:
        dm = cap.data_manager()
        sql = backend.track(configure_sql(dm, backend.url))
        dm.register_services(counters=Counters())
        sql.safe.create_table()
        instrumentor = SQLAlchemyInstrumentor()
        instrumentor.instrument(
            engine=sql.safe.engine, tracer_provider=cap.tracer_provider, skip_dep_check=True
        )
        try:
            with dm.dal() as dal:
                dal.counters.hit("secret-page")
        finally:
            instrumentor.uninstrument()
        update_sql = [s.name for s in cap.spans() if s.parent == "polydatum.safe.update"]
        assert update_sql[0] == "connect"
        assert [n.split(" ")[0] for n in update_sql[1:]] == ["SELECT", "INSERT"]
        assert cap.tree() == [
            (
                "polydatum.context",
                [
                    (
                        "counters.hit",
                        [
                            ("polydatum.resource.setup safe", []),
                            ("polydatum.safe.update", [(n, []) for n in update_sql]),
                        ],
                    ),
                    ("polydatum.resource.teardown safe", []),
                ],
            )
        ]
        # INTERNAL spans: the database under polydatum's names (db.* is for CLIENT spans)
        db_attrs = sql.safe.telemetry_attributes
        assert set(db_attrs) >= {"polydatum.db.system.name", "polydatum.db.namespace"}
        assert not any(k.startswith("db.") for k in db_attrs)
        assert dict(cap.span("polydatum.safe.update").attributes) == {
            "polydatum.safe.namespace": "counters",
            **db_attrs,
        }
        cap.clear()
        safe = sql.safe.safe("ops")
        safe["k"] = "v"
        safe.get("k")
        assert "k" in safe
        assert len(safe) == 1
        assert [key for key in safe] == ["k"]
        safe.items()
        safe.compare_and_set("k", "v", "w")
        safe.setdefault("k")
        safe.pop("k")
        with pytest.raises(KeyError):
            del safe["k"]
        safe.clear()
        with pytest.raises(Boom):
            safe.update("k", lambda v: (_ for _ in ()).throw(Boom("no")))
        records = cap.spans()
        assert [(r.name, r.parent, r.status) for r in records] == [
            (f"polydatum.safe.{op}", None, "ERROR" if op == "update" else "UNSET")
            for op in (
                "set",
                "get",
                "contains",
                "len",
                "keys",
                "items",
                "compare_and_set",
                "setdefault",
                "pop",
                "delete",
                "clear",
                "update",
            )
        ]
        assert records[-1].attributes["error.type"] == "test_safe.Boom"
        for r in records:
            assert r.attributes["polydatum.safe.namespace"] == "ops"
            assert "v" not in r.attributes.values() and "k" not in r.attributes.values()


# ---------------------------------------------------------------- concurrency


def test_threads_lose_no_increment(store: SafeStore) -> None:
    safe = store.safe("threads")
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def work() -> None:
        try:
            barrier.wait()
            for _ in range(1000):
                safe.update("n", lambda n: n + 1, default=0)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert safe["n"] == 8000


def start_workers(args: list[list[str]]) -> list[subprocess.Popen[str]]:
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, *a],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=worker_env(),
        )
        for a in args
    ]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
    return procs


@pytest.fixture
def reap() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=30)


def test_processes_lose_no_increment(
    backend: Backend, store: SafeStore, reap: list[subprocess.Popen[str]]
) -> None:
    store.create_table()  # so that the workers do not race to create it
    procs = start_workers([["increment", backend.url, "procs", "n", "1000"] for _ in range(4)])
    reap.extend(procs)
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0]
    assert outputs == ["done\n"] * 4
    assert store.safe("procs")["n"] == 4000


def test_sigkill_loses_no_returned_assignment(
    backend: Backend, store: SafeStore, reap: list[subprocess.Popen[str]]
) -> None:
    store.create_table()
    (proc,) = start_workers([["assign", backend.url, "crash", "10000"]])
    reap.append(proc)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()
    returned: list[str] = []
    while len(returned) < 2500:
        returned.append(proc.stdout.readline().rstrip("\n"))
    os.kill(proc.pid, signal.SIGKILL)
    rest = proc.stdout.read().splitlines()  # acknowledged before the kill, still in the pipe
    proc.wait(timeout=30)
    returned.extend(rest)
    assert proc.returncode == -signal.SIGKILL
    assert "done" not in returned and 2500 <= len(returned) < 10000
    assert returned == [f"key-{i}" for i in range(len(returned))]
    safe = store.safe("crash")
    stored = dict(safe.items())
    missing = [k for k in returned if stored.get(k) != int(k.removeprefix("key-"))]
    assert missing == []
    # At most the one assignment in flight when the process died went through unacknowledged.
    assert len(returned) <= len(stored) <= len(returned) + 1


# ------------------------------------------------- the safe beside the session (issue 13)

metadata = MetaData()
notes = Table(
    "notes",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("body", String(100), nullable=False),
)


class Notes(Service):
    """The service of docs/backends.md: a safe update, then a write through ``ctx.db``."""

    safe = ServiceSafe("notes")

    def add(self, body: str) -> int:
        note_id = int(self.safe.update("next_id", lambda n: n + 1, default=0))
        self._ctx.db.execute(insert(notes).values(id=note_id, body=body))
        return note_id

    def bodies(self) -> dict[int, str]:
        return {i: b for i, b in self._ctx.db.execute(select(notes.c.id, notes.c.body))}


def make_app(backend: Backend, **options: Any) -> tuple[DataManager, SQLBackend]:
    """configure_sql with bounded lock and pool waits: a regression fails in seconds."""
    options.setdefault("engine_options", backend.bounded_options())
    dm = DataManager()
    sql: SQLBackend = backend.track(configure_sql(dm, backend.url, **options))
    metadata.create_all(sql.db.engine)  # type: ignore[arg-type]
    dm.register_services(notes=Notes())
    return dm, sql


def stored_notes(backend: Backend) -> dict[int, str]:
    """What the database holds, read with a fresh engine."""
    engine = create_engine(backend.url)
    try:
        with engine.connect() as conn:
            return {i: b for i, b in conn.execute(select(notes.c.id, notes.c.body))}
    finally:
        engine.dispose()


def stored_safe(sql: SQLBackend, namespace: str) -> list[tuple[str, Any]]:
    """What the safe holds, read with a fresh store on the same database."""
    assert sql.safe is not None
    fresh = SafeStore(sql.safe.engine.url.render_as_string(hide_password=False))
    try:
        return fresh.safe(namespace).items()
    finally:
        fresh.dispose()


def test_safe_database_url_is_a_sibling_file_on_sqlite_and_the_same_database_elsewhere() -> None:
    assert safe_database_url("sqlite:///app.db") == "sqlite:///app.safe.db"
    assert safe_database_url("sqlite:////var/lib/app/data.sqlite3") == (
        "sqlite:////var/lib/app/data.safe.sqlite3"
    )
    assert safe_database_url("sqlite:///data/app") == "sqlite:///data/app.safe"
    assert safe_database_url("sqlite+aiosqlite:///app.db?timeout=5") == (
        "sqlite+aiosqlite:///app.safe.db?timeout=5"
    )
    for stays in ("sqlite://", "sqlite:///:memory:", "postgresql://app:pw@db:5432/app"):
        assert safe_database_url(stays) == stays


def test_configure_sql_gives_the_safe_its_own_engine(backend: Backend, tmp_path: Any) -> None:
    _, sql = make_app(backend)
    assert sql.safe is not None and sql.safe.engine is not sql.db.engine
    expected = safe_database_url(backend.url)
    assert sql.safe.engine.url.render_as_string(hide_password=False) == (
        expected if backend.name == "sqlite" else sql.db.engine.url.render_as_string(False)
    )
    other = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    chosen = backend.track(configure_sql(DataManager(), backend.url, safe_url=other))
    assert chosen.safe.engine.url.render_as_string(hide_password=False) == other


@pytest.mark.parametrize("transaction", [False, True], ids=["resource", "middleware"])
def test_reads_safe_writes_and_writes_interleave_in_one_context(
    backend: Backend, transaction: bool
) -> None:
    dm, sql = make_app(backend, transaction=transaction)
    started = time.monotonic()
    with dm.context() as ctx:
        assert ctx.dal.notes.bodies() == {}  # a read through ctx.db ...
        ctx.safe.safe("app")["seen"] = 1  # ... a safe write ...
        ctx.db.execute(insert(notes).values(id=100, body="direct"))  # ... a write
        assert ctx.dal.notes.add("first") == 1  # safe write, write (the docs' service)
        assert ctx.dal.notes.add("second") == 2  # and again, after the session wrote
        ctx.safe.safe("app")["seen"] = 2
        assert ctx.dal.notes.bodies() == {100: "direct", 1: "first", 2: "second"}
    assert time.monotonic() - started < sql_backends.LOCK_WAIT_MS / 1000  # nothing waited
    assert stored_notes(backend) == {100: "direct", 1: "first", 2: "second"}
    assert stored_safe(sql, "app") == [("seen", 2)]
    assert stored_safe(sql, "notes") == [("next_id", 2)]
    assert checked_out(sql.db.engine) == 0


def test_the_safes_first_use_inside_a_context_after_a_write(backend: Backend) -> None:
    dm, sql = make_app(backend)
    assert sql.safe is not None
    safe_engine = create_engine(sql.safe.engine.url)
    try:
        assert not inspect(safe_engine).has_table("polydatum_safe")
        with dm.context() as ctx:
            ctx.db.execute(insert(notes).values(id=1, body="written first"))
            ctx.safe.safe("app")["k"] = "v"  # CREATE TABLE, then the write
            ctx.db.execute(insert(notes).values(id=2, body="written after"))
        assert inspect(safe_engine).has_table("polydatum_safe")
    finally:
        safe_engine.dispose()
    assert stored_notes(backend) == {1: "written first", 2: "written after"}
    assert stored_safe(sql, "app") == [("k", "v")]


def test_a_failed_context_keeps_its_safe_writes_and_rolls_back_its_db_writes(
    backend: Backend,
) -> None:
    dm, sql = make_app(backend)
    with pytest.raises(Boom, match="^the request failed$"), dm.dal() as dal:
        assert dal.notes.add("rolled back") == 1
        raise Boom("the request failed")
    assert stored_notes(backend) == {}
    assert stored_safe(sql, "notes") == [("next_id", 1)]  # durable at once, not undone


def test_as_many_threads_as_pool_connections_use_the_session_and_the_safe(
    backend: Backend,
) -> None:
    size = 3
    dm, sql = make_app(
        backend, engine_options=backend.bounded_options(pool_size=size, max_overflow=0)
    )
    held: list[int] = []
    # Every thread holds its session's connection (the whole pool) before any uses the
    # safe: with one pool for both, each safe operation would wait for a connection
    # that no one gives back.
    barrier = threading.Barrier(
        size, action=lambda: held.append(checked_out(sql.db.engine)), timeout=20
    )
    errors: list[BaseException] = []

    def request(i: int) -> None:
        try:
            with dm.context() as ctx:
                ctx.db.execute(text("SELECT 1"))  # checks out the connection
                barrier.wait()
                ctx.safe.safe("threads").update("n", lambda n: n + 1, default=0)
                ctx.db.execute(insert(notes).values(id=i, body=f"thread {i}"))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=request, args=(i,)) for i in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [t.is_alive() for t in threads] == [False] * size
    assert errors == []
    assert held == [size]
    assert stored_notes(backend) == {i: f"thread {i}" for i in range(size)}
    assert stored_safe(sql, "threads") == [("n", size)]
    assert checked_out(sql.db.engine) == 0


@pytest.mark.parametrize("where", ["on_start", "on_end"])
def test_a_raising_span_processor_never_fails_or_repeats_an_update(
    backend: Backend, where: str
) -> None:
    """A processor raising after the update committed must not fail the call: a retry
    of a call that failed that way would apply the update twice."""
    with TelemetryCapture() as cap:
        raising = RaisingProcessor(where)
        cap.tracer_provider.add_span_processor(raising)
        dm = cap.data_manager()
        sql = backend.track(configure_sql(dm, backend.url))
        dm.register_services(counters=Counters())
        sql.safe.create_table()
        for expected in (1, 2, 3):
            with dm.dal() as dal:
                assert dal.counters.hit("home") == expected
        with dm.dal() as dal:
            assert dal.counters.peek("home") == 3
        assert raising.calls > 0
        if where == "on_end":  # the in-memory exporter ran first: the spans are there
            updates = [s for s in cap.spans() if s.name == "polydatum.safe.update"]
            assert len(updates) == 3
