"""Test helpers for the SQL and safe tests: one fixture, two real databases.

``backend`` is parametrised over SQLite (a file in ``tmp_path``) and the PostgreSQL
server (a fresh schema per test, selected through ``search_path`` in the URL, and
dropped afterwards). Under CI a missing PostgreSQL fails (``postgres_url`` fixture).
Everything a test creates through ``backend.track(...)`` is disposed at the end.

``backend.bounded_options()`` are engine options under which no wait is long: a
lock held by another connection fails the statement after ``LOCK_WAIT_MS``
(SQLite ``busy_timeout``, PostgreSQL ``lock_timeout``) and a pool checkout after
``POOL_WAIT_S``. Tests of "never blocks" use them, so that a regression fails the
test in seconds instead of hanging it.
"""

from __future__ import annotations

import os
import secrets
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import create_engine, text

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: How long a statement may wait for a lock under ``bounded_options()``.
LOCK_WAIT_MS = 2000
#: How long a pool checkout may wait under ``bounded_options()``.
POOL_WAIT_S = 5


@dataclass
class Backend:
    """One database for one test: ``name`` is ``"sqlite"`` or ``"postgresql"``."""

    name: str
    url: str
    schema: str | None = None
    _tracked: list[Any] = field(default_factory=list)

    def track(self, thing: Any) -> Any:
        """Dispose ``thing`` (an engine, resource or store) when the test ends."""
        self._tracked.append(thing)
        return thing

    def bounded_options(self, **extra: Any) -> dict[str, Any]:
        """Engine options that turn every lock or pool wait into an error within seconds."""
        options: dict[str, Any] = {"pool_timeout": POOL_WAIT_S}
        if self.name == "sqlite":
            options["sqlite_pragmas"] = {"busy_timeout": LOCK_WAIT_MS}
        else:  # connect_args replace the URL's options: repeat the search_path
            options["connect_args"] = {
                "options": f"-csearch_path={self.schema} -clock_timeout={LOCK_WAIT_MS}"
            }
        options.update(extra)
        return options

    def dispose(self) -> None:
        for thing in reversed(self._tracked):
            dispose = getattr(thing, "dispose", None)
            if dispose is not None and not _is_async(thing):
                dispose()
        self._tracked.clear()


def _is_async(thing: Any) -> bool:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from polydatum.sql import AsyncSQLResource

    return isinstance(thing, AsyncEngine | AsyncSQLResource)


def checked_out(engine: Any) -> int:
    """How many connections of ``engine``'s pool are in use now (sync or async engine)."""
    return int(getattr(engine, "sync_engine", engine).pool.checkedout())


def postgres_schema_url(base: str, schema: str) -> str:
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}options=-csearch_path%3D{schema}"


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Backend]:
    """An isolated database on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        b = Backend("sqlite", f"sqlite:///{tmp_path / 'app.db'}")
        try:
            yield b
        finally:
            b.dispose()
        return
    base = request.getfixturevalue("postgres_url")
    schema = f"pd_{secrets.token_hex(6)}"
    # lock_timeout: a connection a test leaked with a transaction open makes DROP SCHEMA
    # fail (naming the leak) instead of waiting for it forever.
    admin = create_engine(
        base, isolation_level="AUTOCOMMIT", connect_args={"options": "-clock_timeout=20000"}
    )
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        b = Backend("postgresql", postgres_schema_url(base, schema), schema)
        try:
            yield b
        finally:
            b.dispose()
            with admin.connect() as conn:
                conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    finally:
        admin.dispose()


def worker_env() -> dict[str, str]:
    """The environment for helper processes: polydatum importable from this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


@contextmanager
def held_by_another_thread(lock: AbstractContextManager[Any]) -> Iterator[None]:
    """``lock`` held by another thread of this process for as long as the block runs: a
    process forked meanwhile inherits it held, by a thread the child does not have."""
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            holding.set()
            release.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert holding.wait(30), "the other thread never got the lock"
        yield
    finally:
        release.set()
        thread.join(30)


def in_forked_children(
    children: int, work: Callable[[int], None], timeout: float = 60.0
) -> list[str]:
    """Run ``work(child)`` in ``children`` forked processes at once; what each reported
    ('' when it succeeded, else its error). A child with no answer after ``timeout``
    seconds is killed (two processes on one socket can also wait for ever), and so is
    every child still running if this function fails."""
    running: dict[int, int] = {}  # pid: the read end of its pipe
    try:
        for child in range(children):
            read_end, write_end = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: report, and leave without the parent's cleanup
                os.close(read_end)
                try:
                    work(child)
                    report = ""
                except BaseException as error:
                    report = f"{type(error).__name__}: {error}".splitlines()[0]
                os.write(write_end, report.encode())
                os._exit(0)
            os.close(write_end)
            running[pid] = read_end
        reports = []
        deadline = time.monotonic() + timeout
        for pid, read_end in list(running.items()):
            wait = max(0.0, deadline - time.monotonic())
            if select.select([read_end], [], [], wait)[0]:
                with os.fdopen(read_end, "rb") as pipe:
                    reports.append(pipe.read().decode())
                os.waitpid(pid, 0)
                del running[pid]
            else:
                reports.append(f"no answer within {timeout:.0f} s")
        return reports
    finally:
        for pid, read_end in running.items():
            os.close(read_end)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
