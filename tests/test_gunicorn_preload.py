"""A polydatum application under a real ``gunicorn --preload`` with three workers, on
SQLite and the real PostgreSQL server (``tests/_gunicorn_app.py``).

The master builds the DataManager and checks the database before it forks the workers,
so each worker starts from a parent whose pool holds a connection. Concurrent clients
send requests that each write one note; the oracle: every request is answered 200 by
the worker that wrote its note (the pid in the body is the one in the row), the table
holds exactly those notes, and more than one worker served.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from sql_backends import REPO_ROOT, Backend, worker_env
from sql_backends import backend as backend  # the fixture: SQLite and PostgreSQL
from sqlalchemy import create_engine, text

from tests._servers import wait_for

REQUESTS = 150
WORKERS = 3


def gunicorn_command(socket_path: Path) -> list[str]:
    return [
        sys.executable, "-m", "gunicorn", "--preload", "--workers", str(WORKERS),
        "--bind", f"unix:{socket_path}", "--graceful-timeout", "5", "tests._gunicorn_app:app",
    ]  # fmt: skip


def test_workers_of_a_preloaded_app_each_use_connections_of_their_own(
    backend: Backend, tmp_path: Path
) -> None:
    engine = create_engine(backend.url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE notes (key TEXT PRIMARY KEY, pid INTEGER NOT NULL)"))
    socket_path = tmp_path / "gunicorn.sock"
    log = tmp_path / "gunicorn.log"
    env = {**worker_env(), "POLYDATUM_GUNICORN_DB_URL": backend.url}
    with open(log, "wb") as out:
        master = subprocess.Popen(
            gunicorn_command(socket_path), cwd=REPO_ROOT, env=env, stdout=out, stderr=out
        )
    try:
        wait_for(lambda: socket_path.exists() or master.poll() is not None, "gunicorn", timeout=30)
        assert master.poll() is None, log.read_text()
        transport = httpx.HTTPTransport(uds=str(socket_path))
        with httpx.Client(transport=transport, base_url="http://gunicorn", timeout=30) as client:

            def request(i: int) -> tuple[str, int, str]:
                response = client.post(f"/notes/n{i}")
                return f"n{i}", response.status_code, response.text

            wait_for(  # every worker booted, so that several serve
                lambda: log.read_text().count("Booting worker") >= WORKERS,
                "gunicorn's workers",
                timeout=30,
            )
            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(request, range(REQUESTS)))
    finally:
        master.send_signal(signal.SIGTERM)  # graceful: the workers finish, then exit
        try:
            master.wait(30)
        except subprocess.TimeoutExpired:
            master.kill()
            master.wait()
    with engine.connect() as conn:
        rows = {key: pid for key, pid in conn.execute(text("SELECT key, pid FROM notes"))}
    engine.dispose()
    failed = [(key, status, body[:200]) for key, status, body in answers if status != 200]
    assert failed == [], (
        f"{len(failed)} of {REQUESTS} requests failed, e.g. {failed[:3]}; "
        f"gunicorn's log ends:\n{log.read_text()[-3000:]}"
    )
    assert rows == {key: int(body) for key, _, body in answers}
    served_by = set(rows.values())
    assert len(served_by) > 1 and os.getpid() not in served_by
    assert master.returncode == 0, log.read_text()[-3000:]
