"""The Celery app of the Celery integration tests, imported by the test process (the
producer) and by a real worker process (``celery -A tests._celery_app worker``).

Both processes write their finished spans as JSON lines to one file through
:class:`JsonLinesExporter`, so the test can rebuild the cross-process span tree.
The worker is configured by environment variables (see :func:`from_env`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from celery import Celery, signals
from kombu import Queue
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from polydatum import DataManager, Service
from polydatum.context import DataAccessContext
from polydatum.integrations.celery import PolydatumTask, init_celery

BROKER_URL = os.environ.get("POLYDATUM_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
BACKEND_URL = os.environ.get("POLYDATUM_TEST_REDIS_URL", "redis://127.0.0.1:6379/11")
META = ("task", "task_id", "retries", "request_id", "tenant", "break_teardown")
#: The Meta keys of a producer's context that travel with the app's messages.
PROPAGATE = ("request_id", "tenant")


class JsonLinesExporter(SpanExporter):
    """Appends each finished span as one JSON line (ids in hex) to ``path``."""

    def __init__(self, path: Path, process: str) -> None:
        self.path = path
        self.process = process

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = []
        for span in spans:
            ctx = span.get_span_context()
            assert ctx is not None
            lines.append(
                json.dumps(
                    {
                        "name": span.name,
                        "process": self.process,
                        "trace_id": format(ctx.trace_id, "032x"),
                        "span_id": format(ctx.span_id, "016x"),
                        "parent_id": format(span.parent.span_id, "016x") if span.parent else None,
                        "flags": int(ctx.trace_flags),
                        "kind": span.kind.name,
                        "status": span.status.status_code.name,
                        "attributes": {k: _json(v) for k, v in (span.attributes or {}).items()},
                        "start": span.start_time,
                    }
                )
                + "\n"
            )
        with open(self.path, "a", encoding="utf-8") as f:  # one write per batch: O_APPEND
            f.write("".join(lines))
        return SpanExportResult.SUCCESS


def _json(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


class Books(Service):
    def get(self, book_id: int) -> str:
        return str(self._ctx.shelf[book_id])


class Shelf:
    """A resource that can be told (through Meta from the producer) to fail its
    teardown; ``dispose()`` leaves a marker file so the test sees worker shutdown."""

    def __init__(self, marker: Path | None) -> None:
        self.marker = marker

    def __call__(self, ctx: DataAccessContext) -> Iterator[dict[int, str]]:
        try:
            yield {1: "Dune", 2: "Emma"}
        finally:  # fails on success and on error (a rollback that cannot reach the server)
            if ctx.meta.break_teardown:
                raise OSError("connection reset while closing")

    def dispose(self) -> None:
        if self.marker is not None:
            self.marker.write_text("disposed\n")


def build(
    queue: str, tracer_provider: Any, marker: Path | None = None, broken: bool = False
) -> tuple[Celery, DataManager, dict[str, Any]]:
    """The app, its DataManager and its tasks (by short name), routed to ``queue``."""
    dm = DataManager(tracer_provider=tracer_provider, meta_attributes=META)
    dm.register_services(books=Books())
    dm.register_resources(shelf=Shelf(marker))
    if broken:

        def meta(ctx: DataAccessContext) -> Iterator[None]:
            yield

        dm.register_resources(meta=meta)
    app = Celery("polydatum_test", broker=BROKER_URL, backend=BACKEND_URL, task_cls=PolydatumTask)
    app.conf.update(
        task_queues=[Queue(queue, auto_delete=True, durable=False)],
        task_default_queue=queue,
        result_expires=300,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_prefetch_multiplier=1,
        # Wakes the worker's event loop every second, so that it notices SIGTERM
        # (warm shutdown) within a second instead of at the next 10 s poll timeout.
        broker_heartbeat=2,
    )
    init_celery(app, dm, propagate_meta=PROPAGATE)

    @app.task(bind=True, shared=False, name="polydatum_test.lookup")
    def lookup(self: Any, book_id: int) -> dict[str, Any]:
        return {"title": self.dal.books.get(book_id), "meta": dict(self.context.meta.items())}

    @app.task(bind=True, shared=False, name="polydatum_test.flaky", max_retries=2)
    def flaky(self: Any, book_id: int) -> dict[str, Any]:
        title = self.dal.books.get(book_id)
        if self.request.retries == 0:
            raise self.retry(countdown=0)
        return {"title": title, "meta": dict(self.context.meta.items())}

    @app.task(bind=True, shared=False, name="polydatum_test.fail")
    def fail(self: Any, book_id: int) -> None:
        self.dal.books.get(book_id)
        raise ValueError(f"book {book_id} cannot be ordered")

    @app.task(bind=True, shared=False, name="polydatum_test.received")
    def received(self: Any) -> dict[str, Any]:
        """What the worker got: the trace headers of the message, and the task's Meta."""
        return {
            "traceparent": self.request.get("traceparent"),
            "polydatum_trace": self.request.get("polydatum_trace"),
            "meta": dict(self.context.meta.items()),
        }

    return app, dm, {"lookup": lookup, "flaky": flaky, "fail": fail, "received": received}


def from_env() -> Celery:
    """The worker's app (when ``POLYDATUM_CELERY_APP`` names this module):
    ``POLYDATUM_CELERY_DIR`` (spans.jsonl, ready, disposed),
    ``POLYDATUM_CELERY_QUEUE``, ``POLYDATUM_CELERY_INSTRUMENT`` (``1``: also run
    opentelemetry-instrumentation-celery), ``POLYDATUM_CELERY_BROKEN`` (``1``: an
    invalid registration)."""
    directory = Path(os.environ["POLYDATUM_CELERY_DIR"])
    provider = TracerProvider(resource=Resource.create({"service.name": "worker"}))
    provider.add_span_processor(
        SimpleSpanProcessor(JsonLinesExporter(directory / "spans.jsonl", "worker"))
    )
    if os.environ.get("POLYDATUM_CELERY_INSTRUMENT") == "1":
        from opentelemetry.instrumentation.celery import CeleryInstrumentor

        CeleryInstrumentor().instrument(tracer_provider=provider)
    worker_app, _, _ = build(
        os.environ["POLYDATUM_CELERY_QUEUE"],
        provider,
        marker=directory / "disposed",
        broken=os.environ.get("POLYDATUM_CELERY_BROKEN") == "1",
    )

    @signals.worker_ready.connect(weak=False)
    def ready(**_: Any) -> None:
        (directory / "ready").write_text("ready\n")

    return worker_app


if os.environ.get("POLYDATUM_CELERY_APP") == __name__:  # the worker's -A module
    app = from_env()
