"""The safe: a durable, namespaced key-value store on the application's SQL database.

Quick persistence without designing tables: counters, feature flags, cursors of a
sync job, the last time something ran. One table (``polydatum_safe``: namespace,
key, codec, value) holds every namespace; it is created on first use.

Using it
--------
From an application configured with :func:`polydatum.sql.configure_sql` (which
registers the ``safe`` resource beside ``db``: the same database on a server, a
sibling file on SQLite -- ``app.db`` -> ``app.safe.db`` -- always through an engine
and pool of its own), a service declares its own namespace with :class:`ServiceSafe`
and uses ``self.safe`` like a dict::

    from polydatum import DataManager, Service
    from polydatum.safe import ServiceSafe
    from polydatum.sql import configure_sql

    class Counters(Service):
        safe = ServiceSafe("counters")          # this service's namespace

        def hit(self, page: str) -> int:
            return self.safe.update(page, lambda n: n + 1, default=0)

    dm = DataManager()
    configure_sql(dm, "sqlite:///app.db")
    dm.register_services(counters=Counters())
    with dm.dal() as dal:
        dal.counters.hit("/home")

``self.safe`` resolves, in the active context, the ``safe`` resource (a
:class:`SafeStore`; ``ServiceSafe(namespace, resource="other")`` names another) and
returns the :class:`Safe` of that namespace. ``self._ctx.safe`` is the store itself:
``self._ctx.safe.safe("reports")`` reaches any namespace explicitly. Outside
polydatum: ``SafeStore("postgresql://...").safe("jobs")``.

The :class:`Safe` API
---------------------
``safe[key] = value``; ``safe[key]`` (``KeyError`` when absent);
``safe.get(key, default=None)``; ``del safe[key]`` (``KeyError`` when absent);
``key in safe``; ``len(safe)``; ``for key in safe`` (keys sorted as Python sorts str);
``safe.keys()`` / ``values()`` / ``items()`` (lists); ``safe.pop(key[, default])``;
``safe.setdefault(key, default)``; ``safe.clear()``;
``safe.update(key, fn, default=None) -> new value`` (atomic read-modify-write:
``fn(current or default)`` is stored and returned); ``safe.compare_and_set(key,
expected, new) -> bool`` (stores ``new`` only if the current value ``== expected``;
``expected=MISSING`` means "only if absent").

Keys are non-empty strings of at most :data:`MAX_KEY_LENGTH` characters without NUL;
namespaces the same with at most :data:`MAX_NAMESPACE_LENGTH`.

Guarantees
----------
* **Every operation is one transaction, committed before it returns.** Once
  ``safe[key] = value`` (or ``update``, ``del``, ...) returns, the change is durable:
  it survives the process being killed. It is *not* part of the context's ``db``
  transaction: a context that fails afterwards does not undo it.
* **Atomic:** each single operation, including ``update``/``compare_and_set``/
  ``setdefault``/``pop``: concurrent ``update`` calls from any number of threads and
  processes on the same database never lose an increment (PostgreSQL: the row is
  locked with ``SELECT ... FOR UPDATE``; SQLite: the write takes the database write
  lock with ``BEGIN IMMEDIATE``).
* **Not atomic:** a *sequence* of operations (``if k not in safe: safe[k] = v`` can
  race; use ``setdefault``/``compare_and_set``/``update``); iteration and
  ``keys()``/``items()`` are a snapshot taken by one query, not a live view.
  ``fn`` in ``update`` may run more than once (if another process creates the key
  at the same moment) and must have no side effects nor use the safe itself.
* **Namespaced:** two namespaces never see each other's keys (``len``, iteration,
  ``clear`` included).
* **Never waits for the context's session** (as configured by ``configure_sql``):
  safe operations and reads/writes through ``ctx.db`` interleave in any order in a
  context, and contexts holding every connection of the session's pool still reach
  the safe, because the safe has its own pool and, on SQLite, its own file (one
  writer per file: the session keeps the write lock until the context commits). A
  store built on the session's engine (``SafeStore(resource.engine)``) gives that up.
* **Values are JSON** (``None``, ``bool``, ``int``, finite ``float``, ``str``, lists,
  tuples -- read back as lists -- and dicts with string keys). Anything else raises
  :class:`TypeError` naming where in the value the problem is, and nothing is
  written. ``SafeStore(..., serializer="pickle")`` stores pickles instead -- only for
  databases whose every writer you trust, since unpickling runs code; a JSON safe
  refuses to read a pickled value (:class:`PickleRefused`).

Telemetry: each operation is a span ``polydatum.safe.<operation>`` (``get``, ``set``,
``delete``, ``contains``, ``len``, ``keys``, ``items``, ``update``,
``compare_and_set``, ``setdefault``, ``pop``, ``clear``) with
``polydatum.safe.namespace``, ``db.system.name`` and ``db.namespace`` -- never the
key or the value -- and the SQL statement spans (when SQLAlchemy is instrumented)
nest under it. The tracer is the store's ``tracer_provider``, else the active
context's DataManager's, else the one of the DataManager the store was registered
with, else the global provider; nothing is recorded when none is configured.
"""

from __future__ import annotations

import base64
import json
import math
import os
import pickle
import threading
import weakref
from collections.abc import Callable, Generator, Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, Final, TypeVar

from polydatum.context import get_active_context
from polydatum.errors import PolydatumException
from polydatum.telemetry import (
    Telemetry,
    current_span,
    disabled_by_environment,
    end_span,
    fail_span,
    start_span,
)

try:
    from sqlalchemy import (
        Column,
        Connection,
        Engine,
        MetaData,
        String,
        Table,
        Text,
        bindparam,
        delete,
        func,
        insert,
        literal_column,
        select,
        text,
        update,
    )
    from sqlalchemy import inspect as sa_inspect
    from sqlalchemy.dialects.postgresql import insert as pg_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert
    from sqlalchemy.exc import DBAPIError
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "polydatum.safe needs SQLAlchemy 2.x: pip install 'polydatum[sql]'"
    ) from error

from polydatum.sql_engine import SQLITE_BEGIN_OPTION, create_sql_engine, resource_attributes_for

if TYPE_CHECKING:
    from polydatum.context import DataAccessContext
    from polydatum.registry import DataManager

__all__ = [
    "MAX_KEY_LENGTH",
    "MAX_NAMESPACE_LENGTH",
    "MISSING",
    "PickleRefused",
    "Safe",
    "SafeError",
    "SafeStore",
    "ServiceSafe",
]

T = TypeVar("T")

#: Every store of this process, for :func:`_new_locks_after_fork`.
_STORES: weakref.WeakSet[SafeStore] = weakref.WeakSet()


def _new_locks_after_fork() -> None:
    # The forked child has only the thread that forked: the locks other threads held
    # are never released there. (Its engine gets a pool of its own: sql_engine.)
    for store in list(_STORES):
        store._make_locks()


os.register_at_fork(after_in_child=_new_locks_after_fork)

#: Longest key, in characters (keeps the primary-key index entry within PostgreSQL's limit).
MAX_KEY_LENGTH: Final = 512
#: Longest namespace, in characters.
MAX_NAMESPACE_LENGTH: Final = 128
DEFAULT_TABLE: Final = "polydatum_safe"
SERIALIZERS: Final = ("json", "pickle")


class _Missing:
    """The "no value" marker (absent key) for ``compare_and_set`` and ``pop``."""

    _instance: _Missing | None = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


#: Stands for "the key is absent" (``compare_and_set(key, MISSING, value)``).
MISSING: Final = _Missing()


class SafeError(PolydatumException):
    """A safe operation could not be carried out."""


class PickleRefused(SafeError):
    """A pickled value was found (or pickle was asked for) while pickle is not enabled."""


# ----------------------------------------------------------------------- values


def _json_check(value: Any, path: str, seen: set[int], depth: int) -> None:
    if value is None or isinstance(value, bool | int | str):
        return
    if isinstance(value, float):
        if math.isfinite(value):
            return
        raise TypeError(
            f"safe value{path} is {value!r}, which JSON cannot represent; store it as a "
            f"string or None"
        )
    if depth > 200:
        raise TypeError(f"safe value{path} is nested more than 200 levels deep")
    if isinstance(value, dict | list | tuple):
        if id(value) in seen:
            raise TypeError(f"safe value{path} contains itself (a cycle); JSON cannot hold it")
        seen.add(id(value))
        if isinstance(value, dict):
            for k, v in value.items():
                if not isinstance(k, str):
                    raise TypeError(
                        f"safe value{path} has a {type(k).__name__} dict key {k!r}; JSON "
                        f"object keys must be strings (convert it, e.g. str(key))"
                    )
                _json_check(v, f"{path}[{k!r}]", seen, depth + 1)
        else:
            for i, v in enumerate(value):
                _json_check(v, f"{path}[{i}]", seen, depth + 1)
        seen.discard(id(value))
        return
    cls = type(value)
    name = (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )
    raise TypeError(
        f"safe value{path} is a {name}, "
        f"which JSON cannot represent; store JSON types (dict, list, str, int, float, "
        f"bool, None) or open the store with serializer='pickle' (trusted data only)"
    )


def _encode(value: Any, serializer: str) -> tuple[str, str]:
    """``(codec, text)`` for ``value``; :class:`TypeError` if it cannot be serialised."""
    if serializer == "json":
        _json_check(value, "", set(), 0)
        return "json", json.dumps(value, ensure_ascii=True, separators=(",", ":"))
    try:
        data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, TypeError, AttributeError) as error:
        raise TypeError(f"safe value cannot be pickled: {error}") from error
    return "pickle", base64.b64encode(data).decode("ascii")


def _check_name(kind: str, name: Any, limit: int) -> str:
    if not isinstance(name, str):
        raise TypeError(f"safe {kind}s are strings, not {type(name).__name__}: {name!r}")
    if not name:
        raise ValueError(f"a safe {kind} cannot be empty")
    if len(name) > limit:
        raise ValueError(
            f"safe {kind} is {len(name)} characters long; the limit is {limit} "
            f"(hash long {kind}s, e.g. with hashlib.sha256)"
        )
    if "\x00" in name:
        raise ValueError(f"safe {kind} {name!r} contains a NUL character, which SQL text refuses")
    if not name.isascii():
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(
                f"safe {kind} {name!r} is not valid Unicode text (it has a lone surrogate) "
                f"and cannot be stored as UTF-8"
            ) from None
    return name


# ------------------------------------------------------------------------ store


class SafeStore:
    """The safe's table on one database; :meth:`safe` gives a namespace's :class:`Safe`.

    ``url_or_engine``: a URL (resolved by :func:`polydatum.sql.database_url`; the
    store then owns its engine) or a SQLAlchemy :class:`~sqlalchemy.Engine` to share
    (not a context session's: the safe would then wait for the sessions' locks and
    connections; see the module docs). ``serializer``: ``"json"`` (default) or
    ``"pickle"``. It is also a resource: ``dm.register_resources(safe=store)`` makes
    ``ctx.safe`` this store.
    """

    def __init__(
        self,
        url_or_engine: str | Engine | None = None,
        *,
        serializer: str = "json",
        table_name: str = DEFAULT_TABLE,
        schema: str | None = None,
        engine_options: Mapping[str, Any] | None = None,
        tracer_provider: Any = None,
    ) -> None:
        if serializer not in SERIALIZERS:
            raise ValueError(f"serializer must be 'json' or 'pickle', not {serializer!r}")
        self.serializer = serializer
        if isinstance(url_or_engine, Engine):
            self.engine = url_or_engine
            self._owns_engine = False
        else:
            self.engine = create_sql_engine(url_or_engine, engine_options=engine_options)
            self._owns_engine = True
        self._dialect = self.engine.dialect.name
        # Its spans are INTERNAL (an operation of polydatum's, whose statements get
        # CLIENT spans of their own when statement tracing is on): polydatum.db.* names.
        self.telemetry_attributes: dict[str, str | int] = resource_attributes_for(self.engine.url)
        self._span_attributes = {
            k: v for k, v in self.telemetry_attributes.items() if k.startswith("polydatum.db.")
        }
        self.table = Table(
            table_name,
            MetaData(schema=schema),
            Column("namespace", String(MAX_NAMESPACE_LENGTH), primary_key=True),
            Column("key", String(MAX_KEY_LENGTH), primary_key=True),
            Column("codec", String(16), nullable=False),
            Column("value", Text, nullable=False),
        )
        self._build_statements()
        self._ready = False
        self._make_locks()
        _STORES.add(self)
        self._own_telemetry = Telemetry(tracer_provider) if tracer_provider is not None else None
        self._dm_telemetry: Telemetry | None = None
        self._global_telemetry = Telemetry()

    def _make_locks(self) -> None:
        """The store's locks, new (at creation, and in a forked child: a lock another
        thread of the parent held at the fork would stay held for ever there)."""
        self._ready_lock = threading.Lock()
        # SQLite has one writer at a time: threads of this process queue on a lock
        # instead of polling the database lock (other processes: busy_timeout).
        self._write_lock: AbstractContextManager[Any] = (
            threading.RLock() if self._dialect == "sqlite" else nullcontext()
        )

    # -- resource protocol ---------------------------------------------------------

    def setup(self, data_manager: DataManager) -> None:
        """Called when registered as a resource: trace with that DataManager's tracer."""
        self._dm_telemetry = data_manager.telemetry

    def __call__(self, context: DataAccessContext) -> Generator[SafeStore, None, None]:
        yield self

    def ping(self) -> None:
        """Health check: ``SELECT 1`` on the store's engine."""
        with self.engine.connect() as connection:
            connection.execute(text("SELECT 1")).scalar_one()

    def dispose(self) -> None:
        """Close the pool, if this store created its engine (a shared engine is left alone)."""
        if self._owns_engine:
            self.engine.dispose()

    # -- namespaces ---------------------------------------------------------------

    def safe(self, namespace: str) -> Safe:
        """The :class:`Safe` of ``namespace`` (cheap; create them freely)."""
        return Safe(self, _check_name("namespace", namespace, MAX_NAMESPACE_LENGTH))

    def create_table(self) -> None:
        """Create the table if it does not exist (done automatically on first use)."""
        try:
            self.table.metadata.create_all(self.engine, checkfirst=True)
        except DBAPIError:
            # Another process created it between our check and our CREATE.
            if not sa_inspect(self.engine).has_table(self.table.name, schema=self.table.schema):
                raise
        self._ready = True

    def _ensure_table(self) -> None:
        if not self._ready:
            with self._ready_lock:
                if not self._ready:
                    self.create_table()

    # -- plumbing -------------------------------------------------------------------

    def _decode(self, namespace: str, key: str, codec: str, data: str) -> Any:
        if codec == "json":
            return json.loads(data)
        if codec == "pickle":
            if self.serializer != "pickle":
                raise PickleRefused(
                    f"key {key!r} in safe namespace {namespace!r} holds a pickled value and "
                    f"pickle is not enabled (unpickling runs code). Open the store with "
                    f"serializer='pickle' only if every writer of this database is trusted."
                )
            return pickle.loads(base64.b64decode(data))
        raise SafeError(
            f"key {key!r} in safe namespace {namespace!r} has unknown codec {codec!r} "
            f"(written by a newer polydatum?)"
        )

    def _tracer(self) -> Any:
        if disabled_by_environment():
            return None
        # Each Telemetry's tracer() answers for disable(): its own providers keep
        # recording, the default ones stop (as for the DataManager's own spans).
        if self._own_telemetry is not None:
            return self._own_telemetry.tracer()
        ctx = get_active_context()
        if ctx is not None:
            return ctx.data_manager.telemetry.tracer()
        if self._dm_telemetry is not None:
            return self._dm_telemetry.tracer()
        return self._global_telemetry.tracer()

    def _traced(self, operation: str, namespace: str, work: Callable[[], T]) -> T:
        tracer = self._tracer()
        if tracer is None:
            return work()
        attributes: dict[str, Any] = {"polydatum.safe.namespace": namespace}
        attributes.update(self._span_attributes)
        span = start_span(tracer, f"polydatum.safe.{operation}", attributes)
        if span is None:
            return work()
        try:
            with current_span(span):
                return work()
        except BaseException as error:
            fail_span(span, error)
            raise
        finally:
            end_span(span)

    def _read(self, work: Callable[[Connection], T]) -> T:
        self._ensure_table()
        with self.engine.connect() as connection:
            return work(connection)

    def _write(self, work: Callable[[Connection], T]) -> T:
        self._ensure_table()
        with self._write_lock, self.engine.connect() as connection:
            if self._dialect == "sqlite":
                connection.execution_options(**{SQLITE_BEGIN_OPTION: "IMMEDIATE"})
            with connection.begin():
                return work(connection)

    def _build_statements(self) -> None:
        """Every statement once, with bound parameters (``ns``, ``k``, ``codec``, ``data``):
        no per-operation statement construction, and never a value in the SQL text."""
        t, c = self.table, self.table.c
        ns: Any = bindparam("ns")
        k: Any = bindparam("k")
        one = (c.namespace == ns) & (c.key == k)
        self._q_get = select(c.codec, c.value).where(one)
        self._q_lock = select(c.codec, c.value).where(one).with_for_update()
        self._q_contains: Any = select(literal_column("1")).select_from(t).where(one)
        self._q_len = select(func.count()).select_from(t).where(c.namespace == ns)
        self._q_keys = select(c.key).where(c.namespace == ns)
        self._q_items = select(c.key, c.codec, c.value).where(c.namespace == ns)
        self._q_delete = delete(t).where(one)
        self._q_clear = delete(t).where(c.namespace == ns)
        self._q_update = (
            update(t).where(one).values(codec=bindparam("codec"), value=bindparam("data"))
        )
        row = {"namespace": ns, "key": k, "codec": bindparam("codec"), "value": bindparam("data")}
        self._q_insert = insert(t).values(**row)
        self._q_upsert: Any = None
        self._q_insert_absent: Any = None
        if self._dialect in ("postgresql", "sqlite"):
            make = pg_insert if self._dialect == "postgresql" else sqlite_insert
            upsert = make(t).values(**row)
            self._q_upsert = upsert.on_conflict_do_update(
                index_elements=[c.namespace, c.key],
                set_={"codec": upsert.excluded.codec, "value": upsert.excluded.value},
            )
            # RETURNING, not rowcount: drivers disagree on rowcount for DO NOTHING.
            self._q_insert_absent = (
                make(t)
                .values(**row)
                .on_conflict_do_nothing(index_elements=[c.namespace, c.key])
                .returning(c.key)
            )

    def _upsert(self, connection: Connection, params: dict[str, str]) -> None:
        if self._q_upsert is not None:
            connection.execute(self._q_upsert, params)
        elif connection.execute(self._q_update, params).rowcount == 0:
            connection.execute(self._q_insert, params)

    def _insert_if_absent(self, connection: Connection, params: dict[str, str]) -> bool:
        """Insert unless the key exists (also when another transaction just created it)."""
        if self._q_insert_absent is not None:
            return connection.execute(self._q_insert_absent, params).first() is not None
        connection.execute(self._q_insert, params)  # other dialects: PK error on a race
        return True

    def __repr__(self) -> str:
        url = self.engine.url.render_as_string(hide_password=True)
        return f"SafeStore({url!r}, serializer={self.serializer!r})"


# ------------------------------------------------------------------------- safe


class Safe:
    """One namespace of a :class:`SafeStore`: a dict-like, durable mapping (see module docs)."""

    __slots__ = ("namespace", "store")

    def __init__(self, store: SafeStore, namespace: str) -> None:
        self.store = store
        self.namespace = namespace

    def _decode_row(self, key: str, row: Any) -> Any:
        return self.store._decode(self.namespace, key, row[0], row[1])

    # -- reads ------------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key``, or ``default`` when absent."""
        params = {"ns": self.namespace, "k": _check_name("key", key, MAX_KEY_LENGTH)}
        store = self.store

        def work() -> Any:
            row = store._read(lambda conn: conn.execute(store._q_get, params).first())
            return MISSING if row is None else self._decode_row(key, row)

        value = store._traced("get", self.namespace, work)
        return default if value is MISSING else value

    def __getitem__(self, key: str) -> Any:
        value = self.get(key, MISSING)
        if value is MISSING:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        params = {"ns": self.namespace, "k": _check_name("key", key, MAX_KEY_LENGTH)}
        store = self.store

        def work() -> bool:
            return store._read(lambda c: c.execute(store._q_contains, params).first() is not None)

        return store._traced("contains", self.namespace, work)

    def __len__(self) -> int:
        store = self.store

        def work() -> int:
            return int(
                store._read(lambda c: c.execute(store._q_len, {"ns": self.namespace}).scalar_one())
            )

        return store._traced("len", self.namespace, work)

    def keys(self) -> list[str]:
        """Every key of this namespace, sorted (a snapshot)."""
        store = self.store

        def work() -> list[str]:
            # Sorted here, not by the database: its collation would vary by backend.
            return sorted(
                store._read(lambda c: c.execute(store._q_keys, {"ns": self.namespace}).scalars())
            )

        return store._traced("keys", self.namespace, work)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def items(self) -> list[tuple[str, Any]]:
        """Every ``(key, value)`` of this namespace, sorted by key (one query, a snapshot)."""
        store = self.store

        def work() -> list[tuple[str, Any]]:
            rows = store._read(lambda c: c.execute(store._q_items, {"ns": self.namespace}).all())
            return [(k, self._decode_row(k, (codec, v))) for k, codec, v in sorted(rows)]

        return store._traced("items", self.namespace, work)

    def values(self) -> list[Any]:
        """Every value of this namespace, in key order (a snapshot)."""
        return [v for _, v in self.items()]

    # -- writes -----------------------------------------------------------------

    def _params(self, key: str, value: Any) -> dict[str, str]:
        codec, data = _encode(value, self.store.serializer)
        return {"ns": self.namespace, "k": key, "codec": codec, "data": data}

    def __setitem__(self, key: str, value: Any) -> None:
        params = self._params(_check_name("key", key, MAX_KEY_LENGTH), value)
        store = self.store
        store._traced(
            "set", self.namespace, lambda: store._write(lambda c: store._upsert(c, params))
        )

    def set(self, key: str, value: Any) -> None:
        """``safe[key] = value``."""
        self[key] = value

    def __delitem__(self, key: str) -> None:
        params = {"ns": self.namespace, "k": _check_name("key", key, MAX_KEY_LENGTH)}
        store = self.store

        def work() -> int:
            return int(store._write(lambda c: c.execute(store._q_delete, params).rowcount))

        if not store._traced("delete", self.namespace, work):
            raise KeyError(key)

    def pop(self, key: str, default: Any = MISSING) -> Any:
        """Remove ``key`` and return its value (``default``, or ``KeyError``, when absent)."""
        params = {"ns": self.namespace, "k": _check_name("key", key, MAX_KEY_LENGTH)}
        store = self.store

        def body(conn: Connection) -> Any:
            row = conn.execute(store._q_lock, params).first()
            if row is None:
                return MISSING
            value = self._decode_row(key, row)
            conn.execute(store._q_delete, params)
            return value

        value = store._traced("pop", self.namespace, lambda: store._write(body))
        if value is MISSING:
            if default is MISSING:
                raise KeyError(key)
            return default
        return value

    def clear(self) -> None:
        """Delete every key of this namespace (one transaction)."""
        store = self.store
        params = {"ns": self.namespace}
        store._traced(
            "clear",
            self.namespace,
            lambda: store._write(lambda c: c.execute(store._q_clear, params)),
        )

    def setdefault(self, key: str, default: Any = None) -> Any:
        """The value of ``key``; if absent, store ``default`` first (atomically) and return it."""
        params = self._params(_check_name("key", key, MAX_KEY_LENGTH), default)
        store = self.store

        def body(conn: Connection) -> Any:
            while True:
                row = conn.execute(store._q_lock, params).first()
                if row is not None:
                    return self._decode_row(key, row)
                if store._insert_if_absent(conn, params):
                    return self._decode_row(key, (params["codec"], params["data"]))

        return store._traced("setdefault", self.namespace, lambda: store._write(body))

    def update(self, key: str, fn: Callable[[Any], Any], default: Any = None) -> Any:
        """Atomically replace the value of ``key`` with ``fn(value)`` and return the new value.

        ``fn`` receives ``default`` when the key is absent. The key is locked from
        the read to the write, so concurrent updates (threads or processes)
        serialise and none is lost. If ``fn`` raises, or its result cannot be
        serialised, nothing is written and the error propagates.
        """
        key = _check_name("key", key, MAX_KEY_LENGTH)
        lookup = {"ns": self.namespace, "k": key}
        store = self.store

        def body(conn: Connection) -> Any:
            while True:
                row = conn.execute(store._q_lock, lookup).first()
                new = fn(default if row is None else self._decode_row(key, row))
                params = self._params(key, new)
                if row is not None:
                    conn.execute(store._q_update, params)
                    return new
                if store._insert_if_absent(conn, params):
                    return new
                # Another transaction created the key since our read: lock it and redo.

        return store._traced("update", self.namespace, lambda: store._write(body))

    def compare_and_set(self, key: str, expected: Any, new: Any) -> bool:
        """Store ``new`` only if the current value ``== expected`` (``MISSING``: absent).

        Returns whether it stored. Atomic, like :meth:`update`.
        """
        params = self._params(_check_name("key", key, MAX_KEY_LENGTH), new)
        store = self.store

        def body(conn: Connection) -> bool:
            row = conn.execute(store._q_lock, params).first()
            if row is None:
                return expected is MISSING and store._insert_if_absent(conn, params)
            if expected is MISSING or self._decode_row(key, row) != expected:
                return False
            conn.execute(store._q_update, params)
            return True

        return store._traced("compare_and_set", self.namespace, lambda: store._write(body))

    def __repr__(self) -> str:
        return f"<Safe namespace={self.namespace!r} of {self.store!r}>"


# ----------------------------------------------------------------- per service


class ServiceSafe:
    """A service's own namespace as an attribute: ``safe = ServiceSafe("billing")``.

    ``self.safe`` (inside a service method, with a context active) is the
    :class:`Safe` of that namespace in the store registered as resource
    ``resource`` (default ``"safe"``). Without a name, the namespace is the class's
    ``module.QualName`` -- renaming the class then moves to a new, empty namespace,
    so give production services an explicit name.
    """

    def __init__(self, namespace: str | None = None, *, resource: str = "safe") -> None:
        if namespace is not None:
            _check_name("namespace", namespace, MAX_NAMESPACE_LENGTH)
        self.namespace = namespace
        self.resource = resource

    def __set_name__(self, owner: type, name: str) -> None:
        if self.namespace is None:
            self.namespace = _check_name(
                "namespace", f"{owner.__module__}.{owner.__qualname__}", MAX_NAMESPACE_LENGTH
            )

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        store = instance._ctx.resource(self.resource)
        if not isinstance(store, SafeStore):
            raise SafeError(
                f"resource {self.resource!r} is a {type(store).__name__}, not a SafeStore; "
                f"register one with configure_sql(dm, ...) or "
                f"dm.register_resources({self.resource}=SafeStore(url))"
            )
        assert self.namespace is not None
        return store.safe(self.namespace)
