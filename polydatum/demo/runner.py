"""Run the demo bookstore: traffic, telemetry wiring, and the summary it prints.

:func:`run` drives ``requests`` request contexts (a seeded mix of browsing, searching,
ordering, order history and a few anonymous requests) through the bookstore with an
OpenTelemetry SDK of its own: a span processor that keeps per-step durations
(for exact percentiles) and the spans of the most instructive request (for its
waterfall); optionally OTLP export and a Prometheus ``/metrics`` endpoint, in which
case traffic continues (at ``rate`` requests per second) until interrupted or
``duration`` seconds have passed.
"""

from __future__ import annotations

import math
import random
import socket
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

from polydatum.demo.app import BOOKS, Bookstore, create_app

__all__ = ["DemoConfig", "DemoError", "DemoResult", "StepStats", "percentile", "run"]

USERS = ("alice", "bob", "carol", "dave", "erin")


class DemoError(Exception):
    """A problem the user can fix (bad URL, port in use): reported as one line."""


@dataclass
class DemoConfig:
    requests: int = 500
    database_url: str | None = None
    otlp_endpoint: str | None = None
    prometheus_port: int | None = None
    prometheus_host: str = "127.0.0.1"
    duration: float | None = None
    rate: float = 50.0
    seed: int = 7
    cache_failure_rate: float = 0.05
    service_name: str = "polydatum-demo"


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of an already sorted list."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass
class StepStats:
    """Durations (ms) and failures of one step: a middleware/resource phase or a method."""

    kind: str
    name: str
    phase: str
    order: int
    durations: list[float] = field(default_factory=list)
    errors: int = 0

    def summary(self) -> dict[str, Any]:
        values = sorted(self.durations)
        return {
            "kind": self.kind,
            "name": self.name,
            "phase": self.phase,
            "count": len(values),
            "p50_ms": round(percentile(values, 50), 4),
            "p95_ms": round(percentile(values, 95), 4),
            "p99_ms": round(percentile(values, 99), 4),
            "max_ms": round(values[-1], 4) if values else math.nan,
            "errors": self.errors,
        }


def _score(spans: list[ReadableSpan]) -> tuple[int, int]:
    """How instructive a request's waterfall is: an exception path, teardown errors, size."""
    score = 0
    for s in spans:
        attrs = s.attributes or {}
        if attrs.get("polydatum.outcome") == "raised" and s.name.startswith("polydatum.resource"):
            score += 4
        if s.name == "polydatum.context" and "error.type" in attrs:
            score += 5
    return score, len(spans)


class DemoCollector(SpanProcessor):
    """Keeps step durations for the latency table and the best request's spans."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.steps: dict[tuple[str, str, str], StepStats] = {}
        self.outcomes: Counter[str] = Counter()
        self.teardown_errors: Counter[tuple[str, str]] = Counter()
        self.pending: dict[int, list[ReadableSpan]] = defaultdict(list)
        self.best: list[ReadableSpan] = []
        self.best_score: tuple[int, int] = (-1, 0)
        self._order = 0

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        return None

    def _stats(self, kind: str, name: str, phase: str) -> StepStats:
        key = (kind, name, phase)
        stats = self.steps.get(key)
        if stats is None:
            self._order += 1
            stats = self.steps[key] = StepStats(kind, name, phase, self._order)
        return stats

    def on_end(self, span: ReadableSpan) -> None:
        attrs = span.attributes or {}
        ms = ((span.end_time or 0) - (span.start_time or 0)) / 1e6
        failed = span.status.status_code.name == "ERROR"
        name = span.name
        with self.lock:
            if name == "polydatum.context":
                self._stats("context", "context", "").durations.append(ms)
                self.outcomes[str(attrs.get("error.type", "ok"))] += 1
            elif name.startswith(("polydatum.middleware.", "polydatum.resource.")):
                kind = "middleware" if name.startswith("polydatum.middleware.") else "resource"
                phase = name.split(" ", 1)[0].rsplit(".", 1)[1]
                step = str(attrs.get(f"polydatum.{kind}.name", name))
                stats = self._stats(kind, step, phase)
                stats.durations.append(ms)
                stats.errors += failed
                if kind == "resource" and attrs.get("polydatum.outcome") == "raised":
                    self.teardown_errors[(step, str(attrs.get("error.type")))] += 1
            elif "polydatum.service.path" in attrs:
                stats = self._stats("service", str(attrs["polydatum.service.path"]), "call")
                stats.durations.append(ms)
                stats.errors += failed
            if span.context is None:
                return
            trace_id = span.context.trace_id
            if len(self.pending) > 1000:  # spans of traces that never had a context
                self.pending.clear()
            self.pending[trace_id].append(span)
            if name == "polydatum.context" and span.parent is None:
                spans = self.pending.pop(trace_id)
                score = _score(spans)
                if score > self.best_score:
                    self.best, self.best_score = spans, score

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


@dataclass
class DemoResult:
    """What a demo run measured."""

    requests: int
    elapsed_s: float
    database: str
    steps: list[StepStats]
    outcomes: dict[str, int]
    teardown_errors: dict[tuple[str, str], int]
    waterfall_spans: list[ReadableSpan]
    metrics_url: str | None = None
    interrupted: bool = False
    #: Whether SQL statements are spans in this run, and why not (one line).
    sql_statement_spans: str = ""


def traffic(seed: int) -> Iterator[tuple[dict[str, Any], str, tuple[Any, ...]]]:
    """An endless, seeded mix of requests: ``(meta, DAL path, args)``."""
    rng = random.Random(seed)
    book_ids = [b[0] for b in BOOKS]
    terms = ("the", "of", "parable", "games", "solar", "kind")
    number = 0
    while True:
        number += 1
        user: str | None = rng.choice(USERS)
        roll = rng.random()
        path: str
        args: tuple[Any, ...]
        if roll < 0.03:  # anonymous: refused by the auth middleware
            user = None
            path, args = "catalog.books.view", (rng.choice(book_ids),)
        elif roll < 0.45:
            path, args = "catalog.books.view", (rng.choice(book_ids),)
        elif roll < 0.48:  # a book that does not exist
            path, args = "catalog.books.view", (99,)
        elif roll < 0.65:
            path, args = "catalog.books.search", (rng.choice(terms),)
        elif roll < 0.88:  # some run out of stock
            path, args = "orders.place", (rng.choice(book_ids), rng.choice((1, 1, 1, 2, 3)))
        elif roll < 0.9:
            path, args = "inventory.restock", (rng.choice(book_ids), 40)
        elif roll < 0.95:
            path, args = "catalog.books.recent", ()
        else:
            path, args = "orders.history", ()
        meta = {"request_id": f"req-{number:06d}"}
        if user is not None:
            meta["user"] = user
        yield meta, path, args


def quiet_logging(*, only_if_unconfigured: bool = False) -> None:
    """No warning-with-traceback per suppressed teardown error: the summary reports them."""
    import logging
    import sys

    import structlog

    if only_if_unconfigured and structlog.is_configured():
        return
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


def _describe_url(app: Bookstore) -> str:
    return app.backend.url


#: Added to the statement-span line when contrib traced the demo's engines for the
#: providers it was given (``opentelemetry-instrument``): not the demo's own.
ELSEWHERE = "; they go there, not into this summary"


def sql_statement_spans(app: Bookstore, tracer_provider: Any, meter_provider: Any) -> str:
    """Trace the demo's SQL statements (CLIENT spans under the service calls), for the
    demo's own providers; one line saying whether that happened, and if not why (no
    ``sql-tracing`` extra, a version conflict, the environment turned it off, or
    contrib already traces the engines for other providers)."""
    from polydatum.sql import trace_sql_statements

    engines = [app.db.engine]
    if app.backend.safe is not None:
        engines.append(app.backend.safe.engine)
    tracing = [
        trace_sql_statements(e, tracer_provider=tracer_provider, meter_provider=meter_provider)
        for e in engines
    ]
    line = tracing[0].describe()
    if tracing[0].enabled and not tracing[0].traced_here:
        line += ELSEWHERE
    return line


def _open_app(config: DemoConfig, tracer_provider: Any, meter_provider: Any) -> Bookstore:
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    try:
        app = create_app(
            config.database_url,
            seed=config.seed,
            cache_failure_rate=config.cache_failure_rate,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
        )
    except (ArgumentError, ValueError, ImportError) as error:
        raise DemoError(f"cannot use database URL {config.database_url!r}: {error}") from None
    try:
        app.reset()
    except SQLAlchemyError as error:
        url = _describe_url(app)
        app.close()
        reason = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
        raise DemoError(f"cannot reach database {url}: {reason}") from None
    return app


def _serve_metrics(config: DemoConfig, reader_cls: Any) -> tuple[Any, str, Callable[[], None]]:
    from prometheus_client import start_http_server

    port = config.prometheus_port
    assert port is not None
    if not 0 < port < 65536:
        raise DemoError(f"--prometheus-port must be between 1 and 65535, not {port}")
    try:
        server, thread = start_http_server(port, addr=config.prometheus_host)
    except OSError as error:
        raise DemoError(
            f"cannot serve /metrics on {config.prometheus_host}:{port}: {error.strerror or error}"
        ) from None

    # Created once the port is ours: the reader registers itself with prometheus_client.
    reader = reader_cls()

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return reader, f"http://{config.prometheus_host}:{port}/metrics", stop


def run(
    config: DemoConfig,
    progress: Callable[[int, int | None], None] | None = None,
    stop_event: threading.Event | None = None,
    announce: Callable[[str], None] | None = None,
) -> DemoResult:
    """Run the demo. ``progress(done, total)`` is called after each request.

    Without a Prometheus port, exactly ``config.requests`` requests run as fast as
    possible. With one, traffic continues at ``config.rate`` requests per second after
    those, until ``stop_event`` is set, ``config.duration`` seconds have passed or
    the process is interrupted (Ctrl-C).
    """
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    from polydatum import telemetry

    if telemetry.disabled_by_environment():  # the demo's own providers: only this stops it
        raise DemoError(
            "polydatum's telemetry is disabled (OTEL_PYTHON_DISABLED_INSTRUMENTATIONS "
            "contains 'polydatum'): the demo has nothing to show"
        )
    if config.requests < 1:
        raise DemoError(f"--requests must be at least 1, not {config.requests}")
    quiet_logging(only_if_unconfigured=True)

    cleanups: list[Callable[[], None]] = []
    collector = DemoCollector()
    resource = Resource.create({"service.name": config.service_name})
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(collector)
    readers: list[Any] = []
    metrics_url = None
    try:
        if config.prometheus_port is not None:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader

            reader, metrics_url, stop_server = _serve_metrics(config, PrometheusMetricReader)
            readers.append(reader)
            cleanups.append(stop_server)
            if announce is not None:
                announce(metrics_url)
        if config.otlp_endpoint:
            _add_otlp(config.otlp_endpoint, tracer_provider, readers)
        meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        cleanups.append(lambda: meter_provider.shutdown())
        cleanups.append(lambda: tracer_provider.shutdown())
        app = _open_app(config, tracer_provider, meter_provider)
        cleanups.append(app.close)
        statements = sql_statement_spans(app, tracer_provider, meter_provider)
        result = _drive(config, app, collector, progress, stop_event, metrics_url)
        result.sql_statement_spans = statements
        return result
    finally:
        for cleanup in reversed(cleanups):
            cleanup()


def _add_otlp(endpoint: str, tracer_provider: Any, readers: list[Any]) -> None:
    from urllib.parse import urlparse

    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    parsed = urlparse(endpoint)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise DemoError(
            f"--otlp-endpoint must be an http(s) URL such as http://localhost:4318, "
            f"not {endpoint!r}"
        )
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname or "localhost", port), timeout=3).close()
    except OSError as error:
        raise DemoError(
            f"cannot reach the OTLP endpoint {endpoint} ({error.strerror or error}): start "
            "the collector (docker compose -f instrumentation/docker-compose.yml up -d) "
            "or leave out --otlp-endpoint"
        ) from None
    from polydatum.telemetry import limit_export_warnings

    limit_export_warnings()  # a collector that goes away mid-run: one line, not one per batch
    base = endpoint.rstrip("/")
    tracer_provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{base}/v1/traces"))
    )
    readers.append(
        PeriodicExportingMetricReader(
            OTLPMetricExporter(endpoint=f"{base}/v1/metrics"), export_interval_millis=5000
        )
    )


def _drive(
    config: DemoConfig,
    app: Bookstore,
    collector: DemoCollector,
    progress: Callable[[int, int | None], None] | None,
    stop_event: threading.Event | None,
    metrics_url: str | None,
) -> DemoResult:
    from polydatum.errors import PolydatumException

    keep_running = metrics_url is not None
    total = None if keep_running else config.requests
    started = time.perf_counter()
    done = 0
    failing = 0
    interrupted = False
    try:
        for meta, path, args in traffic(config.seed):
            if done >= config.requests:
                if not keep_running:
                    break
                if stop_event is not None and stop_event.is_set():
                    break
                elapsed = time.perf_counter() - started
                if config.duration is not None and elapsed >= config.duration:
                    break
                time.sleep(1 / config.rate if config.rate > 0 else 0)
            try:
                with app.dm.dal(meta) as dal:
                    dal[path](*args)
                failing = 0
            except PolydatumException:
                failing = 0  # expected outcomes (out of stock, not found, unauthorized)
            except Exception as error:
                # Recorded on the context span like any failure; but a database that
                # went away makes every request fail: stop and say so.
                failing += 1
                if failing >= 20:
                    raise DemoError(
                        f"{failing} requests in a row failed, the last with "
                        f"{type(error).__name__}: {str(error).splitlines()[0]}"
                    ) from None
            done += 1
            if progress is not None:
                progress(done, total)
    except KeyboardInterrupt:
        interrupted = True
    elapsed = time.perf_counter() - started
    with collector.lock:
        steps = sorted(collector.steps.values(), key=lambda s: s.order)
        return DemoResult(
            requests=done,
            elapsed_s=elapsed,
            database=_describe_url(app),
            steps=[
                StepStats(s.kind, s.name, s.phase, s.order, list(s.durations), s.errors)
                for s in steps
            ],
            outcomes=dict(collector.outcomes),
            teardown_errors=dict(collector.teardown_errors),
            waterfall_spans=list(collector.best),
            metrics_url=metrics_url,
            interrupted=interrupted,
        )
