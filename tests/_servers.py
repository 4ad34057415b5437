"""Real servers on a loopback port, run in a thread and always stopped: uvicorn (ASGI)
and werkzeug (WSGI). Shared by the integration tests."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


def _loopback_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextmanager
def uvicorn_server(app: Any, *, expect_start: bool = True) -> Iterator[Any]:
    """Serve ``app`` with uvicorn on a free loopback port; yields the ``uvicorn.Server``
    with ``.url`` set. Stops it (lifespan shutdown included) when the block ends."""
    import uvicorn

    sock = _loopback_socket()
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, lifespan="on", log_config=None, log_level="warning", ws="websockets-sansio"
    )
    server = uvicorn.Server(config)
    server.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    server.exit_code = None  # type: ignore[attr-defined]

    def run() -> None:
        try:
            server.run(sockets=[sock])
        except SystemExit as exit:  # uvicorn exits with 3 when the app refuses to start
            server.exit_code = exit.code  # type: ignore[attr-defined]

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if expect_start:
            assert server.started, "uvicorn did not start within 10 s"
        yield server
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not stop within 10 s"


@contextmanager
def wsgi_server(app: Callable[..., Any]) -> Iterator[str]:
    """Serve a WSGI ``app`` with werkzeug's threaded server on a free port; yields its URL."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
        assert not thread.is_alive(), "the WSGI server did not stop within 10 s"


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll ``predicate`` until true; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
