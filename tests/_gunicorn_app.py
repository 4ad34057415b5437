"""The WSGI application of ``tests/test_gunicorn_preload.py``, served by a real
``gunicorn --preload`` with several workers.

Built at import, in gunicorn's master (``--preload``): a DataManager made by
``configure_sql`` on ``POLYDATUM_GUNICORN_DB_URL``, wrapped in
:class:`~polydatum.integrations.wsgi.PolydatumWSGIMiddleware`. Before gunicorn forks
its workers, the master checks the database (``dm.ping()``), as applications do at
startup, so every worker starts from a parent whose pool holds a connection.

``POST /notes/<key>`` writes the note ``key`` with the worker's pid and answers 200 with
that pid.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import text

from polydatum import DataManager, Service
from polydatum.integrations.wsgi import PolydatumWSGIMiddleware
from polydatum.sql import configure_sql

WRITE = text("INSERT INTO notes (key, pid) VALUES (:key, :pid)")


class Notes(Service):
    def write(self, key: str) -> int:
        pid = os.getpid()
        self._ctx.db.execute(WRITE, {"key": key, "pid": pid})
        return pid


dm: DataManager[Any] = DataManager()
configure_sql(dm, os.environ["POLYDATUM_GUNICORN_DB_URL"], safe_name=None)
dm.register_services(notes=Notes())


def notes_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    key = environ["PATH_INFO"].removeprefix("/notes/")
    pid = dm.require_active_context().dal.notes.write(key)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(pid).encode()]


app = PolydatumWSGIMiddleware(notes_app, dm)

startup = dm.ping()  # the master's startup check, before the fork
if not all(result.ok for result in startup.values()):
    raise SystemExit(f"the database check failed: {startup}")
