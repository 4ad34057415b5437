"""The demo application: a small bookstore on polydatum.

What it exercises (every step shows up in the waterfall and on the dashboards):

* **Nested services**: ``catalog.books``, ``catalog.authors``, ``orders``,
  ``inventory``; ``orders.place`` calls ``catalog.books.get`` and
  ``inventory.reserve`` through the DAL, so service spans nest.
* **Context middleware**, in setup order: ``sql_transaction`` (one transaction per
  context, from :func:`polydatum.sql.transaction_middleware`; outermost, so it sees
  what every other middleware did to an error), ``auth`` (reads ``user`` from Meta
  and refuses anonymous requests), ``timing`` (measures the request and keeps the
  slowest one).
* **Resources**: ``db`` (:class:`polydatum.sql.SQLResource`; SQLite file by default,
  PostgreSQL by changing the URL), ``safe`` (per-user "recently viewed" list that
  survives the request), ``cache`` (a per-request view over a shared in-process cache
  whose teardown -- flushing hit statistics to a cache server -- fails now and then,
  from a seeded random generator so runs are reproducible).
* **Errors**: ``orders.place`` raises :class:`OutOfStock` when stock runs out (the
  transaction rolls back), unknown books raise :class:`BookNotFound`, anonymous
  requests fail in ``auth`` setup with :class:`Unauthorized`.

``create_app(url, seed=..., cache_failure_rate=...)`` returns a :class:`Bookstore`
holding the DataManager; ``Bookstore.reset()`` creates and fills the demo tables
(prefixed ``polydatum_demo_`` so they never touch an application's own tables).
"""

from __future__ import annotations

import random
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    Column,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.orm import Session

from polydatum import DataManager, Service
from polydatum.context import DataAccessContext
from polydatum.errors import NotFound, ServiceError
from polydatum.safe import ServiceSafe
from polydatum.sql import SQLBackend, SQLResource, configure_sql

__all__ = [
    "BookNotFound",
    "Bookstore",
    "OutOfStock",
    "Unauthorized",
    "create_app",
]

metadata = MetaData()
authors = Table(
    "polydatum_demo_authors",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(200), nullable=False),
)
books = Table(
    "polydatum_demo_books",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("title", String(200), nullable=False),
    Column("author_id", ForeignKey("polydatum_demo_authors.id"), nullable=False),
    Column("price_cents", Integer, nullable=False),
    Column("stock", Integer, nullable=False),
)
orders = Table(
    "polydatum_demo_orders",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("user", String(100), nullable=False),
    Column("book_id", ForeignKey("polydatum_demo_books.id"), nullable=False),
    Column("quantity", Integer, nullable=False),
)

AUTHORS = [
    (1, "Ursula K. Le Guin"),
    (2, "Octavia E. Butler"),
    (3, "Stanisław Lem"),
    (4, "Iain M. Banks"),
]
BOOKS = [
    (1, "The Left Hand of Darkness", 1, 1499, 40),
    (2, "The Dispossessed", 1, 1599, 25),
    (3, "Kindred", 2, 1299, 30),
    (4, "Parable of the Sower", 2, 1399, 12),
    (5, "Solaris", 3, 1199, 20),
    (6, "The Cyberiad", 3, 1099, 8),
    (7, "Consider Phlebas", 4, 1699, 15),
    (8, "The Player of Games", 4, 1499, 10),
]


class BookNotFound(NotFound):
    """No book with that id."""


class OutOfStock(ServiceError):
    """Not enough copies left to place the order."""

    code = 409


class Unauthorized(ServiceError):
    """The request carries no user in its Meta."""

    code = 401


# ---------------------------------------------------------------------- services


class Authors(Service):
    def get(self, author_id: int) -> dict[str, Any]:
        db: Session = self._ctx.db
        row = db.execute(select(authors.c.name).where(authors.c.id == author_id)).one()
        return {"id": author_id, "name": row.name}


class Books(Service):
    recently_viewed = ServiceSafe("recently_viewed")

    def get(self, book_id: int) -> dict[str, Any]:
        """A book with its author, from the shared cache or the database."""
        cache: RequestCache = self._ctx.cache
        book: dict[str, Any] | None = cache.get(("book", book_id))
        if book is None:
            db: Session = self._ctx.db
            row = db.execute(select(books).where(books.c.id == book_id)).one_or_none()
            if row is None:
                raise BookNotFound(f"no book with id {book_id}")
            author = self._dal.catalog.authors.get(row.author_id)
            book = {
                "id": row.id,
                "title": row.title,
                "author": author["name"],
                "price_cents": row.price_cents,
            }
            cache.set(("book", book_id), book)
        return book

    def view(self, book_id: int) -> dict[str, Any]:
        """A customer looks at a book: :meth:`get`, then remember it in the safe.

        The safe commits on its own (it survives even if this request fails later),
        on its own engine (a sibling file on SQLite), so it never waits for ``db``.
        """
        book: dict[str, Any] = self._dal.catalog.books.get(book_id)
        self.recently_viewed.update(
            self._ctx.meta.user,
            lambda seen: ([book_id] + [b for b in seen if b != book_id])[:5],
            default=[],
        )
        return book

    def recent(self) -> list[int]:
        """The ids of the books the current user viewed last (most recent first)."""
        return list(self.recently_viewed.get(self._ctx.meta.user, []))

    def search(self, term: str) -> list[dict[str, Any]]:
        db: Session = self._ctx.db
        rows = db.execute(
            select(books.c.id, books.c.title)
            .where(func.lower(books.c.title).contains(term.lower()))
            .order_by(books.c.id)
        ).all()
        return [{"id": r.id, "title": r.title} for r in rows]


class Catalog(Service):
    pass


class Inventory(Service):
    def reserve(self, book_id: int, quantity: int) -> int:
        """Take ``quantity`` copies out of stock; :class:`OutOfStock` when too few are left."""
        db: Session = self._ctx.db
        result = db.execute(
            update(books)
            .where(books.c.id == book_id, books.c.stock >= quantity)
            .values(stock=books.c.stock - quantity)
            .returning(books.c.stock)
        ).one_or_none()
        if result is None:
            raise OutOfStock(f"only a few copies of book {book_id} left, {quantity} wanted")
        return int(result.stock)

    def restock(self, book_id: int, quantity: int) -> None:
        db: Session = self._ctx.db
        db.execute(update(books).where(books.c.id == book_id).values(stock=quantity))


class Orders(Service):
    def place(self, book_id: int, quantity: int = 1) -> dict[str, Any]:
        book = self._dal.catalog.books.get(book_id)
        left = self._dal.inventory.reserve(book_id, quantity)
        db: Session = self._ctx.db
        order_id = db.execute(
            insert(orders)
            .values(user=self._ctx.meta.user, book_id=book_id, quantity=quantity)
            .returning(orders.c.id)
        ).scalar_one()
        return {"order": order_id, "title": book["title"], "left": left}

    def history(self) -> list[dict[str, Any]]:
        db: Session = self._ctx.db
        rows = db.execute(
            select(orders.c.id, orders.c.book_id, orders.c.quantity)
            .where(orders.c.user == self._ctx.meta.user)
            .order_by(orders.c.id.desc())
            .limit(10)
        ).all()
        return [{"order": r.id, "book": r.book_id, "quantity": r.quantity} for r in rows]


# ---------------------------------------------------------------------- middleware


def auth(context: DataAccessContext) -> Generator[None, None, None]:
    """Refuse requests without a user in their Meta (before any service runs)."""
    if not context.meta.user:
        raise Unauthorized("the request has no user; pass meta={'user': ...}")
    yield


@dataclass
class Timing:
    """Context middleware measuring each request; keeps the slowest one seen."""

    slowest_ms: float = 0.0
    slowest_request: str | None = None

    def __post_init__(self) -> None:
        self.__name__ = "timing"  # the name spans, metrics and logs use

    def __call__(self, context: DataAccessContext) -> Generator[None, None, None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = (time.perf_counter() - start) * 1000
            if elapsed > self.slowest_ms:
                self.slowest_ms = elapsed
                self.slowest_request = context.meta.request_id


# ------------------------------------------------------------------------- cache


class CacheFlushError(ConnectionResetError):
    """The cache server closed the connection while hit statistics were flushed."""


@dataclass
class RequestCache:
    """One request's view of the shared cache; counts hits and misses."""

    store: dict[Any, Any]
    hits: int = 0
    misses: int = 0

    def get(self, key: Any) -> Any:
        value = self.store.get(key)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def set(self, key: Any, value: Any) -> None:
        self.store[key] = value


@dataclass
class CacheResource:
    """The ``cache`` resource. Its teardown flushes statistics and fails now and then.

    Failures are drawn from ``rng`` (seeded by the demo) with probability
    ``failure_rate``; polydatum suppresses them and records each one.
    """

    rng: random.Random
    failure_rate: float = 0.05
    store: dict[Any, Any] = field(default_factory=dict)
    flushed: int = 0

    def __call__(self, context: DataAccessContext) -> Generator[RequestCache, None, None]:
        cache = RequestCache(self.store)
        yield cache
        if self.rng.random() < self.failure_rate:
            raise CacheFlushError(
                f"cache server reset the connection while flushing stats "
                f"({cache.hits} hits, {cache.misses} misses)"
            )
        self.flushed += 1


# --------------------------------------------------------------------------- app


@dataclass
class Bookstore:
    """The demo application: its DataManager and the pieces the runner looks at."""

    dm: DataManager
    backend: SQLBackend
    db: SQLResource
    cache: CacheResource
    timing: Timing

    def reset(self) -> None:
        """(Re)create the demo tables and fill them; idempotent."""
        engine = self.db.engine
        metadata.drop_all(engine)
        metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(insert(authors), [{"id": i, "name": n} for i, n in AUTHORS])
            conn.execute(
                insert(books),
                [
                    {"id": i, "title": t, "author_id": a, "price_cents": p, "stock": s}
                    for i, t, a, p, s in BOOKS
                ],
            )
        assert self.backend.safe is not None
        self.backend.safe.safe("recently_viewed").clear()
        self.cache.store.clear()

    def close(self) -> None:
        self.backend.dispose()


def create_app(
    url: str | None = None,
    *,
    seed: int = 7,
    cache_failure_rate: float = 0.05,
    tracer_provider: Any = None,
    meter_provider: Any = None,
) -> Bookstore:
    """Build the bookstore's DataManager on ``url`` (default: the SQLite file default)."""
    dm = DataManager(
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        meta_attributes=("user", "request_id"),
    )
    backend = configure_sql(dm, url, transaction=True)
    timing = Timing()
    dm.register_context_middleware(auth, timing)
    cache = CacheResource(random.Random(seed), cache_failure_rate)
    dm.register_resources(cache=cache)
    dm.register_services(
        catalog=Catalog().register_services(books=Books(), authors=Authors()),
        orders=Orders(),
        inventory=Inventory(),
    )
    assert isinstance(backend.db, SQLResource)
    return Bookstore(dm, backend, backend.db, cache, timing)
