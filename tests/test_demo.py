"""``polydatum demo``: the bookstore, its summary, and its exports (OTLP, /metrics)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import sql_tracing_lines as lines
import sqlalchemy
from sql_backends import worker_env

from polydatum.demo import DemoConfig, DemoError, run
from polydatum.demo.app import OutOfStock, create_app
from polydatum.demo.cli import to_json
from polydatum.testing import TelemetryCapture
from polydatum.waterfall import contexts, exception_path

OUTCOMES_120 = {
    "ok": 111,
    "polydatum.demo.app.BookNotFound": 5,
    "polydatum.demo.app.Unauthorized": 4,
}
STEPS_120 = [
    ("context", "context", "", 120, 0),
    ("middleware", "auth", "setup", 120, 4),
    ("middleware", "auth", "teardown", 116, 0),
    ("middleware", "sql_transaction", "setup", 120, 0),
    ("middleware", "sql_transaction", "teardown", 120, 0),
    ("middleware", "timing", "setup", 116, 0),
    ("middleware", "timing", "teardown", 116, 0),
    ("resource", "cache", "setup", 81, 0),
    ("resource", "cache", "teardown", 81, 3),
    ("resource", "db", "setup", 120, 0),
    ("resource", "db", "teardown", 120, 0),
    ("resource", "safe", "setup", 54, 0),
    ("resource", "safe", "teardown", 54, 0),
    ("service", "catalog.authors.get", "call", 8, 0),
    ("service", "catalog.books.get", "call", 81, 5),
    ("service", "catalog.books.recent", "call", 4, 0),
    ("service", "catalog.books.search", "call", 23, 0),
    ("service", "catalog.books.view", "call", 55, 5),
    ("service", "inventory.reserve", "call", 26, 0),
    ("service", "inventory.restock", "call", 2, 0),
    ("service", "orders.history", "call", 6, 0),
    ("service", "orders.place", "call", 26, 0),
]
PATH_120 = [
    "catalog.books.get raised BookNotFound: no book with id 99",
    "middleware timing saw BookNotFound and let it through",
    "middleware auth saw BookNotFound and let it through",
    "middleware sql_transaction saw BookNotFound and let it through",
    "resource cache saw BookNotFound on teardown",
    "resource db saw BookNotFound on teardown",
    "→ BookNotFound: no book with id 99 raised out of the context",
]


def check_run(url: str) -> None:
    result = run(DemoConfig(requests=120, database_url=url))
    assert result.requests == 120
    assert result.outcomes == OUTCOMES_120
    assert result.teardown_errors == {("cache", "polydatum.demo.app.CacheFlushError"): 3}
    steps = sorted((s.kind, s.name, s.phase, len(s.durations), s.errors) for s in result.steps)
    assert steps == STEPS_120
    (ctx,) = contexts(result.waterfall_spans)
    assert ctx.attributes["polydatum.meta.request_id"] == "req-000028"
    assert exception_path(ctx) == PATH_120
    # the statements are in the waterfall: CLIENT spans under the service calls
    assert result.sql_statement_spans == lines.on_line(stable=False)
    statements = {s.name.split()[0] for s in result.waterfall_spans if s.kind.name == "CLIENT"}
    assert statements == {"SELECT"}
    data = to_json(result)
    assert [(r["kind"], r["name"], r["phase"]) for r in data["latency"][:7]] == [
        ("context", "context", ""),
        ("middleware", "sql_transaction", "setup"),
        ("middleware", "auth", "setup"),
        ("middleware", "timing", "setup"),
        ("middleware", "timing", "teardown"),
        ("middleware", "auth", "teardown"),
        ("middleware", "sql_transaction", "teardown"),
    ]
    assert all(r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"] <= r["max_ms"] for r in data["latency"])
    json.dumps(data)


def test_seeded_run_on_sqlite_is_reproducible(tmp_path: Path) -> None:
    check_run(f"sqlite:///{tmp_path / 'demo.db'}")
    check_run(f"sqlite:///{tmp_path / 'demo.db'}")  # reset: the same run again


@pytest.mark.postgres
def test_postgresql_works_unchanged(postgres_url: str) -> None:
    check_run(postgres_url)


def test_out_of_stock_rolls_back_and_raises(tmp_path: Path) -> None:
    with TelemetryCapture() as cap:
        app = create_app(
            f"sqlite:///{tmp_path / 'shop.db'}",
            tracer_provider=cap.tracer_provider,
            meter_provider=cap.meter_provider,
            cache_failure_rate=0.0,
        )
        try:
            app.reset()
            with app.dm.dal({"user": "alice"}) as dal:
                assert dal.orders.place(6, 8) == {"order": 1, "title": "The Cyberiad", "left": 0}
            cap.clear()
            with pytest.raises(OutOfStock, match="only a few copies of book 6 left, 1 wanted"):
                with app.dm.dal({"user": "bob"}) as dal:
                    dal.orders.place(6, 1)
            with app.dm.dal({"user": "alice"}) as dal:
                assert dal.orders.history() == [{"order": 1, "book": 6, "quantity": 8}]
        finally:
            app.close()
        (ctx, _) = contexts(cap.finished_spans())
    assert exception_path(ctx) == [
        "inventory.reserve raised OutOfStock: only a few copies of book 6 left, 1 wanted",
        "middleware timing saw OutOfStock and let it through",
        "middleware auth saw OutOfStock and let it through",
        "middleware sql_transaction saw OutOfStock and let it through",
        "resource cache saw OutOfStock on teardown",
        "resource db saw OutOfStock on teardown",
        "→ OutOfStock: only a few copies of book 6 left, 1 wanted raised out of the context",
    ]


def test_bad_inputs_are_demo_errors(tmp_path: Path) -> None:
    with pytest.raises(DemoError, match=r"^--requests must be at least 1, not 0$"):
        run(DemoConfig(requests=0))
    with pytest.raises(DemoError, match=r"^cannot use database URL 'nosuch://x': "):
        run(DemoConfig(requests=1, database_url="nosuch://x"))
    with pytest.raises(DemoError, match=r"^--otlp-endpoint must be an http\(s\) URL"):
        run(DemoConfig(requests=1, otlp_endpoint="localhost:4318"))
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        nobody = closed.getsockname()[1]
    with pytest.raises(
        DemoError,
        match=rf"^cannot reach the OTLP endpoint http://127.0.0.1:{nobody} \(Connection refused\)",
    ):
        run(DemoConfig(requests=1, otlp_endpoint=f"http://127.0.0.1:{nobody}"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(
            DemoError, match=rf"^cannot serve /metrics on 127.0.0.1:{port}: Address already in use$"
        ):
            run(DemoConfig(requests=1, prometheus_port=port))


def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "import sys; from polydatum.cli import main; sys.exit(main())",
         "demo", *args],
        cwd=cwd, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_cli_plain_output(tmp_path: Path) -> None:
    done = cli(tmp_path, "--requests", "120", "--database-url", f"sqlite:///{tmp_path}/d.db")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "\x1b[" not in out
    lines = out.splitlines()
    assert lines[0].startswith("polydatum demo · 120 requests in ")
    assert lines[1] == "outcomes: ok 111, BookNotFound 5, Unauthorized 4"
    assert "Latency by step" in lines
    headers = lines[lines.index("Latency by step") + 1].split()
    assert headers == ["step", "phase", "count", "p50", "p95", "p99", "max", "errors"]
    assert [line.strip() for line in lines if line.strip() in (
        "Context", "Context middleware", "Resources", "Service methods"
    )] == ["Context", "Context middleware", "Resources", "Service methods"]  # fmt: skip
    assert "  ⚠ cache: polydatum.demo.app.CacheFlushError: 3" in lines
    assert "Waterfall of req-000028 (user carol)" in lines
    assert "  → BookNotFound: no book with id 99 raised out of the context" in lines
    assert done.stderr == ""


def test_cli_json_and_one_line_errors(tmp_path: Path) -> None:
    done = cli(
        tmp_path, "--requests", "30", "--json", "--database-url", f"sqlite:///{tmp_path}/j.db"
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["requests"] == 30
    assert sorted(data) == [
        "database", "elapsed_s", "latency", "metrics_url", "outcomes", "requests",
        "sql_statement_spans", "teardown_errors", "waterfall",
    ]  # fmt: skip
    bad = cli(tmp_path, "--requests", "3", "--database-url", "postgresql+psycopg://u@127.0.0.1:1/x")
    assert bad.returncode == 2
    assert bad.stderr.startswith(
        "polydatum: error: cannot reach database postgresql+psycopg://u@127.0.0.1:1/x: "
    )
    assert len(bad.stderr.splitlines()) == 1


def test_prometheus_endpoint_serves_while_running(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stop = threading.Event()
    seen: list[bytes] = []

    def progress(done: int, total: int | None) -> None:
        if done == 30 and not seen:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                seen.append(r.read())
        if done >= 40:
            stop.set()

    result = run(
        DemoConfig(
            requests=20, prometheus_port=port, rate=1000, database_url=f"sqlite:///{tmp_path}/p.db"
        ),
        progress,
        stop,
    )
    assert result.metrics_url == f"http://127.0.0.1:{port}/metrics"
    assert result.requests == 40  # kept going past --requests until stopped
    assert b"\npolydatum_context_duration_seconds_count{" in seen[0]
    with pytest.raises(OSError):  # the server is gone
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


class OtlpReceiver(BaseHTTPRequestHandler):
    received: list[tuple[str, bytes]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.received.append((self.path, body))  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        return None


@pytest.fixture
def otlp_server() -> Iterator[Any]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), OtlpReceiver)
    server.received = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_otlp_export(otlp_server: Any, tmp_path: Path) -> None:
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
        ExportMetricsServiceRequest,
    )
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    endpoint = f"http://127.0.0.1:{otlp_server.server_address[1]}"
    run(DemoConfig(requests=25, otlp_endpoint=endpoint, database_url=f"sqlite:///{tmp_path}/o.db"))
    paths = {path for path, _ in otlp_server.received}
    assert paths == {"/v1/traces", "/v1/metrics"}
    span_names: set[str] = set()
    services: set[str] = set()
    metric_names: set[str] = set()
    for path, body in otlp_server.received:
        if path == "/v1/traces":
            traces = ExportTraceServiceRequest.FromString(body)
            for rs in traces.resource_spans:
                services |= {a.value.string_value for a in rs.resource.attributes
                             if a.key == "service.name"}  # fmt: skip
                span_names |= {s.name for ss in rs.scope_spans for s in ss.spans}
        else:
            metrics = ExportMetricsServiceRequest.FromString(body)
            metric_names |= {
                m.name for rm in metrics.resource_metrics for sm in rm.scope_metrics
                for m in sm.metrics
            }  # fmt: skip
    assert services == {"polydatum-demo"}
    assert {"polydatum.context", "polydatum.middleware.setup auth", "orders.place"} <= span_names
    assert metric_names == {
        "db.client.connections.usage",  # contrib's, from the demo's traced engines
        "polydatum.context.active",
        "polydatum.context.duration",
        "polydatum.middleware.duration",
        "polydatum.resource.duration",
        "polydatum.resource.teardown.errors",
        "polydatum.service.duration",
    }


# ------------------------------------------------- whether SQL statements are spans


def waterfall_names(node: dict[str, Any]) -> list[str]:
    return [node["name"], *(n for c in node.get("children", ()) for n in waterfall_names(c))]


def demo_json(tmp_path: Path, *, prelude: str = "", wrapper: bool = False, **env: str) -> Any:
    """``polydatum demo --json`` in a fresh interpreter (contrib reads its opt-in once per
    process), optionally under ``opentelemetry-instrument``, after ``prelude``."""
    command = [
        sys.executable, "-c",
        f"{prelude}\nimport sys; from polydatum.cli import main; sys.exit(main())",
        "demo", "--requests", "30", "--json", "--database-url", f"sqlite:///{tmp_path}/s.db",
    ]  # fmt: skip
    if wrapper:
        command.insert(0, str(Path(sys.executable).parent / "opentelemetry-instrument"))
    environment = {**os.environ, **worker_env()}
    for name in ("OTEL_SEMCONV_STABILITY_OPT_IN", "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS"):
        environment.pop(name, None)
    environment.update(env)
    done = subprocess.run(
        command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def statement_names(data: Any) -> set[str]:
    return {n.split()[0] for n in waterfall_names(data["waterfall"]) if n.split()[0].isupper()}


@pytest.mark.parametrize("stable", [False, True], ids=["old-names", "stable-names"])
def test_the_demo_says_which_attribute_names_its_statement_spans_carry(
    tmp_path: Path, stable: bool
) -> None:
    env = {"OTEL_SEMCONV_STABILITY_OPT_IN": "database,http"} if stable else {}
    data = demo_json(tmp_path, **env)
    assert data["sql_statement_spans"] == lines.on_line(stable=stable)
    assert statement_names(data) == {"SELECT"}  # the seeded run's chosen request


def test_under_opentelemetry_instrument_the_demo_keeps_its_statement_spans(
    tmp_path: Path,
) -> None:
    """``opentelemetry-instrument`` skips contrib's instrumentor for a SQLAlchemy outside
    the range contrib declares (2.1): the demo traces its engines itself and says so."""
    if not lines.OUTSIDE_CONTRIB:
        pytest.skip(f"{lines.INSTALLED} is within the range contrib declares")
    data = demo_json(tmp_path, wrapper=True)
    assert data["sql_statement_spans"] == lines.on_line(stable=False)
    assert statement_names(data) == {"SELECT"}  # the seeded run's chosen request


def test_when_contrib_traces_the_engines_the_demo_says_where_the_spans_go(
    tmp_path: Path,
) -> None:
    """With a SQLAlchemy in contrib's range, ``opentelemetry-instrument`` instruments
    SQLAlchemy before the demo makes its engines (here: the application does, as the
    wrapper would): their statements go to contrib's provider, never twice, and the
    demo says they are not in its summary."""
    prelude = (
        "from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor\n"
        "SQLAlchemyInstrumentor().instrument(skip_dep_check=True)"
    )
    data = demo_json(tmp_path, prelude=prelude)
    from polydatum.demo.runner import ELSEWHERE

    assert data["sql_statement_spans"] == lines.on_line(stable=False, reason=lines.ALREADY) + (
        ELSEWHERE
    )
    assert statement_names(data) == set()


def test_the_demo_says_when_statement_spans_are_off_and_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path}/off.db"
    monkeypatch.setenv("OTEL_PYTHON_DISABLED_INSTRUMENTATIONS", "sqlalchemy")
    result = run(DemoConfig(requests=10, database_url=url))
    assert result.sql_statement_spans == lines.DISABLED
    monkeypatch.delenv("OTEL_PYTHON_DISABLED_INSTRUMENTATIONS")
    with monkeypatch.context() as missing:  # the sql-tracing extra is not installed
        missing.setitem(sys.modules, "opentelemetry.instrumentation.sqlalchemy", None)
        result = run(DemoConfig(requests=10, database_url=url))
    assert result.sql_statement_spans == lines.NOT_INSTALLED
    assert not [s for s in result.waterfall_spans if s.kind.name == "CLIENT"]
    if lines.OUTSIDE_CONTRIB:  # a SQLAlchemy beyond what polydatum tested, too
        from polydatum import sql_engine

        tested = f"<{sqlalchemy.__version__}"
        monkeypatch.setattr(sql_engine, "STATEMENT_TRACING_TESTED", tested)
        result = run(DemoConfig(requests=10, database_url=url))
        assert result.sql_statement_spans == lines.conflict_line(tested)
    done = cli(tmp_path, "--requests", "5", "--width", "500", "--database-url", url)
    assert lines.on_line(stable=False) in done.stdout.splitlines()


def test_the_demo_refuses_to_run_when_the_environment_turns_polydatum_off(
    tmp_path: Path,
) -> None:
    env = {**os.environ, "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "polydatum"}
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from polydatum.cli import main; sys.exit(main())",
         "demo", "--requests", "3", "--database-url", f"sqlite:///{tmp_path}/x.db"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert (done.returncode, done.stdout, done.stderr) == (
        2,
        "",
        "polydatum: error: polydatum's telemetry is disabled "
        "(OTEL_PYTHON_DISABLED_INSTRUMENTATIONS contains 'polydatum'): the demo has nothing "
        "to show\n",
    )
