"""Test helpers for the SQL and safe tests: one fixture, two real databases.

``backend`` is parametrised over SQLite (a file in ``tmp_path``) and the PostgreSQL
server (a fresh schema per test, selected through ``search_path`` in the URL, and
dropped afterwards). Under CI a missing PostgreSQL fails (``postgres_url`` fixture).
Everything a test creates through ``backend.track(...)`` is disposed at the end.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import create_engine, text

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
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
