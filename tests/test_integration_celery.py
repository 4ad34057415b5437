"""Celery integration against the real RabbitMQ broker and Redis result backend, with a
real worker process. Producer (this process) and worker write spans to one JSON-lines
file; the tests rebuild the cross-process span tree from it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from polydatum.testing import TelemetryCapture
from tests._celery_app import JsonLinesExporter, build
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
def celery_worker(directory: Path, instrument: bool, broken: bool = False) -> Iterator[Worker]:
    """A real ``celery worker`` (solo pool) on a fresh, auto-deleted queue; stopped with
    SIGTERM (warm shutdown) when the block ends."""
    require_service("RabbitMQ", "127.0.0.1", 5672)
    require_service("Redis", "127.0.0.1", 6379)
    directory.mkdir(parents=True, exist_ok=True)
    queue = f"polydatum-test-{uuid.uuid4().hex[:12]}"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "POLYDATUM_CELERY_DIR": str(directory),
        "POLYDATUM_CELERY_QUEUE": queue,
        "POLYDATUM_CELERY_INSTRUMENT": "1" if instrument else "0",
        "POLYDATUM_CELERY_BROKEN": "1" if broken else "0",
    }
    command = [sys.executable, "-m", "celery", "-A", "tests._celery_app", "worker"]
    command += ["-P", "solo", "-Q", queue, "-n", f"{queue}@localhost", "-l", "warning"]
    command += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    with open(directory / "worker.log", "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log)
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
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
                raise AssertionError("the worker ignored SIGTERM:\n" + worker.output()) from None


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


@contextmanager
def producer(worker: Worker, instrument: bool) -> Iterator[Producer]:
    """This process as the producer: same app, spans to the worker's span file."""
    with TelemetryCapture() as cap:
        spans = worker.directory / "spans.jsonl"
        cap.tracer_provider.add_span_processor(
            SimpleSpanProcessor(JsonLinesExporter(spans, "producer"))
        )
        app, dm, tasks = build(worker.queue, cap.tracer_provider)
        instrumentor = None
        if instrument:
            from opentelemetry.instrumentation.celery import CeleryInstrumentor

            instrumentor = CeleryInstrumentor()
            instrumentor.instrument(tracer_provider=cap.tracer_provider)
        try:
            yield Producer(cap, tasks, dm, spans)
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


def enqueue(p: Producer, task: str, *args: Any, **options: Any) -> tuple[Any, str]:
    """Publish ``task`` from inside a test span and a producer-side polydatum context."""
    tracer = p.cap.tracer_provider.get_tracer("test")
    with tracer.start_as_current_span("enqueue") as span:
        with p.dm.context({"request_id": "req-77"}):
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
    attempt = [("books.get", [("polydatum.resource.setup shelf", [])])]
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
    """No opentelemetry-instrumentation-celery anywhere: polydatum's own
    ``polydatum_trace`` header makes the task's context join the producer's trace."""
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
    assert [s["process"] for s in spans_named(p.spans, trace_id, "polydatum.context")] == [
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
