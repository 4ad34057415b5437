"""A real ``celery worker`` process for the Celery tests: started on a fresh,
auto-deleted queue of its own (so that a concurrent test run never takes its
messages), always stopped by its PID (warm shutdown, SIGTERM).

The worker's app module reads its configuration from the environment:
``POLYDATUM_CELERY_APP`` (the ``-A`` module: only that module builds a worker app),
``POLYDATUM_CELERY_DIR`` (where it writes ``ready``, its log and what else the app
records), ``POLYDATUM_CELERY_QUEUE`` and whatever ``env`` adds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from tests._servers import wait_for
from tests.conftest import require_service

ROOT = Path(__file__).resolve().parent.parent


class Worker(NamedTuple):
    queue: str
    directory: Path
    process: subprocess.Popen[bytes]

    def output(self) -> str:
        return (self.directory / "worker.log").read_text(errors="replace")


@contextmanager
def celery_worker(
    directory: Path,
    instrument: bool,
    broken: bool = False,
    *,
    app: str = "tests._celery_app",
    pool: tuple[str, ...] = ("-P", "solo"),
    env: dict[str, str] | None = None,
) -> Iterator[Worker]:
    """A real ``celery worker`` of ``app`` (solo pool unless told) on a fresh,
    auto-deleted queue; stopped with SIGTERM (warm shutdown) when the block ends."""
    require_service("RabbitMQ", "127.0.0.1", 5672)
    require_service("Redis", "127.0.0.1", 6379)
    directory.mkdir(parents=True, exist_ok=True)
    queue = f"polydatum-test-{uuid.uuid4().hex[:12]}"
    worker_env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "POLYDATUM_CELERY_APP": app,
        "POLYDATUM_CELERY_DIR": str(directory),
        "POLYDATUM_CELERY_QUEUE": queue,
        "POLYDATUM_CELERY_INSTRUMENT": "1" if instrument else "0",
        "POLYDATUM_CELERY_BROKEN": "1" if broken else "0",
        **(env or {}),
    }
    command = [sys.executable, "-m", "celery", "-A", app, "worker", *pool]
    command += ["-Q", queue, "-n", f"{queue}@localhost", "-l", "warning"]
    command += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    with open(directory / "worker.log", "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=worker_env, stdout=log, stderr=log)
    worker = Worker(queue, directory, process)
    try:
        if not broken:
            wait_for(
                lambda: (directory / "ready").exists() or process.poll() is not None,
                "the worker to be ready",
                timeout=30,
            )
            assert process.poll() is None, worker.output()
        yield worker
    finally:
        stop_worker(worker)


def stop_worker(worker: Worker) -> None:
    """Warm shutdown (SIGTERM), then wait for the worker to exit; kill it if it hangs."""
    process = worker.process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
            raise AssertionError("the worker ignored SIGTERM:\n" + worker.output()) from None
