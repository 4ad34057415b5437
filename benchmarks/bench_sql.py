"""What polydatum's SQL resource costs over bare SQLAlchemy, and the safe's throughput.

Run: ``.venv/bin/python benchmarks/bench_sql.py [--rounds 15] [--requests 400]``.

For each backend (SQLite in a temporary file; PostgreSQL in a scratch schema of
``$POLYDATUM_BENCH_POSTGRES_URL``, default the test server) one process measures,
in interleaved rounds so that both sides see the same machine noise:

* **polydatum**: ``with dm.dal() as dal: dal.items.get(id)`` -- a context, a lazy
  ``SQLResource`` session, a service call, commit and close at the end;
* **bare**: ``with Session(engine) as s, s.begin(): s.execute(...)`` -- a session
  per request on the *same* engine, the same prebuilt statement, also committing.

Telemetry is idle (no tracer or meter provider, structlog unconfigured), as in an
application that has not configured OpenTelemetry. The ratio printed is the median
per-request time of polydatum over bare (target: at most 1.15x). Then the safe's
``get`` and ``set`` throughput (operations per second, one thread).
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    String,
    Table,
    bindparam,
    create_engine,
    insert,
    select,
    text,
)
from sqlalchemy.orm import Session

from polydatum import DataManager, Service
from polydatum.sql import SQLResource, configure_sql

POSTGRES_URL = os.environ.get(
    "POLYDATUM_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
ROWS = 1000

metadata = MetaData()
items = Table(
    "bench_items",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(100), nullable=False),
)


def get_statement() -> Any:
    """The one query both sides run: a row by primary key, prebuilt, with a bound id."""
    return select(items.c.name).where(items.c.id == bindparam("id"))


class Items(Service):
    def __init__(self) -> None:
        super().__init__()
        self._get = get_statement()

    def get(self, item_id: int) -> str:
        name: str = self._ctx.db.execute(self._get, {"id": item_id}).scalar_one()
        return name


@contextmanager
def sqlite_url() -> Iterator[str]:
    with tempfile.TemporaryDirectory() as tmp:
        yield f"sqlite:///{tmp}/bench.db"


@contextmanager
def postgres_url() -> Iterator[str | None]:
    schema = f"bench_{secrets.token_hex(4)}"
    try:
        admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except Exception as error:
        print(f"postgresql: skipped ({type(error).__name__}: {error})".splitlines()[0])
        yield None
        return
    try:
        sep = "&" if "?" in POSTGRES_URL else "?"
        yield f"{POSTGRES_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def timed(fn: Callable[[int], Any], n: int) -> float:
    """Seconds per call of ``fn(i)`` over ``n`` calls."""
    t0 = time.perf_counter()
    for i in range(n):
        fn(i % ROWS + 1)
    return (time.perf_counter() - t0) / n


def bench_backend(name: str, url: str, rounds: int, requests: int) -> dict[str, float]:
    dm = DataManager()
    backend = configure_sql(dm, url)
    dm.register_services(items=Items())
    resource = backend.db
    assert isinstance(resource, SQLResource)
    engine = resource.engine
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(items), [{"id": i, "name": f"item {i}"} for i in range(1, ROWS + 1)])
    statement = get_statement()

    def through_polydatum(item_id: int) -> str:
        with dm.dal() as dal:
            result: str = dal.items.get(item_id)
        return result

    def bare(item_id: int) -> str:
        with Session(engine, expire_on_commit=False) as session, session.begin():
            result: str = session.execute(statement, {"id": item_id}).scalar_one()
            return result

    assert through_polydatum(7) == bare(7) == "item 7"
    timed(through_polydatum, requests)  # warm-up: pools, statement caches
    timed(bare, requests)
    ours, theirs = [], []
    for r in range(rounds):
        if r % 2:
            ours.append(timed(through_polydatum, requests))
            theirs.append(timed(bare, requests))
        else:
            theirs.append(timed(bare, requests))
            ours.append(timed(through_polydatum, requests))
    polydatum_s, bare_s = statistics.median(ours), statistics.median(theirs)
    ratios = sorted(o / t for o, t in zip(ours, theirs, strict=True))

    assert backend.safe is not None
    safe = backend.safe.safe("bench")
    safe["warm"] = 0
    n_ops = max(200, requests)
    t0 = time.perf_counter()
    for i in range(n_ops):
        safe[f"k{i % 100}"] = {"i": i, "name": "value"}
    set_ops = n_ops / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for i in range(n_ops):
        safe.get(f"k{i % 100}")
    get_ops = n_ops / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(n_ops // 2):
        safe.update("counter", lambda v: v + 1, default=0)
    update_ops = (n_ops // 2) / (time.perf_counter() - t0)
    backend.dispose()

    print(
        f"{name:<11} polydatum {polydatum_s * 1e6:8.1f} us/request   "
        f"bare SQLAlchemy {bare_s * 1e6:8.1f} us/request   "
        f"ratio {polydatum_s / bare_s:5.3f}x (per-round {ratios[0]:.3f}..{ratios[-1]:.3f})"
    )
    print(
        f"{'':<11} safe: get {get_ops:8.0f} ops/s   set {set_ops:8.0f} ops/s   "
        f"update {update_ops:8.0f} ops/s"
    )
    return {"ratio": polydatum_s / bare_s, "get_ops": get_ops, "set_ops": set_ops}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    args = parser.parse_args()
    from polydatum.telemetry import Telemetry

    assert Telemetry().tracer() is None, "telemetry must be idle for this benchmark"
    print(
        f"polydatum context + service vs bare SQLAlchemy session, one row by primary key; "
        f"{args.rounds} interleaved rounds x {args.requests} requests; target <= 1.15x"
    )
    if args.backend in ("sqlite", "both"):
        with sqlite_url() as url:
            bench_backend("sqlite", url, args.rounds, args.requests)
    if args.backend in ("postgresql", "both"):
        with postgres_url() as pg:
            if pg is not None:
                bench_backend("postgresql", pg, args.rounds, args.requests)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
