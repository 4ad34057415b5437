"""Celery integration against the real RabbitMQ broker and Redis result backend, with a
real worker process. Producer (this process) and worker write spans to one JSON-lines
file; the tests rebuild the cross-process span tree from it."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from sqlalchemy import bindparam, create_engine, text

from polydatum import DataManager
from polydatum.errors import CommitError
from polydatum.testing import TelemetryCapture
from tests import _celery_async_app as async_app
from tests._celery_app import JsonLinesExporter, build
from tests._celery_worker import Worker, celery_worker, stop_worker
from tests._servers import wait_for
from tests.conftest import POSTGRES_URL, require_service
from tests.sql_backends import postgres_schema_url


@pytest.fixture(scope="module")
def instrumented_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """A worker running opentelemetry-instrumentation-celery (the production setup)."""
    with celery_worker(tmp_path_factory.mktemp("celery-otel"), instrument=True) as worker:
        yield worker
    # Warm shutdown ran worker_shutdown: resources were disposed.
    assert (worker.directory / "disposed").read_text() == "disposed\n", worker.output()
    assert worker.process.returncode == 0, worker.output()


class Producer(NamedTuple):
    cap: TelemetryCapture
    tasks: dict[str, Any]
    dm: Any
    spans: Path
    app: Any


@contextmanager
def producer(
    worker: Worker, instrument: bool, build: Callable[..., Any] = build, **options: Any
) -> Iterator[Producer]:
    """This process as the producer: same app (``build(queue, tracer_provider,
    **options)``), spans to the worker's span file."""
    with TelemetryCapture() as cap:
        spans = worker.directory / "spans.jsonl"
        cap.tracer_provider.add_span_processor(
            SimpleSpanProcessor(JsonLinesExporter(spans, "producer"))
        )
        app, dm, tasks = build(worker.queue, cap.tracer_provider, **options)
        instrumentor = None
        if instrument:
            from opentelemetry.instrumentation.celery import CeleryInstrumentor

            instrumentor = CeleryInstrumentor()
            instrumentor.instrument(tracer_provider=cap.tracer_provider)
        try:
            yield Producer(cap, tasks, dm, spans, app)
        finally:
            if instrumentor is not None:
                instrumentor.uninstrument()
            app.close()


def read_spans(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def trace_tree(path: Path, trace_id: str) -> list[tuple[str, list[Any]]]:
    """The span forest of one trace (both processes), children in start order."""
    spans = sorted(
        (s for s in read_spans(path) if s["trace_id"] == trace_id), key=lambda s: s["start"]
    )
    ids = {s["span_id"] for s in spans}
    children: dict[str | None, list[dict[str, Any]]] = {}
    for s in spans:
        children.setdefault(s["parent_id"] if s["parent_id"] in ids else None, []).append(s)

    def build_level(parent: str | None) -> list[tuple[str, list[Any]]]:
        return [(s["name"], build_level(s["span_id"])) for s in children.get(parent, [])]

    return build_level(None)


def spans_named(path: Path, trace_id: str, name: str) -> list[dict[str, Any]]:
    return [s for s in read_spans(path) if s["trace_id"] == trace_id and s["name"] == name]


def enqueue(p: Producer, task: str, *args: Any, dm: Any = None, **options: Any) -> tuple[Any, str]:
    """Publish ``task`` from inside a test span and a producer-side polydatum context
    (of ``dm``, by default the app's own DataManager)."""
    tracer = p.cap.tracer_provider.get_tracer("test")
    with tracer.start_as_current_span("enqueue") as span:
        with (p.dm if dm is None else dm).context({"request_id": "req-77"}):
            result = p.tasks[task].apply_async(args, **options)
    return result, format(span.get_span_context().trace_id, "032x")


def wait_spans(p: Producer, trace_id: str, name: str, count: int) -> None:
    wait_for(
        lambda: len(spans_named(p.spans, trace_id, name)) >= count,
        f"{count} span(s) {name!r} in the span file",
    )


def worker_context(spans: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [s for s in spans if s["process"] == "worker"]


def test_task_context_continues_the_producer_trace(instrumented_worker: Worker) -> None:
    with producer(instrumented_worker, instrument=True) as p:
        result, trace_id = enqueue(p, "lookup", 2)
        value = result.get(timeout=20)
        wait_spans(p, trace_id, "run/polydatum_test.lookup", 1)
    assert value == {
        "title": "Emma",
        "meta": {
            "task": "polydatum_test.lookup",
            "task_id": result.id,
            "retries": 0,
            "request_id": "req-77",  # from the producer's context, via the message header
        },
    }
    assert trace_tree(p.spans, trace_id) == [
        (
            "enqueue",
            [
                (
                    "polydatum.context",
                    [
                        (
                            "apply_async/polydatum_test.lookup",
                            [
                                (
                                    "run/polydatum_test.lookup",
                                    [
                                        (
                                            "polydatum.context",
                                            [
                                                (
                                                    "books.get",
                                                    [("polydatum.resource.setup shelf", [])],
                                                ),
                                                ("polydatum.resource.teardown shelf", []),
                                            ],
                                        )
                                    ],
                                )
                            ],
                        )
                    ],
                )
            ],
        )
    ]
    (context,) = worker_context(spans_named(p.spans, trace_id, "polydatum.context"))
    assert (context["status"], context["kind"]) == ("UNSET", "INTERNAL")
    assert {k: v for k, v in context["attributes"].items() if k != "polydatum.context.id"} == {
        "polydatum.meta.task": "polydatum_test.lookup",
        "polydatum.meta.task_id": result.id,
        "polydatum.meta.retries": 0,
        "polydatum.meta.request_id": "req-77",
    }


def _context_summary(spans: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [
        (
            s["attributes"]["polydatum.meta.retries"],
            s["status"],
            s["attributes"].get("error.type"),
            s["attributes"].get("polydatum.teardown_errors"),
        )
        for s in sorted(worker_context(spans), key=lambda s: s["start"])
    ]


def test_retry_runs_in_a_new_context_nested_in_the_trace(instrumented_worker: Worker) -> None:
    with producer(instrumented_worker, instrument=True) as p:
        result, trace_id = enqueue(p, "flaky", 1)
        value = result.get(timeout=20)
        wait_spans(p, trace_id, "run/polydatum_test.flaky", 2)
    assert value["meta"] == {
        "task": "polydatum_test.flaky",
        "task_id": result.id,
        "retries": 1,
        "request_id": "req-77",  # carried again by the retry message
    }
    attempt: list[tuple[str, list[Any]]] = [("books.get", [("polydatum.resource.setup shelf", [])])]
    assert trace_tree(p.spans, trace_id) == [
        (
            "enqueue",
            [
                (
                    "polydatum.context",
                    [
                        (
                            "apply_async/polydatum_test.flaky",
                            [
                                (
                                    "run/polydatum_test.flaky",
                                    [
                                        (
                                            "polydatum.context",
                                            [
                                                *attempt,
                                                (
                                                    "apply_async/polydatum_test.flaky",
                                                    [
                                                        (
                                                            "run/polydatum_test.flaky",
                                                            [
                                                                (
                                                                    "polydatum.context",
                                                                    [
                                                                        *attempt,
                                                                        (
                                                                            "polydatum.resource"
                                                                            ".teardown shelf",
                                                                            [],
                                                                        ),
                                                                    ],
                                                                )
                                                            ],
                                                        )
                                                    ],
                                                ),
                                                ("polydatum.resource.teardown shelf", []),
                                            ],
                                        )
                                    ],
                                )
                            ],
                        )
                    ],
                )
            ],
        )
    ]
    contexts = spans_named(p.spans, trace_id, "polydatum.context")
    assert _context_summary(contexts) == [
        (0, "ERROR", "celery.exceptions.Retry", None),
        (1, "UNSET", None, None),
    ]


def test_failure_and_teardown_errors(instrumented_worker: Worker) -> None:
    """A task that raises (rolled back, FAILURE with its own error); a task whose
    resource fails to tear down (SUCCESS, recorded); a task raising *and* failing
    teardown (FAILURE with the task's error, the teardown error recorded)."""
    broken = {"headers": {"polydatum_meta": {"break_teardown": True}}}
    with producer(instrumented_worker, instrument=True) as p:
        failed, failed_trace = enqueue(p, "fail", 1)
        teardown, teardown_trace = enqueue(p, "lookup", 1, **broken)
        both, both_trace = enqueue(p, "fail", 2, **broken)
        with pytest.raises(ValueError, match=r"^book 1 cannot be ordered$"):
            failed.get(timeout=20)
        assert teardown.get(timeout=20)["meta"]["break_teardown"] is True
        with pytest.raises(ValueError, match=r"^book 2 cannot be ordered$"):
            both.get(timeout=20)
        for trace_id, name in (
            (failed_trace, "run/polydatum_test.fail"),
            (teardown_trace, "run/polydatum_test.lookup"),
            (both_trace, "run/polydatum_test.fail"),
        ):
            wait_spans(p, trace_id, name, 1)
    assert (failed.state, teardown.state, both.state) == ("FAILURE", "SUCCESS", "FAILURE")
    summaries = [
        _context_summary(spans_named(p.spans, t, "polydatum.context"))
        for t in (failed_trace, teardown_trace, both_trace)
    ]
    assert summaries == [
        [(0, "ERROR", "ValueError", None)],
        [(0, "UNSET", None, 1)],
        [(0, "ERROR", "ValueError", 1)],
    ]
    teardowns = [
        [
            (s["status"], s["attributes"].get("error.type"))
            for s in spans_named(p.spans, t, "polydatum.resource.teardown shelf")
        ]
        for t in (failed_trace, teardown_trace, both_trace)
    ]
    assert teardowns == [[("UNSET", None)], [("ERROR", "OSError")], [("ERROR", "OSError")]]
    task_run = [
        spans_named(p.spans, t, name)[0]["status"]
        for t, name in (
            (failed_trace, "run/polydatum_test.fail"),
            (teardown_trace, "run/polydatum_test.lookup"),
        )
    ]
    assert task_run == ["ERROR", "UNSET"]


def test_without_celery_instrumentation_polydatum_carries_the_trace(
    tmp_path: Path,
) -> None:
    """No opentelemetry-instrumentation-celery anywhere: the trace context polydatum
    puts in the standard message headers makes the task's context join the producer's
    trace, as a child of the producer's current span."""
    with celery_worker(tmp_path, instrument=False) as worker:
        with producer(worker, instrument=False) as p:
            result, trace_id = enqueue(p, "lookup", 1)
            assert result.get(timeout=20)["title"] == "Dune"
            wait_for(
                lambda: len(spans_named(p.spans, trace_id, "polydatum.context")) == 2,
                "the worker's context span",
            )
    assert trace_tree(p.spans, trace_id) == [
        (
            "enqueue",
            [
                (
                    "polydatum.context",
                    [
                        (
                            "polydatum.context",
                            [
                                ("books.get", [("polydatum.resource.setup shelf", [])]),
                                ("polydatum.resource.teardown shelf", []),
                            ],
                        )
                    ],
                )
            ],
        )
    ]
    contexts = spans_named(p.spans, trace_id, "polydatum.context")
    # In start order: the file is in end order, and the worker may finish first.
    assert [s["process"] for s in sorted(contexts, key=lambda s: s["start"])] == [
        "producer",
        "worker",
    ]
    assert worker.process.returncode == 0
    assert (tmp_path / "disposed").read_text() == "disposed\n"


def test_worker_refuses_to_start_with_an_invalid_data_manager(tmp_path: Path) -> None:
    with celery_worker(tmp_path, instrument=False, broken=True) as worker:
        returncode = worker.process.wait(30)
    output = worker.output()
    assert returncode == 1, output
    assert (
        "polydatum: the worker cannot start: 1 problem(s) in the DataManager registration:\n"
        "  - resource 'meta' collides with DataAccessContext.meta" in output
    ), output
    assert not (tmp_path / "ready").exists()


# ------------------------------------------------- trace context in the message headers


@pytest.fixture(scope="module")
def plain_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """A worker without opentelemetry-instrumentation-celery."""
    with celery_worker(tmp_path_factory.mktemp("celery-plain"), instrument=False) as worker:
        yield worker
    assert worker.process.returncode == 0, worker.output()


def one_span(p: Producer, trace_id: str, name: str, process: str) -> dict[str, Any]:
    (span,) = [s for s in spans_named(p.spans, trace_id, name) if s["process"] == process]
    return span


def strays(p: Producer, trace_id: str, task_id: str) -> list[tuple[str, str]]:
    """Spans about the task ``task_id`` (an attribute names it) outside its trace."""
    return [
        (s["name"], s["trace_id"])
        for s in read_spans(p.spans)
        if task_id in s["attributes"].values() and s["trace_id"] != trace_id
    ]


def test_the_trace_context_travels_in_the_standard_headers(plain_worker: Worker) -> None:
    """The worker's request carries ``traceparent`` (the producer's current span: its
    polydatum context), no private header; the worker's context is that span's child."""
    with producer(plain_worker, instrument=False) as p:
        result, trace_id = enqueue(p, "received")
        value = result.get(timeout=20)
        wait_for(
            lambda: len(spans_named(p.spans, trace_id, "polydatum.context")) == 2,
            "the worker's context span",
        )
    produced = one_span(p, trace_id, "polydatum.context", "producer")
    consumed = one_span(p, trace_id, "polydatum.context", "worker")
    assert value == {
        "traceparent": f"00-{trace_id}-{produced['span_id']}-{produced['flags']:02x}",
        "polydatum_trace": None,
        "meta": {
            "task": "polydatum_test.received",
            "task_id": result.id,
            "retries": 0,
            "request_id": "req-77",
        },
    }
    assert consumed["parent_id"] == produced["span_id"]
    assert trace_tree(p.spans, trace_id) == [
        ("enqueue", [("polydatum.context", [("polydatum.context", [])])])
    ]
    assert strays(p, trace_id, result.id) == []


def test_with_celery_instrumentation_in_the_worker_only_the_context_nests_under_run(
    instrumented_worker: Worker,
) -> None:
    """The producer has no opentelemetry-instrumentation-celery, the worker has: its
    CONSUMER ``run/<task>`` span continues the producer's trace from polydatum's
    ``traceparent`` and the task's context is its child. One trace, no stray span."""
    with producer(instrumented_worker, instrument=False) as p:
        result, trace_id = enqueue(p, "lookup", 1)
        assert result.get(timeout=20)["title"] == "Dune"
        wait_spans(p, trace_id, "run/polydatum_test.lookup", 1)
    assert trace_tree(p.spans, trace_id) == [
        (
            "enqueue",
            [
                (
                    "polydatum.context",
                    [
                        (
                            "run/polydatum_test.lookup",
                            [
                                (
                                    "polydatum.context",
                                    [
                                        ("books.get", [("polydatum.resource.setup shelf", [])]),
                                        ("polydatum.resource.teardown shelf", []),
                                    ],
                                )
                            ],
                        )
                    ],
                )
            ],
        )
    ]
    run = one_span(p, trace_id, "run/polydatum_test.lookup", "worker")
    produced = one_span(p, trace_id, "polydatum.context", "producer")
    consumed = one_span(p, trace_id, "polydatum.context", "worker")
    assert (run["kind"], run["parent_id"]) == ("CONSUMER", produced["span_id"])
    assert consumed["parent_id"] == run["span_id"]
    assert strays(p, trace_id, result.id) == []


def test_with_celery_instrumentation_in_the_producer_only_the_context_nests_under_it(
    plain_worker: Worker,
) -> None:
    """The producer has opentelemetry-instrumentation-celery, the worker has not: the
    worker's context is the child of the PRODUCER ``apply_async/<task>`` span."""
    with producer(plain_worker, instrument=True) as p:
        result, trace_id = enqueue(p, "lookup", 2)
        assert result.get(timeout=20)["title"] == "Emma"
        wait_for(
            lambda: len(spans_named(p.spans, trace_id, "polydatum.context")) == 2,
            "the worker's context span",
        )
    assert trace_tree(p.spans, trace_id) == [
        (
            "enqueue",
            [
                (
                    "polydatum.context",
                    [
                        (
                            "apply_async/polydatum_test.lookup",
                            [
                                (
                                    "polydatum.context",
                                    [
                                        ("books.get", [("polydatum.resource.setup shelf", [])]),
                                        ("polydatum.resource.teardown shelf", []),
                                    ],
                                )
                            ],
                        )
                    ],
                )
            ],
        )
    ]
    publish = one_span(p, trace_id, "apply_async/polydatum_test.lookup", "producer")
    consumed = one_span(p, trace_id, "polydatum.context", "worker")
    assert (publish["kind"], consumed["parent_id"]) == ("PRODUCER", publish["span_id"])
    assert strays(p, trace_id, result.id) == []


def test_the_deprecated_polydatum_trace_header_is_still_read(plain_worker: Worker) -> None:
    """A message of the previous version (trace context only in ``polydatum_trace``):
    the worker's context continues that trace, as a child of the span it names."""
    trace_id, span_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    legacy = {"polydatum_trace": {"traceparent": f"00-{trace_id}-{span_id}-01"}}
    with producer(plain_worker, instrument=False) as p:
        result = p.tasks["received"].apply_async(headers=legacy)  # no span, no context
        value = result.get(timeout=20)
        wait_for(
            lambda: len(spans_named(p.spans, trace_id, "polydatum.context")) == 1,
            "the worker's context span",
        )
    assert value == {
        "traceparent": None,
        "polydatum_trace": legacy["polydatum_trace"],
        "meta": {"task": "polydatum_test.received", "task_id": result.id, "retries": 0},
    }
    consumed = one_span(p, trace_id, "polydatum.context", "worker")
    assert consumed["parent_id"] == span_id
    assert trace_tree(p.spans, trace_id) == [("polydatum.context", [])]
    assert strays(p, trace_id, result.id) == []


# ------------------------------------------------------------------- propagate_meta


def received_meta(result: Any) -> dict[str, Any]:
    meta: dict[str, Any] = result.get(timeout=20)["meta"]
    assert meta.pop("task_id") == result.id
    return meta


def test_propagate_meta_travels_from_any_data_managers_sync_context(
    plain_worker: Worker,
) -> None:
    """The app's ``propagate_meta`` (``request_id``, ``tenant``) decides, whichever
    DataManager's context is active at publish time: the app's own, another one (a web
    app's), by task or by name (``send_task``); unlisted keys stay behind; explicit
    ``polydatum_meta`` headers win over the context's values."""
    meta = {"request_id": "req-5", "tenant": "acme", "user_email": "ann@example.com"}
    web_dm = DataManager()
    with producer(plain_worker, instrument=False) as p:
        task = p.tasks["received"]
        with p.dm.context(meta):
            own = task.apply_async()
            by_name = p.app.send_task("polydatum_test.received")
        with web_dm.context(meta):
            other = task.apply_async()
            explicit = task.apply_async(headers={"polydatum_meta": {"tenant": "globex"}})
        outside = task.apply_async()
        values = [received_meta(r) for r in (own, by_name, other, explicit, outside)]
    travelled = {"task": "polydatum_test.received", "retries": 0, "request_id": "req-5"}
    assert values == [
        {**travelled, "tenant": "acme"},
        {**travelled, "tenant": "acme"},
        {**travelled, "tenant": "acme"},
        {**travelled, "tenant": "globex"},
        {"task": "polydatum_test.received", "retries": 0},
    ]


def test_propagate_meta_travels_from_async_contexts(plain_worker: Worker) -> None:
    """A producer inside ``async with`` a context of an async DataManager (an
    async-generator middleware): published from the coroutine itself, and from
    ``asyncio.to_thread`` (which copies the context)."""

    async def guard(ctx: Any) -> AsyncIterator[None]:
        yield

    web_dm = DataManager()
    web_dm.register_context_middleware(guard)
    meta = {"request_id": "req-6", "tenant": "initech", "session": "s3cr3t"}
    with producer(plain_worker, instrument=False) as p:
        task = p.tasks["received"]

        async def publish() -> tuple[Any, Any]:
            async with web_dm.context(meta):
                direct = task.apply_async()
                threaded = await asyncio.to_thread(task.apply_async)
            return direct, threaded

        results = asyncio.run(publish())
        values = [received_meta(r) for r in results]
    expected = {
        "task": "polydatum_test.received",
        "retries": 0,
        "request_id": "req-6",
        "tenant": "initech",
    }
    assert values == [expected, expected]


# ----------------------------------------------------- a DataManager with async parts


@contextmanager
def database(kind: str, directory: Path) -> Iterator[str]:
    """A fresh database with the async app's tables: a SQLite file in ``directory``, or
    a new schema on the PostgreSQL server (dropped afterwards). Yields its URL."""
    if kind == "sqlite":
        url = f"sqlite:///{directory / 'app.db'}"
        create_tables(url)
        yield url
        return
    require_service("PostgreSQL", "127.0.0.1", 5432)
    schema = f"pd_celery_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        try:
            url = postgres_schema_url(POSTGRES_URL, schema)
            create_tables(url)
            yield url
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    finally:
        admin.dispose()


def create_tables(url: str) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            for statement in async_app.SCHEMA:
                conn.execute(text(statement))
    finally:
        engine.dispose()


def read_notes(url: str, keys: list[str]) -> list[tuple[str, int]]:
    """The ``(key, attempt)`` rows of ``keys``, read with a fresh engine."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT key, attempt FROM notes WHERE key IN :keys ORDER BY key").bindparams(
                    bindparam("keys", expanding=True)
                ),
                {"keys": keys},
            )
            return [(key, attempt) for key, attempt in rows]
    finally:
        engine.dispose()


class AsyncWorker(NamedTuple):
    worker: Worker
    backend: str
    url: str


@contextmanager
def async_celery_worker(
    kind: str, directory: Path, instrument: bool, pool: tuple[str, ...] = ("-P", "solo")
) -> Iterator[AsyncWorker]:
    """A real worker of ``tests._celery_async_app`` on a fresh database of ``kind``."""
    directory.mkdir(parents=True, exist_ok=True)
    with database(kind, directory) as url:
        with celery_worker(
            directory,
            instrument,
            app="tests._celery_async_app",
            pool=pool,
            env={"POLYDATUM_CELERY_DB_URL": url},
        ) as worker:
            yield AsyncWorker(worker, kind, url)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def async_worker(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AsyncWorker]:
    """An instrumented solo worker whose DataManager needs an async context."""
    directory = tmp_path_factory.mktemp(f"celery-async-{request.param}")
    with async_celery_worker(request.param, directory, instrument=True) as running:
        yield running
    assert running.worker.process.returncode == 0, running.worker.output()


@contextmanager
def async_producer(running: AsyncWorker) -> Iterator[Producer]:
    with producer(running.worker, False, async_app.build, db_url=running.url) as p:
        yield p


def outcome(result: Any) -> tuple[str, Any]:
    """A finished task's state and its result (or its exception's type and message)."""
    try:
        value = result.get(timeout=20)
    except Exception as error:
        return result.state, (type(error), str(error))
    return result.state, value


def commit_refused(backend: str) -> str:
    reason = {
        "sqlite": "IntegrityError: FOREIGN KEY constraint failed",
        "postgresql": 'ForeignKeyViolation: insert or update on table "notes" violates '
        'foreign key constraint "notes_parent_id_fkey"',
    }[backend]
    return (
        f"the context's work was not committed: the database refused the COMMIT "
        f"({reason}); the transaction was rolled back"
    )


def test_async_data_manager_task_outcomes_are_its_contexts(async_worker: AsyncWorker) -> None:
    """``async def`` bodies on an AsyncSQLResource: success commits; a raise, a failed
    COMMIT (deferred foreign key) roll back and fail the task with their error; a Retry
    rolls back the first attempt and the second commits; a sync body runs too."""
    keys = [f"{name}-{uuid.uuid4().hex[:8]}" for name in ("ok", "raise", "orphan", "retry")]
    with async_producer(async_worker) as p:
        results = [
            p.tasks[name].apply_async((key,))
            for name, key in zip(
                ("add", "add_then_fail", "add_orphan", "add_retried"), keys, strict=True
            )
        ]
        sync = p.tasks["sync_body"].apply_async()
        outcomes = [outcome(r) for r in (*results, sync)]
    assert outcomes == [
        ("SUCCESS", {"task": "polydatum_async.add", "task_id": results[0].id, "retries": 0}),
        ("FAILURE", (ValueError, f"note {keys[1]} was rejected")),
        ("FAILURE", (CommitError, commit_refused(async_worker.backend))),
        ("SUCCESS", 1),
        (
            "SUCCESS",
            {
                "label": "notes",
                "loop": outcomes[4][1]["loop"],
                "pid": async_worker.worker.process.pid,
                "meta": {"task": "polydatum_async.sync_body", "task_id": sync.id, "retries": 0},
            },
        ),
    ]
    assert read_notes(async_worker.url, keys) == sorted([(keys[0], 0), (keys[3], 1)])


def test_async_tasks_share_one_event_loop_and_one_pooled_connection(
    async_worker: AsyncWorker,
) -> None:
    """Thirty tasks in a row: one event loop (the worker thread's, kept between tasks)
    and one pooled connection (one PostgreSQL backend) -- a loop per task would break
    the pool's connections; sync bodies run on that loop too."""
    with async_producer(async_worker) as p:
        results = [p.tasks["identity"].apply_async() for _ in range(30)]
        sync = [p.tasks["sync_body"].apply_async() for _ in range(3)]
        identities = [r.get(timeout=20) for r in results]
        sync_loops = {r.get(timeout=20)["loop"] for r in sync}
    seen = {(i["pid"], i["loop"], i["connection"], i["backend_pid"] is None) for i in identities}
    ((pid, loop, _, no_backend),) = seen
    assert (pid, no_backend) == (async_worker.worker.process.pid, async_worker.backend == "sqlite")
    assert sync_loops == {loop}
    if async_worker.backend == "postgresql":
        assert len({i["backend_pid"] for i in identities}) == 1


def test_async_task_span_tree(async_worker: AsyncWorker) -> None:
    """The async context nests under the worker's ``run/<task>`` span, its async
    middleware, service and resource spans under it; a retry published from inside the
    first attempt's context nests there."""
    with async_producer(async_worker) as p:
        plain = DataManager(tracer_provider=p.cap.tracer_provider)
        key = f"tree-{uuid.uuid4().hex[:8]}"
        result, trace_id = enqueue(p, "add_retried", key, dm=plain)
        assert result.get(timeout=20) == 1
        wait_spans(p, trace_id, "run/polydatum_async.add_retried", 2)
    attempt: list[tuple[str, list[Any]]] = [
        ("polydatum.middleware.setup tenant_guard", []),
        ("notes.add", [("polydatum.resource.setup db", [])]),
    ]
    ending: list[tuple[str, list[Any]]] = [
        ("polydatum.middleware.teardown tenant_guard", []),
        ("polydatum.resource.teardown db", []),
    ]
    assert trace_tree(p.spans, trace_id) == [
        (
            "enqueue",
            [
                (
                    "polydatum.context",
                    [
                        (
                            "run/polydatum_async.add_retried",
                            [
                                (
                                    "polydatum.context",
                                    [
                                        *attempt,
                                        (
                                            "apply_async/polydatum_async.add_retried",
                                            [
                                                (
                                                    "run/polydatum_async.add_retried",
                                                    [("polydatum.context", [*attempt, *ending])],
                                                )
                                            ],
                                        ),
                                        *ending,
                                    ],
                                )
                            ],
                        )
                    ],
                )
            ],
        )
    ]
    contexts = spans_named(p.spans, trace_id, "polydatum.context")
    assert _context_summary(contexts) == [
        (0, "ERROR", "celery.exceptions.Retry", None),
        (1, "UNSET", None, None),
    ]
    assert strays(p, trace_id, result.id) == []


POOLS = {
    "solo": ("-P", "solo"),
    "prefork": ("-P", "prefork", "-c", "2"),
    "threads-1": ("-P", "threads", "-c", "1"),
}


@pytest.mark.parametrize("pool", list(POOLS))
@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_each_pool_runs_an_async_data_manager_on_one_loop_per_process(
    kind: str, pool: str, tmp_path: Path
) -> None:
    """solo, prefork (two children) and threads with one thread: in each process one
    event loop and one pooled connection for every task; at warm shutdown every process
    disposes its resources, an async ``dispose()`` on the loop its tasks ran on."""
    with async_celery_worker(kind, tmp_path, instrument=False, pool=POOLS[pool]) as running:
        with async_producer(running) as p:
            results = [p.tasks["identity"].apply_async() for _ in range(16)]
            sync = [p.tasks["sync_body"].apply_async() for _ in range(4)]
            identities = [r.get(timeout=20) for r in results]
            sync_runs = [r.get(timeout=20) for r in sync]
        stop_worker(running.worker)
        output = running.worker.output()
        parent = running.worker.process.pid
        assert running.worker.process.returncode == 0, output
    loops: dict[int, set[tuple[int, int]]] = {}
    for i in identities:
        loops.setdefault(i["pid"], set()).add((i["loop"], i["connection"]))
    assert all(len(found) == 1 for found in loops.values()), loops
    if pool == "prefork":
        assert parent not in loops  # tasks run in the children
    else:
        assert set(loops) == {parent}
    assert {(s["pid"], s["loop"]) for s in sync_runs} <= {
        (pid, loop) for pid, found in loops.items() for loop, _ in found
    }
    disposed = {
        record["pid"]: record["loop"]
        for record in (json.loads(f.read_text()) for f in tmp_path.glob("disposed-*"))
    }
    assert {pid: disposed.get(pid) for pid in loops} == {
        pid: loop for pid, found in loops.items() for loop, _ in found
    }
    assert parent in disposed  # the main process disposes at worker_shutdown
    assert "dispose_failed" not in output and "Traceback" not in output, output


def test_worker_refuses_an_async_data_manager_on_a_threads_pool(tmp_path: Path) -> None:
    """Four threads, four event loops, one AsyncEngine pool: unrunnable. The worker
    exits before taking a task, listing that together with the registration's problem."""
    url = f"sqlite:///{tmp_path / 'app.db'}"
    pool = ("-P", "threads", "-c", "4")
    with celery_worker(
        tmp_path,
        instrument=False,
        broken=True,
        app="tests._celery_async_app",
        pool=pool,
        env={"POLYDATUM_CELERY_DB_URL": url},
    ) as worker:
        returncode = worker.process.wait(30)
    output = worker.output()
    assert returncode == 1, output
    assert (
        "polydatum: the worker cannot start: 2 problem(s) in the DataManager registration:\n"
        "  - resource 'meta' collides with DataAccessContext.meta: ctx.meta returns the "
        "attribute, not the resource; rename it\n"
        "  - the worker pool is threads with concurrency 4, which cannot run this "
        "DataManager: it needs an async context (context middleware 'tenant_guard' is an "
        "async generator; resource 'db' is an async generator; resource 'probe' is an "
        "async generator; service method(s) notes.add, notes.identity are `async def`), "
        "and each thread would run its own event loop, but async connection pools (an "
        "AsyncEngine's) cannot be shared between loops; use --pool prefork (one event "
        "loop per process), --pool solo or --concurrency 1\n" in output
    ), output
    assert "polydatum.worker.invalid_data_manager" in output
    assert not (tmp_path / "ready").exists()


def test_an_async_task_called_from_a_running_loop() -> None:
    """No worker here: from code already running an event loop, a task applied eagerly
    cannot run the thread's loop and fails saying why; called directly inside an active
    ``async with`` context, it reuses that context and returns its coroutine."""
    from celery import Celery

    from polydatum.integrations.celery import PolydatumTask, init_celery

    async def guard(ctx: Any) -> AsyncIterator[None]:
        yield

    dm = DataManager()
    dm.register_context_middleware(guard)
    app = Celery("polydatum_eager", broker="memory://", task_cls=PolydatumTask)
    app.conf.task_always_eager = True
    init_celery(app, dm)

    @app.task(bind=True, shared=False, name="polydatum_eager.whoami")
    async def whoami(self: Any) -> dict[str, Any]:
        return dict(self.context.meta.items())

    async def main() -> tuple[Any, Any]:
        applied = whoami.apply(task_id="t-9")
        async with dm.context({"request_id": "req-1"}):
            direct = await whoami()
        return applied, direct

    try:
        applied, direct = asyncio.run(main())
    finally:
        app.close()
    assert (applied.state, type(applied.result), str(applied.result)) == (
        "FAILURE",
        RuntimeError,
        "task 'polydatum_eager.whoami' runs its polydatum context on the thread's event "
        "loop, but this thread is already running one (a task applied eagerly or called "
        "from async code?): run it in a worker, or await the body inside your own "
        "`async with dm.context()`",
    )
    assert direct == {"request_id": "req-1"}
