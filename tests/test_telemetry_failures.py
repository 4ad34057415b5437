"""Telemetry failures never hurt the application.

A real OTLP/HTTP exporter talks to a collector that is down, slow (it sleeps three
seconds per request) or answers 500; the export queue overflows; a span processor
raises on start or on end; a structlog processor or logger factory raises. In every
case requests return their results, the lifecycle still runs (resources torn down,
teardown errors recorded, the active context restored), a request never waits for
the exporter, memory stays bounded, and the loss is logged once -- not per span.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import tracemalloc
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import structlog
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from span_faults import RaisingProcessor as Raising
from sql_backends import held_by_another_thread, in_forked_children

from polydatum import DataManager, Service, get_active_context
from polydatum import telemetry as polydatum_telemetry
from polydatum.testing import TelemetryCapture

SLOW_SECONDS = 3.0


class Echo(Service):
    def get(self, value: int) -> int:
        return value + self._ctx.conn


def conn(ctx: Any) -> Iterator[int]:
    yield 1000


def flaky(ctx: Any) -> Iterator[int]:
    yield 1
    raise ValueError("flaky teardown")


def app(tracer_provider: Any = None, meter_provider: Any = None) -> DataManager:
    dm = DataManager(tracer_provider=tracer_provider, meter_provider=meter_provider)
    dm.register_services(echo=Echo())
    dm.register_resources(conn=conn, flaky=flaky)
    return dm


class Collector:
    """A tiny OTLP/HTTP endpoint on loopback that misbehaves on purpose."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.requests = 0
        self.release = threading.Event()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                collector.requests += 1
                if collector.mode == "slow":
                    collector.release.wait(SLOW_SECONDS)
                    self.send_response(200)
                else:
                    self.send_response(500)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1/traces"


@pytest.fixture
def export_filter() -> Iterator[polydatum_telemetry.OncePerMessage]:
    """The once-per-message filter, forgetting what earlier tests logged."""
    once = polydatum_telemetry.limit_export_warnings()
    once.counts.clear()
    yield once
    once.counts.clear()


@pytest.fixture
def fresh_loss_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(polydatum_telemetry, "_reported", set())


LOSS = {
    "down": "Failed to export %s batch due to timeout, max retries or shutdown.",
    "slow": "Failed to export %s batch due to timeout, max retries or shutdown.",
    "500": "Failed to export %s batch code: %s, reason: %s",
}
QUEUE_FULL = "Queue full, dropping %s."


@pytest.mark.parametrize("mode", ["down", "slow", "500"])
def test_a_broken_collector_never_slows_or_breaks_requests(
    mode: str, export_filter: polydatum_telemetry.OncePerMessage, caplog: pytest.LogCaptureFixture
) -> None:
    collector = Collector(mode) if mode != "down" else None
    url = collector.url if collector is not None else closed_port_url()
    exporter = OTLPSpanExporter(endpoint=url, timeout=1)
    provider = TracerProvider()
    provider.add_span_processor(
        BatchSpanProcessor(
            exporter, max_queue_size=512, max_export_batch_size=64, schedule_delay_millis=20
        )
    )
    dm = app(tracer_provider=provider)
    caplog.set_level(logging.WARNING)
    try:
        for i in range(100):  # warm-up: imports, caches, the exporter's session
            with dm.dal() as dal:
                dal.echo.get(i)
        tracemalloc.start()
        baseline = tracemalloc.get_traced_memory()[0]
        worst = 0.0
        for i in range(1000):  # 4 spans each: 4,000 spans into a 512-span queue
            t0 = time.perf_counter()
            with dm.dal() as dal:
                assert dal.echo.get(i) == i + 1000
            worst = max(worst, time.perf_counter() - t0)
        peak = tracemalloc.get_traced_memory()[1] - baseline
        tracemalloc.stop()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not any(
            key[1] == LOSS[mode] for key in export_filter.counts
        ):
            time.sleep(0.05)
    finally:
        exporter.shutdown()  # in-flight retries stop; the final flush is dropped quickly
        provider.shutdown()
        if collector is not None:
            collector.stop()
    # A request never waited for the exporter (it sleeps 3 s / retries for 1 s).
    assert worst < 0.5, f"a request took {worst:.3f} s"
    # The queue is bounded, so memory is: 512 queued spans are well under 8 MB.
    assert peak < 8 * 2**20, f"peak {peak / 2**20:.1f} MiB"
    # The loss was reported, each kind of message once however often it happened.
    counts = {msg: n for (_, msg), n in export_filter.counts.items()}
    assert LOSS[mode] in counts
    logged = [
        (r.name, r.msg)
        for r in caplog.records
        if r.name.startswith("opentelemetry") and r.levelno >= logging.WARNING
    ]
    assert len(logged) == len(set(logged)), f"a loss was logged more than once: {logged}"
    assert any(msg == LOSS[mode] for _, msg in logged)
    if mode == "500":
        assert counts[LOSS["500"]] > 1  # many failed batches, one line
        assert collector is not None and collector.requests > 1


class BlockedExporter(SpanExporter):
    """An exporter stuck on a collector that never answers (until released)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.exported = 0

    def export(self, spans: Any) -> SpanExportResult:
        self.release.wait(30)
        self.exported += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.release.set()


def test_a_full_export_queue_drops_spans_not_requests(caplog: pytest.LogCaptureFixture) -> None:
    exporter = BlockedExporter()
    provider = TracerProvider()
    provider.add_span_processor(
        BatchSpanProcessor(
            exporter, max_queue_size=64, max_export_batch_size=16, schedule_delay_millis=10
        )
    )
    dm = app(tracer_provider=provider)
    caplog.set_level(logging.WARNING)
    worst = 0.0
    try:
        for i in range(1000):  # 4 spans each; the exporter holds its first batch
            t0 = time.perf_counter()
            with dm.dal() as dal:
                assert dal.echo.get(i) == i + 1000
            worst = max(worst, time.perf_counter() - t0)
    finally:
        exporter.release.set()
        provider.shutdown()
    assert worst < 0.5, f"a request took {worst:.3f} s"
    # At most the queue (64) plus the batch held by the exporter (16) survived.
    assert 0 < exporter.exported <= 64 + 16
    full = [r for r in caplog.records if r.msg == QUEUE_FULL]
    # The SDK reports it at most once per 20 s (its own DuplicateFilter), never per span.
    assert len(full) <= 1


@pytest.mark.parametrize("where", ["on_start", "on_end"])
def test_a_raising_span_processor_loses_spans_not_requests(
    where: str, fresh_loss_reports: None, caplog: pytest.LogCaptureFixture
) -> None:
    capture = TelemetryCapture()
    raising = Raising(where)
    capture.tracer_provider.add_span_processor(raising)  # after the in-memory exporter
    dm = app(capture.tracer_provider, capture.meter_provider)
    caplog.set_level(logging.WARNING, logger="polydatum.telemetry")
    root = trace.get_current_span()
    for i in range(50):
        with dm.context() as ctx:
            assert ctx.dal.echo.get(i) == i + 1000
            ctx.flaky
        assert get_active_context() is None
        assert trace.get_current_span() is root
        assert [type(e) for _, e, _ in ctx.get_resource_exit_errors()] == [ValueError]
    assert raising.calls == 50 * 6  # 6 spans per context: context, call, 2 setups, 2 teardowns
    reports = [r.getMessage() for r in caplog.records if r.name == "polydatum.telemetry"]
    action = "starting" if where == "on_start" else "ending"
    assert reports == [
        f"polydatum telemetry lost: {action} a span (a span processor's {where}?) raised "
        f"RuntimeError: processor {where} exploded; the application is unaffected and "
        f"further failures of this kind are not logged"
    ]
    errors = {
        tuple(p.attributes.items()): p.value
        for p in capture.metrics("polydatum.resource.teardown.errors")
    }
    assert errors == {(("polydatum.resource.name", "flaky"), ("error.type", "ValueError")): 50.0}
    if where == "on_end":  # the in-memory exporter ran first: the trees are complete
        assert capture.tree()[:1] == [
            (
                "polydatum.context",
                [
                    ("echo.get", [("polydatum.resource.setup conn", [])]),
                    ("polydatum.resource.setup flaky", []),
                    ("polydatum.resource.teardown flaky", []),
                    ("polydatum.resource.teardown conn", []),
                ],
            )
        ]
    capture.tracer_provider.shutdown()
    capture.meter_provider.shutdown()


@pytest.fixture
def restore_structlog() -> Iterator[None]:
    saved = structlog.get_config()
    yield
    structlog.reset_defaults()
    structlog.configure(**saved)


@pytest.mark.parametrize("broken", ["processor", "logger_factory"])
def test_a_raising_structlog_configuration_loses_logs_not_requests(
    broken: str,
    restore_structlog: None,
    fresh_loss_reports: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def exploding_processor(logger: Any, name: str, event: Any) -> Any:
        raise RuntimeError("structlog processor exploded")

    def exploding_factory(*args: Any) -> Any:
        raise RuntimeError("structlog logger factory exploded")

    if broken == "processor":
        structlog.configure(
            processors=[exploding_processor],
            wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
            cache_logger_on_first_use=False,
        )
    else:
        structlog.configure(
            processors=[structlog.processors.JSONRenderer()],
            wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
            logger_factory=exploding_factory,
            cache_logger_on_first_use=False,
        )
    capture = TelemetryCapture()  # spans and metrics only; logging is the broken part
    dm = app(capture.tracer_provider, capture.meter_provider)
    caplog.set_level(logging.WARNING, logger="polydatum.telemetry")
    for i in range(20):
        with dm.context() as ctx:
            assert ctx.dal.echo.get(i) == i + 1000
            ctx.flaky
        assert get_active_context() is None
        assert [str(e) for _, e, _ in ctx.get_resource_exit_errors()] == ["flaky teardown"]
    # an in-context error still comes out unchanged
    with pytest.raises(KeyError, match="'in the block'"):
        with dm.context() as ctx:
            ctx.flaky
            raise KeyError("in the block")
    assert get_active_context() is None
    reports = [r.getMessage() for r in caplog.records if r.name == "polydatum.telemetry"]
    what = "a structlog log call" if broken == "processor" else "a structlog logger"
    assert reports == [
        f"polydatum telemetry lost: {what} raised RuntimeError: structlog "
        f"{broken.replace('_', ' ')} exploded; the application is unaffected and "
        f"further failures of this kind are not logged"
    ]
    teardowns = [s for s in capture.spans() if s.name == "polydatum.resource.teardown flaky"]
    # the last one saw the KeyError and let it through: not an error of its own
    assert [s.status for s in teardowns] == ["ERROR"] * 20 + ["UNSET"]
    assert len(capture.spans()) == 20 * 6 + 3  # the last context made no service call
    capture.tracer_provider.shutdown()
    capture.meter_provider.shutdown()


@pytest.mark.parametrize("where", ["on_start", "on_end"])
def test_a_raising_span_processor_never_makes_ping_raise(where: str) -> None:
    capture = TelemetryCapture()
    raising = Raising(where)
    capture.tracer_provider.add_span_processor(raising)

    class Pinged:
        """A resource with a health check (``ping`` beside the generator)."""

        def __init__(self, error: Exception | None) -> None:
            self.error = error

        def __call__(self, ctx: Any) -> Iterator[None]:
            yield None

        def ping(self) -> None:
            if self.error is not None:
                raise self.error

    dm = DataManager(tracer_provider=capture.tracer_provider)
    dm.register_resources(down=Pinged(ConnectionError("database is down")), up=Pinged(None))
    results = dm.ping()
    assert {name: (r.ok, r.error) for name, r in results.items()} == {
        "down": (False, "ConnectionError: database is down"),
        "up": (True, None),
    }
    assert raising.calls == 2
    capture.tracer_provider.shutdown()


# Forking while another thread runs is the point: CPython 3.12+ warns of exactly that.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_gets_a_filter_lock_of_its_own(
    export_filter: polydatum_telemetry.OncePerMessage,
) -> None:
    """A filter lock another thread held at the fork (an exporter thread logging a
    failure) would stay held for ever in the child, whose first export warning hung."""

    def child(_: int) -> None:
        record = logging.LogRecord("opentelemetry.sdk", logging.WARNING, "", 0, "x %s", (1,), None)
        assert export_filter.filter(record) is True
        assert export_filter.filter(record) is False

    with held_by_another_thread(export_filter._lock):  # an exporter thread logging
        assert in_forked_children(1, child, timeout=20) == [""]
